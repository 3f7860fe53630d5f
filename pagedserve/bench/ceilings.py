"""Measures the card's two ceilings once: device-to-device copy bandwidth (bytes read + written)
and the bf16 matrix rate, each the fastest of 20 timed repeats after 10 warm-ups, on random data.

The fastest, not the median: a ceiling is the best the card does, and the median of 10 repeats after 3
warm-ups let a slow start understate it (an H200 gave 3.82 TB/s in one call and 4.14-4.23 in others,
2026-12-02), which inflated every "% of floor" of that call."""

from __future__ import annotations

import torch


def _best_ms(fn, reps: int = 20, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


def _copy_bandwidth(device: torch.device) -> float:
    n = 1 << 30  # 2 GiB of bf16 per buffer: far beyond L2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _best_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def _matmul_rate(device: torch.device) -> float:
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = _best_ms(lambda: a @ b)
    return 2 * m**3 / (ms / 1e3)


def measure_fp8_matmul_rate(device: torch.device | None = None) -> float:
    """The fp8 (e4m3) matrix rate, FLOP/s: torch._scaled_mm on 8192^3 with row-wise scales and a bf16 output, as
    quantization="fp8" runs its large GEMMs; fastest of 20 after 10 warm-ups."""
    device = device or torch.device("cuda")
    m = 8192
    a = torch.randn(m, m, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(m, m, device=device).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    sa = torch.ones(m, 1, device=device)
    sb = torch.ones(1, m, device=device)
    ms = _best_ms(lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    return 2 * m**3 / (ms / 1e3)


def measure_ceilings(device: torch.device | None = None) -> tuple[float, float]:
    """Returns (bytes/s, FLOP/s) measured on the current CUDA device."""
    device = device or torch.device("cuda")
    bandwidth = _copy_bandwidth(device)
    flops = _matmul_rate(device)
    torch.cuda.empty_cache()
    return bandwidth, flops
