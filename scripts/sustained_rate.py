"""GPU probe: the bf16 matrix rate held for seconds against the burst rate the bench's ceiling takes.

    python scripts/sustained_rate.py [--seconds 3]

Session 8 found the mixed steps' prefill GEMMs 10-25% slower than the same GEMMs timed alone (down_proj
at 8,192 tokens: 1.445 ms alone, 1.77-1.88 ms inside ~175 ms steps), and guessed the card's power limit.
This measures it directly, three ways:
  1. burst: the bench's own ceiling (fastest of 20 single 8192^3 matmuls after 10 warm-ups);
  2. sustained: 8192^3 matmuls back to back for --seconds, TFLOP/s per 0.25 s window (events), so the
     fall from the first window to the last shows when and how far the clock drops;
  3. the mixed step's GEMM sequence: qkv, o, gate_up, down of the Qwen2-7B shapes at 8,192 tokens, 28
     layers back to back (one ~145 ms "step" of GEMMs), repeated: ms per step and TFLOP/s, first vs last.
nvidia-smi's SM clock and power before and after, when nvidia-smi is there.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

from pagedserve.bench.ceilings import _matmul_rate

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}  # (K, N)


def smi() -> str:
    query = "--query-gpu=clocks.sm,power.draw,temperature.gpu"
    try:
        return subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def windows(fn, seconds: float, flops_per_call: float, window_s: float) -> list[float]:
    """TFLOP/s of fn in consecutive windows of ~window_s of device time, for ~`seconds` in all. The calls
    of a window are sized from one timed call (the host must not queue seconds of work ahead)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, round(window_s / (start.elapsed_time(end) / 1e3)))
    rates = []
    for _ in range(max(1, round(seconds / window_s))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        rates.append(calls * flops_per_call / (start.elapsed_time(end) / 1e3) / 1e12)
    return rates


def square(dev: torch.device, seconds: float) -> list[float]:
    m = 8192
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    return windows(lambda: a @ b, seconds, 2 * m**3, 0.25)


def mixed_step(dev: torch.device, seconds: float, tokens: int = 8192) -> tuple[list[float], float]:
    x = {name: torch.randn(tokens, k, device=dev, dtype=torch.bfloat16) for name, (k, _) in SHAPES.items()}
    w = {name: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for name, (k, n) in SHAPES.items()}
    step_flops = 28 * sum(2 * tokens * n * k for k, n in SHAPES.values())

    def step() -> None:
        for _ in range(28):
            for name in SHAPES:
                torch.nn.functional.linear(x[name], w[name])

    return windows(step, seconds, step_flops, 0.5), step_flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}; nvidia-smi (SM MHz, W, C) before: {smi()}")
    print(f"burst (the bench's ceiling): {_matmul_rate(dev) / 1e12:.1f} TFLOP/s")
    rates = square(dev, args.seconds)
    print(f"sustained 8192^3, {args.seconds:.0f} s in 0.25 s windows: first {rates[0]:.1f}, last {rates[-1]:.1f}, "
          f"min {min(rates):.1f}, max {max(rates):.1f} TFLOP/s; nvidia-smi after: {smi()}")
    torch.cuda.empty_cache()
    time.sleep(2.0)  # let the clock recover from the run above
    rates, step_flops = mixed_step(dev, args.seconds)
    print(f"mixed-step GEMMs (qkv, o, gate_up, down at 8192 tokens x 28 layers, {step_flops / 1e12:.1f} TFLOP a "
          f"step): first window {rates[0]:.1f}, last {rates[-1]:.1f}, min {min(rates):.1f} TFLOP/s "
          f"({step_flops / (rates[0] * 1e12) * 1e3:.1f} -> {step_flops / (rates[-1] * 1e12) * 1e3:.1f} ms a step); "
          f"nvidia-smi after: {smi()}")


if __name__ == "__main__":
    main()
