"""Triton attention backend: paged KV-cache write, then decode or prefill paged attention.

    forward(query [T,Hq,D], key/value [T,Hkv,D], kv_cache [2,NB,BS,Hkv,D], meta, scale) -> [T,Hq,D]

1. `write_kv_cache` stores key/value rows at meta.slot_mapping (slot < 0 = padding, skipped).
2. meta.is_decode_only -> `paged_attention_decode` (GQA-grouped, split-K over the context);
   otherwise        -> `paged_attention_prefill` (prefills, chunked prefills, prefix-cache hits)
                       and, for the one-token sequences of the same mixed batch, the decode kernel
                       in its mixed mode (each kernel skips the other's sequences on the device, so
                       no host knowledge of the mix is needed; meta.query_lens_cpu, when present,
                       only lets us skip a launch with nothing to do).

CUDA graphs (decode-only batches): nothing here syncs with the device or reads device data on the
host; every launch grid and scratch size comes from tensor shapes plus the host ints
meta.max_seq_len (only to pick the number of splits; any value is correct). When capturing, pass
max_seq_len as the largest context the graph will replay with (e.g. max_model_len) so long contexts
get enough splits. Padded batch slots need seq_lens == 0 (output zeros) or any valid context,
and slot_mapping == -1.
"""

from __future__ import annotations

import os

import torch

from pagedserve.executor.attention.base import AttentionBackend, AttentionMetadata
from pagedserve.executor.kernels.kv_cache_write import write_kv_cache
from pagedserve.executor.kernels.paged_attention_decode import _MAX_SPLITS, paged_attention_decode
from pagedserve.executor.kernels.paged_attention_prefill import paged_attention_prefill
from pagedserve.executor.kernels.rotary_kv_write import rotary_and_write_kv_cache


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through Triton kernels (GPU; on CPU only under TRITON_INTERPRET=1)."""

    name = "triton"
    # forward() takes `rope` and rotates q/k inside the KV-cache write (one kernel instead of two per
    # layer). PAGEDSERVE_FUSED_ROPE_KV=0 turns it off (A/B runs): the model then rotates first.
    fuses_rotary = os.environ.get("PAGEDSERVE_FUSED_ROPE_KV", "1") == "1"

    def __init__(self, decode_num_splits: int | None = None, split_mixed_decodes: bool = True,
                 decode_seq_order: bool | None = None) -> None:
        # None: choose per call from shapes (see choose_num_splits); an int pins it (tests, tuning).
        # PAGEDSERVE_DECODE_SPLITS=N pins it for A/B runs (0 or unset: chosen per call); decode steps that
        # run the work list (batches that fill the SMs) are not affected.
        if decode_num_splits is None:
            decode_num_splits = _splits_from_env()
        self.decode_num_splits = decode_num_splits
        # Decode-only steps start their longest sequences first (meta.seq_order, built by the runner):
        # over a realistic mix of context lengths the step no longer waits on a few long sequences
        # started last (H100, bench_kernels --tune decode-mix: batch 256 2.61 -> 2.88 TB/s, batch 139
        # 2.49 -> 2.60, batch 64 unchanged). PAGEDSERVE_DECODE_ORDER=0 turns it off (A/B runs).
        if decode_seq_order is None:
            decode_seq_order = os.environ.get("PAGEDSERVE_DECODE_ORDER", "1") == "1"
        self.wants_seq_order = decode_seq_order
        # Decode-only steps whose batch fills the SMs run a work list instead (meta.decode_work, built by
        # the runner): long sequences cut into chunks, longest first, the last chunk of a sequence merging
        # them (paged_attention_decode.decode_work_list). PAGEDSERVE_DECODE_WORK=0 keeps the plain order.
        self.decode_work = decode_seq_order and os.environ.get("PAGEDSERVE_DECODE_WORK", "1") == "1"
        # False: the prefill kernel also computes the decodes of a mixed batch (one launch, but
        # 16+ row tiles with few used rows and no split-K for them).
        self.split_mixed_decodes = split_mixed_decodes

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor | None = None,
        rope=None,
        kv_written: bool = False,
        window: int | None = None,
        softcap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """See AttentionBackend.forward; `out` optionally receives the result ([T, Hq, D]). With `rope`
        (a layers.RopeStep for CUDA), query and key arrive unrotated and are rotated in place here. With
        kv_written, the step's K/V are already in the cache and query is rotated (kernels/qkv_rope_kv.py):
        key and value are not used. window: a sliding window (each token sees its last `window` keys); decode
        steps then split the window's keys, without the step's work list. softcap: Gemma 2's attention logit
        soft-capping (softcap * tanh(score / softcap)). sinks: gpt-oss's per-head softmax sinks ([num_heads] fp32)."""
        if not kv_written:
            if rope is not None:
                rotary_and_write_kv_cache(query, key, value, rope.positions, rope.cos_sin_cache, kv_cache,
                                          meta.slot_mapping)
            else:
                write_kv_cache(key, value, kv_cache, meta.slot_mapping)
        if out is None:
            out = torch.empty_like(query)
        if meta.is_decode_only:
            num_seqs = meta.seq_lens.shape[0]
            # Decode: token i is sequence i. Rows past num_seqs (if any) are padding.
            paged_attention_decode(
                query[:num_seqs],
                kv_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                out=out[:num_seqs],
                max_seq_len=meta.max_seq_len,
                num_splits=None if meta.decode_work is not None and window is None else self.decode_num_splits,
                seq_order=meta.seq_order,
                work=meta.decode_work if window is None else None,
                window=window,
                softcap=softcap,
                sinks=sinks,
            )
            return out

        num_decodes = num_prefills = None
        if meta.query_lens_cpu is not None:
            num_decodes = sum(1 for q_len in meta.query_lens_cpu if q_len == 1)
            num_prefills = len(meta.query_lens_cpu) - num_decodes
        use_decode_kernel = self.split_mixed_decodes and num_decodes != 0
        if use_decode_kernel:
            paged_attention_decode(
                query,
                kv_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                out=out,
                max_seq_len=meta.max_seq_len,
                num_splits=self.decode_num_splits,
                query_start_loc=meta.query_start_loc,
                num_decodes=num_decodes,
                window=window,
                softcap=softcap,
                sinks=sinks,
            )
        if num_prefills != 0:
            paged_attention_prefill(
                query,
                kv_cache,
                meta.query_start_loc,
                meta.seq_lens,
                meta.block_tables,
                scale,
                meta.max_query_len,
                out=out,
                skip_decodes=use_decode_kernel,
                max_seq_len=meta.max_seq_len,
                window=window,
                softcap=softcap,
                sinks=sinks,
            )
        return out


def _splits_from_env() -> int | None:
    value = os.environ.get("PAGEDSERVE_DECODE_SPLITS", "0").strip() or "0"
    if not value.isdigit() or int(value) > _MAX_SPLITS:
        raise ValueError(f"PAGEDSERVE_DECODE_SPLITS must be a split count in 0..{_MAX_SPLITS} (0: chosen per call), "
                         f"got {value!r}")
    return int(value) or None
