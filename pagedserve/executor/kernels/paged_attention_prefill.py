"""Prefill / extend paged attention for mixed batches (prefills, chunked prefills, prefix hits, decodes).

    query:           [num_tokens, num_heads, head_dim]   new tokens of all sequences, back to back
    query_start_loc: [num_seqs + 1] int32;  seq_lens: [num_seqs] int32 (context incl. new tokens)
    kv_cache:        [2, num_blocks, block_size, num_kv_heads, head_dim]  (new K/V already written)

Sequence s has q_len new tokens and ctx_len = seq_len - q_len cached ones; its i-th new token sits at
position ctx_len + i and sees keys 0 ..= ctx_len + i, all read through the block table:

    keys:  | cached prefix (ctx_len) ............ | new tokens (q_len) |
    row i:  visible ................................ ..= ctx_len + i

Grid (num_q_tiles, num_kv_heads). A program owns BLOCK_Q new tokens of one sequence times the
G = num_heads // num_kv_heads query heads of one KV head: the BLOCK_M = BLOCK_Q * G (+ padding) rows
of tl.dot are (token, head) pairs, so each K/V tile is read once for the whole GQA group.

Programs map to (sequence, q tile) without a host sync: q-tile slots are numbered so that
sequence s owns slots [qsl[s] // BLOCK_Q + s, qsl[s+1] // BLOCK_Q + s + 1), which always holds its
cdiv(q_len, BLOCK_Q) tiles; a program finds its sequence by binary search and returns when its slot
is past the sequence's last tile. Total slots: num_tokens // BLOCK_Q + num_seqs. Within a sequence
slots run from the last q tile (most keys) to the first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.kv_store import query_for_cache
from pagedserve.executor.kernels.paged_attention_decode import (
    LOG2E,
    _attend_tile,
    _fold_sink,
    _sink_logits,
    attention_operands,
    sink_operand,
)
from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter


@triton.jit
def _find_seq(query_start_loc_ptr, q_tile_slot, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with query_start_loc[s] // BLOCK_Q + s <= q_tile_slot."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_tile_slot:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# one variant for any batch, table width, window and cap
@triton.jit(do_not_specialize=["num_seqs", "stride_bt_seq", "window", "softcap_l"])
def _paged_prefill_kernel(
    q_ptr,
    out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    sinks_ptr,  # [num_heads] (HAS_SINKS only): each query head's attention sink logit
    qk_scale,
    num_seqs,
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
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SKIP_DECODES: tl.constexpr,
    WINDOWED: tl.constexpr = False,
    SOFTCAP: tl.constexpr = False,  # Gemma 2's attention logit soft-capping
    HAS_SINKS: tl.constexpr = False,  # gpt-oss's attention sinks: one more logit per head, with no value
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    pdl_enter(USE_PDL)
    q_tile_slot = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_seq(query_start_loc_ptr, q_tile_slot, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_tile_local = q_tile_slot - (q_start // BLOCK_Q + seq)
    num_q_tiles = tl.cdiv(q_len, BLOCK_Q)
    if q_tile_local >= num_q_tiles:
        return
    # Last tile first: the tiles that see the most keys start earliest (better load balance).
    q_tile_start = (num_q_tiles - 1 - q_tile_local) * BLOCK_Q
    if SKIP_DECODES:  # one-token sequences are left to the decode kernel
        if q_len == 1:
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    # Row r of the tile is (token q_tile_start + r // G, head r % G). Padding rows are clamped onto
    # a real token so that no row is ever fully masked; they are not stored.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    tok = q_tile_start + offs_m // QUERIES_PER_KV
    row_mask = (offs_m < BLOCK_Q * QUERIES_PER_KV) & (tok < q_len)
    tok = tl.minimum(tok, q_len - 1)
    heads = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    row_tok = (q_start + tok).to(tl.int64)
    q = query_for_cache(tl.load(
        q_ptr + row_tok[:, None] * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=d_mask[None, :],
        other=0.0,
    ), k_cache_ptr)
    row_last_pos = ctx_len + tok  # causal limit of each row

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    kv_head_offset = kv_head.to(tl.int64) * stride_c_head

    # Keys 0 ..= first_pos are visible to every row: those whole tiles run without masks.
    first_pos = ctx_len + q_tile_start
    kv_end = ctx_len + tl.minimum(q_tile_start + BLOCK_Q, q_len)  # keys the last row sees
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    if WINDOWED:
        # Row r sees keys row_last_pos - window + 1 ..= row_last_pos: from the first row's first key on, every
        # tile masked (a row may see none of a tile's keys: its running max starts finite, so that adds nothing).
        row_first_pos = row_last_pos - window + 1
        for tile in range(tl.maximum(first_pos - window + 1, 0) // BLOCK_N, num_tiles):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, tile * BLOCK_N, row_last_pos, row_first_pos,
                kv_end, qk_scale, kv_head_offset, stride_c_block, stride_c_slot,
                HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, True, softcap_l, SOFTCAP,
            )  # fmt: skip
    else:
        num_full = (first_pos + 1) // BLOCK_N
        for tile in range(0, num_full):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, tile * BLOCK_N, row_last_pos, row_last_pos,
                kv_end, qk_scale, kv_head_offset, stride_c_block, stride_c_slot,
                HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, False, False, softcap_l, SOFTCAP,
            )  # fmt: skip
        for tile in range(num_full, num_tiles):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_row, tile * BLOCK_N, row_last_pos, row_last_pos,
                kv_end, qk_scale, kv_head_offset, stride_c_block, stride_c_slot,
                HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True, False, softcap_l, SOFTCAP,
            )  # fmt: skip

    if HAS_SINKS:  # the sink joins each row's softmax once, at its normalization
        acc, m_i, l_i = _fold_sink(acc, m_i, l_i, _sink_logits(sinks_ptr, heads, row_mask))
    o = acc / l_i[:, None]
    tl.store(
        out_ptr + row_tok[:, None] * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


def default_prefill_config(
    head_dim: int, max_query_len: int, queries_per_kv: int, max_seq_len: int | None = None
) -> dict[str, int]:
    """Tiles from the key range: bench_kernels --tune prefill on H100 (Hq=28, Hkv=4, D=128, bf16)
    ranked 64x32 tiles first for 1x1024 and 8x512 prompts, 128x64 first for 1x4096 (all 4 warps,
    2 stages). Short queries (decode-heavy batches) shrink the row tile down to 16."""
    long_keys = max(max_query_len, max_seq_len or 0) >= 2048
    block_m, block_n = (128, 64) if long_keys else (64, 32)
    if head_dim > 128:
        block_m, block_n = 64, 32
    rows = max(16, triton.next_power_of_2(max(1, max_query_len) * queries_per_kv))
    block_m = min(block_m, rows)
    block_m = max(block_m, triton.next_power_of_2(queries_per_kv))  # >= one token's whole group
    return {"block_m": block_m, "block_n": block_n, "num_warps": 4, "num_stages": 2}


def paged_attention_prefill(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_query_len: int,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    skip_decodes: bool = False,
    max_seq_len: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention of each sequence's new tokens over its whole context; returns [T, Hq, D].

    window: a sliding window: each token sees only the last `window` keys, itself included.
    softcap (Gemma 2): the scores capped as softcap * tanh(score / softcap) before the softmax.
    sinks (gpt-oss, [Hq] on the query's device): one more logit per query head in every token's softmax (in the
    scaled scores' units), taking mass and bringing no value; see paged_attention_decode.

    skip_decodes=True leaves sequences with one new token to paged_attention_decode (mixed mode).
    max_seq_len (host int, optional) only steers the tile shape.
    Rows of `out` past query_start_loc[-1] (batch padding) are left untouched.
    """
    num_tokens, num_heads, head_dim = query.shape
    query, out, k_cache, v_cache = attention_operands(query, kv_cache, out)
    sinks = sink_operand(sinks, query)
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive key count, got {window}")
    queries_per_kv = num_heads // num_kv_heads
    config = default_prefill_config(head_dim, max_query_len, queries_per_kv, max_seq_len)
    block_m = block_m or config["block_m"]
    block_n = block_n or config["block_n"]
    if block_m < queries_per_kv:
        raise ValueError(f"block_m={block_m} must hold one token's {queries_per_kv} query heads")
    block_q = block_m // queries_per_kv
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_prefill_kernel[grid](
        query, out, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        sinks if sinks is not None else seq_lens, scale * LOG2E, num_seqs, window or 0, (softcap or 0.0) * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        BLOCK_SIZE=block_size,
        SKIP_DECODES=skip_decodes,
        WINDOWED=window is not None,
        SOFTCAP=bool(softcap),
        HAS_SINKS=sinks is not None,
        num_warps=num_warps or config["num_warps"],
        num_stages=num_stages or config["num_stages"],
        **pdl_launch_kwargs(query.device),
    )  # fmt: skip
    return out


__all__ = ["paged_attention_prefill", "default_prefill_config"]
