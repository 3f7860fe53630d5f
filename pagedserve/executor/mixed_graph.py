"""CUDA graphs for small mixed steps (prefill chunks beside decodes): one graph per padded token count.

Why: an eager step launches ~300 kernels, one layer at a time from Python. On the H200 machine a
~500-token admission step of the load test spent ~26 ms launching them while its device work is
~10 ms, and such steps come every time requests arrive. A graph replays the whole forward (attention
too) in one launch. Large steps (thousands of tokens) stay eager: their device time hides the launches.

A mixed step of t tokens and n sequences runs the graph of the smallest captured size T >= t, which
has room for S = min(T, max_num_seqs) sequences and S logits rows. Its static input buffers:

    tokens   [0, t)  the step's ids, positions, slots   [t, T)  stale ids/positions, slot -1 (no KV write)
    seqs     [0, n)  the step's query_start_loc,        [n, S)  query_start_loc = t (no new tokens),
                     seq_lens, block tables                     seq_len 0: both attention kernels skip them
    logits   [0, l)  the step's rows (last token of     [l, S)  row 0 (computed, never read)
                     each sampling sequence)

Nothing in the captured forward reads a host value of the step: the prefill kernel's grid is
T / BLOCK_Q + S programs that find their sequence on the device, the decode kernel's mixed mode
computes only the sequences with exactly one new token, and the metadata is captured with
max_query_len = T and max_seq_len = max_model_len (tile shape and split count only; any value is
correct). Logits are copied into one buffer shared by every size (the graphs' own outputs would keep
~150 MB each alive in the pool). The graphs share the decode graphs' memory pool: steps run one at a
time, in stream order.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from pagedserve.executor.attention.base import AttentionBackend, AttentionMetadata, ForwardContext
from pagedserve.executor.cuda_graph import GraphedForward, capture_ladder

logger = logging.getLogger(__name__)

MAX_MIXED_GRAPH_TOKENS = 1024  # above this a step's device time (> ~20 ms on an H200) hides its launches


def mixed_token_ladder(max_tokens: int) -> list[int]:
    """Token counts with a graph: fine steps at small counts, <= 33% padding above 128."""
    sizes = [16, 32, 64, 96, 128, 192, 256, 320, 384, 512, 640, 768, 1024]
    return [s for s in sizes if s <= max_tokens]


class CUDAGraphMixed(GraphedForward):
    """Captured forwards (model + logits) of mixed steps, one per size of `mixed_token_ladder`.

    With capture() never called (CPU tests), run() executes the same padded forward eagerly, so the
    padding rules above are tested without a GPU."""

    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        max_tokens: int = MAX_MIXED_GRAPH_TOKENS,
        num_window_groups: int = 0,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.sizes = mixed_token_ladder(max_tokens)
        if not self.sizes:
            raise ValueError(f"no mixed-step graph size fits {max_tokens} tokens")
        max_tokens, max_seqs = self.sizes[-1], self.num_seqs_of(self.sizes[-1])
        super().__init__(model, kv_caches, backend, max_model_len, block_size, device, max_tokens, max_seqs,
                         num_window_groups)
        self.query_start_loc = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.zeros(max_seqs, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None  # [max_seqs, V], allocated by the first forward
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def num_seqs_of(self, num_tokens: int) -> int:
        """Sequences (and logits rows) the graph of num_tokens tokens has room for."""
        return min(num_tokens, self.max_num_seqs)

    def padded_size(self, num_tokens: int) -> int | None:
        for size in self.sizes:
            if size >= num_tokens:
                return size
        return None

    def fits(self, num_tokens: int, num_seqs: int, width: int) -> bool:
        """Whether a mixed step of num_tokens tokens, num_seqs sequences and block tables `width` wide
        has a graph (a sequence has at most one logits row, so its logits rows fit too: speculative decoding's
        drafted tokens are each their own sequence)."""
        size = self.padded_size(num_tokens)
        return (size is not None and 0 < num_seqs <= self.num_seqs_of(size)
                and width <= self.block_tables.shape[1])

    def _metadata(self, size: int) -> AttentionMetadata:
        num_seqs = self.num_seqs_of(size)
        return self._with_window(AttentionMetadata(
            query_start_loc=self.query_start_loc[: num_seqs + 1],
            seq_lens=self.seq_lens[:num_seqs],
            block_tables=self.block_tables[:num_seqs],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=size,
            max_seq_len=self.max_model_len,
            block_size=self.block_size,
        ), num_seqs, size)

    def _forward(self, size: int) -> torch.Tensor:
        ctx = ForwardContext(self._metadata(size), self.kv_caches, self.backend)
        hidden = self.model(self.input_ids[:size], self.positions[:size], ctx)
        num_rows = self.num_seqs_of(size)
        logits = self.model.compute_logits(hidden.index_select(0, self.logits_indices[:num_rows]))
        if self.logits is None:
            self.logits = torch.empty((self.num_seqs_of(self.sizes[-1]), logits.shape[1]), dtype=logits.dtype,
                                      device=logits.device)
        self.logits[:num_rows].copy_(logits)
        return self.logits[:num_rows]

    @torch.inference_mode()
    def capture(self, pool=None) -> float:
        """Captures every size, largest first, into `pool` (e.g. the decode graphs'); returns seconds."""
        t0 = time.perf_counter()
        # All padding: capture writes nothing to the cache and attends over nothing.
        self._clear_slots()
        self.seq_lens.zero_()
        self.query_start_loc.zero_()
        self.graphs, _, _ = capture_ladder(self.sizes, self._forward, self.device, pool, "mixed graph capture")
        elapsed = time.perf_counter() - t0
        from pagedserve.executor.compile_log import summary_suffix

        logger.info("captured %d CUDA graphs for mixed steps (token counts %s) in %.1f s%s", len(self.sizes),
                    self.sizes, elapsed, summary_suffix())
        return elapsed

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            logits_indices: torch.Tensor, num_logits: int) -> torch.Tensor:
        """Replays the graph for this mixed step; returns logits [num_logits, V] (a view).

        input_ids / positions / meta.slot_mapping hold the step's t real tokens (no padding), meta's
        integer tensors may be int64 (the copies convert), logits_indices the step's num_logits rows."""
        num_tokens = int(input_ids.shape[0])
        num_seqs = int(meta.seq_lens.shape[0])
        width = int(meta.block_tables.shape[1])
        if not self.fits(num_tokens, num_seqs, width):
            raise ValueError(f"no mixed-step CUDA graph for {num_tokens} tokens of {num_seqs} sequences "
                             f"({width} blocks)")
        size = self.padded_size(num_tokens)
        rows = self.num_seqs_of(size)
        self.input_ids[:num_tokens].copy_(input_ids, non_blocking=True)
        self.positions[:num_tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[num_tokens:size].fill_(-1)
        self.query_start_loc[: num_seqs + 1].copy_(meta.query_start_loc, non_blocking=True)
        self.query_start_loc[num_seqs + 1 : rows + 1].fill_(num_tokens)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[num_seqs:rows].zero_()
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables, non_blocking=True)
        self._copy_window(meta, num_seqs, width, num_tokens, size)
        self.logits_indices[:num_logits].copy_(logits_indices[:num_logits], non_blocking=True)
        self.logits_indices[num_logits:rows].zero_()  # a stale row index could lie past this size's tokens
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
        else:  # not captured (CPU tests): the same padded forward, eagerly
            self._forward(size)
        return self.logits[:num_logits]
