"""`pagedserve bench hf`: the same random workload through Hugging Face Transformers on the same card.

Two modes, as a Transformers user would run them:
- `generate`: static batches, left-padded, each batch runs until its longest requested output;
  only the requested output tokens count as output.
- `generate_batch`: Transformers' own continuous batching (attn_implementation="paged|sdpa"), where
  the installed version has it.

`bench throughput --compare-hf` calls `run` on its own requests; `bench hf` (`run_hf_bench`) draws the
same random workload from the same flags and seed, so the two commands' numbers compare.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import TYPE_CHECKING

from pagedserve.bench.common import finish
from pagedserve.bench.datasets import BenchRequest, parse_range, random_requests

if TYPE_CHECKING:  # torch loads when a Transformers run starts, not when the CLI registers `bench`
    import torch

logger = logging.getLogger(__name__)


def load_hf_model(model_path: str, dummy: bool, device: torch.device, dtype: torch.dtype,
                  attn_implementation: str | None = None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    if dummy:
        config = AutoConfig.from_pretrained(model_path)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, **kwargs).to(device)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def decoding_kwargs(temperature: float) -> dict:
    """Transformers' generate arguments for the decoding our engine runs: greedy at temperature 0, else
    plain sampling at that temperature (no top-k/top-p, which Transformers would otherwise add: top_k=50)."""
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def describe_decoding(temperature: float) -> str:
    return "greedy" if temperature <= 0 else f"sampling at temperature {temperature:g}"


def run_generate(model, requests: list[BenchRequest], batch_size: int, device: torch.device,
                 pad_token_id: int, temperature: float = 0.0) -> float:
    """Static left-padded batches; returns elapsed seconds."""
    import torch

    with torch.no_grad():
        return _run_generate(model, requests, batch_size, device, pad_token_id, temperature)


def _run_generate(model, requests: list[BenchRequest], batch_size: int, device: torch.device,
                  pad_token_id: int, temperature: float) -> float:
    import torch

    _sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids):] = 1
        new = max(r.output_len for r in batch)
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                       min_new_tokens=new, pad_token_id=pad_token_id, **decoding_kwargs(temperature))
    _sync(device)
    return time.perf_counter() - t0


def run_generate_batch(model, requests: list[BenchRequest], device: torch.device,
                       max_batch_tokens: int = 8192, temperature: float = 0.0) -> float | None:
    """Transformers' continuous batching; None where the installed version lacks it."""
    import torch
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return None
    new = max(r.output_len for r in requests)
    config = GenerationConfig(max_new_tokens=new, eos_token_id=None, pad_token_id=0, **decoding_kwargs(temperature))
    try:
        config.max_batch_tokens = max_batch_tokens
    except AttributeError:
        pass
    inputs = [r.prompt_token_ids for r in requests]
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate_batch(inputs=inputs, generation_config=config)
    _sync(device)
    return time.perf_counter() - t0


def run(args: argparse.Namespace, requests: list[BenchRequest], model_path: str, device: torch.device,
        dtype: torch.dtype, elapsed_s: dict[str, float] | None = None) -> dict:
    """Runs the requested Transformers modes; returns {mode: output tok/s} (and fills elapsed_s, if
    given, with {mode: seconds})."""
    import torch

    from pagedserve.gc_control import freeze_startup_objects, unfreeze_and_collect

    elapsed_s = {} if elapsed_s is None else elapsed_s
    num_out = sum(r.output_len for r in requests)
    temperature = float(getattr(args, "temperature", 0.0))  # the engine's decoding, on both sides
    results: dict[str, float] = {}
    dummy = args.load_format == "dummy"
    if "generate" in args.hf_modes:
        model = load_hf_model(model_path, dummy, device, dtype)
        warm = requests[:2]
        run_generate(model, [BenchRequest(r.prompt_token_ids[:32], 4) for r in warm], 2, device, 0, temperature)
        freeze_startup_objects("transformers generate")  # as our engine's run: the same GC treatment
        for bs in args.hf_batch_sizes:
            elapsed = run_generate(model, requests, bs, device, pad_token_id=0, temperature=temperature)
            results[f"generate_bs{bs}"] = num_out / elapsed
            elapsed_s[f"generate_bs{bs}"] = elapsed
            print(f"transformers generate, static batches of {bs}, {describe_decoding(temperature)}: "
                  f"{num_out / elapsed:.1f} output tok/s ({elapsed:.1f} s)", flush=True)
        del model
        unfreeze_and_collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "generate_batch" in args.hf_modes:
        model = load_hf_model(model_path, dummy, device, dtype, attn_implementation="paged|sdpa")
        freeze_startup_objects("transformers generate_batch")
        elapsed = run_generate_batch(model, requests, device, temperature=temperature)
        if elapsed is not None:
            results["generate_batch"] = num_out / elapsed
            elapsed_s["generate_batch"] = elapsed
            print(f"transformers generate_batch (paged|sdpa), {describe_decoding(temperature)}: "
                  f"{num_out / elapsed:.1f} output tok/s "
                  f"({elapsed:.1f} s)", flush=True)
        del model
        unfreeze_and_collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-modes", nargs="+", default=["generate", "generate_batch"],
                   choices=["generate", "generate_batch"], help="Transformers modes to run")
    p.add_argument("--hf-batch-sizes", nargs="+", type=int, default=[256],
                   help="static batch sizes for Transformers' generate")


def run_hf_bench(args: argparse.Namespace) -> dict:
    """`pagedserve bench hf`: resolves model, device and dtype as the engine does, draws the random
    workload as `bench throughput` draws it, runs the Transformers modes, prints and writes JSON."""
    import torch
    from transformers import AutoConfig

    from pagedserve.entrypoints.args import config_from_args
    from pagedserve.executor.worker import resolve_device, resolve_dtype, resolve_model

    config = config_from_args(args)
    device = resolve_device(config)
    dtype = resolve_dtype(config, device)
    model_path, _, gguf_file = resolve_model(config)
    if gguf_file is not None:
        raise ValueError(f"bench hf loads Hugging Face folders (config.json + safetensors), not GGUF "
                         f"({gguf_file}); pass a folder or a Hub id with --model")
    torch.manual_seed(args.seed)
    vocab_size = int(AutoConfig.from_pretrained(model_path).vocab_size)
    requests = random_requests(args.num_prompts, parse_range(args.input_len), parse_range(args.output_len),
                               vocab_size, seed=args.dataset_seed)
    num_in = sum(len(r.prompt_token_ids) for r in requests)
    num_out = sum(r.output_len for r in requests)
    elapsed: dict[str, float] = {}
    tok_per_s = run(args, requests, model_path, device, dtype, elapsed)
    modes = {mode: {"output_tok_per_s": tps, "total_tok_per_s": (num_in + num_out) / elapsed[mode],
                    "requests_per_s": len(requests) / elapsed[mode], "elapsed_s": elapsed[mode]}
             for mode, tps in tok_per_s.items()}
    best = max(tok_per_s, key=tok_per_s.get) if tok_per_s else None
    result = {
        "bench": "hf", "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": model_path, "dtype": str(dtype).removeprefix("torch."), "load_format": args.load_format,
        "num_prompts": len(requests), "input_tokens": num_in, "output_tokens": num_out, "modes": modes,
        "best_mode": best, "best_output_tok_per_s": tok_per_s[best] if best else None,
        "decoding": describe_decoding(float(args.temperature)),
    }
    finish(result, args)
    if best:
        print(f"transformers best: {best}, {tok_per_s[best]:.1f} output tok/s")
    else:
        print("transformers: no mode ran (generate_batch needs a transformers version that has it)")
    return result


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """`bench hf` flags: the workload flags of `bench throughput` (same defaults), the modes, JSON."""
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", default="100-1024", help="N or LO-HI (uniform)")
    p.add_argument("--output-len", default="100-1024", help="N or LO-HI (uniform); every token is generated")
    p.add_argument("--dataset-seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; above 0: plain sampling at that temperature (no top-k/top-p)")
    p.add_argument("--output-json", default=None, help="write the results to this JSON file")
    add_args(p)
