"""`pagedserve bench hf`: the same random workload through Hugging Face Transformers on the same card.

Two modes, as a Transformers user would run them:
- `generate`: static batches, left-padded, each batch runs until its longest requested output;
  only the requested output tokens count as output.
- `generate_batch`: Transformers' own continuous batching (attn_implementation="paged|sdpa"), where
  the installed version has it.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from pagedserve.bench.datasets import BenchRequest

logger = logging.getLogger(__name__)


def load_hf_model(model_path: str, dummy: bool, device: torch.device, dtype: torch.dtype,
                  attn_implementation: str | None = None):
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
        torch.cuda.synchronize()


@torch.no_grad()
def run_generate(model, requests: list[BenchRequest], batch_size: int, device: torch.device,
                 pad_token_id: int) -> float:
    """Static left-padded batches; returns elapsed seconds."""
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
                       min_new_tokens=new, do_sample=False, pad_token_id=pad_token_id)
    _sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def run_generate_batch(model, requests: list[BenchRequest], device: torch.device,
                       max_batch_tokens: int = 8192) -> float | None:
    """Transformers' continuous batching; None where the installed version lacks it."""
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return None
    new = max(r.output_len for r in requests)
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    try:
        config.max_batch_tokens = max_batch_tokens
    except AttributeError:
        pass
    inputs = [r.prompt_token_ids for r in requests]
    _sync(device)
    t0 = time.perf_counter()
    model.generate_batch(inputs=inputs, generation_config=config)
    _sync(device)
    return time.perf_counter() - t0


def run(args: argparse.Namespace, requests: list[BenchRequest], model_path: str, device: torch.device,
        dtype: torch.dtype) -> dict:
    """Runs the requested Transformers modes; returns {mode: output tok/s}."""
    num_out = sum(r.output_len for r in requests)
    results: dict[str, float] = {}
    dummy = args.load_format == "dummy"
    if "generate" in args.hf_modes:
        model = load_hf_model(model_path, dummy, device, dtype)
        warm = requests[:2]
        run_generate(model, [BenchRequest(r.prompt_token_ids[:32], 4) for r in warm], 2, device, 0)
        for bs in args.hf_batch_sizes:
            elapsed = run_generate(model, requests, bs, device, pad_token_id=0)
            results[f"generate_bs{bs}"] = num_out / elapsed
            print(f"transformers generate, static batches of {bs}: {num_out / elapsed:.1f} output tok/s "
                  f"({elapsed:.1f} s)", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "generate_batch" in args.hf_modes:
        model = load_hf_model(model_path, dummy, device, dtype, attn_implementation="paged|sdpa")
        elapsed = run_generate_batch(model, requests, device)
        if elapsed is not None:
            results["generate_batch"] = num_out / elapsed
            print(f"transformers generate_batch (paged|sdpa): {num_out / elapsed:.1f} output tok/s "
                  f"({elapsed:.1f} s)", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-modes", nargs="+", default=["generate", "generate_batch"],
                   choices=["generate", "generate_batch"], help="Transformers modes to run")
    p.add_argument("--hf-batch-sizes", nargs="+", type=int, default=[256],
                   help="static batch sizes for Transformers' generate")
