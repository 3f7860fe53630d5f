"""The reference attention backend: plain torch, obviously correct, and the CPU path's attention.

Every fast kernel is checked against causal_attention, which takes one sequence at a time and favours
clarity over speed: the K/V of each sequence are gathered from its blocks into a contiguous tensor, then
attended with an explicit causal mask and an fp32 softmax. The backend sends the prefills and extends of a
step through torch's scaled_dot_product_attention (sdpa_attention: the same attention, its fused CPU kernel
never holds the [heads, q, seq_len] scores; 2.6-5x faster at 512-1500 tokens), or through causal_attention where
a soft-cap or sinks change the softmax; the step's one-token queries (decodes) go through
batched_decode_attention, the same arithmetic over all of them at once (both checked against causal_attention in
tests/executor/test_models.py).

For sequence s with q_s new tokens and seq_len_s cached-after-write tokens:

    cache positions:  0 1 2 ... seq_len_s - q_s - 1 | seq_len_s - q_s ... seq_len_s - 1
                      (written in earlier steps)     | (new tokens, written just now)
    new token i sits at position p_i = seq_len_s - q_s + i and sees cache positions 0 ..= p_i.
"""

from __future__ import annotations

import torch

from pagedserve.executor.attention.base import AttentionBackend, AttentionMetadata


def write_kv_cache(
    kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each new token's K/V at its slot (block_id * block_size + offset). Negative slots
    (padding tokens) are skipped."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key, value = key[valid], value[valid]
    if kv_cache.dtype == torch.float8_e4m3fn:  # e4m3 has no infinity: clamp, then round to nearest even
        key, value = key.float().clamp(-448.0, 448.0), value.float().clamp(-448.0, 448.0)
    kv_cache[0].view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = key.to(kv_cache.dtype)
    kv_cache[1].view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = value.to(kv_cache.dtype)


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached K and V of positions [start, seq_len) of one sequence, each [seq_len - start, num_kv_heads,
    head_dim] (blocks wholly before `start` are not read: a sliding window may have given them back)."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_blocks = (seq_len + block_size - 1) // block_size
    first_block = start // block_size
    blocks = block_table[first_block:num_blocks].long()
    size = (num_blocks - first_block) * block_size
    skip = start - first_block * block_size
    key = kv_cache[0, blocks].reshape(size, num_kv_heads, head_dim)[skip : seq_len - first_block * block_size]
    value = kv_cache[1, blocks].reshape(size, num_kv_heads, head_dim)[skip : seq_len - first_block * block_size]
    return key, value


def causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, window: int | None = None,
    softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [q, H, D] for the LAST q of the seq_len positions in key/value [seq_len, KVH, D]. window: a sliding
    window, each query sees only its last `window` positions (itself included), as Transformers' sliding masks.
    sinks [H] (gpt-oss): each head's extra logit in the softmax, which takes probability and gives no value.

    GQA: each group of H // KVH query heads shares one kv head (repeat_interleave, as HF's
    repeat_kv). Scores, softmax and the weighted sum are fp32; the result has query's dtype.
    """
    q_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.float(), k) * scale
    if softcap:  # Gemma 2: the scores capped before the mask and the softmax
        scores = torch.tanh(scores / softcap) * softcap
    query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
    key_pos = torch.arange(seq_len, device=query.device)
    future = key_pos[None, :] > query_pos[:, None]  # [q, seq_len]
    if window is not None:
        future |= key_pos[None, :] <= query_pos[:, None] - window
    scores.masked_fill_(future[None], float("-inf"))
    if sinks is not None:
        column = sinks.float().reshape(num_heads, 1, 1).expand(num_heads, q_len, 1)
        probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                   window: int | None = None) -> torch.Tensor:
    """causal_attention without a soft-cap or sinks, through torch's fused scaled_dot_product_attention (GQA
    included): query [q, H, D] for the last q of key/value's [seq_len, KVH, D] positions. The K/V take the query's
    dtype (an fp16 or fp8 cache under fp32 queries); the kernel accumulates in fp32."""
    q_len, seq_len = query.shape[0], key.shape[0]
    q = query.transpose(0, 1).unsqueeze(0)
    k = key.to(query.dtype).transpose(0, 1).unsqueeze(0)
    v = value.to(query.dtype).transpose(0, 1).unsqueeze(0)
    if q_len == seq_len and window is None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:  # the queries sit at the end of the keys (is_causal would align them with the start)
        query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        key_pos = torch.arange(seq_len, device=query.device)[None, :]
        seen = key_pos <= query_pos
        if window is not None:
            seen &= key_pos > query_pos - window
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale,
                                                               enable_gqa=True)
    return out[0].transpose(0, 1)


# Padded K/V elements (fp32) one batched decode chunk may gather: the chunk's sequences times its longest length
# times kv heads times head dim. 32 Mi elements = 128 MiB for each of K and V.
DECODE_CHUNK_ELEMENTS = 32 * 1024 * 1024


def batched_decode_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: list[int], scale: float,
    window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per sequence, all sequences at once: query [S, H, D], seq_lens[s] cached keys each (the new
    token's included). The same arithmetic as causal_attention for q_len 1 (fp32 scores and softmax, the soft-cap,
    the window, the sinks), done as a few batched einsums over the sequences' keys gathered and padded to the
    longest: the CPU path's decode steps made ~layers x seqs small calls before. Sequences are taken shortest first
    in chunks whose padded keys stay under DECODE_CHUNK_ELEMENTS (a long tail pads only its own chunk)."""
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    lens = torch.tensor(seq_lens, dtype=torch.long, device=query.device)
    order = sorted(range(num_seqs), key=seq_lens.__getitem__)
    per_token = num_kv_heads * head_dim
    start = 0
    while start < num_seqs:
        end = start + 1
        while end < num_seqs and (end + 1 - start) * seq_lens[order[end]] * per_token <= DECODE_CHUNK_ELEMENTS:
            end += 1
        idx = torch.tensor(order[start:end], dtype=torch.long, device=query.device)
        max_len = seq_lens[order[end - 1]]
        num_blocks = (max_len + block_size - 1) // block_size
        blocks = block_tables[idx, :num_blocks].long()  # [s, nb]
        shape = (len(idx), num_blocks * block_size, num_kv_heads, head_dim)
        key = kv_cache[0, blocks].reshape(shape).float()
        value = kv_cache[1, blocks].reshape(shape).float()
        q = query[idx].float().view(len(idx), num_kv_heads, group, head_dim)
        scores = torch.einsum("skgd,slkd->skgl", q, key) * scale  # [s, kvh, g, l]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        key_pos = torch.arange(shape[1], device=query.device)
        last = lens[idx] - 1  # each sequence's new token's position
        hidden = key_pos[None, :] > last[:, None]
        if window is not None:
            hidden |= key_pos[None, :] <= (last - window)[:, None]
        scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
        # Keys past a sequence's end are other requests' or unwritten slots: their values may be anything, NaN
        # included, and 0 x NaN is NaN: zeroed, as the per-sequence path never gathers them.
        value.masked_fill_(hidden[:, :, None, None], 0.0)
        if sinks is not None:
            column = sinks.float().view(1, num_kv_heads, group, 1).expand(len(idx), num_kv_heads, group, 1)
            probs = torch.softmax(torch.cat([scores, column], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        result = torch.einsum("skgl,slkd->skgd", probs, value)
        out[idx] = result.reshape(len(idx), num_heads, head_dim).to(query.dtype)
        start = end
    return out


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    capturable = False  # boolean-mask indexing (padding slots) syncs with the host: no CUDA graph capture

    def __init__(self, batch_decodes: bool = True, fused_prefill: bool = True) -> None:
        # Both False: every sequence through causal_attention (the reference)
        self.batch_decodes = batch_decodes
        self.fused_prefill = fused_prefill

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        write_kv_cache(kv_cache, key, value, meta.slot_mapping)
        query_lens = meta.query_lens_cpu
        if query_lens is None:
            query_lens = torch.diff(meta.query_start_loc).tolist()
        seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.tolist()
        out = torch.empty_like(query)
        decodes = [s for s, q_len in enumerate(query_lens) if q_len == 1]
        if self.batch_decodes and len(decodes) > 1:  # every one-token query at once
            rows = torch.tensor(_starts(query_lens, decodes), dtype=torch.long, device=query.device)
            out[rows] = batched_decode_attention(query[rows], kv_cache, meta.block_tables[decodes],
                                                 [seq_lens[s] for s in decodes], scale, window, softcap, sinks)
        else:
            decodes = []
        batched = set(decodes)
        start = 0
        for s, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
            if s in batched:
                start += q_len
                continue
            # (with a window, only the keys some query of the sequence sees: the queries are the last q_len of them,
            # as the attention functions expect, and what lies behind the window, given back, is never read)
            first = max(0, seq_len - q_len - window + 1) if window is not None else 0
            k, v = gather_kv(kv_cache, meta.block_tables[s], seq_len, first)
            if self.fused_prefill and not softcap and sinks is None:
                out[start : start + q_len] = sdpa_attention(query[start : start + q_len], k, v, scale, window)
            else:
                out[start : start + q_len] = causal_attention(query[start : start + q_len], k, v, scale, window,
                                                              softcap, sinks)
            start += q_len
        # Tokens past the last sequence (padding of a captured batch size) get zeros, not garbage.
        out[start:] = 0
        return out


def _starts(query_lens: list[int], seqs: list[int]) -> list[int]:
    """The first query row of each sequence in seqs (query_lens packed back to back)."""
    offsets, total = [], 0
    for q_len in query_lens:
        offsets.append(total)
        total += q_len
    return [offsets[s] for s in seqs]
