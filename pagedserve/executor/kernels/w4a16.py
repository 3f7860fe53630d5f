"""4-bit weights times 16-bit activations (AWQ / GPTQ checkpoints held packed on the GPU): y = x W^T (+ b), W
dequantized tile by tile in the kernel, never whole in memory.

    x       [M, K]       16-bit (fp32 in tests)
    qweight [N, K / 8]   int32: value k of row n in word k // 8, bits 4 (k % 8) .. 4 (k % 8) + 3 (unsigned)
    scales  [N, K / G]   fp32: the group's scale s
    zs      [N, K / G]   fp32: the group's zero times its scale, z s
    W[n, k] = q[n, k] s[n, k / G] - zs[n, k / G]     (= (q - z) s, AWQ's and GPTQ's dequantization)

Grid (cdiv(M, BM), cdiv(N, BN), splits); a program walks its split of K in BK steps (BK divides the group size G,
so a step has one group's scale a row), unpacks its [BN, BK / 8] words into [BN, BK] values with shifts, scales
them in fp32, rounds them to x's dtype and accumulates x W^T in fp32 on the tensor cores. Decode (M small) is bound
by the packed weight's bytes: a quarter of a 16-bit weight's; K is split there so that enough programs stream it
(w4a16_splits), their fp32 partial sums added after. `pack_int4_rows` makes the layout from AWQ's / GPTQ's
(executor/int_quant.py). Launched with programmatic dependent launch on Hopper, as the other kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, s_ptr, zs_ptr, b_ptr, y_ptr, M, N, K, GROUP, k_per_split,
                  stride_xm, stride_qn, stride_sn, stride_ym, stride_ys,
                  HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    split = tl.program_id(2)
    m_ok = m < M
    n_ok = n < N
    shifts = tl.arange(0, 8) * 4
    words = tl.arange(0, BK // 8)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    x_rows = x_ptr + m[:, None].to(tl.int64) * stride_xm
    q_rows = qw_ptr + n[:, None].to(tl.int64) * stride_qn
    for k0 in range(split * k_per_split, tl.minimum(split * k_per_split + k_per_split, K), BK):
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
    tl.store(y_ptr + split * stride_ys + m[:, None].to(tl.int64) * stride_ym + n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


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


MAX_SPLITS = 16


def w4a16_splits(m_tiles: int, n_tiles: int, k: int, bk: int, device: torch.device) -> int:
    """K splits for a launch of m_tiles x n_tiles programs: enough for ~2 programs an SM while the tiles are few
    (decode: o_proj / down_proj have 56 column tiles on the 7B shapes), each split a multiple of BK; 1 when the
    tiles fill the card. The splits' fp32 partial sums are added after (no atomics: the same sum every run)."""
    from pagedserve.executor.kernels.paged_attention_decode import num_sms

    tiles = m_tiles * n_tiles
    want = triton.cdiv(2 * num_sms(device), tiles)
    return max(1, min(want, triton.cdiv(k, bk), MAX_SPLITS))


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zs: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, plan: tuple[int, int, int, int] | None = None,
                 splits: int | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for the packed 4-bit W (see the module docstring); x [..., K] -> [..., N] in x's dtype.
    plan, splits: tuning overrides (w4a16_plan, w4a16_splits)."""
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
    if m == 0:
        return _empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps = plan or w4a16_plan(m, group_size)
    m_tiles, n_tiles = triton.cdiv(m, bm), triton.cdiv(n, bn)
    splits = w4a16_splits(m_tiles, n_tiles, k, bk, x.device) if splits is None else splits
    k_per_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_per_split)
    # One split: the result directly (bias added in the kernel); more: fp32 partial sums, added up after.
    y = _empty(m, n, dtype=x.dtype, device=x.device) if splits == 1 else \
        _empty(splits, m, n, dtype=torch.float32, device=x.device)
    _w4a16_kernel[(m_tiles, n_tiles, splits)](
        x2, qweight, scales, zs, bias if bias is not None else scales, y, m, n, k, group_size, k_per_split,
        x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(-2), y.stride(0) if splits > 1 else 0,
        HAS_BIAS=bias is not None and splits == 1, BM=bm, BN=bn, BK=bk,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps,
        **pdl_launch_kwargs(x.device))
    if splits > 1:
        y = y.sum(0) if bias is None else y.sum(0) + bias.float()
        y = y.to(x.dtype)
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
