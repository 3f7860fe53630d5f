"""The reference attention backend: plain torch, one sequence at a time, obviously correct.

Every fast kernel is checked against this. It runs on CPU and CUDA and favours clarity over speed:
the K/V of each sequence are gathered from its blocks into a contiguous tensor, then attended with
an explicit causal mask and an fp32 softmax.

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
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first seq_len cached K and V of one sequence, each [seq_len, num_kv_heads, head_dim]."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    key = kv_cache[0, blocks].reshape(num_blocks * block_size, num_kv_heads, head_dim)[:seq_len]
    value = kv_cache[1, blocks].reshape(num_blocks * block_size, num_kv_heads, head_dim)[:seq_len]
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


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

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
        start = 0
        for s, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
            k, v = gather_kv(kv_cache, meta.block_tables[s], seq_len)
            out[start : start + q_len] = causal_attention(query[start : start + q_len], k, v, scale, window, softcap,
                                                                sinks)
            start += q_len
        # Tokens past the last sequence (padding of a captured batch size) get zeros, not garbage.
        out[start:] = 0
        return out
