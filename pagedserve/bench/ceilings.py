"""Measures the card's two ceilings once: device-to-device copy bandwidth (bytes read + written)
and the bf16 matrix rate, each the median of timed repeats after warm-up, on random data."""

from __future__ import annotations

import torch


def _median_ms(fn, reps: int = 10) -> float:
    for _ in range(3):
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
    times.sort()
    return times[len(times) // 2]


def _copy_bandwidth(device: torch.device) -> float:
    n = 1 << 30  # 2 GiB of bf16 per buffer: far beyond L2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def _matmul_rate(device: torch.device) -> float:
    m = 8192
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b)
    return 2 * m**3 / (ms / 1e3)


def measure_ceilings(device: torch.device | None = None) -> tuple[float, float]:
    """Returns (bytes/s, FLOP/s) measured on the current CUDA device."""
    device = device or torch.device("cuda")
    bandwidth = _copy_bandwidth(device)
    flops = _matmul_rate(device)
    torch.cuda.empty_cache()
    return bandwidth, flops
