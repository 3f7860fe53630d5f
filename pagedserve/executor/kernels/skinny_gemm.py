"""Skinny GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]), 1 <= M <= 256.

At small M a projection is a matrix-vector product: the time is reading W (bf16, row-major [N, K])
once, so everything here is about wide, coalesced, well-overlapped weight loads and about keeping
every SM busy. Each W byte feeds ~M FLOPs, far below the H100's ~300 FLOPs per HBM byte up to
M ~ 128; toward M = 256 tensor-core throughput and L2 traffic (m-tiles re-reading W, n-tiles
re-reading x) start to count as well.

Each program owns BLOCK_N output columns (rows of W) and BLOCK_M rows of x (an m-tile). The fma
paths (M <= 8) take all M rows in one m-tile, so W is read exactly once. The dot path covers M rows
with cdiv(M, block_m) m-tiles; the m-tiles of one n-tile are neighbours in launch order (grid axis
0 = n_tile * num_m_tiles + m_tile), so they run at the same time and only the first read of a W tile
comes from HBM, the others from L2. x (M x K) is re-read from L1/L2 by every n-tile.

    W [N, K], row-major          program (n_tile * num_m_tiles + m_tile, split):
    +-------------------+        W rows  n_tile*BLOCK_N ...  +BLOCK_N
    | n-tile 0 |s0|s1|s2|        x rows  m_tile*BLOCK_M ...  +BLOCK_M
    | n-tile 1 |  |  |  |        cols    split*k_per_split ...  +k_per_split, BLOCK_K per step
    +-------------------+        (k_per_split is a multiple of BLOCK_K)

Two inner products, chosen per call (config.use_dot):
  * dot (any M): tl.dot(W tile [BLOCK_N, BLOCK_K], x tile^T [BLOCK_K, BLOCK_M]), BLOCK_M =
    config.block_m (16..256, default 16; x rows past M are masked to zeros). W is the big (A) operand,
    so the tensor-core tile is BLOCK_N x BLOCK_M (Hopper wgmma: 64 W rows per warpgroup of 4 warps,
    BLOCK_M as its N); at small M this costs almost no instructions per byte.
  * fma (M <= 8 only): CUDA-core multiply-adds, BLOCK_M = next power of 2 of M. At M == 1 the
    products accumulate in a [BLOCK_N, BLOCK_K] fp32 tile and are summed across K once at the end (no
    shuffles in the loop); at M > 1 each x row is reduced across K every step (shuffles grow with M,
    so meant for M <= 2).
Rows of W past N re-read row N-1 instead of being masked (their results are never stored), so W
loads are unmasked when K % BLOCK_K == 0 and 16 bytes wide along K either way. M is a runtime
argument Triton does not specialize (do_not_specialize), so every batch size shares one compiled
variant per config.

Split-K (config.split_k > 1, for too few tiles to fill the SMs, e.g. o_proj/down_proj N=3584): the
programs of one (n, m) tile each cover a K range and write fp32 partial sums to a [splits, M, N]
workspace; `_split_k_reduce_kernel` adds them in split order (deterministic, no atomics), adds the
bias and casts: one more launch, but the same bits on every run (a last-arriving-program fixup
would save the launch; atomic adds would make decode outputs vary run to run). Accumulation is
fp32 throughout; the output has x's dtype.

fp8 weights (quantization="fp8"; `weight_scale`, one fp32 scale per W row): W is read at one byte an
element. With 16-bit x (W8A16) the fma paths widen it to fp32 like any W and the dot path converts each W
tile to x's dtype before the dot (exact: e4m3 values are bf16/fp16 values); with fp8 x as well (W8A8,
`x_scale` per x row, dot path only) the tiles go to the fp8 tensor cores unconverted. Either way the sums
are fp32 and the scales multiply them once, before the bias (each split's partial sums too: the scales
are per row and column, so the splits still add up). Configs: SKINNY_FP8_CONFIGS / SKINNY_W8A8_CONFIGS.

No host syncs and the grid depends on shapes only, so a call can be captured in a CUDA graph
(the split-K workspace is then allocated from the graph's pool). Configs: `default_config` (a
heuristic per (M, N, K); `default_dot_config` for M > 8) unless SKINNY_CONFIGS has an entry measured
on the GPU (scripts/bench_skinny_gemm.py prints one to paste), keyed (N, K, m_bucket) with m_bucket
= next power of 2 of M (1, 2, 4, 8, 16, 32, 64, 128, 256), unless the caller passes `config`. As
committed, the entries are measured on the H100 (M = 1 for every projection; M = 16 where Triton
beat cuBLAS, confirmed on the H200) and on the H200 (o and gate_up at M = 17-32, gate_up at 3-8); any
other M runs on the heuristic, which is reasoning, not measurement (the model uses the kernel above
M = 1 only where an entry exists: `has_measured_config`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter

MAX_M = 256
FMA_MAX_M = 8  # the fma paths take all M rows in one tile
_SMEM_BUDGET = 112 * 1024  # heuristic, M > 8: pipeline buffers per program, two programs per H100 SM
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# W8A8 (fp8 x fp8 dots) on Hopper, whose tensor cores add fp8 products in reduced precision: "full" leaves the
# sums there for the whole K loop (Triton's sm_90 default, as cuBLAS's fast accumulation: 1.2-2.2e-3 relative at
# the 7B shapes), "tile" moves them into the fp32 accumulator after every K tile (1.3-2.1e-4, cuBLAS's precise
# mode). Measured on the H200 (session 21): "tile" costs 2.1% of the fp8 default workload's throughput and changes
# no engine-level figure (bf16 logprob error 4.2e-2 either way: the activations' fp8 rounding dominates).
FP8_SUMS = os.environ.get("PAGEDSERVE_FP8_SUMS", "full")
if FP8_SUMS not in ("full", "tile"):
    raise ValueError(f"PAGEDSERVE_FP8_SUMS must be 'full' or 'tile', got {FP8_SUMS!r}")


@triton.jit(do_not_specialize=["M"])  # one compiled variant for every batch size
def _skinny_gemm_kernel(
    x_ptr,  # [M, K], K contiguous
    w_ptr,  # [N, K], contiguous
    bias_ptr,  # [N] (HAS_BIAS only)
    scale_ptr,  # [N] fp32 (HAS_SCALE only): W's rows are fp8, each times its scale
    x_scale_ptr,  # [M] fp32 (X_SCALED only): x's rows are fp8, each times its scale
    out_ptr,  # y [M, N] (x's dtype) or, when split, partials [splits, M, N] fp32
    M,  # dot: any M (m-tiles of BLOCK_M rows); fma: M <= BLOCK_M (one tile)
    N,
    K,
    stride_xm,
    stride_wn,
    stride_os,  # between splits in out (0 when unsplit)
    stride_om,
    k_per_split,  # a multiple of BLOCK_K
    HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,  # fp8 W: converted to x's dtype for the dot, the row scale applied to the sums
    X_SCALED: tl.constexpr,  # fp8 x too (dot path): fp8 x fp8 tensor-core products, both scales on the sums
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks at all
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_SUMS_PER_TILE: tl.constexpr,  # X_SCALED: fp8 partial sums into the fp32 accumulator every K tile
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    # With PDL the M == 1 path loads its first W tile before waiting for the previous kernel (W is
    # never written during a step; x, the output and the workspace are touched only after the wait),
    # so weight streaming starts while that kernel finishes. The other paths wait first.
    if USE_DOT:
        # axis 0 = n_tile * num_m_tiles + m_tile: the m-tiles of one n-tile are neighbours in launch
        # order, so they run together and all but the first read their W tile from L2.
        num_m_tiles = tl.cdiv(M, BLOCK_M)
        pid_n = tl.program_id(0) // num_m_tiles
        pid_m = tl.program_id(0) % num_m_tiles
    else:
        pid_n = tl.program_id(0)
        pid_m = 0
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    rows_n = tl.minimum(offs_n, N - 1)  # padding rows re-read row N-1 (never stored)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + (k_start + offs_k)[None, :]

    if USE_DOT:
        pdl_enter(USE_PDL)
        # x rows past M (padding of the last m-tile) are masked (zeros, no memory traffic); the mask
        # is constant along K, so the loads stay vectorized.
        m_mask = (offs_m < M)[:, None]
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_start + offs_k)[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs, mask=m_mask, other=0.0)
            else:
                k_mask = (k + offs_k) < k_end
                w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=m_mask & k_mask[None, :], other=0.0)
            if HAS_SCALE and not X_SCALED:  # fp8 -> x's dtype (exact: e4m3 values are bf16/fp16 values)
                w = w.to(x.dtype)
            if X_SCALED and FP8_SUMS_PER_TILE:  # fp8 x fp8 sums into fp32 every K tile (FP8_SUMS above)
                acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    elif BLOCK_M == 1:
        x_ptrs = x_ptr + (k_start + offs_k)[None, :]
        # The first K step, peeled: its W tile is loaded before the PDL wait.
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            first_mask = (k_start + offs_k) < k_end
            w = tl.load(w_ptrs, mask=first_mask[None, :], other=0.0)
        pdl_enter(USE_PDL)
        if EVEN_K:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=first_mask[None, :], other=0.0)
        acc_wide = w.to(tl.float32) * x.to(tl.float32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        for k in range(k_start + BLOCK_K, k_end, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                k_mask = (k + offs_k) < k_end
                w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
                x = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            acc_wide += w.to(tl.float32) * x.to(tl.float32)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        result = tl.sum(acc_wide, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        pdl_enter(USE_PDL)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        x_ptrs = x_ptr + k_start + offs_k
        for k in range(k_start, k_end, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs).to(tl.float32)
            else:
                k_mask = (k + offs_k) < k_end
                w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0).to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                row_off = tl.minimum(m, M - 1) * stride_xm
                if EVEN_K:
                    x_m = tl.load(x_ptrs + row_off)
                else:
                    x_m = tl.load(x_ptrs + row_off, mask=k_mask, other=0.0)
                dot_m = tl.sum(w * x_m.to(tl.float32)[None, :], axis=1)  # [BLOCK_N]
                acc += tl.where(offs_m[None, :] == m, dot_m[:, None], 0.0)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        result = tl.trans(acc)

    n_mask = offs_n < N
    if HAS_SCALE:  # per split too: the scale is per column, so the split sums add up the same
        result *= tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if X_SCALED:
        result *= tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if HAS_BIAS:
        result += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["M"])
def _tma_gemm_kernel(
    w_desc,  # TMA descriptor of W [N, K], block [BLOCK_N, BLOCK_K]
    x_desc,  # TMA descriptor of x [M, K], block [BLOCK_M, BLOCK_K] (rows past M read as zeros)
    xt_desc,  # TMA descriptor of x [M, K], block [BLOCK_MT, BLOCK_K] (BLOCK_MT > 0 only; else x_desc)
    bias_ptr,  # [N] (HAS_BIAS only)
    out_ptr,  # y [M, N] or, when split, partials [splits, M, N] fp32
    M,
    N,
    stride_os,
    stride_om,
    k_per_split,  # a multiple of BLOCK_K
    K,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    BLOCK_MT: tl.constexpr = 0,  # a second token tile under the first: an m-tile of BLOCK_M + BLOCK_MT rows
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    """The dot path with both operands fetched by the Hopper tensor-memory accelerator (TMA): W and x
    tiles land in shared memory through bulk tensor copies, NUM_STAGES deep, and feed wgmma directly
    (no per-thread address arithmetic or register staging). Same tiling and launch order as the dot
    path of _skinny_gemm_kernel; rows past N or M and columns past K are zero-filled by the copy.

    BLOCK_MT > 0: each K step runs two dots on the same W tile, BLOCK_M tokens and BLOCK_MT more
    (e.g. 128 + 16 for M = 144), so an M between powers of 2 costs the tensor cores M rounded up to
    BLOCK_M + BLOCK_MT rather than to the next power of 2 (wgmma's token width can be any multiple of
    8; Triton's tiles are powers of 2)."""
    TILE_M: tl.constexpr = BLOCK_M + BLOCK_MT
    num_m_tiles = tl.cdiv(M, TILE_M)
    pid_n = tl.program_id(0) // num_m_tiles
    pid_m = tl.program_id(0) % num_m_tiles
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    m0 = pid_m * TILE_M
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    pdl_enter(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if BLOCK_MT > 0:
        acc_t = tl.zeros([BLOCK_N, BLOCK_MT], dtype=tl.float32)
    for k in tl.range(k_start, k_end, BLOCK_K, num_stages=NUM_STAGES):
        w = w_desc.load([n0, k])
        x = x_desc.load([m0, k])
        if BLOCK_MT > 0:
            xt = xt_desc.load([m0 + BLOCK_M, k])
        acc = tl.dot(w, x.T, acc)
        if BLOCK_MT > 0:
            acc_t = tl.dot(w, xt.T, acc_t)
    if BLOCK_MT > 0:
        result_t = tl.trans(acc_t)  # [BLOCK_MT, BLOCK_N]
        if HAS_BIAS:
            result_t += bias
        offs_t = m0 + BLOCK_M + tl.arange(0, BLOCK_MT)
        out_t = out_ptr + pid_k * stride_os + offs_t[:, None] * stride_om + offs_n[None, :]
        tl.store(out_t, result_t.to(out_ptr.dtype.element_ty), mask=(offs_t < M)[:, None] & n_mask[None, :])
    result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        result += bias
    offs_m = m0 + tl.arange(0, BLOCK_M)
    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, result.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_mask[None, :])


@triton.jit(do_not_specialize=["M"])
def _split_k_reduce_kernel(
    part_ptr,  # [num_splits, M, N] fp32, contiguous
    bias_ptr,
    y_ptr,
    M,
    N,
    stride_ym,
    num_splits,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    pdl_enter(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat index m * N + n
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):  # fixed order: the same bits on every run
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * stride_ym + n, acc.to(y_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True, slots=True)
class SkinnyConfig:
    block_n: int  # rows of W per program (power of 2; >= 16 with use_dot)
    block_k: int  # K elements per step (power of 2; >= 16 with use_dot)
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # upper bound: reduced so that no split is empty
    use_dot: bool = True
    block_m: int = 16  # rows of x per program, use_dot only (power of 2, 16..256); fma tiles are m_bucket(M)
    use_tma: bool = False  # dot path with TMA (bulk tensor copy) loads: Hopper or newer, bf16/fp16
    block_m_tail: int = 0  # use_tma only: a second token tile of this many rows (power of 2, 16..block_m)

    def validate(self) -> None:
        for name in ("block_n", "block_k", "num_warps", "block_m"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of 2, got {value}")
        if self.use_dot and (self.block_n < 16 or self.block_k < 16):
            raise ValueError(f"use_dot needs block_n and block_k >= 16, got {self.block_n}, {self.block_k}")
        if not 16 <= self.block_m <= MAX_M:
            raise ValueError(f"block_m must be in 16..{MAX_M}, got {self.block_m}")
        if self.num_warps > 16 or self.num_stages < 1 or self.split_k < 1:
            raise ValueError(f"bad num_warps / num_stages / split_k in {self}")
        if self.use_tma and not self.use_dot:
            raise ValueError("use_tma needs use_dot (the TMA path is a tensor-core path)")
        tail = self.block_m_tail
        if tail and (not self.use_tma or tail < 16 or tail > self.block_m or tail & (tail - 1)):
            raise ValueError(f"block_m_tail must be 0 or, with use_tma, a power of 2 in 16..block_m, got {tail}")


# Measured overrides, keyed (N, K, m_bucket) or (N, K) (any M; an fma entry is skipped for M > 8);
# m_bucket = next power of 2 of M: 1, 2, 4, 8, 16, 32, 64, 128, 256 (M = 139 takes the 256 entry).
# Values: SkinnyConfig fields (block_m defaults to 16). Paste the dict scripts/bench_skinny_gemm.py prints.
# Qwen2-7B at M=1, NVIDIA H100 80GB HBM3, 2026-11-24 (scripts/bench_skinny_gemm.py --m 1, weights
# rotated past L2): whole layer 163.0 us vs cuBLAS 178.5 us.
SKINNY_CONFIGS: dict[tuple[int, ...], dict[str, int | bool]] = {
    # qkv M=1: 13.4 us vs cuBLAS 14.3 us, heuristic 15.6 us
    (4608, 3584, 1): dict(block_n=4, block_k=512, num_warps=4, num_stages=2, split_k=1, use_dot=False),
    # o M=1: 9.9 us vs cuBLAS 11.6 us, heuristic 12.1 us (4-row tiles: 10.3 us; session 5, 08d8269)
    (3584, 3584, 1): dict(block_n=2, block_k=512, num_warps=4, num_stages=2, split_k=1, use_dot=False),
    # gate_up M=1: 89.8 us vs cuBLAS 98.5 us, heuristic 92.0 us
    (37888, 3584, 1): dict(block_n=4, block_k=512, num_warps=4, num_stages=2, split_k=1, use_dot=False),
    # down M=1: 46.7 us vs cuBLAS 53.6 us, heuristic 57.0 us (4-row tiles: 48.6 us; one row a program spreads
    # 3,584 programs evenly over the SMs where 896 left a ragged last wave; session 5, 08d8269)
    (3584, 18944, 1): dict(block_n=1, block_k=512, num_warps=4, num_stages=3, split_k=1, use_dot=False),
    # lm_head M=1 (fp32 logits; PAGEDSERVE_SKINNY_LM_HEAD=0 for cuBLAS): 351.3 us vs cuBLAS 380.7 us, heuristic
    # 353.7 us (--m 1 --shapes lm_head --quick, ae6475e)
    (152064, 3584, 1): dict(block_n=8, block_k=256, num_warps=4, num_stages=3, split_k=1, use_dot=False),
    # M=9..16, same card and script (--m 16), 2026-11-24: only the projections where Triton won are
    # listed (qkv stays with cuBLAS: 16.0 vs 14.5 us). At M 64-256 cuBLAS won or tied every shape.
    # o M=16: 13.1 us vs cuBLAS 14.1 us
    (3584, 3584, 16): dict(block_n=64, block_k=64, num_warps=4, num_stages=4, split_k=4, use_dot=True, block_m=16),
    # gate_up M=16: 93.0 us vs cuBLAS 99.7 us
    (37888, 3584, 16): dict(block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=1, use_dot=True, block_m=16),
    # down M=16: 50.9 us vs cuBLAS 52.9 us
    (3584, 18944, 16): dict(block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=5, use_dot=True, block_m=16),
    # The three M=16 entries above, timed again on an NVIDIA H200 (2026-12-03, --m 16 --quick): o 10.0 us vs cuBLAS
    # 11.8, gate_up 64.2 vs 73.1, down 36.7 vs 39.1; qkv still loses (12.1 vs 11.1).
    # NVIDIA H200, 2026-12-03 (scripts/bench_skinny_gemm.py --m 17,32,40,64 --shapes o,gate_up; --m 4,8 --shapes
    # gate_up; weights rotated past L2), only where Triton won at both ends of the bucket (lost or tied: o at
    # M=64, gate_up at 40-64, qkv at 4-48, down at 4-8 and 24-48; every shape at 72-128 but o at 72). Not timed
    # on the H100. docs/gpu-notes.md, session 15.
    # o M=32: 9.1 us vs cuBLAS 12.0 us (M=17: 9.8 vs 11.9 with split 4)
    (3584, 3584, 32): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=2, use_dot=True, block_m=32),
    # gate_up M=32: 66.2 us vs cuBLAS 72.9 us (M=17: 65.1 vs 72.1, same config)
    (37888, 3584, 32): dict(block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=1, use_dot=True, block_m=32),
    # gate_up M=4: 65.6 us vs cuBLAS 71.6 us; M=8: 65.9 vs 72.7 (same config)
    (37888, 3584, 4): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=1, use_dot=True, block_m=16),
    (37888, 3584, 8): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=1, use_dot=True, block_m=16),
}


def has_measured_config(m: int, n: int, k: int) -> bool:
    """Whether SKINNY_CONFIGS has an entry measured for this shape and M's bucket: the model uses
    the kernel above M=1 only where it beat cuBLAS on the GPU."""
    return (n, k, m_bucket(m)) in SKINNY_CONFIGS


def m_bucket(m: int) -> int:
    return triton.next_power_of_2(m)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # CPU (interpreter): pretend H100 so the heuristic matches what the GPU would pick


def default_config(m: int, n: int, k: int, dtype: torch.dtype, num_sms: int = 132) -> SkinnyConfig:
    """A heuristic, before measurement (SKINNY_CONFIGS overrides it). M > 8: see `default_dot_config`.

    M <= 8:
    * block_k: one 16-byte vector per lane, a warp spanning 512 contiguous bytes of a W row
      (256 bf16); halved (down to 64) while it does not divide K, so common K take the unmasked path.
    * M <= 2: fma with 16 rows per program; M >= 4: tensor cores (fma's per-step shuffles grow with M)
      with 32 rows.
    * block_n is halved (fma down to 4, dot to 16) until there are >= 4 programs per SM: memory
      latency is hidden by many programs in flight, and a small grid leaves SMs idle in the tail.
    * split_k only when the n-tiles still give < 2 programs per SM (o/down at N=3584): enough splits
      for ~4 programs per SM, each split keeping >= 4 K steps so the pipeline fills.
    """
    if m > FMA_MAX_M:
        return default_dot_config(m, n, k, dtype, num_sms)
    block_k = fit_block_k(k, 512 // dtype.itemsize)
    use_dot = m_bucket(m) >= 4
    block_n, min_block_n = (32, 16) if use_dot else (16, 4)
    while block_n > min_block_n and triton.cdiv(n, block_n) < 4 * num_sms:
        block_n //= 2
    num_warps = 4 if block_n * block_k >= 4 * 32 * 8 else 2
    return SkinnyConfig(block_n, block_k, num_warps, 3, default_split_k(n, k, block_n, block_k, num_sms), use_dot)


def default_dot_config(m: int, n: int, k: int, dtype: torch.dtype, num_sms: int = 132) -> SkinnyConfig:
    """The M > 8 heuristic (tensor cores, m-tiles), reasoned for the H100 (132 SMs, 228 KB shared memory per SM):

    * block_m: next power of 2 of M, 16..128; 64 for M in 129..192 (3 x 64 rows pad less than 2 x 128).
    * block_n: 128 rows of W with 8 warps (two wgmma warpgroups of 64 rows) when N alone gives >= 2
      n-tiles per SM (gate_up), else 64 with 4 warps (one warpgroup).
    * While the (n, m) tiles number fewer than the SMs, block_m is halved (down to 32, or 64 for M > 64):
      each extra m-tile re-reads its W tile from L2, cheaper than split-K's fp32 partials.
    * block_k 128, halved to 64 unless 3 stages of (block_n + block_m) * block_k * itemsize bytes fit
      _SMEM_BUDGET (112 KB: two programs per SM); num_stages: as many (2..4) as fit it.
    * split_k: `default_split_k` -- only while the tiles give < 2 programs per SM, and capped so the
      partials (written and read, fp32) stay <= 1/4 of W's bytes.
    """
    block_m = min(triton.next_power_of_2(m), 128)
    if block_m == 128 and triton.cdiv(m, 64) * 64 < triton.cdiv(m, 128) * 128:
        block_m = 64
    block_m = max(block_m, 16)
    block_n, num_warps = (128, 8) if triton.cdiv(n, 128) >= 2 * num_sms else (64, 4)
    min_block_m = min(block_m, 32 if m <= 64 else 64)
    while block_m > min_block_m and triton.cdiv(n, block_n) * triton.cdiv(m, block_m) < num_sms:
        block_m //= 2
    block_k = fit_block_k(k, 128)
    while block_k > 64 and _SMEM_BUDGET // ((block_n + block_m) * block_k * dtype.itemsize) < 3:
        block_k //= 2
    num_stages = max(2, min(4, _SMEM_BUDGET // ((block_n + block_m) * block_k * dtype.itemsize)))
    split_k = default_split_k(n, k, block_n, block_k, num_sms, m=m, block_m=block_m)
    return SkinnyConfig(block_n, block_k, num_warps, num_stages, split_k, True, block_m)


def fit_block_k(k: int, block_k: int) -> int:
    """block_k capped at K (rounded up to a power of 2, >= 16), halved (down to 64) until it divides K."""
    block_k = max(16, min(block_k, triton.next_power_of_2(k)))
    while block_k > 64 and k % block_k:
        block_k //= 2
    return block_k


def default_split_k(n: int, k: int, block_n: int, block_k: int, num_sms: int, m: int = 1, block_m: int = 16) -> int:
    """M <= 8: 1 when the n-tiles give >= 2 programs per SM; else ~4 programs per SM, >= 4 K steps per split.

    M > 8 (tiles of n and m, block_m rows): 1 when the tiles give >= 2 programs per SM; else ~2 programs
    per SM (larger tiles: fewer fit on an SM), >= 4 K steps per split, and at most K / (16 M) splits, so
    the fp32 partials (8 M N bytes per split, written then read) stay <= 1/4 of W's 2 N K bytes.
    """
    tiles = triton.cdiv(n, block_n)
    if m <= FMA_MAX_M:
        if tiles >= 2 * num_sms:
            return 1
        return max(1, min(triton.cdiv(4 * num_sms, tiles), triton.cdiv(k, block_k) // 4))
    tiles *= triton.cdiv(m, block_m)
    if tiles >= 2 * num_sms:
        return 1
    return max(1, min(triton.cdiv(2 * num_sms, tiles), triton.cdiv(k, block_k) // 4, k // (16 * m)))


def effective_split_k(k: int, block_k: int, split_k: int) -> int:
    """The number of splits a launch uses: at most one per K step, and no empty split."""
    k_tiles = triton.cdiv(k, block_k)
    return triton.cdiv(k_tiles, triton.cdiv(k_tiles, min(split_k, k_tiles)))


def choose_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> SkinnyConfig:
    for key in ((n, k, m_bucket(m)), (n, k)):
        if key in SKINNY_CONFIGS:
            config = SkinnyConfig(**SKINNY_CONFIGS[key])
            if config.use_dot or m <= FMA_MAX_M:
                return fit_tail(config, m)
    return default_config(m, n, k, dtype, _num_sms(device))


# fp8 weights (skinny_linear's weight_scale), keyed (N, K, m_bucket) as SKINNY_CONFIGS; measured entries only.
# SKINNY_FP8_CONFIGS: 16-bit x (W8A16); SKINNY_W8A8_CONFIGS: fp8 x as well (x_scale).
# Qwen2-7B, NVIDIA H200, 2026-12-04 (scripts/bench_skinny_gemm.py --fp8; weights rotated past L2; docs/gpu-notes.md,
# session 20 runs 2-3). W8A16 is the way at M = 1 only (executor/quantization.py): layer 75.2 us vs cuBLAS bf16 134.0.
SKINNY_FP8_CONFIGS: dict[tuple[int, ...], dict[str, int | bool]] = {
    # qkv M=1: 6.9 us vs cuBLAS bf16 11.0; o 6.2 vs 11.6; gate_up 39.0 vs 71.7; down 22.7 vs 38.0
    (4608, 3584, 1): dict(block_n=4, block_k=512, num_warps=4, num_stages=2, split_k=1, use_dot=False),
    (3584, 3584, 1): dict(block_n=2, block_k=512, num_warps=4, num_stages=2, split_k=1, use_dot=False),
    (37888, 3584, 1): dict(block_n=8, block_k=512, num_warps=4, num_stages=3, split_k=1, use_dot=False),
    (3584, 18944, 1): dict(block_n=1, block_k=512, num_warps=4, num_stages=3, split_k=1, use_dot=False),
}
# W8A8 (the time includes the per-token quantization of x), same card (--fp8 --quick; runs 3 and 5); M=2..64 at the
# bucket's M, bucket 128 at M=100, bucket 256 the best tile at M=139 (the default workload's typical decode batch;
# at M=256 within 10%). Layer (qkv + o + gate_up + down) vs cuBLAS bf16: M=2 81.1 vs 131.6 us, M=8 82.5 vs 132.6,
# M=64 94.8 vs 133.0, M=100 110.2 vs 142.9, M=139 150.7 vs 150.5.
SKINNY_W8A8_CONFIGS: dict[tuple[int, ...], dict[str, int | bool]] = {
    # qkv: M=2-8 9.7 us (cuBLAS bf16 10.9), M=16 10.2, M=32 10.6, M=64 11.6 (11.8), M=100 13.7 (13.8), M=139 13.8 (14.7)
    (4608, 3584, 2): dict(block_n=64, block_k=256, num_warps=4, num_stages=4, split_k=3, use_dot=True, block_m=16),
    (4608, 3584, 4): dict(block_n=64, block_k=256, num_warps=4, num_stages=4, split_k=3, use_dot=True, block_m=16),
    (4608, 3584, 8): dict(block_n=64, block_k=256, num_warps=4, num_stages=4, split_k=3, use_dot=True, block_m=16),
    (4608, 3584, 16): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=4, use_dot=True, block_m=16),
    (4608, 3584, 32): dict(block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=3, use_dot=True, block_m=32),
    (4608, 3584, 64): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=3, use_dot=True, block_m=64),
    (4608, 3584, 128): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=2, use_dot=True, block_m=128),
    (4608, 3584, 256): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=1, use_dot=True, block_m=64),
    # o: M=2-8 8.8 us (cuBLAS bf16 11.6), M=16 9.2, M=32 9.7, M=64 10.2 (9.3), M=100 11.3 (9.6), M=139 14.3 (10.1)
    (3584, 3584, 2): dict(block_n=64, block_k=256, num_warps=4, num_stages=4, split_k=3, use_dot=True, block_m=16),
    (3584, 3584, 4): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=5, use_dot=True, block_m=16),
    (3584, 3584, 8): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=5, use_dot=True, block_m=16),
    (3584, 3584, 16): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=5, use_dot=True, block_m=16),
    (3584, 3584, 32): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=5, use_dot=True, block_m=32),
    (3584, 3584, 64): dict(block_n=128, block_k=128, num_warps=8, num_stages=4, split_k=3, use_dot=True, block_m=64),
    (3584, 3584, 128): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=2, use_dot=True, block_m=128),
    (3584, 3584, 256): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=1, use_dot=True, block_m=64),
    # gate_up: M=2-16 36.5-37.6 us (cuBLAS bf16 69-71), M=32 39.3, M=64 42.7, M=100 51.5 (73.8), M=139 74.5 (80.1)
    (37888, 3584, 2): dict(block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=1, use_dot=True, block_m=16),
    (37888, 3584, 4): dict(block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=1, use_dot=True, block_m=16),
    (37888, 3584, 8): dict(block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=1, use_dot=True, block_m=16),
    (37888, 3584, 16): dict(block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=1, use_dot=True, block_m=16),
    (37888, 3584, 32): dict(block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=1, use_dot=True, block_m=32),
    (37888, 3584, 64): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=1, use_dot=True, block_m=64),
    (37888, 3584, 128): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=1, use_dot=True, block_m=128),
    (37888, 3584, 256): dict(block_n=128, block_k=128, num_warps=8, num_stages=4, split_k=1, use_dot=True, block_m=64),
    # down: M=2-16 26.2-26.8 us (cuBLAS bf16 37-39), M=32 27.9, M=64 30.2 (42.6), M=100 33.7 (44.1), M=139 48.1 (46.3)
    (3584, 18944, 2): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=5, use_dot=True, block_m=16),
    (3584, 18944, 4): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=5, use_dot=True, block_m=16),
    (3584, 18944, 8): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=5, use_dot=True, block_m=16),
    (3584, 18944, 16): dict(block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=5, use_dot=True, block_m=16),
    (3584, 18944, 32): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=5, use_dot=True, block_m=32),
    (3584, 18944, 64): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=5, use_dot=True, block_m=64),
    (3584, 18944, 128): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=3, use_dot=True, block_m=64),
    (3584, 18944, 256): dict(block_n=64, block_k=128, num_warps=4, num_stages=4, split_k=2, use_dot=True, block_m=64),
}


def choose_fp8_config(m: int, n: int, k: int, device: torch.device, w8a8: bool = False) -> SkinnyConfig:
    """fp8 weights: a measured entry, else the heuristic. W8A16: the fma paths' block_k spans 512 bytes of a W row
    as for 16-bit W, and the dot path sizes its shared memory for 16-bit tiles (W is converted before the dot).
    W8A8 (dot only): tiles of one-byte elements, block_k >= 32 (fp8 wgmma's K step)."""
    key = (n, k, m_bucket(m))
    table = SKINNY_W8A8_CONFIGS if w8a8 else SKINNY_FP8_CONFIGS
    if key in table:
        return SkinnyConfig(**table[key])
    if w8a8:
        config = default_dot_config(max(m, FMA_MAX_M + 1), n, k, torch.float8_e4m3fn, _num_sms(device))
        return replace(config, block_k=max(32, config.block_k))
    if m > FMA_MAX_M:
        return default_dot_config(m, n, k, torch.bfloat16, _num_sms(device))
    return default_config(m, n, k, torch.float8_e4m3fn, _num_sms(device))


def fit_tail(config: SkinnyConfig, m: int) -> SkinnyConfig:
    """An entry with two token tiles (block_m_tail > 0) serves every M of its bucket: the second tile is sized
    to what M leaves past block_m (a power of 2, 16..block_m), or dropped when block_m holds M, so M = 144 runs
    128 + 16 rows and M = 200 runs 128 + 128, not two m-tiles of 144 (one compiled variant per tail size)."""
    if not config.block_m_tail:
        return config
    if m <= config.block_m:
        return replace(config, block_m_tail=0)
    return replace(config, block_m_tail=min(config.block_m, max(16, m_bucket(m - config.block_m))))


def _check_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
                    weight_scale: torch.Tensor | None = None, x_scale: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None) -> None:
    if x_scale is not None:  # fp8 x as well (W8A8): the output dtype is out_dtype's
        if weight_scale is None or x.dtype != torch.float8_e4m3fn or weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"x_scale needs x and weight in float8_e4m3fn and a weight_scale, got {x.dtype}, "
                             f"{weight.dtype}")
        if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"fp8 x needs out_dtype bfloat16, float16 or float32, got {out_dtype}")
    elif out_dtype not in (None, x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be x's dtype or torch.float32, got {out_dtype}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [M, K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    (m, k), (n, k_w) = x.shape, weight.shape
    if not 1 <= m <= MAX_M:
        raise ValueError(f"skinny_linear takes 1 <= M <= {MAX_M} rows, got M={m}; use F.linear for more")
    if k != k_w or k == 0 or n == 0:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not match ([M, K] @ [N, K]^T)")
    if x_scale is not None and (x_scale.numel() != m or x_scale.dtype != torch.float32
                                or not x_scale.is_contiguous()):
        raise ValueError(f"x_scale must be a contiguous float32 tensor of {m} elements, got "
                         f"{tuple(x_scale.shape)} {x_scale.dtype}")
    if weight_scale is not None:
        if weight.dtype != torch.float8_e4m3fn or (x_scale is None and x.dtype not in _DTYPES):
            raise ValueError(f"with weight_scale, weight must be float8_e4m3fn and x float16/bfloat16/float32, "
                             f"got {weight.dtype}, {x.dtype}")
        if weight_scale.shape != (n,) or weight_scale.dtype != torch.float32 or weight_scale.stride(0) != 1:
            raise ValueError(f"weight_scale must be a contiguous [{n}] float32 tensor, got "
                             f"{tuple(weight_scale.shape)} {weight_scale.dtype}")
    elif x.dtype not in _DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x and weight must share a float16/bfloat16/float32 dtype, got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError("x needs a contiguous last dimension and weight must be contiguous")
    if weight.device != x.device:
        raise ValueError(f"x is on {x.device} but weight on {weight.device}")
    y_dtype = out_dtype if x_scale is not None else x.dtype  # bias and default output: x's dtype, or out_dtype
    if bias is not None and (bias.shape != (n,) or bias.dtype != y_dtype or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{n}] tensor of {y_dtype}, got {tuple(bias.shape)} {bias.dtype}")
    out_dtypes = (y_dtype,) if x_scale is not None else (x.dtype, torch.float32)
    if out is not None and (out.shape != (m, n) or out.dtype not in out_dtypes or out.stride(1) != 1):
        raise ValueError(f"out must be [{m}, {n}] of {' or '.join(str(d) for d in out_dtypes)} with a contiguous "
                         "last dim")


def _check_tma(x: torch.Tensor, weight: torch.Tensor) -> None:
    """TMA's rules for a global tensor: 16-byte aligned base and row stride, 2-byte elements here."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"use_tma takes float16/bfloat16 operands, got {x.dtype}")
    for name, t in (("x", x), ("weight", weight)):
        if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            raise ValueError(f"use_tma needs {name} 16-byte aligned with a 16-byte multiple row stride")


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: SkinnyConfig | Mapping[str, int | bool] | None = None,
    out_dtype: torch.dtype | None = None,
    weight_scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] with 1 <= M <= 256; returns out ([M, N], x's dtype, or
    out_dtype=torch.float32: the fp32 accumulator unrounded, e.g. for logits).

    weight_scale [N] fp32: weight is float8_e4m3fn and stands for weight * weight_scale[:, None] (fp8
    weights, 16-bit activations: W read at one byte an element, products and sums as for 16-bit W).
    x_scale [M] or [M, 1] fp32 (with weight_scale; dot configs): x is float8_e4m3fn too, standing for x * x_scale
    (per-token activations, kernels/fp8_quant.py), and the products run on fp8 tensor cores; the output is
    out_dtype (required: bfloat16 or float16, or float32)."""
    _check_operands(x, weight, bias, out, weight_scale, x_scale, out_dtype)
    (m, k), n = x.shape, weight.shape[0]
    if config is None:
        config = (choose_config(m, n, k, x.dtype, x.device) if weight_scale is None
                  else choose_fp8_config(m, n, k, x.device, w8a8=x_scale is not None))
    elif not isinstance(config, SkinnyConfig):
        config = SkinnyConfig(**config)
    config.validate()
    if x_scale is not None and (not config.use_dot or config.use_tma):
        raise ValueError("fp8 x (x_scale) takes the plain dot path (use_dot=True, use_tma=False)")
    if weight_scale is not None and config.use_tma:
        raise ValueError("fp8 weights (weight_scale) take the plain dot or fma paths, not use_tma")
    if not config.use_dot and m > FMA_MAX_M:
        raise ValueError(f"use_dot=False (the fma path) takes M <= {FMA_MAX_M}, got M={m}; use a dot config")
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    block_k = config.block_k
    num_splits = effective_split_k(k, block_k, config.split_k)
    tiles_per_split = triton.cdiv(triton.cdiv(k, block_k), num_splits)
    if num_splits > 1:
        target = torch.empty((num_splits, m, n), dtype=torch.float32, device=x.device)
        stride_os, stride_om = target.stride(0), target.stride(1)
    else:
        target, stride_os, stride_om = out, 0, out.stride(0)
    block_m = config.block_m if config.use_dot else m_bucket(m)  # fma: one m-tile
    tile_m = block_m + config.block_m_tail
    grid = (triton.cdiv(n, config.block_n) * triton.cdiv(m, tile_m), num_splits)
    common = dict(HAS_BIAS=bias is not None and num_splits == 1, BLOCK_M=block_m, BLOCK_N=config.block_n,
                  BLOCK_K=block_k, num_warps=config.num_warps, **pdl_launch_kwargs(x.device))
    if config.use_tma:
        _check_tma(x, weight)
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
        tail = config.block_m_tail
        _tma_gemm_kernel[grid](
            TensorDescriptor.from_tensor(weight, [config.block_n, block_k]),
            x_desc, TensorDescriptor.from_tensor(x, [tail, block_k]) if tail else x_desc,
            bias if bias is not None else x, target,
            m, n, stride_os, stride_om, tiles_per_split * block_k, k,
            NUM_STAGES=config.num_stages, BLOCK_MT=tail, **common,
        )  # fmt: skip
    else:
        _skinny_gemm_kernel[grid](
            x, weight, bias if bias is not None else x, weight_scale if weight_scale is not None else x,
            x_scale if x_scale is not None else x, target,
            m, n, k, x.stride(0), weight.stride(0), stride_os, stride_om, tiles_per_split * block_k,
            HAS_SCALE=weight_scale is not None, X_SCALED=x_scale is not None,
            EVEN_K=k % block_k == 0,
            USE_DOT=config.use_dot,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,  # fp32: no TF32 rounding
            FP8_SUMS_PER_TILE=FP8_SUMS == "tile",
            num_stages=config.num_stages, **common,
        )  # fmt: skip
    if num_splits > 1:
        block = 512
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            target, bias if bias is not None else x, out, m, n, out.stride(0), num_splits,
            HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
            **pdl_launch_kwargs(out.device),
        )  # fmt: skip
    return out


__all__ = [
    "FMA_MAX_M",
    "MAX_M",
    "SKINNY_CONFIGS",
    "SKINNY_FP8_CONFIGS",
    "SKINNY_W8A8_CONFIGS",
    "SkinnyConfig",
    "choose_config",
    "choose_fp8_config",
    "default_config",
    "default_dot_config",
    "default_split_k",
    "effective_split_k",
    "fit_block_k",
    "fit_tail",
    "skinny_linear",
]
