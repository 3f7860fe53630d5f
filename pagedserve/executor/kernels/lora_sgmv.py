"""LoRA's two products for a batch of tokens that hold different adapters: shrink (h = x A_s^T) and expand
(y += h B_s^T), each token with the adapter of its slot s, tokens grouped by slot (a segmented GEMM, as Punica's
SGMV and vLLM's LoRA kernels).

The adapters' weights sit in dense slot arrays (executor/lora.py): A [S * RT, K], slot s (1-based) in rows
(s - 1) * RT ... s * RT; B [N, S * RT], slot s in those columns. RT is the rank columns a slot (parts x max rank
for a merged projection). The step's tokens come as

    order  [T]      token indices sorted by slot (stable), the tokens without adapter (slot 0) first
    starts [S + 2]  starts[s] = the first index in `order` of slot s's tokens; starts[S + 1] = T

so slot s's tokens are order[starts[s] : starts[s + 1]]. Each program takes one block of BM tokens of one slot:
program b finds its slot from the per-slot block counts (cdiv(count, BM)) in the kernel, so the grid depends on
the launch's token count only (cdiv(T, BM) + S blocks at most) and a CUDA graph captures it once: each replay
reads the step's `order` and `starts`. Blocks past the step's last one, and tokens without an adapter, are not
touched: their h is not written and their y is left as it is.

    shrink: grid (blocks, splits). A split sums K columns split * k_per_split ... + k_per_split and writes its
            fp32 partial sums to h[split, token, :RT]; with one token (decode at batch 1) the splits spread the
            adapter's A over many programs.
    expand: grid (blocks, cdiv(N, BN)). Sums the splits' partials of its tokens, rounds h to B's dtype (as
            the torch path rounds x A^T to the adapter's dtype), and adds h B_s^T to y in fp32, rounded once to
            y's dtype (as torch's addmm).

Both kernels start with pdl_enter (programmatic dependent launch on Hopper).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter
from pagedserve.executor.kernels.segments import segment_block

MAX_SPLITS = 32
# Launch configurations, measured per layer (four projections, Qwen2-7B shapes, four adapters) on an H200 in session
# 24's runs 1-5 (docs/gpu-notes.md). The shrink is a tiny GEMM bound by latency: it wants ~64-128 programs (2 splits
# at 139 tokens took 137.6 us a layer against 76.0 with 19), 16-token blocks up to 64 tokens and 64-token blocks
# above (139 tokens: 66.2 against 73.7 with 32-token blocks). The expand wants 16-token blocks, 256 columns a tile,
# 2 tiles a program and 8 warps from 17 to 256 tokens (139: 56.4 against 73.7 with 32 x 128 x 4 and 4 warps; 256:
# 68.5 against 79.8). It sums the splits' partials before its first product, SPLIT_UNROLL loads in flight at a time.
BK = 64


@triton.jit
def _lora_shrink_kernel(x_ptr, a_ptr, order_ptr, starts_ptr, h_ptr, K, RT, k_per_split,
                        stride_xm, stride_am, stride_hs, stride_hm,
                        NUM_SLOTS: tl.constexpr, S_POW2: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr,
                        BK: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    split = tl.program_id(1)
    idx, tok, row_ok = segment_block(starts_ptr, order_ptr, tl.program_id(0), NUM_SLOTS, S_POW2, BM, 1)
    if idx < NUM_SLOTS:
        r = tl.arange(0, BR)
        r_ok = r < RT
        a_rows = (idx * RT + r).to(tl.int64)
        k_start = split * k_per_split
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for kk in range(0, k_per_split, BK):
            k = k_start + kk + tl.arange(0, BK)
            k_ok = k < K
            xt = tl.load(x_ptr + tok[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
            at = tl.load(a_ptr + a_rows[:, None] * stride_am + k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                         other=0.0)
            acc = tl.dot(xt.to(at.dtype), tl.trans(at), acc, input_precision=DOT_PRECISION)
        tl.store(h_ptr + split * stride_hs + tok[:, None] * stride_hm + r[None, :], acc,
                 mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_expand_kernel(h_ptr, b_ptr, order_ptr, starts_ptr, y_ptr, N, RT, num_splits, n_per_program,
                        stride_hs, stride_hm, stride_bn, stride_ym,
                        NUM_SLOTS: tl.constexpr, S_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BR: tl.constexpr, SPLIT_UNROLL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    nb = tl.program_id(1)
    idx, tok, row_ok = segment_block(starts_ptr, order_ptr, tl.program_id(0), NUM_SLOTS, S_POW2, BM, 1)
    if idx < NUM_SLOTS:
        r = tl.arange(0, BR)
        r_ok = r < RT
        h_mask = row_ok[:, None] & r_ok[None, :]
        h = tl.zeros((BM, BR), dtype=tl.float32)
        h_rows = h_ptr + tok[:, None] * stride_hm + r[None, :]
        split_of = tl.zeros((BM, BR), dtype=tl.int32)
        for s0 in range(0, num_splits, SPLIT_UNROLL):  # SPLIT_UNROLL loads in flight, not one round trip a split
            for j in tl.static_range(SPLIT_UNROLL):
                h += tl.load(h_rows + (s0 + j) * stride_hs, mask=h_mask & (split_of + (s0 + j) < num_splits),
                             other=0.0)
        b_cols = b_ptr + (idx * RT + r)[None, :]
        y_rows = y_ptr + tok[:, None] * stride_ym
        h_low = h.to(b_ptr.dtype.element_ty)
        for n0 in range(nb * n_per_program, tl.minimum(nb * n_per_program + n_per_program, N), BN):
            n = n0 + tl.arange(0, BN)
            n_ok = n < N
            bt = tl.load(b_cols + n[:, None].to(tl.int64) * stride_bn, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            delta = tl.dot(h_low, tl.trans(bt), input_precision=DOT_PRECISION)  # [BM, BN] fp32
            y_mask = row_ok[:, None] & n_ok[None, :]
            y = tl.load(y_rows + n[None, :], mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_rows + n[None, :], (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def shrink_plan(num_tokens: int, k: int, bm: int | None = None, target: int | None = None) -> tuple[int, int, int]:
    """(tokens a block, splits, K columns a split) of the shrink for a launch of num_tokens tokens and K input
    columns: splits for ~target programs while the tokens fill few blocks, each a multiple of BK columns. bm,
    target: tuning overrides."""
    bm = bm or (16 if num_tokens <= 64 else 64)
    target = target or (128 if num_tokens <= 64 else 64)
    blocks = triton.cdiv(num_tokens, bm)
    splits = max(1, min(MAX_SPLITS, target // blocks, triton.cdiv(k, BK)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), BK) * BK
    return bm, triton.cdiv(k, k_per_split), k_per_split


def expand_plan(num_tokens: int, n: int, bm: int | None = None, bn: int | None = None, tiles: int | None = None,
                warps: int | None = None) -> tuple[int, int, int, int]:
    """(tokens a block, BN, output columns a program, warps) of the expand for num_tokens tokens and N output
    columns: one 128-column tile a program for up to 16 tokens (B streamed by many programs), two 256-column tiles
    and 8 warps up to 256, 64-token blocks of eight 64-column tiles above (prefill chunks; not tuned). Overrides
    for tuning."""
    if num_tokens <= 16:
        plan = (16, 128, 1, 4)
    elif num_tokens <= 256:
        plan = (16, 256, 2, 8)
    else:
        plan = (64, 64, 8, 4)
    bm, bn, tiles, warps = (bm or plan[0]), (bn or plan[1]), (tiles or plan[2]), (warps or plan[3])
    return bm, bn, min(bn * tiles, triton.cdiv(n, bn) * bn), warps


def partials_rows(max_tokens: int) -> int:
    """Rows of fp32 partial sums (splits x tokens) a launch of up to max_tokens tokens may need (with one split
    from 64 blocks of 64 tokens on: the tokens themselves)."""
    return max(max_tokens, max(shrink_plan(t, 1 << 30)[1] * t for t in range(1, 64 * 64 + 1)))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink(x: torch.Tensor, a: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, partials: torch.Tensor,
                num_slots: int, rank_cols: int, tune: dict | None = None) -> torch.Tensor:
    """Writes each adapter token's x A_s^T, split over K, into partials (a flat fp32 buffer of at least
    splits * T * rank_cols values) and returns its [splits, T, rank_cols] view. x: [T, K]; a: [num_slots *
    rank_cols, K] (contiguous rows)."""
    t, k = x.shape
    if a.shape != (num_slots * rank_cols, k) or a.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError(f"lora_shrink: x {tuple(x.shape)}, a {tuple(a.shape)} for {num_slots} slots of "
                         f"{rank_cols} columns")
    tune = tune or {}
    bm, splits, k_per_split = shrink_plan(t, k, tune.get("bm"), tune.get("target"))
    if partials.numel() < splits * t * rank_cols:
        raise ValueError(f"lora_shrink: {partials.numel()} partial sums for {splits} x {t} x {rank_cols}")
    h = partials[: splits * t * rank_cols].view(splits, t, rank_cols)
    grid = (triton.cdiv(t, bm) + num_slots, splits)
    _lora_shrink_kernel[grid](
        x, a, order, starts, h, k, rank_cols, k_per_split, x.stride(0), a.stride(0), h.stride(0), h.stride(1),
        NUM_SLOTS=num_slots, S_POW2=max(2, triton.next_power_of_2(num_slots)), BM=bm,
        BR=max(16, triton.next_power_of_2(rank_cols)), BK=BK, DOT_PRECISION=_dot_precision(a.dtype),
        num_warps=4, **pdl_launch_kwargs(x.device))
    return h


def lora_expand(h: torch.Tensor, b: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, y: torch.Tensor,
                num_slots: int, tune: dict | None = None) -> torch.Tensor:
    """y[token] += (sum over splits of h[:, token]) B_s^T for every adapter token, in place. h: lora_shrink's
    [splits, T, rank_cols] partials; b: [N, num_slots * rank_cols]; y: [T, N]."""
    splits, t, rank_cols = h.shape
    n = y.shape[1]
    if b.shape != (n, num_slots * rank_cols) or b.stride(1) != 1 or y.stride(1) != 1 or y.shape[0] != t:
        raise ValueError(f"lora_expand: h {tuple(h.shape)}, b {tuple(b.shape)}, y {tuple(y.shape)} for "
                         f"{num_slots} slots")
    tune = tune or {}
    bm, bn, per_program, warps = expand_plan(t, n, tune.get("bm"), tune.get("bn"), tune.get("tiles"),
                                             tune.get("warps"))
    grid = (triton.cdiv(t, bm) + num_slots, triton.cdiv(n, per_program))
    _lora_expand_kernel[grid](
        h, b, order, starts, y, n, rank_cols, splits, per_program, h.stride(0), h.stride(1), b.stride(0),
        y.stride(0),
        NUM_SLOTS=num_slots, S_POW2=max(2, triton.next_power_of_2(num_slots)), BM=bm, BN=bn,
        BR=max(16, triton.next_power_of_2(rank_cols)),
        SPLIT_UNROLL=min(8 if bm * rank_cols <= 1024 else 4, triton.next_power_of_2(splits)),
        DOT_PRECISION=_dot_precision(b.dtype), num_warps=warps, **pdl_launch_kwargs(y.device))
    return y


__all__ = ["expand_plan", "lora_expand", "lora_shrink", "partials_rows", "shrink_plan"]
