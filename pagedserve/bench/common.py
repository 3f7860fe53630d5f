"""Pieces every bench command shares: building the engine, the card's ceilings, JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

from pagedserve.bench.roofline import ModelShape


def add_ceiling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peak-bandwidth", type=float, default=None,
                        help="one card's copy bandwidth in bytes/s (default: measured at start on CUDA; the floor "
                             "takes N cards' with -tp N)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="card's bf16 matrix rate in FLOP/s (default: measured at start on CUDA)")
    parser.add_argument("--peak-fp8-flops", type=float, default=None,
                        help="card's fp8 matrix rate in FLOP/s, for the floor of a --quantization fp8 run (default: "
                             "measured at start on CUDA when the run is fp8)")
    parser.add_argument("--output-json", default=None, help="write the results to this JSON file")


def card_ceilings(args: argparse.Namespace, device_type: str) -> tuple[float | None, float | None, str]:
    """(bandwidth, flops, card name); measured when not given and a GPU is there. With tensor parallelism over
    N cards the floor's ceilings are N times one card's (given or measured on cuda:0), named "N x card"."""
    bandwidth, flops = args.peak_bandwidth, args.peak_flops
    name = "cpu"
    if device_type == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        if bandwidth is None or flops is None:
            from pagedserve.bench.ceilings import measure_ceilings

            measured_bw, measured_flops = measure_ceilings()
            bandwidth = bandwidth or measured_bw
            flops = flops or measured_flops
    cards = getattr(args, "tensor_parallel_size", 1) or 1
    if cards > 1 and device_type == "cuda":
        bandwidth = bandwidth and bandwidth * cards
        flops = flops and flops * cards
        name = f"{cards} x {name}"
    return bandwidth, flops, name


def fp8_ceiling(args: argparse.Namespace, device_type: str) -> float | None:
    """The fp8 matrix rate for a --quantization fp8 run's floor: given, or measured on CUDA (N cards' with -tp N);
    None for other runs and on CPU."""
    if getattr(args, "quantization", None) != "fp8":
        return None
    rate = getattr(args, "peak_fp8_flops", None)
    if rate is None and device_type == "cuda":
        import torch

        from pagedserve.bench.ceilings import measure_fp8_matmul_rate

        rate = measure_fp8_matmul_rate()
        torch.cuda.empty_cache()
    cards = getattr(args, "tensor_parallel_size", 1) or 1
    return rate * cards if rate and device_type == "cuda" else rate


def build_llm(args: argparse.Namespace):
    from pagedserve.entrypoints.args import config_from_args
    from pagedserve.entrypoints.llm import LLM

    config = config_from_args(args)
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    return llm, time.perf_counter() - t0


def model_shape(llm) -> ModelShape:
    worker = llm.engine.worker
    dtype_bytes = worker.dtype_bytes
    # fp8 / 4-bit weights are kept as such on CUDA only (the CPU holds their dequantized values); "int4" (a 4-bit
    # checkpoint held packed) is the model's own record, not an engine setting
    held = getattr(getattr(worker, "runner", None), "model", None)
    quantization = (getattr(held, "quantization", None) or llm.engine.config.quantization
                    if worker.device.type == "cuda" else None)
    kv_caches = getattr(getattr(worker, "runner", None), "kv_caches", None)
    kv_bytes = kv_caches[0].element_size() if kv_caches else dtype_bytes
    return ModelShape.from_hf_config(worker.hf_config, dtype_bytes, quantization, kv_dtype_bytes=kv_bytes)


def spec_decode_delta(engine, before: dict | None) -> dict | None:
    """Speculative decoding over a timed run: the engine's counters now minus `before` (its stats' "spec_decode"
    when the run began), with the acceptance rate and tokens a drafted step. None without speculative decoding."""
    from pagedserve.spec_decode import since

    now = engine.get_stats().get("spec_decode")
    if now is None:
        return None
    return {**since(now, before), "config": engine.config.speculative_config}


def spec_decode_line(d: dict) -> str:
    return (f"speculative decoding: {d['num_drafts']} drafted steps, {d['num_accepted_tokens']} of "
            f"{d['num_draft_tokens']} drafts kept ({100 * d['acceptance_rate']:.1f}%), "
            f"{d['mean_acceptance_length']:.2f} tokens a drafted step")


def git_commit() -> str:
    if os.environ.get("PAGEDSERVE_COMMIT"):  # set where the tree travels without .git (GPU machine)
        return os.environ["PAGEDSERVE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def finish(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    result.setdefault("date", time.strftime("%Y-%m-%d"))
    result.setdefault("commit", git_commit())
    result.setdefault("command", " ".join(sys.argv))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result
