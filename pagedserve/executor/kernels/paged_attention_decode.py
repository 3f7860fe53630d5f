"""Decode paged attention (one new token per sequence), GQA-aware, with split-K (flash-decoding).

    query:        [num_seqs, num_heads, head_dim]          (token i belongs to sequence i)
    kv_cache:     [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: [num_seqs, max_blocks] int32;  seq_lens: [num_seqs] int32 (includes the new token)

Grid (num_seqs, num_kv_heads, num_splits). One program owns ALL query heads of one KV head group:
the G = num_heads // num_kv_heads heads are the M rows of tl.dot (padded to >= 16), so each K/V
tile is read from memory once per group, not once per query head.

The sequence is cut into tiles of BLOCK_N tokens (a tile may span several cache blocks: every token
finds its physical block through the block table). With num_splits > 1 the tiles are divided evenly
among the splits *on the device* from seq_lens:

    tiles:   | 0 | 1 | 2 | 3 | 4 |          num_tiles = cdiv(seq_len, BLOCK_N)
    splits:  |  s0   |  s1   | s2 |  (s3 empty: returns at once)   tiles_per_split = cdiv(num_tiles, S)

so any num_splits is correct for any seq_len. Each split writes a normalized partial output and
its log-sum-exp (base 2) to fp32 scratch; `_decode_reduce_kernel` merges them. num_splits is
chosen on the host from shapes and the host int max_seq_len only, so a captured CUDA graph stays
valid (and correct) for any context length that fits the block table.

Attention sinks (gpt-oss, HAS_SINKS): one more logit per query head, with no value, enters once per (sequence,
head) where the output is normalized: the epilogue of an unsplit program, the reduce kernel after splits (the
partials leave it out), on the work path an unsplit sequence's one chunk or the merge of a split one's chunks.

Processing order (optional seq_order, int32 [num_seqs], a permutation of the sequence indices): the
programs then run on a 1-D grid in the order (position i, split, kv_head) with the kv head fastest,
and position i processes sequence seq_order[i] (its query row, seq_len, block-table row, output row
and split partials all use the looked-up index, so the result is the same as without an order).
Programs are dispatched to the SMs roughly in launch order, in waves when they don't all fit at
once; `longest_first_order(seq_lens)` puts the long sequences' programs (all kv heads and splits)
first, so that a long one does not start in the last wave and leave the step waiting on it.
Without seq_order the grid is (num_seqs, num_kv_heads, num_splits) as before, with no extra load.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.kv_store import from_cache, query_for_cache
from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # inside the kernels (a jit function reads only constexpr globals)
_MAX_SPLITS = 64


@triton.jit
def _softcap(s, cap):
    """cap * tanh(s / cap), tanh through one exp of -|x| (no overflow for any s)."""
    x = s / cap
    t = tl.exp(-2.0 * tl.abs(x))
    th = (1.0 - t) / (1.0 + t)
    return cap * tl.where(x < 0, -th, th)


@triton.jit
def _sink_logits(sinks_ptr, heads, mask):
    """Each row's attention sink (gpt-oss: one learned logit per query head), in the kernels' base-2 units."""
    return tl.load(sinks_ptr + heads, mask=mask, other=0.0).to(tl.float32) * _LOG2E


@triton.jit
def _fold_sink(acc, m_i, l_i, sink):
    """An online softmax's last step with the sink: one more logit, which takes probability mass and brings no
    value (a key whose value row is zero). Taken once per (sequence, head), where the output is normalized."""
    m_new = tl.maximum(m_i, sink)
    alpha = tl.exp2(m_i - m_new)
    return acc * alpha[:, None], m_new, l_i * alpha + tl.exp2(sink - m_new)


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, BLOCK_D] in the cache dtype
    acc,  # [BLOCK_M, BLOCK_D] fp32
    m_i,  # [BLOCK_M] fp32 running max (base-2 scaled scores)
    l_i,  # [BLOCK_M] fp32 running sum
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,  # this sequence's row of the block table
    tile_start,  # first token position of this tile
    row_last_pos,  # [BLOCK_M] last key position each row may see (causal / length limit)
    row_first_pos,  # [BLOCK_M] first key position each row may see (WINDOWED only: a sliding window)
    kv_len,  # keys that exist for this program (loads beyond are masked)
    qk_scale,  # softmax scale * log2(e)
    kv_head_offset,  # kv_head * stride_c_head
    stride_c_block,
    stride_c_slot,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MASK: tl.constexpr,  # False: every key of the tile is visible to every row (no masks at all)
    WINDOWED: tl.constexpr = False,  # keys before row_first_pos are masked too (with MASK)
    softcap_l=0.0,  # SOFTCAP: Gemma 2's attention soft-capping cap x log2(e) (the scores are base-2 scaled)
    SOFTCAP: tl.constexpr = False,
):
    """One online-softmax step over BLOCK_N keys read through the block table. A row that sees none of the tile's
    keys adds nothing, as long as its running max started finite (-1e30, not -inf)."""
    offs_n = tile_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    if MASK:
        n_mask = offs_n < kv_len
        if WINDOWED:  # keys behind every row's window are not read at all: their blocks may be given back and hold
            # anything (another request's keys, or a NaN that a probability of 0 would still spread)
            n_mask = n_mask & (offs_n >= tl.min(row_first_pos, 0))
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
    else:
        block_ids = tl.load(block_table_ptr + offs_n // BLOCK_SIZE)
    row_offs = block_ids.to(tl.int64) * stride_c_block + (offs_n % BLOCK_SIZE) * stride_c_slot + kv_head_offset
    if MASK:
        k = tl.load(
            k_cache_ptr + row_offs[None, :] + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
    else:
        k = tl.load(k_cache_ptr + row_offs[None, :] + offs_d[:, None], mask=d_mask[:, None], other=0.0)
    k = k.to(q.dtype)  # an fp8 cache's tile widened to the dots' dtype (kv_store.query_for_cache; else a no-op)
    # fp32 caches: full-precision dots, as an fp32 model asks for (Triton's default for fp32 operands is TF32,
    # 10-bit mantissas, on the tensor cores). 16-bit caches: unchanged.
    if q.dtype == tl.float32:
        s = tl.dot(q, k, input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N] fp32
    else:
        s = tl.dot(q, k) * qk_scale
    if SOFTCAP:  # cap tanh(raw / cap) in base 2: (cap L) tanh(s / (cap L)), s = raw L
        s = _softcap(s, softcap_l)
    if MASK:
        s = tl.where(offs_n[None, :] <= row_last_pos[:, None], s, float("-inf"))
        if WINDOWED:
            s = tl.where(offs_n[None, :] >= row_first_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK:
        v = tl.load(
            v_cache_ptr + row_offs[:, None] + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
    else:
        v = tl.load(v_cache_ptr + row_offs[:, None] + offs_d[None, :], mask=d_mask[None, :], other=0.0)
    v = from_cache(v, q)  # an fp8 cache's tile widened (kv_store.from_cache says how)
    if v.dtype == tl.float32:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _merge_parts(o, lse, part_out_ptr, part_lse_ptr, counter_ptr, part_row, part_base, num_parts,
                 heads, offs_d, g_mask, store_mask, out_ptrs, sinks_ptr,
                 NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_SINKS: tl.constexpr = False):
    """A chunk of a split sequence: writes its normalized output and log-sum-exp (base 2) to its part
    row; the last of the sequence's chunks to finish (per kv head: a counter taken with an acq_rel
    atomic after a barrier, the release/acquire pattern of split-K semaphores) merges all the parts
    in part order and writes the output, so the result does not depend on which chunk came last,
    and resets the counter for the next launch. HAS_SINKS: the merge starts from the sink, as one more
    part whose log-sum-exp is the sink and whose output is zero."""
    rows = part_row * NUM_HEADS + heads
    tl.store(part_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], o, mask=store_mask)
    tl.store(part_lse_ptr + rows, lse, mask=g_mask)
    tl.debug_barrier()  # every thread's partial stores come before the release below
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    tl.debug_barrier()
    if arrived == num_parts - 1:
        if HAS_SINKS:
            m = _sink_logits(sinks_ptr, heads, g_mask)
            total = tl.full([BLOCK_G], 1.0, dtype=tl.float32)  # exp2(sink - m)
        else:
            m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            total = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for p in range(part_base, part_base + num_parts):
            prow = p * NUM_HEADS + heads
            # .cg: from L2, where the other chunks' stores are (not a stale L1 line)
            lse_p = tl.load(part_lse_ptr + prow, mask=g_mask, other=0.0, cache_modifier=".cg")
            o_p = tl.load(part_out_ptr + prow[:, None] * HEAD_DIM + offs_d[None, :], mask=store_mask,
                          other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m, lse_p)
            keep = tl.exp2(m - m_new)
            w = tl.exp2(lse_p - m_new)
            acc = acc * keep[:, None] + o_p * w[:, None]
            total = total * keep + w
            m = m_new
        tl.store(out_ptrs, (acc / total[:, None]).to(out_ptrs.dtype.element_ty), mask=store_mask)
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


# One compiled variant for any split count and block-table width (the width follows the longest
# sequence of the step; Triton would otherwise compile new variants for widths == 1 or % 16 == 0).
@triton.jit(do_not_specialize=["num_splits", "stride_bt_seq", "window", "softcap_l"])
def _paged_decode_kernel(
    q_ptr,
    out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,  # MIXED only
    seq_order_ptr,  # [num_seqs] int32 (ORDERED only): position i processes sequence seq_order[i]
    part_out_ptr,  # [num_seqs, num_heads, num_splits, HEAD_DIM] fp32 (SPLIT); [parts, num_heads, HEAD_DIM] (WORK)
    part_lse_ptr,  # [num_seqs, num_heads, num_splits] fp32 (SPLIT); [parts, num_heads] (WORK)
    work_ptr,  # [6, items] int32 (WORK only): seq, tok_lo, tok_hi, part_row, part_base, num_parts
    counter_ptr,  # [num_seqs * num_kv_heads] int32, zero between launches (WORK only)
    sinks_ptr,  # [num_heads] (HAS_SINKS only): each query head's attention sink logit
    stride_w,  # between the rows of work
    qk_scale,
    num_splits,
    window,  # WINDOWED only: keys a token sees (itself included), a sliding window
    softcap_l,  # SOFTCAP only: the attention soft-capping cap x log2(e)
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_bt_seq,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    NUM_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    MIXED: tl.constexpr,
    ORDERED: tl.constexpr,
    WORK: tl.constexpr = False,
    WINDOWED: tl.constexpr = False,  # a sliding window: only the last `window` keys (not with WORK)
    SOFTCAP: tl.constexpr = False,  # Gemma 2's attention logit soft-capping
    HAS_SINKS: tl.constexpr = False,  # gpt-oss's attention sinks, taken where the output is normalized (not SPLIT)
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    pdl_enter(USE_PDL)
    if WORK:
        # 1-D grid over (item, kv_head), kv head fastest; an item is one chunk of one sequence.
        pid = tl.program_id(0)
        kv_head = pid % (NUM_HEADS // QUERIES_PER_KV)
        item = pid // (NUM_HEADS // QUERIES_PER_KV)
        seq = tl.load(work_ptr + item)
        if seq < 0:  # capacity past the step's items (a CUDA graph's padding)
            return
        tok_lo = tl.load(work_ptr + stride_w + item)
        tok_hi = tl.load(work_ptr + 2 * stride_w + item)
        part_row = tl.load(work_ptr + 3 * stride_w + item)
        part_base = tl.load(work_ptr + 4 * stride_w + item)
        num_parts = tl.load(work_ptr + 5 * stride_w + item)
    elif ORDERED:
        # 1-D grid, launch order (position, split, kv_head) with the kv head fastest: the programs of
        # the order's first sequences are dispatched first, all their kv heads and splits together.
        pid = tl.program_id(0)
        kv_head = pid % (NUM_HEADS // QUERIES_PER_KV)
        rest = pid // (NUM_HEADS // QUERIES_PER_KV)
        split = rest % num_splits
        seq = tl.load(seq_order_ptr + rest // num_splits)
    else:
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

    seq64 = seq.to(tl.int64)
    if MIXED:  # a mixed batch: handle only the decodes (q_len == 1); the prefill kernel does the rest
        q_row = tl.load(query_start_loc_ptr + seq)
        if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
            return
        q_row = q_row.to(tl.int64)
    else:
        q_row = seq64
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    first_key = 0  # the first key the token sees
    if WINDOWED:
        first_key = tl.maximum(seq_len - window, 0)
    first_tile = first_key // BLOCK_N  # every tile from it on holds a key the token sees
    if WORK:  # the host cut chunks at multiples of BLOCK_N
        tile_lo = tok_lo // BLOCK_N
        tile_hi = tl.cdiv(tl.minimum(tok_hi, seq_len), BLOCK_N)
    elif SPLIT:
        tiles_per_split = tl.cdiv(num_tiles - first_tile, num_splits)
        tile_lo = first_tile + split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
        if tile_lo >= tile_hi:  # empty split: the reduce kernel skips it
            return
    else:
        tile_lo = first_tile
        tile_hi = num_tiles

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < QUERIES_PER_KV
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * QUERIES_PER_KV + offs_g
    q = query_for_cache(tl.load(
        q_ptr + q_row * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ), k_cache_ptr)

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    row_last_pos = tl.full([BLOCK_G], 0, dtype=tl.int32) + (seq_len - 1)
    row_first_pos = tl.full([BLOCK_G], 0, dtype=tl.int32) + first_key
    bt_row = block_tables_ptr + seq64 * stride_bt_seq
    kv_head_offset = kv_head.to(tl.int64) * stride_c_head

    # Tiles fully inside the sequence (and, with a window, past its first key) need no masks; the ragged last
    # one and the window's first one do.
    full_lo = tile_lo
    if WINDOWED:
        if first_key % BLOCK_N != 0 and tile_lo == first_tile:
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, tile_lo * BLOCK_N, row_last_pos, row_first_pos,
                seq_len, qk_scale, kv_head_offset, stride_c_block, stride_c_slot,
                HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, True, softcap_l, SOFTCAP,
            )  # fmt: skip
            full_lo = tile_lo + 1
    full_hi = tl.minimum(tile_hi, seq_len // BLOCK_N)
    for tile in range(full_lo, full_hi):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, tile * BLOCK_N, row_last_pos, row_first_pos,
            seq_len, qk_scale, kv_head_offset, stride_c_block, stride_c_slot,
            HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, False, False, softcap_l, SOFTCAP,
        )  # fmt: skip
    if tile_hi > tl.maximum(full_hi, full_lo):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, tl.maximum(full_hi, full_lo) * BLOCK_N,
            row_last_pos, row_first_pos, seq_len, qk_scale, kv_head_offset, stride_c_block, stride_c_slot,
            HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, WINDOWED, softcap_l, SOFTCAP,
        )  # fmt: skip

    store_mask = g_mask[:, None] & d_mask[None, :]
    if WORK:
        out_ptrs = out_ptr + q_row * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :]
        if num_parts == 1:
            if HAS_SINKS:
                acc, m_i, l_i = _fold_sink(acc, m_i, l_i, _sink_logits(sinks_ptr, heads, g_mask))
            o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # an empty sequence: zeros, not NaN
            tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=store_mask)
        else:
            _merge_parts(acc / l_i[:, None], m_i + tl.log2(l_i), part_out_ptr, part_lse_ptr,
                         counter_ptr + seq64 * (NUM_HEADS // QUERIES_PER_KV) + kv_head,
                         part_row, part_base, num_parts, heads, offs_d, g_mask, store_mask, out_ptrs, sinks_ptr,
                         NUM_HEADS, HEAD_DIM, BLOCK_G, BLOCK_D, HAS_SINKS)
    elif SPLIT:  # the partials leave the sink out: _decode_reduce_kernel takes it
        o = acc / l_i[:, None]
        lse = m_i + tl.log2(l_i)
        part_row = (seq64 * NUM_HEADS + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=store_mask)
        tl.store(part_lse_ptr + part_row, lse, mask=g_mask)
    else:
        if HAS_SINKS:
            acc, m_i, l_i = _fold_sink(acc, m_i, l_i, _sink_logits(sinks_ptr, heads, g_mask))
        # seq_len == 0 (a padded CUDA-graph slot) leaves l_i == 0 (or, with a sink, acc == 0): write zeros, not NaN.
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + q_row * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=store_mask,
        )


@triton.jit(do_not_specialize=["num_splits", "window"])
def _decode_reduce_kernel(
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,  # MIXED only
    sinks_ptr,  # [NUM_HEADS] (HAS_SINKS only)
    num_splits,
    window,  # WINDOWED only
    stride_o_tok,
    stride_o_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIXED: tl.constexpr,
    WINDOWED: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False,  # the head's sink joins the merge as one more part: lse = sink, output 0
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    pdl_enter(USE_PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if MIXED:
        q_row = tl.load(query_start_loc_ptr + seq)
        if tl.load(query_start_loc_ptr + seq + 1) - q_row != 1:
            return
        q_row = q_row.to(tl.int64)
    else:
        q_row = seq
    seq_len = tl.load(seq_lens_ptr + seq)
    # Recompute which splits ran (same arithmetic as the attention kernel).
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    if WINDOWED:
        num_tiles -= tl.maximum(seq_len - window, 0) // BLOCK_N
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), 1)
    num_valid = tl.cdiv(num_tiles, tiles_per_split)

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_valid
    part_row = (seq * NUM_HEADS + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part_row, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(num_valid > 0, lse_max, 0.0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * _LOG2E  # base 2, as the partials' lse
        lse_max = tl.maximum(lse_max, sink)
    w = tl.exp2(lse - lse_max)  # masked splits: 0
    o = tl.load(
        part_out_ptr + part_row[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    w_sum = tl.sum(w, 0)
    if HAS_SINKS:
        w_sum += tl.exp2(sink - lse_max)
    res = tl.sum(o * w[:, None], 0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    tl.store(
        out_ptr + q_row * stride_o_tok + head * stride_o_head + offs_d,
        res.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter on CPU: any value is correct; keep grids small


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, device: torch.device) -> int:
    """Split the sequence only when (seq, kv_head) programs alone would leave SMs idle.

    Depends on host ints only (shapes and the metadata's max_seq_len), never on device data.
    Measured on H100 (Hq=28, Hkv=4, D=128, bf16, graph replays): at batch 64 (256 programs) one
    split beat two at every context; at batch 1, 2 programs per SM and down to one tile per split
    was fastest (8192 tokens: 10 us with 64 splits vs 59 us with 4).
    """
    programs = num_seqs * num_kv_heads
    sms = num_sms(device)
    if programs >= sms:
        return 1
    num_tiles = max(1, triton.cdiv(max_seq_len, block_n))
    return max(1, min(triton.cdiv(2 * sms, programs), num_tiles, _MAX_SPLITS))


def default_decode_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile size and launch shape for the decode kernel (bench_kernels --tune decode on H100:
    64-token tiles with 2 warps were within ~2% of the best config in every batch x context case)."""
    block_n = 64 if head_dim <= 128 else 32
    return {"block_n": block_n, "num_warps": 2, "num_stages": 3}


def attention_operands(
    query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks query [T, Hq, D] against the cache [2, NB, BS, Hkv, D]; returns (query with a
    contiguous last dim, out (allocated if None), k_cache, v_cache). Shared by both launchers."""
    _, num_heads, head_dim = query.shape
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_kv_heads, cache_head_dim = k_cache.shape[2], k_cache.shape[3]
    if cache_head_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"query heads/dim {num_heads}/{head_dim} incompatible with cache kv heads/dim "
            f"{num_kv_heads}/{cache_head_dim}"
        )
    if query.stride(-1) != 1:
        query = query.contiguous()
    if out is None:
        out = torch.empty_like(query)
    return query, out, k_cache, v_cache


def sink_operand(sinks: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """Checks attention sinks (gpt-oss: one logit per query head, [Hq] floats on the query's device; fp32 as the
    model keeps them, other float dtypes are widened in the kernels); returns them contiguous. Shared by both
    launchers."""
    if sinks is None:
        return None
    num_heads = query.shape[1]
    if sinks.shape != (num_heads,) or not sinks.is_floating_point():
        raise ValueError(f"sinks must be a float tensor of shape ({num_heads},) (one logit per query head), got "
                         f"{sinks.dtype} {tuple(sinks.shape)}")
    if sinks.device != query.device:
        raise ValueError(f"sinks are on {sinks.device}, the query on {query.device}")
    return sinks if sinks.stride(0) == 1 else sinks.contiguous()


def paged_attention_decode(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    query_start_loc: torch.Tensor | None = None,
    num_decodes: int | None = None,
    seq_order: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context; returns [num_seqs, Hq, D].

    softcap (Gemma 2): the scores capped as softcap * tanh(score / softcap) before the softmax.

    sinks (gpt-oss's attention sinks, [Hq] on the query's device): one more logit per query head in each token's
    softmax, in the units of the scaled (and capped) scores, which takes probability mass and brings no value:
    out = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sinks[h])). It enters once per (sequence, head), where the
    output is normalized: in the attention kernel without splits, in the reduce kernel with them, and, on the
    work path, in an unsplit sequence's one chunk or the merge of a split one's chunks.

    window (a sliding window, e.g. Mistral's or Gemma's local layers): the token sees only the last `window` keys,
    itself included (not with work; splits divide those keys only).

    Mixed batches: with query_start_loc given, query/out are the whole flat batch [T, Hq, D] and
    only sequences with exactly one new token are computed (at row query_start_loc[s]); the other
    rows are left for paged_attention_prefill(..., skip_decodes=True). num_decodes (host int, if
    known) steers num_splits.
    max_seq_len (host int) only steers num_splits; when None the block table's capacity is used.
    With num_splits > 1 fp32 scratch of [num_seqs, Hq, num_splits, D] is allocated; its size
    depends on shapes and host ints only, so the call can be captured in a CUDA graph.
    seq_order (int32 [num_seqs] on the query's device, a permutation of 0..num_seqs-1, e.g. from
    longest_first_order): the order in which the sequences' programs are launched (see the module
    docstring); the output is the same. Only its dtype/shape/device are checked (a host check of the
    values would sync): a sequence missing from it gets no output (its row is left unwritten, or with
    splits reduced from unwritten scratch). In a mixed batch the prefill sequences' programs return
    at once wherever the order puts them.
    work (int32 [6, items], from decode_work_list; decode-only, not with seq_order or num_splits): the
    programs run the items in order, each one chunk of one sequence (see decode_work_list); a split
    sequence's chunks are merged by the last of them to finish. Padding items (seq -1) return at once.
    """
    _, num_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    mixed = query_start_loc is not None
    ordered = seq_order is not None
    if ordered:
        if seq_order.dtype != torch.int32 or seq_order.shape != (num_seqs,):
            raise ValueError(
                f"seq_order must be int32 of shape ({num_seqs},), got {seq_order.dtype} {tuple(seq_order.shape)}"
            )
        if seq_order.device != seq_lens.device:
            raise ValueError(f"seq_order is on {seq_order.device}, seq_lens on {seq_lens.device}")
        if seq_order.stride(0) != 1:
            seq_order = seq_order.contiguous()
    windowed = window is not None
    if windowed and (window < 1 or work is not None):
        raise ValueError(f"window must be a positive key count without work, got {window}")
    if work is not None:
        if mixed or ordered or num_splits not in (None, 1):
            raise ValueError("work takes a decode-only batch without seq_order or num_splits")
        if work.dtype != torch.int32 or work.dim() != 2 or work.shape[0] != 6 or work.stride(1) != 1:
            raise ValueError(f"work must be int32 [6, items] with contiguous rows, got {work.dtype} "
                             f"{tuple(work.shape)}")
        if work.device != seq_lens.device:
            raise ValueError(f"work is on {work.device}, seq_lens on {seq_lens.device}")
    query, out, k_cache, v_cache = attention_operands(query, kv_cache, out)
    sinks = sink_operand(sinks, query)
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_seqs == 0:
        return out
    config = default_decode_config(head_dim, kv_cache.dtype)
    block_n = block_n or config["block_n"]
    num_warps = num_warps or config["num_warps"]
    num_stages = num_stages or config["num_stages"]
    if work is not None:
        # Part rows: every chunk of a split sequence has one; a split sequence has >= 2 chunks, so they
        # number at most 2 * (items - num_seqs), whatever the step (also in a captured graph's capacity).
        items, num_splits, split = work.shape[1], 1, False
        parts = max(1, 2 * (items - num_seqs))
        part_out = torch.empty((parts, num_heads, head_dim), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((parts, num_heads), dtype=torch.float32, device=query.device)
        counters = merge_counters(query.device, num_seqs * num_kv_heads)
        grid = (items * num_kv_heads,)
    else:
        if max_seq_len is None:
            max_seq_len = block_tables.shape[1] * block_size
        if windowed:
            max_seq_len = min(max_seq_len, window + block_n)  # the keys a window's tiles hold at most
        if num_splits is None:
            num_splits = choose_num_splits(
                num_seqs if num_decodes is None else num_decodes, num_kv_heads, max_seq_len, block_n, query.device
            )
        if not 1 <= num_splits <= _MAX_SPLITS:
            raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
        split = num_splits > 1
        if split:
            part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32,
                                   device=query.device)
            part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
        else:
            part_out = part_lse = out  # unused
        counters = seq_lens  # unused
        if ordered:
            grid = (num_seqs * num_splits * num_kv_heads,)
        else:
            grid = (num_seqs, num_kv_heads, num_splits)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _paged_decode_kernel[grid](
        query, out, k_cache, v_cache, block_tables, seq_lens, query_start_loc if mixed else seq_lens,
        seq_order if ordered else seq_lens, part_out, part_lse,
        work if work is not None else seq_lens, counters, sinks if sinks is not None else seq_lens,
        work.stride(0) if work is not None else 0, scale * LOG2E, num_splits, window or 0, (softcap or 0.0) * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads,
        QUERIES_PER_KV=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_G=max(16, triton.next_power_of_2(num_heads // num_kv_heads)),
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        SPLIT=split,
        MIXED=mixed,
        ORDERED=ordered,
        WORK=work is not None,
        WINDOWED=windowed,
        SOFTCAP=bool(softcap),
        HAS_SINKS=sinks is not None and not split,  # with splits the reduce kernel takes the sinks
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch_kwargs(query.device),
    )  # fmt: skip
    if split:  # indexed by the real sequence: the partials are at the real sequence's rows
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, seq_lens, query_start_loc if mixed else seq_lens,
            sinks if sinks is not None else seq_lens, num_splits, window or 0,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            # Fixed at the largest split count, so one variant serves every count: each new
            # constexpr value costs a JIT compile (seconds) the first time a step needs it.
            BLOCK_S=triton.next_power_of_2(_MAX_SPLITS),
            BLOCK_N=block_n,
            MIXED=mixed,
            WINDOWED=windowed,
            HAS_SINKS=sinks is not None,
            num_warps=4 if head_dim >= 128 else 2,
            **pdl_launch_kwargs(out.device),
        )  # fmt: skip
    return out


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown counter buffers, kept alive: captured graphs may still use them


def merge_counters(device: torch.device, size: int) -> torch.Tensor:
    """The work path's per-(sequence, kv head) arrival counters: zeros that every launch leaves at zero.
    One buffer per device, grown (never inside a CUDA graph capture: the runner's warm-up before each
    capture sizes it); an outgrown buffer stays allocated, since graphs captured with it replay it."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < size:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"merge counters for {size} (sequence, kv head) pairs must exist before capture")
        if counters is not None:
            _RETIRED.append(counters)
        counters = torch.zeros(max(size, 256), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


PROGRAMS_PER_SM = 2  # decode programs resident per SM at the default config (shared memory)
MIN_CHUNK = 256  # tokens: shorter chunks would spend more on their parts than they save


def uses_work_list(num_seqs: int, num_kv_heads: int, num_sms: int) -> bool:
    """Decode steps whose (sequence, kv head) programs fill the SMs take the work list; smaller ones
    split every sequence evenly instead (choose_num_splits). (Small batches through the work list, in
    one-tile chunks without the reduce kernel, measured no faster at batch 1: H100, session 6, run 5.)"""
    return num_seqs * num_kv_heads >= num_sms


def work_capacity(num_seqs: int, num_kv_heads: int, num_sms: int) -> int:
    """Items decode_work_list can produce for num_seqs sequences (at PROGRAMS_PER_SM): one each, plus at
    most total_tokens / chunk more, and chunk >= total_tokens * kv_heads / (2 * slots)."""
    return num_seqs + triton.cdiv(2 * PROGRAMS_PER_SM * num_sms, num_kv_heads)


def decode_work_list(seq_lens: np.ndarray | Sequence[int], num_kv_heads: int, num_sms: int, block_n: int,
                     capacity: int | None = None, min_chunk: int | None = None,
                     programs_per_sm: int = PROGRAMS_PER_SM) -> np.ndarray:
    """The work list of a decode step (host, numpy): int32 [6, items] with rows
    seq, tok_lo, tok_hi, part_row, part_base, num_parts, in launch order.

    Each sequence is cut into chunks of `chunk` tokens, chunk = the step's tokens * kv_heads /
    (2 * resident program slots), rounded up to a multiple of block_n and at least MIN_CHUNK: no
    chunk carries more than half of a slot's share of the step, so the last programs to start
    cannot hold the step up by much (a long sequence was one program, as long as a slot's whole
    share at mid batch sizes). Chunks run longest first (stable: equal lengths in sequence order).
    An unsplit sequence's one chunk has part_row -1 and num_parts 1 (it writes the output itself);
    a split sequence's chunks have part rows part_base .. part_base + num_parts - 1.
    capacity: pad to this many items with seq -1 (a CUDA graph's fixed grid). min_chunk: MIN_CHUNK, or
    block_n when the batch's programs number fewer than the SMs. programs_per_sm: the slots assumed per
    SM (bench sweeps; work_capacity bounds only the default's lists)."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    if lens.ndim != 1:
        raise ValueError(f"seq_lens must be 1-D, got shape {lens.shape}")
    slots = programs_per_sm * num_sms
    want = -(-int(lens.sum()) * num_kv_heads // (2 * slots))
    if min_chunk is None:  # a batch short of the SMs wants every tile in flight at once: chunks of one tile
        min_chunk = MIN_CHUNK if uses_work_list(len(lens), num_kv_heads, num_sms) else block_n
    chunk = max(min_chunk, -(-want // block_n) * block_n)
    if chunk % block_n:
        raise ValueError(f"min_chunk {min_chunk} must be a multiple of block_n {block_n}")
    counts = np.maximum(1, -(-lens // chunk))
    total = int(counts.sum())
    if capacity is None:
        capacity = total
    if total > capacity:
        raise ValueError(f"{total} work items exceed the capacity {capacity}")
    seq = np.repeat(np.arange(len(lens)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    index = np.arange(total) - first  # chunk index within its sequence
    tok_lo = index * chunk
    tok_hi = np.minimum(tok_lo + chunk, lens[seq])
    split = counts > 1
    base = np.cumsum(np.where(split, counts, 0)) - np.where(split, counts, 0)
    part_row = np.where(split[seq], base[seq] + index, -1)
    order = np.argsort(-(tok_hi - tok_lo), kind="stable")
    work = np.full((6, capacity), -1, dtype=np.int32)
    work[:, :total] = np.stack([seq, tok_lo, tok_hi, part_row, np.where(split[seq], base[seq], -1),
                                counts[seq]])[:, order]
    return work


def longest_first_order(seq_lens: np.ndarray | Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
    """Sequence indices by descending length, equal lengths in index order (a stable sort): the
    seq_order of paged_attention_decode for longest-processing-time-first dispatch. Host only.
    Padded CUDA-graph slots (length 0) come last. out: an int32 [len(seq_lens)] array to fill (e.g. the
    numpy view of a pinned buffer), returned; otherwise a new int32 array."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    if lens.ndim != 1:
        raise ValueError(f"seq_lens must be 1-D, got shape {lens.shape}")
    order = np.argsort(-lens, kind="stable")
    if out is None:
        return order.astype(np.int32)
    if out.dtype != np.int32 or out.shape != lens.shape:
        raise ValueError(f"out must be int32 of shape {lens.shape}, got {out.dtype} {out.shape}")
    out[:] = order
    return out


__all__ = [
    "choose_num_splits",
    "decode_work_list",
    "default_decode_config",
    "longest_first_order",
    "merge_counters",
    "num_sms",
    "paged_attention_decode",
    "sink_operand",
    "uses_work_list",
    "work_capacity",
]
