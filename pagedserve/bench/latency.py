"""`pagedserve bench latency`: one stream (default 128 in, 256 out): time to first token, decode
tok/s, ms per step, achieved GB/s, and % of the weights-over-bandwidth floor."""

from __future__ import annotations

import argparse
import statistics
import time

from pagedserve.bench.common import build_llm, card_ceilings, finish, model_shape, spec_decode_delta, spec_decode_line
from pagedserve.bench.datasets import random_requests
from pagedserve.bench.lora import add_lora_args, prepare_lora_args, random_adapters


def _one_stream(engine, prompt: list[int], output_len: int, request_id: str,
                lora_request=None) -> tuple[float, float, int]:
    from pagedserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    t0 = time.perf_counter()
    engine.add_request(request_id, prompt, params, lora_request=lora_request)
    t_first = None
    num_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            num_tokens = len(out.outputs[0].token_ids)
            if t_first is None and num_tokens:
                t_first = time.perf_counter()
    t_end = time.perf_counter()
    return t_first - t0, t_end - t_first, num_tokens


def _graph_replay_ms(engine, reps: int = 50) -> float | None:
    """Device time of the batch-1 decode graph alone: the step minus all host work."""
    graphs = getattr(engine.worker.runner, "cuda_graphs", None)
    if graphs is None:
        return None
    import torch

    graph = graphs.graphs[graphs.sizes[0]]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def run(args: argparse.Namespace) -> dict:
    prepare_lora_args(args)
    llm, startup_s = build_llm(args)
    engine = llm.engine
    lora = random_adapters(engine.worker.hf_config, 1, args.lora_rank)[0] if args.num_loras else None
    req = random_requests(1, (args.input_len, args.input_len), (args.output_len, args.output_len),
                          engine.vocab_size, seed=args.dataset_seed)[0]
    _one_stream(engine, req.prompt_token_ids, 16, "warmup", lora)
    spec_before = engine.get_stats().get("spec_decode")
    runs = [_one_stream(engine, req.prompt_token_ids, args.output_len, f"run{i}", lora)
            for i in range(args.num_iters)]
    ttft = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    steps = runs[0][2] - 1  # the first token comes from the prefill step
    step_s = decode_s / steps
    graph_ms = _graph_replay_ms(engine)
    shape = model_shape(llm)
    avg_context = args.input_len + args.output_len / 2
    bytes_per_step = shape.step_weight_bytes(1) + shape.kv_tokens([round(avg_context)]) * shape.kv_bytes_per_token
    bandwidth, flops, card = card_ceilings(args, engine.worker.device.type)
    result = {
        "bench": "latency", "card": card, "input_len": args.input_len, "output_len": args.output_len,
        "ttft_ms": ttft * 1e3, "decode_tok_per_s": 1.0 / step_s, "ms_per_step": step_s * 1e3,
        "achieved_gb_per_s": bytes_per_step / step_s / 1e9, "startup_s": startup_s,
        "e2e_s": statistics.median(r[0] + r[1] for r in runs),
        "graph_replay_ms": graph_ms, "lora_rank": args.lora_rank if args.num_loras else None,
        "step_timing": engine.step_timing.summary(),
        "spec_decode": spec_decode_delta(engine, spec_before),
    }
    if bandwidth:
        floor_step = bytes_per_step / bandwidth
        result.update({"peak_bandwidth": bandwidth, "peak_flops": flops,
                       "floor_tok_per_s": 1.0 / floor_step, "pct_of_floor": 100.0 * floor_step / step_s})
    finish(result, args)
    print(f"latency: TTFT {result['ttft_ms']:.1f} ms, decode {result['decode_tok_per_s']:.1f} tok/s "
          f"({result['ms_per_step']:.2f} ms/step, {result['achieved_gb_per_s']:.0f} GB/s), e2e {result['e2e_s']:.2f} s")
    print(f"steps: {result['step_timing']}")
    if result["spec_decode"] is not None:
        print(spec_decode_line(result["spec_decode"]))
    if graph_ms is not None:
        print(f"batch-1 decode graph replay alone (model forward + logits): {graph_ms:.3f} ms")
    if bandwidth:
        print(f"floor on {card} ({bandwidth / 1e12:.2f} TB/s): {result['floor_tok_per_s']:.0f} tok/s; "
              f"reached {result['pct_of_floor']:.1f}% of floor")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--dataset-seed", type=int, default=0)
    add_lora_args(p)  # (latency: one adapter for the stream when --num-loras > 0)
