"""4-bit weights times 16-bit activations (AWQ / GPTQ checkpoints held packed on the GPU): y = x W^T (+ b), W
dequantized tile by tile in the kernel, never whole in memory.

    x       [M, K]       16-bit (fp32 in tests)
    qweight [N, K / 8]   int32: value k of row n in word k // 8, bits 4 (k % 8) .. 4 (k % 8) + 3 (unsigned)
    scales  [N, K / G]   fp32: the group's scale s
    zs      [N, K / G]   fp32: the group's zero times its scale, z s
    W[n, k] = q[n, k] s[n, k / G] - zs[n, k / G]     (= (q - z) s, AWQ's and GPTQ's dequantization)

Grid (cdiv(M, BM), cdiv(N, BN)); a program walks K in BK steps (BK divides the group size G, so a step has one
group's scale a row), unpacks its [BN, BK / 8] words into [BN, BK] values with shifts, scales them in fp32, rounds
them to x's dtype and accumulates x W^T in fp32 on the tensor cores. Decode (M small) is bound by the packed
weight's bytes: a quarter of a 16-bit weight's. `pack_int4_rows` makes the layout from AWQ's / GPTQ's
(executor/int_quant.py). Launched with programmatic dependent launch on Hopper, as the other kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, zs_ptr, b_ptr, y_ptr, M, N, K, GROUP,
                  stride_xm, stride_qn, stride_sn, stride_ym,
                  HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok = m < M
    n_ok = n < N
    shifts = tl.arange(0, 8) * 4
    words = tl.arange(0, BK // 8)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    x_rows = x_ptr + m[:, None].to(tl.int64) * stride_xm
    q_rows = qw_ptr + n[:, None].to(tl.int64) * stride_qn
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        xt = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = (k0 // 8 + words) < tl.cdiv(K, 8)
        packed = tl.load(q_rows + (k0 // 8 + words)[None, :], mask=n_ok[:, None] & w_ok[None, :], other=0)
        q = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # [BN, BK / 8, 8]
        q = tl.reshape(q, (BN, BK))
        group = k0 // GROUP
        s = tl.load(s_ptr + n.to(tl.int64) * stride_sn + group, mask=n_ok, other=0.0)
        zs = tl.load(zs_ptr + n.to(tl.int64) * stride_sn + group, mask=n_ok, other=0.0)
        w = q.to(tl.float32) * s[:, None] - zs[:, None]
        acc = tl.dot(xt, tl.trans(w.to(xt.dtype)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None].to(tl.int64) * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


_empty = torch.empty  # (the tests poison the output through it)


def w4a16_plan(m: int, group_size: int) -> tuple[int, int, int, int]:
    """(BM, BN, BK, warps): 16-row tiles of 64 columns for decode, 64 x 128 for prefill; BK a divisor of the
    group size (a power of two, at most 128). Not tuned on a GPU yet."""
    bk = 128  # the largest power of two (at most 128) that divides the group
    while group_size % bk:
        bk //= 2
    if m <= 16:
        return 16, 64, max(bk, 16), 4
    return 64, 128, max(bk, 16), 8


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zs: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, plan: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for the packed 4-bit W (see the module docstring); x [..., K] -> [..., N] in x's dtype."""
    k = x.shape[-1]
    n = qweight.shape[0]
    if qweight.dtype != torch.int32 or qweight.shape[1] * 8 < k or scales.shape != zs.shape \
            or scales.shape[0] != n or scales.shape[1] * group_size < k or group_size % 16:
        raise ValueError(f"w4a16_linear: x [.., {k}], qweight {tuple(qweight.shape)} {qweight.dtype}, scales "
                         f"{tuple(scales.shape)}, zs {tuple(zs.shape)}, group size {group_size}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = _empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        bm, bn, bk, warps = plan or w4a16_plan(m, group_size)
        _w4a16_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            x2, qweight, scales, zs, bias if bias is not None else scales, y, m, n, k, group_size,
            x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps,
            **pdl_launch_kwargs(x.device))
    return y.view(*x.shape[:-1], n)


def pack_int4_rows(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight [N, K / 8] int32, scales [N, groups] fp32, zs [N, groups] fp32) from the unpacked values q [K, N]
    (0..15), zeros [groups, N] and scales [groups, N] of a projection (int_quant.py's unpacking)."""
    kk, n = q.shape
    if kk % 8:
        raise ValueError(f"4-bit rows need a multiple of 8 inputs, got {kk}")
    rows = q.t().to(torch.int64).reshape(n, kk // 8, 8)
    words = sum(rows[:, :, i] << (4 * i) for i in range(8))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    s = scales.float().t().contiguous()
    return words.contiguous(), s, (zeros.float().t() * s).contiguous()


__all__ = ["pack_int4_rows", "w4a16_linear", "w4a16_plan"]
