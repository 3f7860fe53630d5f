"""The attention seam: one metadata object per step and a small backend interface.

Flat batch vocabulary (as in vLLM / flash-attention). A step packs the new tokens of all
scheduled sequences back to back:

    query tokens:   | seq0: q0 tokens | seq1: q1 tokens | ... |      (num_tokens = sum q_i)
    query_start_loc: [0, q0, q0+q1, ..., num_tokens]                  (int32, num_seqs + 1)
    seq_lens:        context length of each sequence after this step  (int32; includes its new tokens)
    block_tables:    [num_seqs, max_blocks_per_seq] int32 physical block ids, padded with 0
    slot_mapping:    [num_tokens] int64: block_id * block_size + offset where each new token's K/V goes

Causality: the i-th new token of sequence s sits at position seq_lens[s] - q_s + i and attends to
cache positions 0 ..= that position. Decode sequences have q_s == 1.

KV cache of one layer: a tensor [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, on the model's device
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host copies (lists) for backends that loop in Python (the torch reference).
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # All sequences are decodes (q == 1): lets backends take a decode-only path (and CUDA graphs).
    is_decode_only: bool = False
    # Decode-only steps, backends with `wants_seq_order`: [num_seqs] int32 permutation, longest
    # sequence first, the order in which the decode kernel starts sequences (a shorter tail).
    seq_order: torch.Tensor | None = None
    # Decode-only steps whose batch fills the SMs (backends with `decode_work`): int32 [6, items], the
    # chunks of the sequences in launch order (paged_attention_decode.decode_work_list); replaces seq_order.
    decode_work: torch.Tensor | None = None
    # A hybrid model (core/kv_cache.py): the same step with each window group's block tables and slot mapping, read
    # by its windowed layers (DecoderAttention.kv_group k reads windows[k - 1]); None: every layer reads these.
    windows: list[AttentionMetadata] | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass(slots=True)
class ForwardContext:
    """Everything a model forward needs besides token ids and positions; passed explicitly."""

    attn_metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]  # one [2, num_blocks, block_size, kv_heads, head_dim] per layer
    backend: AttentionBackend


class AttentionBackend(ABC):
    """Writes the step's new K/V into the paged cache, then attends over the cache."""

    name: str = "base"
    # Whether a step through it can be captured in a CUDA graph (no host syncs, no data-dependent shapes)
    capturable: bool = True

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,  # a sliding window: each token sees its last `window` keys (itself included)
        softcap: float | None = None,  # Gemma 2: scores capped as softcap * tanh(score / softcap)
        sinks: torch.Tensor | None = None,  # gpt-oss: [num_heads] fp32, one more logit per head in the softmax
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...
