"""How exact are W8A8's sums? The skinny GEMM's fp8 x fp8 dot written in fp32 at the Qwen2-7B shapes, with its
partial sums left in Hopper's fp8 accumulator for the whole K loop ("full") or moved to fp32 every K tile ("tile"),
and cuBLAS's fp8 GEMM (torch._scaled_mm, per-tensor scales, fp32 out, use_fast_accum off and on) on the same
operands, each against fp32 sums of the dequantized operands. The products of two fp8 values are exact, so every
difference is summation. Prints the norm-wise relative error and the worst element's error over its row's scale.

    python scripts/fp8_acc_probe.py            # CUDA with fp8 tensor cores (compute capability 8.9+)
"""

from __future__ import annotations

import torch

from pagedserve.executor.kernels import skinny_gemm
from pagedserve.executor.kernels.fp8_quant import per_token_quant_fp8
from pagedserve.executor.quantization import quantize_rows_fp8

SHAPES = {"qkv": (4608, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}


def errors(y: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor) -> tuple[float, float]:
    norm = ((y - ref).norm() / ref.norm()).item()
    worst = ((y - ref).abs() / terms.clamp_min(1e-30)).max().item()  # against the sum of |products|
    return norm, worst


def main() -> None:
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") / k**0.5
        q, s = quantize_rows_fp8(w)
        w_dq = q.float() * s[:, None]
        for m in (2, 16, 139):
            xq, xs = per_token_quant_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
            x_dq = xq.float() * xs
            ref = x_dq.double() @ w_dq.double().T
            terms = x_dq.abs().double() @ w_dq.abs().double().T
            line = f"{name:8} M={m:<4}"
            for mode in ("full", "tile"):
                skinny_gemm.FP8_SUMS = mode
                y = skinny_gemm.skinny_linear(xq, q, out_dtype=torch.float32, weight_scale=s, x_scale=xs)
                norm, worst = errors(y.double(), ref, terms)
                line += f"  skinny {mode} {norm:.2e} / {worst:.2e}"
            one = torch.ones((), device="cuda")
            for fast in (False, True):  # the same sums without the row scales (applied after, in fp64)
                y = torch._scaled_mm(xq, q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32,
                                     use_fast_accum=fast)
                y = y.double() * xs.double() * s.double()[None, :]
                norm, worst = errors(y, ref, terms)
                line += f"  cuBLAS{' fast' if fast else ''} {norm:.2e} / {worst:.2e}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
