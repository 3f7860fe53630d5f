"""Speculative decoding with a draft model (vLLM's `"method": "draft_model"`): a smaller model of the same tokenizer
guesses the next k tokens, greedily, and the target checks them all in one step (spec_decode.py says why keeping
each draft its sample confirms is exact: a greedy draft is a point mass, so random sampling stays exact too).

The draft model runs on the target's device in its own ModelRunner (paged attention, CUDA graphs for its decode
steps) with its own KV cache of as many blocks as the target's (worker.py sizes both from one memory budget), and
its own block tables: the draft's cache holds, per request, the keys and values of the tokens it has seen (the
`tokens` of _DraftState). A proposal for a request whose text is `tokens`:

  1. catch up: the tokens the draft has not computed (the whole prompt the first time; after a verified step, the
     samples that step kept) run as one prefill chunk per request, all requests in one forward (split into chunks
     of max_num_batched_tokens), whose last position gives the first draft;
  2. k - 1 decode steps over the requests still drafting, each feeding the draft before.

Draft tokens the target rejects leave stale keys in the draft's cache past the common prefix of what it computed
and the request's text: the next catch-up starts at that prefix and overwrites them. Block tables grow with the
text; a request's blocks are freed when it ends, or taken back from the least recently drafting requests when the
pool runs short (they recompute later). The decode steps are queued back to back, each fed the one before's samples
on the device (the runner's placeholders, as async scheduling feeds a step), and the host reads every draft once at
the end of the proposal; with async scheduling that read waits for the target's step in flight too (the draft runs
on the same device queue).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedserve.core.outputs import PLACEHOLDER_TOKEN_ID, ScheduledRequest, SchedulerOutput
from pagedserve.distributed import single_rank
from pagedserve.sampling_params import SamplingParams
from pagedserve.spec_decode import SpeculativeConfig

logger = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)


@dataclass(slots=True)
class _DraftState:
    tokens: list[int] = field(default_factory=list)  # tokens whose keys and values the draft cache holds
    blocks: list[int] = field(default_factory=list)  # its block table in the draft cache
    last_used: int = 0  # the proposal call that last drafted for it (eviction order)


class DraftModelProposer:
    """The scheduler's proposer (as spec_decode.NgramProposer) backed by a draft model's runner."""

    def __init__(self, config: SpeculativeConfig, runner: Any, num_blocks: int, block_size: int,
                 max_num_batched_tokens: int) -> None:
        self.config = config
        self.runner = runner
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._states: dict[str, _DraftState] = {}
        self._calls = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def release(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self._free.extend(reversed(state.blocks))

    def propose(self, request_id: str, token_ids: list[int], k: int) -> list[int]:
        return self.propose_many([(request_id, token_ids, k)])[0]

    @torch.inference_mode()
    def propose_many(self, items: list[tuple[str, list[int], int]]) -> list[list[int]]:
        """Up to k greedy draft tokens after each (request id, its tokens, k); [] for one whose blocks do not fit.
        With tensor parallelism the draft runs on rank 0 alone (distributed.single_rank)."""
        with single_rank():
            return self._propose_many(items)

    def _propose_many(self, items: list[tuple[str, list[int], int]]) -> list[list[int]]:
        self._calls += 1
        out: list[list[int]] = [[] for _ in items]
        work: list[tuple[int, _DraftState, list[int], int]] = []  # (index in items, state, tokens, k)
        in_call = {request_id for request_id, _, _ in items}
        for i, (request_id, token_ids, k) in enumerate(items):
            k = min(k, self.config.num_speculative_tokens)
            if k < 1 or not token_ids:
                continue
            state = self._states.setdefault(request_id, _DraftState())
            state.last_used = self._calls
            common = _common_prefix(state.tokens, token_ids, len(token_ids) - 1)
            del state.tokens[common:]
            # keys and values of positions 0 .. len + k - 2 (the last draft is sampled, never fed)
            if not self._grow(state, len(token_ids) + k - 1, in_call):
                continue
            work.append((i, state, list(token_ids), k))
        if not work:
            return out
        ids = [request_id for request_id, _, _ in items]
        handle, firsts = self._catch_up(work, ids)
        # Each decode step feeds the one before's samples on the device (placeholders, as async scheduling does):
        # the host reads the drafts once, at the end.
        pending: list[tuple[Any, list[int]]] = [] if handle is None else [(handle, [i for i, _, _, _ in work])]
        for step in range(1, max(k for _, _, _, k in work)):
            rows = [(i, state, tokens) for i, state, tokens, k in work if k > step]
            scheduled = [ScheduledRequest(ids[i], [firsts[i] if step == 1 and firsts else PLACEHOLDER_TOKEN_ID],
                                          len(tokens) + step - 1, state.blocks, True, _GREEDY, tokens, [])
                         for i, state, tokens in rows]
            pending.append((self.runner.execute_async(SchedulerOutput(scheduled, len(scheduled))),
                            [i for i, _, _ in rows]))
        drafts: dict[int, list[int]] = {i: [firsts[i]] if firsts else [] for i, _, _, _ in work}
        for step_handle, rows_of in pending:
            for i, token in zip(rows_of, step_handle.result().sampled_token_ids, strict=True):
                drafts[i].append(int(token))
        for i, state, tokens, _ in work:
            state.tokens = tokens + drafts[i][:-1]
            out[i] = drafts[i]
        return out

    def _catch_up(self, work: list[tuple[int, _DraftState, list[int], int]], ids: list[str]
                  ) -> tuple[Any, dict[int, int] | None]:
        """Runs each request's uncomputed tokens. When they fit one forward (the usual case: the one or few tokens
        the last check kept), returns its queued step's handle (its samples, the first drafts, stay on the device
        for the next step) and None; else runs chunks of at most max_num_batched_tokens a forward, all requests
        together, and returns None and index -> the greedy token after its text (the first draft)."""
        done = {i: len(state.tokens) for i, state, _, _ in work}
        if sum(len(tokens) - done[i] for i, _, tokens, _ in work) <= self.max_num_batched_tokens:
            scheduled = [ScheduledRequest(ids[i], tokens[done[i]:], done[i], state.blocks, True, _GREEDY, tokens, [])
                         for i, state, tokens, _ in work]
            handle = self.runner.execute_async(SchedulerOutput(scheduled, sum(len(r.token_ids) for r in scheduled)))
            for _, state, tokens, _ in work:
                state.tokens = tokens
            return handle, None
        firsts: dict[int, int] = {}
        while len(firsts) < len(work):
            budget = self.max_num_batched_tokens
            scheduled, rows = [], []
            for i, state, tokens, _ in work:
                if i in firsts or budget <= 0:
                    continue
                start = done[i]
                end = min(len(tokens), start + budget)
                last = end == len(tokens)
                scheduled.append(ScheduledRequest(ids[i], tokens[start:end], start, state.blocks, last, _GREEDY,
                                                  tokens, []))
                rows.append((i, last))
                budget -= end - start
                done[i] = end
            output = self.runner.execute(SchedulerOutput(scheduled, self.max_num_batched_tokens - budget))
            for (i, last), token in zip(rows, output.sampled_token_ids, strict=True):
                if last:
                    firsts[i] = int(token)
        for _, state, tokens, _ in work:
            state.tokens = tokens
        return None, firsts

    def _grow(self, state: _DraftState, num_positions: int, keep: set[str]) -> bool:
        """Blocks for num_positions in state's table, taking back the least recently drafting requests' blocks
        (not those of this call) when the pool is short; False when they still do not fit."""
        need = -(-num_positions // self.block_size) - len(state.blocks)
        if need > len(self._free):
            idle = sorted((s.last_used, rid) for rid, s in self._states.items() if rid not in keep and s.blocks)
            for _, request_id in idle:
                self.release(request_id)
                if need <= len(self._free):
                    break
        if need > len(self._free):
            return False
        for _ in range(max(0, need)):
            state.blocks.append(self._free.pop())
        return True


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for j in range(n):
        if a[j] != b[j]:
            return j
    return n


def load_draft(config: Any, spec: SpeculativeConfig, device: torch.device, dtype: torch.dtype,
               target_hf_config: Any, max_model_len: int) -> tuple[Any, Any, Any]:
    """The draft model on the target's device, whole on rank 0 with tensor parallelism (distributed.single_rank):
    (its EngineConfig, model, HF config). ValueError for a draft whose vocabulary is larger than the target's (its
    tokens could not be fed to the target)."""
    from pagedserve.executor.loader import load_model

    draft_config = config.replace(model=spec.model, speculative_config=None, quantization=None, enable_lora=False,
                                  max_model_len=max_model_len, tokenizer=None, hf_overrides=None, revision=None,
                                  disable_sliding_window=False, tensor_parallel_size=1)
    with single_rank():
        model, hf_config = load_model(draft_config, spec.model, device, dtype)
    if int(hf_config.vocab_size) > int(target_hf_config.vocab_size):
        raise ValueError(f"the draft model's vocabulary ({hf_config.vocab_size}) is larger than the target's "
                         f"({target_hf_config.vocab_size}); a draft model must share the target's tokenizer")
    if getattr(model, "embedding_only", False):
        raise ValueError("the draft model has no LM head; it cannot draft tokens")
    logger.info("speculative decoding: draft model %s (%d layers), %d tokens a step", spec.model,
                hf_config.num_hidden_layers, spec.num_speculative_tokens)
    return draft_config, model, hf_config


__all__ = ["DraftModelProposer", "load_draft"]
