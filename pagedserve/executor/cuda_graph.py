"""CUDA graphs for decode steps: one graph per batch size of a ladder, replayed with padded inputs.

A decode-only step of n sequences runs the graph of the smallest captured size bs >= n. The graph
reads fixed (static) input buffers, so a replay first copies the step's inputs into them:

    static rows:   [0, n)  the step's sequences      [n, bs)  padding
    input_ids / positions:  the step's                 0
    slot_mapping:           the step's                 -1   (the KV write skips them)
    seq_lens:               the step's                 0    (attention outputs zeros for them)
    block_tables[:, :w]:    the step's (w = its width) stale rows, never read past seq_len
    seq_order (if used):    a permutation of [0, n)    n, n+1, ... (the identity)
    decode work (if used):  the step's I items          items [I, capacity(bs)): seq -1 (no-ops)

Graphs whose batch fills the SMs (paged_attention_decode.uses_work_list) take a decode work list
instead of seq_order, with a grid fixed at capture for the most items a step of bs sequences makes.

Attention metadata inside the graph is captured with max_seq_len = max_model_len, so the decode
kernel's split count covers the longest context a replay can bring. Logits are computed inside
the graph for all bs rows; the sampler runs eagerly on the first n.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from torch import nn

from pagedserve.executor.attention.base import AttentionBackend, AttentionMetadata, ForwardContext

logger = logging.getLogger(__name__)


def capture_ladder(sizes: list[int], forward, device: torch.device, pool=None, phase: str = "graph capture"):
    """Captures forward(size) as one CUDA graph per size, largest first so the smaller graphs reuse its
    memory (in `pool`, new if None). First a dry run compiles every size's Triton variants side by side
    (precompile.compile_ahead), then each size runs twice (Triton compiles, cuBLAS picks its kernels)
    before its capture. Returns ({size: graph}, {size: forward's output in the graph}, pool)."""
    from pagedserve.executor.precompile import compile_ahead

    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        with compile_ahead(phase) as dry:
            for size in reversed(sizes) if dry else ():
                forward(size)
        for size in reversed(sizes):
            for _ in range(2):
                forward(size)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                outputs[size] = forward(size)
            if pool is None:
                pool = graph.pool()
            graphs[size] = graph
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    return graphs, outputs, pool


# Between 64 and 256 every 16, except 192 and 240: cuBLAS (torch 2.11's, H100) picks kernels there that cost as
# much as a larger batch does, a layer's four 7B projections 219.4 us at 192 against 204.8 at 200 and 228.6 at 240
# against 221.6 at 256 (docs/benchmarks.md, session 6; 218.8 at 192 against 219.3 at 256 in session 34), so batches
# of 177-192 pad to 200 and 225-240 to 256 (the default workload: ~140 of its ~1,020 decode steps, ~0.3%).
_LADDER_64_256 = [64, 80, 96, 112, 128, 144, 160, 176, 200, 208, 224]


def batch_size_ladder(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, 64, 8)) + _LADDER_64_256 + list(range(256, 1025, 32))
    return [s for s in sizes if s < max_num_seqs] + [max_num_seqs]


class GraphedForward:
    """What the decode graphs and the mixed-step graphs (mixed_graph.py) share: the model and its cache, and
    the static inputs a captured forward reads, sized for the largest graph (token rows and sequence rows)."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        max_tokens: int,
        max_seqs: int,
        num_window_groups: int = 0,
    ) -> None:
        """num_window_groups: a hybrid model's window groups (core/kv_cache.py), each with a block table and slot
        mapping of its own, copied in as the first."""
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.device = device
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_seqs, max_blocks), dtype=torch.int32, device=device)
        self.num_window_groups = num_window_groups
        self.window_slot_mapping = torch.full((num_window_groups, max_tokens), -1, dtype=torch.long, device=device)
        self.window_block_tables = torch.zeros((num_window_groups, max_seqs, max_blocks), dtype=torch.int32,
                                               device=device)

    def _with_window(self, meta: AttentionMetadata, num_seqs: int, num_tokens: int) -> AttentionMetadata:
        """meta, and for a hybrid model its window groups' views of the static buffers."""
        if self.num_window_groups:
            meta.windows = [dataclasses.replace(meta, block_tables=self.window_block_tables[k, :num_seqs],
                                                slot_mapping=self.window_slot_mapping[k, :num_tokens])
                            for k in range(self.num_window_groups)]
        return meta

    def _copy_window(self, meta: AttentionMetadata, num_seqs: int, width: int, num_tokens: int, size: int) -> None:
        """A hybrid model's step: its window groups' tables into the static buffers (slots of padding rows -1)."""
        groups = len(meta.windows) if meta.windows is not None else 0
        if groups != self.num_window_groups:
            raise ValueError(f"the graphs were captured for {self.num_window_groups} window group(s) of block "
                             f"tables (a hybrid model's); this step has {groups}")
        for k, window in enumerate(meta.windows or ()):
            self.window_slot_mapping[k, :num_tokens].copy_(window.slot_mapping, non_blocking=True)
            if size > num_tokens:
                self.window_slot_mapping[k, num_tokens:size].fill_(-1)
            self.window_block_tables[k, :num_seqs, :width].copy_(window.block_tables, non_blocking=True)

    def _clear_slots(self) -> None:
        """Capture: no slot written (every row padding)."""
        self.slot_mapping.fill_(-1)
        self.window_slot_mapping.fill_(-1)


class CUDAGraphDecoder(GraphedForward):
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        num_window_groups: int = 0,
    ) -> None:
        self.sizes = batch_size_ladder(max_num_seqs)
        max_bs = self.sizes[-1]
        super().__init__(model, kv_caches, backend, max_model_len, block_size, device, max_bs, max_bs,
                         num_window_groups)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)  # token i: sequence i
        self.use_seq_order = bool(getattr(backend, "wants_seq_order", False))
        self._identity = torch.arange(max_bs, dtype=torch.int32, device=device)
        self.seq_order = self._identity.clone()
        self.use_work = bool(getattr(backend, "decode_work", False))
        if self.use_work:
            from pagedserve.executor.kernels import paged_attention_decode as pad

            self._num_kv_heads = kv_caches[0].shape[3]
            self._num_sms = pad.num_sms(device)
            self.work = torch.full((6, pad.work_capacity(max_bs, self._num_kv_heads, self._num_sms)), -1,
                                   dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def work_items(self, bs: int) -> int:
        """The graph of bs sequences runs this many work items (0: it takes seq_order instead)."""
        if not self.use_work:
            return 0
        from pagedserve.executor.kernels import paged_attention_decode as pad

        if not pad.uses_work_list(bs, self._num_kv_heads, self._num_sms):
            return 0
        return pad.work_capacity(bs, self._num_kv_heads, self._num_sms)

    def _metadata(self, bs: int) -> AttentionMetadata:
        items = self.work_items(bs)
        return self._with_window(AttentionMetadata(
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            slot_mapping=self.slot_mapping[:bs],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            block_size=self.block_size,
            is_decode_only=True,
            seq_order=self.seq_order[:bs] if self.use_seq_order and not items else None,
            decode_work=self.work[:, :items] if items else None,
        ), bs, bs)

    def _forward(self, bs: int) -> torch.Tensor:
        ctx = ForwardContext(self._metadata(bs), self.kv_caches, self.backend)
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], ctx)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> float:
        """Captures every size, largest first so smaller graphs reuse its memory pool."""
        t0 = time.perf_counter()
        # Padding everywhere: capture writes nothing to the cache and reads only zero-length contexts.
        self._clear_slots()
        self.seq_lens.zero_()
        if self.use_work:
            self.work.fill_(-1)
        self.graphs, self.logits, self.pool = capture_ladder(self.sizes, self._forward, self.device, self.pool,
                                                             "graph capture")
        elapsed = time.perf_counter() - t0
        from pagedserve.executor.compile_log import summary_suffix

        logger.info("captured %d CUDA graphs (batch sizes %s) in %.1f s%s", len(self.sizes), self.sizes, elapsed,
                    summary_suffix())
        return elapsed

    def padded_size(self, num_seqs: int) -> int | None:
        for bs in self.sizes:
            if bs >= num_seqs:
                return bs
        return None

    def fits(self, num_seqs: int, width: int) -> bool:
        """Whether a decode step of num_seqs sequences with block tables `width` wide has a graph."""
        return self.padded_size(num_seqs) is not None and width <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, *,
            placeholder_rows: torch.Tensor | None = None, last_sampled: torch.Tensor | None = None) -> torch.Tensor:
        """Replays the graph for this decode-only step; returns logits [num_seqs, V] (a view).

        meta's integer tensors may be int64 (the copies into the graph's int32 buffers convert).
        placeholder_rows: every token is a placeholder for the token sampled in row
        placeholder_rows[i] of last_sampled; the ids are gathered from there (input_ids is unused)."""
        n = int(meta.seq_lens.shape[0])
        bs = self.padded_size(n)
        width = int(meta.block_tables.shape[1])
        if not self.fits(n, width):
            raise ValueError(f"no CUDA graph for {n} sequences of {width} blocks")
        if placeholder_rows is not None:
            if last_sampled is None or placeholder_rows.shape != (n,):
                raise ValueError("placeholder_rows needs last_sampled and one row per sequence")
            torch.index_select(last_sampled, 0, placeholder_rows, out=self.input_ids[:n])
        else:
            self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self._copy_window(meta, n, width, n, bs)
        items = self.work_items(bs)
        if items:
            if meta.decode_work is None:
                raise ValueError(f"the graph of {bs} sequences runs a decode work list; this step has none")
            used = int(meta.decode_work.shape[1])
            if used > items:
                raise ValueError(f"{used} work items exceed the graph's capacity {items}")
            self.work[:, :used].copy_(meta.decode_work, non_blocking=True)
            if used < items:  # (the runner pads its lists to the graph's capacity: no fill then)
                self.work[0, used:items].fill_(-1)
        elif self.use_seq_order:
            if meta.seq_order is None:
                raise ValueError("the graphs were captured with a sequence order; this step has none")
            self.seq_order[:n].copy_(meta.seq_order, non_blocking=True)
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
            if self.use_seq_order and not items:  # a larger step may have left its permutation there
                self.seq_order[n:bs].copy_(self._identity[n:bs], non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[bs][:n]
