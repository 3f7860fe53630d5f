"""Batch-1 MLP input: silu(x @ W_gate^T) * (x @ W_up^T) in one kernel, for one token.

    x: [1, K];  weight: [2I, K] = gate rows | up rows (the merged gate_up_proj), contiguous;
    -> out [1, I] in x's dtype

At one token the gate_up projection is a matrix-vector product that streams 2I x K weights, and
SiLU·mul is a separate ~1.5 us kernel of pure latency. Here each program owns BLOCK_N gate rows and
the BLOCK_N up rows of the same columns, accumulates both dot products over K (the fma path of
skinny_gemm: a [BLOCK_N, BLOCK_K] fp32 tile summed once at the end), and applies SiLU·mul to its own
outputs: one launch instead of two, and no [1, 2I] intermediate.

Numerics equal the two-kernel path (skinny GEMM, then silu_mul): the two products are rounded to
x's dtype first (the GEMM's output rounding), then silu(g) * u is computed in fp32 and rounded once.
With PDL the first weight tiles are loaded before waiting for the previous kernel (weights are never
written during a step), as in skinny_gemm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter

DEFAULT_BLOCK_N = 2  # 2 gate + 2 up rows per program: the 4-row tiles of gate_up's measured M=1 config
DEFAULT_BLOCK_K = 512


@triton.jit
def paired_rows_dot(w_ptr, rows_a, rows_b, stride_wn, x_ptr, K, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
                    USE_PDL: tl.constexpr):
    """(W[rows_a] @ x, W[rows_b] @ x) in fp32 for one token x [K]: two row sets of the same weight, each
    accumulated in a [rows, BLOCK_K] tile summed across K once at the end (skinny_gemm's M=1 fma path).
    Calls pdl_enter after loading the first K step's weight tiles (weights are never written in a step)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = w_ptr + rows_a[:, None] * stride_wn + offs_k[None, :]
    b_ptrs = w_ptr + rows_b[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_k
    # First K step peeled: its weight tiles load before the PDL wait.
    if EVEN_K:
        wa = tl.load(a_ptrs)
        wb = tl.load(b_ptrs)
    else:
        first_mask = (offs_k < K)[None, :]  # not `k_mask`: a name reassigned in the loop must keep its type
        wa = tl.load(a_ptrs, mask=first_mask, other=0.0)
        wb = tl.load(b_ptrs, mask=first_mask, other=0.0)
    pdl_enter(USE_PDL)
    if EVEN_K:
        x = tl.load(x_ptrs).to(tl.float32)[None, :]
    else:
        x = tl.load(x_ptrs, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
    acc_a = wa.to(tl.float32) * x
    acc_b = wb.to(tl.float32) * x
    for k in range(BLOCK_K, K, BLOCK_K):
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        if EVEN_K:
            wa = tl.load(a_ptrs)
            wb = tl.load(b_ptrs)
            x = tl.load(x_ptrs).to(tl.float32)[None, :]
        else:
            k_mask = (k + offs_k) < K
            wa = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            wb = tl.load(b_ptrs, mask=k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        acc_a += wa.to(tl.float32) * x
        acc_b += wb.to(tl.float32) * x
    return tl.sum(acc_a, axis=1), tl.sum(acc_b, axis=1)


@triton.jit
def _gate_up_silu_kernel(
    x_ptr,  # [K]
    w_ptr,  # [2I, K], contiguous
    out_ptr,  # [I]
    inter,
    K,
    stride_wn,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, inter - 1).to(tl.int64)  # padding rows re-read row inter-1 (never stored)
    gate, up = paired_rows_dot(w_ptr, rows, rows + inter, stride_wn, x_ptr, K, EVEN_K, BLOCK_K, USE_PDL)
    # The unfused path's roundings: GEMM outputs in x's dtype, then SiLU·mul in fp32, rounded once.
    gate = gate.to(out_ptr.dtype.element_ty).to(tl.float32)
    up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up  # as silu_mul (and torch's CUDA silu)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=offs_n < inter)


def gate_up_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """silu(x @ weight[:I].T) * (x @ weight[I:].T) for x [1, K] and weight [2I, K]; returns [1, I]."""
    if x.dim() != 2 or x.shape[0] != 1 or weight.dim() != 2 or weight.shape[1] != x.shape[1] \
            or weight.shape[0] % 2 or weight.shape[0] == 0:
        raise ValueError(f"x must be [1, K] and weight [2I, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x and weight must share a float16/bfloat16/float32 dtype, got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or not weight.is_contiguous() or x.device != weight.device:
        raise ValueError("x needs a contiguous last dimension, weight must be contiguous, both on one device")
    for name, value in (("block_n", block_n), ("block_k", block_k), ("num_warps", num_warps)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of 2, got {value}")
    inter, k = weight.shape[0] // 2, weight.shape[1]
    if out is None:
        out = torch.empty((1, inter), dtype=x.dtype, device=x.device)
    elif out.shape != (1, inter) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [1, {inter}] tensor of {x.dtype}")
    block_k = max(16, min(block_k, triton.next_power_of_2(k)))
    _gate_up_silu_kernel[(triton.cdiv(inter, block_n),)](
        x, weight, out, inter, k, weight.stride(0),
        EVEN_K=k % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch_kwargs(x.device),
    )  # fmt: skip
    return out


__all__ = ["gate_up_silu", "paired_rows_dot"]
