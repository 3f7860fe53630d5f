"""GPU probe: cuBLAS on the Qwen2-7B projections with the weight stored [N, K] (as loaded: F.linear, "TN")
or transposed [K, N] (torch.mm(x, Wt), "NN"), at a decode batch and at prefill chunk sizes.

    python scripts/gemm_layouts.py [--m 136,8192,16384]

Each timing cycles through copies of the weight totalling >= 256 MB (no call finds its weight in L2, as
in a real step), CUDA-event timed per call, fastest median of 3 rounds of 20 calls after 5 warm-ups.
Prints us per call, TFLOP/s and TB/s (weight + activation bytes) for both layouts. A layout worth
switching to would show here first (the down projection's prefill GEMM ran at ~74% of the matrix rate in
session 8's timeline, the others at 83-86%).
"""

from __future__ import annotations

import argparse
import statistics

import torch

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}  # (K, N)


def time_us(fns) -> float:
    for f in fns[:5]:
        f()
    rounds = []
    for _ in range(3):
        times = []
        for i in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[i % len(fns)]()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        rounds.append(statistics.median(times))
    return min(rounds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="136,8192,16384")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"{'proj':8} {'M':>6} {'TN us':>9} {'NN us':>9} {'TN TF/s':>8} {'NN TF/s':>8} {'TN TB/s':>8} {'NN TB/s':>8}")
    for name, (k, n) in SHAPES.items():
        copies = max(1, -(-256 * 2**20 // (2 * n * k)))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            outs = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            tn = time_us([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in ws])
            nn_ = time_us([lambda w=w, x=x, o=outs: torch.mm(x, w, out=o) for w in wts])
            flops, nbytes = 2 * m * n * k, 2 * (n * k + m * k + m * n)
            print(f"{name:8} {m:>6} {tn:>9.1f} {nn_:>9.1f} {flops / tn / 1e6:>8.1f} {flops / nn_ / 1e6:>8.1f} "
                  f"{nbytes / tn / 1e6:>8.2f} {nbytes / nn_ / 1e6:>8.2f}")
        del ws, wts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
