"""GPU probe: how fast cuBLAS runs the Qwen2-7B projections at the batch sizes the engine uses.

    python scripts/gemm_probe.py

For each projection (qkv, o, gate_up, down, lm_head) and M tokens: median microseconds of F.linear
in bf16 (CUDA-event timed, 50 runs after warm-up), achieved GB/s (weight + activation bytes) and
TFLOP/s. Also says whether torch.mm(..., out_dtype=torch.float32) works for bf16 on this build.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

SHAPES = {  # name: (in_features, out_features), Qwen2-7B
    "qkv": (3584, 4608),
    "o": (3584, 3584),
    "gate_up": (3584, 37888),
    "down": (18944, 3584),
    "lm_head": (3584, 152064),
}


def time_us(fn, runs: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    weights = {n: torch.randn(o, i, device=dev, dtype=torch.bfloat16) * 0.02 for n, (i, o) in SHAPES.items()}
    print(f"{'proj':8} {'M':>6} {'us':>9} {'GB/s':>7} {'TFLOP/s':>8}")
    per_m_total = {}
    for m in (1, 4, 16, 64, 128, 139, 192, 256, 2048, 8192):
        total = 0.0
        for name, w in weights.items():
            if name == "lm_head" and m > 256:
                continue
            x = torch.randn(m, w.shape[1], device=dev, dtype=torch.bfloat16)
            us = time_us(lambda x=x, w=w: F.linear(x, w))
            total += us
            nbytes = 2 * (w.numel() + x.numel() + m * w.shape[0])
            flops = 2 * m * w.numel()
            print(f"{name:8} {m:6d} {us:9.1f} {nbytes / us / 1e3:7.0f} {flops / us / 1e6:8.1f}")
        per_m_total[m] = total
    for m, t in per_m_total.items():
        print(f"M={m}: one layer's 4 projections + lm_head would take {t:.0f} us of this sum")
    x = torch.randn(8, 3584, device=dev, dtype=torch.bfloat16)
    try:
        out = torch.mm(x, weights["lm_head"].t(), out_dtype=torch.float32)
        ref = x.float() @ weights["lm_head"].float().t()
        print(f"torch.mm out_dtype=float32: works, dtype {out.dtype}, max abs err vs fp32 "
              f"{(out - ref).abs().max().item():.2e} (bf16 output: "
              f"{(F.linear(x, weights['lm_head']).float() - ref).abs().max().item():.2e})")
        us_f32 = time_us(lambda: torch.mm(x, weights["lm_head"].t(), out_dtype=torch.float32))
        us_bf16 = time_us(lambda: F.linear(x, weights["lm_head"]))
        print(f"lm_head M=8: out_dtype fp32 {us_f32:.1f} us vs bf16 {us_bf16:.1f} us")
    except Exception as e:  # noqa: BLE001 - the probe reports whatever this build does
        print(f"torch.mm out_dtype=float32: not available ({type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
