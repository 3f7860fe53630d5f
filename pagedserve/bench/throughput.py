"""`pagedserve bench throughput`: offline throughput on a random dataset, against the card's floor."""

from __future__ import annotations

import argparse
import time

from pagedserve.bench.common import (
    build_llm,
    card_ceilings,
    finish,
    fp8_ceiling,
    model_shape,
    spec_decode_delta,
    spec_decode_line,
)
from pagedserve.bench.datasets import FILE_DATASETS, file_requests, parse_range, random_requests
from pagedserve.bench.lora import add_lora_args, prepare_lora_args, random_adapters
from pagedserve.bench.roofline import workload_floor
from pagedserve.gc_control import GcMonitor, freeze_startup_objects, unfreeze_and_collect


def run(args: argparse.Namespace) -> dict:
    from pagedserve.sampling_params import SamplingParams

    sampling = {"top_p": float(getattr(args, "top_p", 1.0)), "top_k": int(getattr(args, "top_k", 0)),
                "min_p": float(getattr(args, "min_p", 0.0)),
                "repetition_penalty": float(getattr(args, "repetition_penalty", 1.0)),
                "frequency_penalty": float(getattr(args, "frequency_penalty", 0.0)),
                "presence_penalty": float(getattr(args, "presence_penalty", 0.0))}
    plain = SamplingParams()
    if args.compare_hf and any(v != getattr(plain, k) for k, v in sampling.items()):
        raise ValueError("--top-p / --top-k / --min-p and the penalties are for our side only; --compare-hf runs "
                         "both sides with none of them")
    prepare_lora_args(args)
    args.output_len_given = args.output_len is not None
    if args.output_len is None:
        args.output_len = "100-1024"
    llm, startup_s = build_llm(args)
    engine = llm.engine
    loras = random_adapters(engine.worker.hf_config, args.num_loras, args.lora_rank) if args.num_loras else [None]
    if args.num_loras and args.compare_hf:
        raise ValueError("--num-loras is for our side only; --compare-hf runs both sides without adapters")
    requests = _requests(args, engine)
    params = [SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=args.temperature, seed=None,
                             **sampling) for r in requests]
    # Warm-up outside the timed region: a small workload drawn from the same length ranges, so the
    # Triton kernels compile every variant the run needs (tile sizes follow the query lengths; mixed
    # and decode-only steps; split-K counts). First compiles cost seconds each on a fresh machine.
    warm_len = (min(len(r.prompt_token_ids) for r in requests), max(len(r.prompt_token_ids) for r in requests))
    warm = random_requests(min(32, args.num_prompts), warm_len, (8, 8), engine.vocab_size, seed=args.dataset_seed + 1)
    t_warm = time.perf_counter()
    llm.generate([r.prompt_token_ids for r in warm], SamplingParams(max_tokens=8, ignore_eos=True),
                 use_tqdm=False, lora_request=[loras[i % len(loras)] for i in range(len(warm))])
    warmup_s = time.perf_counter() - t_warm
    engine.step_timing.totals.clear()
    freeze_startup_objects("bench throughput")  # as the server's engine process does after start-up
    gc_monitor = GcMonitor().start()
    spec_before = engine.get_stats().get("spec_decode")
    from pagedserve.engine import KVOccupancy

    engine.kv_occupancy = KVOccupancy(engine.worker.num_kv_blocks * engine.config.block_size)
    try:
        t0 = time.perf_counter()
        outputs = llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=not args.no_tqdm,
                               lora_request=[loras[i % len(loras)] for i in range(len(requests))])
        elapsed = time.perf_counter() - t0
    finally:
        gc_monitor.stop()
        kv_use = engine.kv_occupancy.summary()
        engine.kv_occupancy = None
        unfreeze_and_collect()  # frozen for the timed run only: the engine's cycles are found when it goes
    num_in = sum(len(r.prompt_token_ids) for r in requests)
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    reserve = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    kv_groups = 1 + engine.scheduler.kv_cache.num_window_groups  # a hybrid layout: the full group + window groups
    expected_out = sum(r.output_len for r in requests)
    if num_out != expected_out:
        raise RuntimeError(f"generated {num_out} tokens, expected {expected_out} (ignore_eos is set)")
    step_summary = engine.step_timing.summary()
    bandwidth, flops, card = card_ceilings(args, engine.worker.device.type)
    fp8_flops = fp8_ceiling(args, engine.worker.device.type)
    result = {
        "bench": "throughput",
        "card": card,
        "dataset": getattr(args, "dataset", "random"),
        "num_prompts": len(requests),
        "input_tokens": num_in,
        "output_tokens": num_out,
        "elapsed_s": elapsed,
        "requests_per_s": len(requests) / elapsed,
        "output_tok_per_s": num_out / elapsed,
        "total_tok_per_s": (num_in + num_out) / elapsed,
        "startup_s": startup_s,
        "sampling": {"temperature": args.temperature, **sampling},
        "num_loras": args.num_loras, "lora_rank": args.lora_rank if args.num_loras else None,
        "num_preemptions": engine.get_stats()["num_preemptions"],
        "kv_blocks": engine.worker.num_kv_blocks,
        "kv_cache": kv_use and {
            **kv_use, "block_size": engine.config.block_size, "kv_groups": kv_groups,
            # what a contiguous cache (one region a request, sized for the workload's longest, in every layer:
            # Transformers' static batches, or pre-paging servers) would hold at once in the same memory; a hybrid
            # layout's slot holds one group's layers, so such a region takes kv_groups slots a token
            "contiguous_reserve_tokens": reserve,
            "contiguous_max_running": kv_use["total_slots"] // (reserve * kv_groups),
        },
        "step_timing": step_summary,
        "warmup_s": warmup_s,
        "spec_decode": spec_decode_delta(engine, spec_before),
        **gc_monitor.summary(),
    }
    shape = model_shape(llm)
    if bandwidth and flops and (fp8_flops or not shape.fp8_params):
        floor_s, prefill_s = workload_floor(shape, [len(r.prompt_token_ids) for r in requests],
                                            [r.output_len for r in requests], bandwidth, flops, fp8_flops)
        result.update({
            "peak_bandwidth": bandwidth, "peak_flops": flops, "floor_s": floor_s,
            **({"peak_fp8_flops": fp8_flops, "quantization": "fp8"} if shape.fp8_params else {}),
            "floor_prefill_s": prefill_s, "floor_output_tok_per_s": num_out / floor_s,
            "pct_of_floor": 100.0 * floor_s / elapsed,
        })
    finish(result, args)
    line = (f"throughput: {result['requests_per_s']:.2f} req/s, {result['output_tok_per_s']:.1f} output tok/s, "
            f"{result['total_tok_per_s']:.1f} total tok/s ({num_out} output tokens in {elapsed:.2f} s, "
            f"{result['num_preemptions']} preemptions)")
    print(line)
    print(f"steps: {step_summary} (warm-up before the run: {warmup_s:.1f} s)")
    if kv_use:
        kv = result["kv_cache"]
        groups = f", {kv_groups} groups of layers (hybrid layout)" if kv_groups > 1 else ""
        print(f"KV cache: {kv['total_slots']:,} token slots ({engine.worker.num_kv_blocks:,} blocks of "
              f"{kv['block_size']}{groups}); in use {kv['mean_used_pct']:.1f}% of them on average over the steps, "
              f"{kv['peak_used_pct']:.1f}% at peak; of the slots in use {kv['empty_pct']:.2f}% held no token "
              f"(worst step {kv['worst_step_empty_pct']:.2f}%); requests at once {kv['mean_running']:.1f} on average, "
              f"{kv['peak_running']} at peak, where a contiguous cache reserving {kv['contiguous_reserve_tokens']:,} "
              f"tokens a request would hold {kv['contiguous_max_running']:,}")
    print(gc_monitor.line())
    if result["spec_decode"] is not None:
        print(spec_decode_line(result["spec_decode"]))
    if args.compare_hf:
        del engine, outputs  # the engine (weights, KV cache, graphs) must go before Transformers loads
        _compare_hf(args, llm, requests, result)
    if "floor_s" in result:
        rates = f"{flops / 1e12:.0f}" + (f", fp8 {fp8_flops / 1e12:.0f}" if shape.fp8_params else "")
        print(f"floor on {card} ({bandwidth / 1e12:.2f} TB/s, {rates} TFLOP/s): {result['floor_s']:.2f} s "
              f"= {result['floor_output_tok_per_s']:.0f} output tok/s; reached {result['pct_of_floor']:.1f}% of floor")
    return result


def _requests(args: argparse.Namespace, engine) -> list:
    """The random dataset, or --dataset sharegpt / custom read from --dataset-path (with --output-len N: every
    request's output length)."""
    if getattr(args, "dataset", "random") == "random":
        return random_requests(args.num_prompts, parse_range(args.input_len), parse_range(args.output_len),
                               engine.vocab_size, seed=args.dataset_seed)
    if not args.dataset_path:
        raise ValueError(f"--dataset {args.dataset} needs --dataset-path")
    fixed = args.output_len if args.output_len_given else None
    return file_requests(args.dataset, args.dataset_path, args.num_prompts, engine.tokenizer, args.dataset_seed,
                         output_len=None if fixed is None else _single_length(fixed))


def _single_length(text: str) -> int:
    lo, hi = parse_range(text)
    if lo != hi:
        raise ValueError("with a file dataset --output-len is one length N (every request's), not a range")
    return lo


def _compare_hf(args: argparse.Namespace, llm, requests, result: dict) -> None:
    """Frees our engine, runs the same requests through Transformers on the same card, prints the ratio."""
    import gc

    import torch

    from pagedserve.bench import hf_baseline

    worker = llm.engine.worker
    model_path, device, dtype = worker.config.model, worker.device, worker.dtype
    del worker
    llm.engine = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    hf = hf_baseline.run(args, requests, model_path, device, dtype)
    if hf:
        best_mode = max(hf, key=hf.get)
        result["hf"] = hf
        result["hf_best_mode"] = best_mode
        result["ratio_to_hf"] = result["output_tok_per_s"] / hf[best_mode]
        result["decoding"] = hf_baseline.describe_decoding(args.temperature)
        print(f"pagedserve {result['output_tok_per_s']:.1f} vs transformers {best_mode} {hf[best_mode]:.1f} "
              f"output tok/s, both {result['decoding']}: {result['ratio_to_hf']:.2f}x")
    finish(result, args)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", default="100-1024", help="N or LO-HI (uniform)")
    p.add_argument("--output-len", default=None,
                   help="N or LO-HI (uniform; default 100-1024); ignore_eos is set. With a file dataset: N for every "
                        "request (default: each reply's own length)")
    p.add_argument("--dataset", default="random", choices=["random", *FILE_DATASETS],
                   help="random token ids (--input-len / --output-len), or real text from --dataset-path: sharegpt "
                        "(ShareGPT's JSON of conversations) or custom (JSONL of {\"prompt\": ..., "
                        "\"output_tokens\": N})")
    p.add_argument("--dataset-path", default=None, help="the file of --dataset sharegpt / custom")
    p.add_argument("--dataset-seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for every request (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling for every request (0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling for every request (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="for every request (1: off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="for every request (0: off)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="for every request (0: off)")
    p.add_argument("--no-tqdm", action="store_true")
    add_lora_args(p)
    p.add_argument("--compare-hf", action="store_true",
                   help="also run the workload through Hugging Face Transformers and print the ratio")
    from pagedserve.bench.hf_baseline import add_args as add_hf_args

    add_hf_args(p)
