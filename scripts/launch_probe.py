"""Host cost of launching the kernels of an eager (mixed) step, on the GPU machine.

    python scripts/launch_probe.py

Eager steps (prefill chunks beside decodes) in the load test spent ~45 ms of host time each for ~300
launches (docs/gpu-notes.md, session 4). This measures, with the device idle before each call so no
queue is full: F.linear on the 7B qkv shape at a token count seen for the first time vs one seen before
(cuBLAS picks an algorithm per new shape), with the default BLAS backend and with cuBLASLt, and the
host time of single Triton launches (RMSNorm, SiLU·mul, the KV write) at fixed shapes.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from pagedserve.executor.kernels.fused_norm import rms_norm
from pagedserve.executor.kernels.kv_cache_write import write_kv_cache
from pagedserve.executor.kernels.silu_mul import silu_and_mul


def host_us(fn, repeats: int = 50) -> float:
    """Median host microseconds of one call, the device idle before each."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def linear_new_vs_seen(weight: torch.Tensor, start: int) -> tuple[float, float]:
    new, seen = [], []
    for m in range(start, start + 40):
        x = torch.randn(m, weight.shape[1], device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        t = time.perf_counter()
        F.linear(x, weight)
        new.append((time.perf_counter() - t) * 1e6)
        seen.append(host_us(lambda x=x: F.linear(x, weight), repeats=5))
    return statistics.median(new), statistics.median(seen)


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    weight = torch.randn(4608, 3584, device="cuda", dtype=torch.bfloat16) / 60
    F.linear(torch.randn(8, 3584, device="cuda", dtype=torch.bfloat16), weight)  # cuBLAS handle, workspace
    for backend in ("default", "cublaslt"):
        if backend == "cublaslt":
            torch.backends.cuda.preferred_blas_library("cublaslt")
        start = 301 if backend == "default" else 701
        new, seen = linear_new_vs_seen(weight, start)
        print(f"F.linear qkv, {backend:8s}: first call at a new token count {new:7.1f} us host, "
              f"repeated {seen:6.1f} us (40 token counts from {start})")
    torch.backends.cuda.preferred_blas_library("default")

    x = torch.randn(700, 3584, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(700, 3584, device="cuda", dtype=torch.float32)
    w = torch.ones(3584, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(700, 2 * 18944, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(700, 4, 128, device="cuda", dtype=torch.bfloat16)
    cache = torch.zeros(2, 100, 16, 4, 128, device="cuda", dtype=torch.bfloat16)
    slots = torch.arange(700, device="cuda", dtype=torch.int64)
    cases = {
        "rms_norm (residual)": lambda: rms_norm(x, w, 1e-6, res),
        "silu_and_mul": lambda: silu_and_mul(gu),
        "write_kv_cache": lambda: write_kv_cache(key, key, cache, slots[:700] % 1600),
        "torch.empty_like": lambda: torch.empty_like(x),
        "x + 1 (torch op)": lambda: x + 1,
    }
    for name, fn in cases.items():
        fn()
        print(f"{name:22s} {host_us(fn):6.1f} us host per call")


if __name__ == "__main__":
    main()
