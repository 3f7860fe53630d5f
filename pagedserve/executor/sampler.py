"""Turns one row of logits per request into one sampled token id (and optional logprobs).

Pipeline for a batch (every step is a batched tensor op on the logits' device):

    raw logits ──► log_softmax ──► logprobs (sampled token, rank, top-N)   [only rows that ask]
        │
        ├─ structured outputs (tokens outside the row's grammar → -inf)
        ├─ logit_bias (added) ─ min_tokens (stop ids → -inf) ─ repetition ─ frequency ─ presence
        │                                                    (the order of vLLM's apply_penalties)
        ├─ greedy rows: argmax
        ├─ random rows off CUDA (and filtered rows with fused_filters=False):
        │      /temperature ─ top_k ─ top_p ─ min_p ─ softmax ─ argmax(probs / q), q ~ Exp(1)
        └─ random rows on CUDA: kernels/sample.py, one fused pass: argmax(logits / T - log q) over the
               tokens with logits / T >= the row's threshold, which kernels/sample_filter.py finds for
               rows with top_k/top_p/min_p (no sort; -inf for the others)

The exponential race picks token i with probability p_i (argmax of p_i / q_i with q_i ~ Exp(1) is a
categorical draw), needs no cumulative sum, and lets each seeded row draw its own noise from a
generator seeded by (seed, output position): the same seed then gives the same tokens alone or
batched, and again after a preemption recompute, because nothing depends on generator history.

The fused CUDA path runs the same race in one Triton pass over the row, with no softmax, no fp32 copy
of the logits and no [S, V] noise tensor; argmax(p_i / q_i) = argmax(logits_i / T - log q_i). Rows
with filters first get a threshold (one kernel, a few passes over the row, no sort); the race then
skips the tokens below it, which is the same as racing over the filtered, renormalized softmax.
The kept sets equal the torch filters' but for ties and rounding at the top-p boundary
(kernels/sample_filter.py says how). Its noise is in-kernel Philox keyed by (philox seed, offset, column),
one (seed, offset) per row: a seeded request's row uses philox seed position_seed(seed, output
position) and offset = output position, so it too is a function of (seed, position) alone. Unseeded
rows get a fresh 63-bit philox seed per row and step from a host numpy generator owned by the
Sampler, seeded from `seed` (default torch.initial_seed(), i.e. what the worker's
torch.manual_seed(config.seed) set): no device generator state is read, so nothing waits.
The two paths draw different noise, so on CUDA a seed gives other tokens than on CPU (or than with
fused_filters=False and a top-k/top-p/min-p filter on): seeded reproducibility holds per device type,
and a row samples the same alone or batched on both paths (the path is chosen from the row's own
parameters and the device).

Penalties read each request's history: how often each token came out, and which tokens its prompt has.
Given a StepHistory (the engine's runner always passes one), that history lives on the device in
`PenaltyHistory`, a cache of per-request rows updated by a few tokens a step; the newest output may still
be only on the device (async scheduling samples step N+1 before the host has step N's token), and is
read from the step before's samples there, so penalized requests never make the engine wait. Without one
(direct calls), the history is built from the host lists each call.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.core.outputs import ScheduledRequest, TokenLogprobs
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured_output import apply_token_bitmask

_MASK64 = (1 << 64) - 1
_EMPTY = np.empty(0, dtype=np.int64)
_FUSED_LOGPROBS = os.environ.get("PAGEDSERVE_FUSED_LOGPROBS", "1") != "0"  # logprob_stats's kernel for k <= 1


def position_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed mixed from (request seed, output position) with splitmix64.

    Mixing (rather than seed + position) keeps seeds s and s+1 from producing shifted copies of
    the same noise stream.
    """
    z = ((seed & _MASK64) + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def apply_sampling_filters(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    *,
    max_top_k: int | None = None,
    use_top_p: bool | None = None,
    use_min_p: bool | None = None,
) -> torch.Tensor:
    """Probabilities [S, V] after temperature, top-k, top-p and min-p; filtered tokens get exactly 0.

    temperatures [S] float (> 0), top_k [S] int (<= 0 or >= V: off), top_p [S] float (1: off),
    min_p [S] float (0: off). A row whose filter is off is left bit-for-bit unchanged by that
    filter, so a row's probabilities never depend on what other rows in the batch asked for.
    Definitions (as in HF transformers' warpers):
      top_k: keep logits >= the k-th highest (tokens tied with it survive too, as in vLLM; both
             code paths agree, so a row samples the same alone or batched).
      top_p: keep the smallest most-likely-first prefix whose probability mass reaches top_p.
      min_p: keep tokens with p_i >= min_p * p_max (a ratio, so unaffected by the filters before it).
    max_top_k / use_top_p / use_min_p: what the caller already knows on the host (the largest
    active top_k, 0 for none; whether any row uses top-p / min-p). Given, they spare the reads of
    device tensors that would wait for the device (the engine's async steps rely on that).
    """
    num_rows, vocab_size = logits.shape
    logits = logits / temperatures.to(logits.dtype).unsqueeze(1)
    k = top_k.to(device=logits.device, dtype=torch.long)
    k = torch.where((k <= 0) | (k > vocab_size), torch.full_like(k, vocab_size), k)
    if max_top_k is None:
        max_top_k = int(torch.where(k < vocab_size, k, torch.zeros_like(k)).max())
    use_top_k = 0 < max_top_k < vocab_size
    if use_top_p is None:
        use_top_p = bool((top_p < 1.0).any())
    if use_min_p is None:
        use_min_p = bool((min_p > 0.0).any())
    neg_inf = float("-inf")

    if use_top_p:
        # One descending sort serves both filters; masks are applied in sorted order and scattered
        # back (a permutation, so unmasked values are untouched). A stable sort keeps the order of
        # tied logits independent of the batch around the row.
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
        if use_top_k:
            kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        p = top_p.to(device=logits.device, dtype=sorted_probs.dtype).unsqueeze(1)
        # Rows with top_p == 1 are excluded explicitly: float cumsum can pass 1.0 in the tail.
        drop = (mass_before >= p) & (p < 1.0)
        drop[:, 0] = False  # the most likely token always survives
        sorted_logits = sorted_logits.masked_fill(drop, neg_inf)
        logits = torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)
    elif use_top_k:
        # Without top-p a partial top-k is enough: threshold at the k-th largest logit.
        max_k = max_top_k
        top_vals = logits.topk(max_k, dim=-1).values
        kth = top_vals.gather(1, (k.clamp(max=max_k) - 1).unsqueeze(1))
        keep_all = (k >= vocab_size).unsqueeze(1)
        logits = logits.masked_fill((logits < kth) & ~keep_all, neg_inf)

    if use_min_p:
        # p_i < min_p * p_max  <=>  logit_i < max_logit + log(min_p); log(0) = -inf masks nothing.
        log_min_p = torch.log(min_p.to(device=logits.device, dtype=logits.dtype)).unsqueeze(1)
        max_logit = logits.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(logits < max_logit + log_min_p, neg_inf)

    return logits.softmax(dim=-1)


def exponential_noise(
    shape: tuple[int, int],
    seeds: Sequence[int | None],
    positions: Sequence[int],
    device: torch.device,
) -> torch.Tensor:
    """q ~ Exp(1) of `shape`; row i comes from its own generator when seeds[i] is set."""
    q = torch.empty(shape, device=device, dtype=torch.float32)
    q.exponential_()  # unseeded rows: the default generator, one draw for the batch
    for row, (seed, pos) in enumerate(zip(seeds, positions)):
        if seed is None:
            continue
        gen = torch.Generator(device=device)
        gen.manual_seed(position_seed(seed, pos))
        q[row].exponential_(generator=gen)
    # exponential_ may return 0; 0/0 would be NaN, and argmax picks NaN.
    return q.clamp_min_(torch.finfo(torch.float32).tiny)


@dataclass(slots=True)
class SampleResult:
    """One step's samples, still on the logits' device: nothing here has waited for the device.

    token_ids [S] int64 feed the next step's placeholder tokens on the device; `payload` (1-D) is
    everything the host needs, to be copied back in one transfer and turned into lists by
    decode(payload.tolist()).
    """

    token_ids: torch.Tensor
    payload: torch.Tensor
    decode: Callable[[list], tuple[list[int], list[TokenLogprobs | None]]]


def _decode_ids(values: list) -> tuple[list[int], list[TokenLogprobs | None]]:
    return values, [None] * len(values)


@dataclass(slots=True)
class StepHistory:
    """What the runner knows of the step before, for samplers that keep per-request state: its sampled ids
    (device, row i for the i-th request it sampled), each sampled request's row in them, and the ids of
    requests that ended since (their state can go)."""

    last_sampled: torch.Tensor | None = None
    last_rows: Mapping[str, int] = field(default_factory=dict)
    finished: Sequence[str] = ()


@dataclass(slots=True)
class _HistoryEntry:
    slot: int
    outputs: list[int]  # the request's own output list object: a reused request id is a new list
    prompt_len: int
    folded: int  # outputs counted in the slot's row so far


class PenaltyHistory:
    """Per-request penalty history on the device, kept across steps: counts[slot, t] is how many of the
    request's first `folded` outputs are token t, and in_prompt[slot, t] whether its prompt has t.

    Each call brings the rows of the requests being sampled up to date, in one host-to-device copy and a
    few scatter ops: the outputs the host list has that are not counted yet, and at most one more, the
    token the step before sampled for the request (under async scheduling not yet on the host), read from
    that step's samples on the device. A request's row is made once, from its prompt and output lists.

    It is a cache: any entry can be dropped and rebuilt from the host lists, so rows of finished requests
    are freed when the runner reports them, and otherwise the least recently used entries not needed this
    step make room. The tensors grow (doubling) to the most rows one step needs, and past max_rows (the
    engine's max_num_seqs: the most requests one step samples) only when a step needs more.
    """

    def __init__(self, vocab_size: int, device: torch.device, max_rows: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.max_rows = max_rows
        self.counts = torch.zeros((0, vocab_size), dtype=torch.int32, device=device)
        self.in_prompt = torch.zeros((0, vocab_size), dtype=torch.bool, device=device)
        self.entries: OrderedDict[str, _HistoryEntry] = OrderedDict()  # least recently used first
        self.free: list[int] = []

    @property
    def capacity(self) -> int:
        return self.counts.shape[0]

    def release(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            entry = self.entries.pop(rid, None)
            if entry is not None:
                self.free.append(entry.slot)

    def gather(self, requests: Sequence[ScheduledRequest], history: StepHistory,
               with_prompt: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(counts int32 [R, V], in_prompt bool [R, V] or None) for `requests` in order, up to date for the
        token each samples now (outputs 0 .. output_index - 1). Queues device work only; no wait."""
        slots = self.update(requests, history)
        in_prompt = self.in_prompt.index_select(0, slots) if with_prompt else None
        return self.counts.index_select(0, slots), in_prompt

    def update(self, requests: Sequence[ScheduledRequest], history: StepHistory) -> torch.Tensor:
        """Brings the rows of `requests` up to date (as gather) and returns their slots, int64 [R] on the
        device: request i's history is counts[slots[i]] and in_prompt[slots[i]]."""
        width = self.vocab_size
        wanted = {r.request_id: r for r in requests}
        if len(wanted) != len(requests):
            raise ValueError("PenaltyHistory.update: a request id appears twice in one step")
        # An entry is rebuilt when its request id now names another request (a new output list).
        self.release([rid for rid, r in wanted.items() if (e := self.entries.get(rid)) is not None and (
            e.outputs is not r.output_token_ids or e.prompt_len != len(r.prompt_token_ids)
            or e.folded > r.output_index)])
        new = [r for r in requests if r.request_id not in self.entries]
        self._make_room(len(new), wanted)

        zero_slots: list[int] = []
        prompt_parts: list[np.ndarray] = []
        fold_parts: list[np.ndarray] = []
        dev_slots: list[int] = []
        dev_rows: list[int] = []
        for r in new:
            slot = self.free.pop()
            self.entries[r.request_id] = _HistoryEntry(slot, r.output_token_ids, len(r.prompt_token_ids), 0)
            zero_slots.append(slot)
            prompt_parts.append(_valid_ids(r.prompt_token_ids, width) + slot * width)
        slots: list[int] = []
        for r in requests:
            entry = self.entries[r.request_id]
            self.entries.move_to_end(r.request_id)
            slots.append(entry.slot)
            need = r.output_index  # outputs before the one sampled now
            have = min(len(r.output_token_ids), need)
            if have > entry.folded:
                fold_parts.append(_valid_ids(r.output_token_ids[entry.folded:have], width) + entry.slot * width)
            if need > have:
                row = history.last_rows.get(r.request_id)
                if need - have > 1 or row is None or history.last_sampled is None:
                    raise RuntimeError(f"request {r.request_id}: output {have} of {need} is neither on the host "
                                       "nor among the last step's samples")
                dev_slots.append(entry.slot)
                dev_rows.append(row)
            entry.folded = need

        parts = [np.asarray(zero_slots, dtype=np.int64), np.concatenate(prompt_parts or [_EMPTY]),
                 np.concatenate(fold_parts or [_EMPTY]), np.asarray(dev_slots, dtype=np.int64),
                 np.asarray(dev_rows, dtype=np.int64), np.asarray(slots, dtype=np.int64)]
        sizes = [a.size for a in parts]
        # Each part padded to an even length, so each starts 16-byte aligned on the device (Triton kernels
        # specialize on pointer alignment: a parity changing with the step would compile new variants).
        host = np.concatenate([np.pad(a, (0, a.size & 1)) for a in parts])
        dev = torch.from_numpy(host)
        if self.device.type != "cpu":
            dev = dev.to(self.device, non_blocking=True)
        zero_idx, prompt_idx, fold_idx, dslots, drows, slots_idx = (
            t[:n] for t, n in zip(torch.split(dev, [n + (n & 1) for n in sizes]), sizes))
        if sizes[0]:
            self.counts.index_fill_(0, zero_idx, 0)
            self.in_prompt.index_fill_(0, zero_idx, False)
        if sizes[1]:
            self.in_prompt.view(-1).index_fill_(0, prompt_idx, True)
        if sizes[2]:
            self.counts.view(-1).index_add_(0, fold_idx, torch.ones_like(fold_idx, dtype=torch.int32))
        if sizes[3]:
            toks = history.last_sampled.index_select(0, drows).to(torch.int64)
            valid = (toks >= 0) & (toks < width)  # (ids past the row never count, as on the host path)
            flat = torch.where(valid, dslots * width + toks.clamp(0, width - 1), 0)
            self.counts.view(-1).index_add_(0, flat, valid.to(torch.int32))
        return slots_idx

    def _make_room(self, num_new: int, keep: Mapping[str, ScheduledRequest]) -> None:
        """Free slots for num_new entries: evict the least recently used entries not in `keep`, then grow."""
        for rid in [rid for rid in self.entries if rid not in keep]:
            if len(self.free) >= num_new:
                break
            self.free.append(self.entries.pop(rid).slot)
        short = num_new - len(self.free)
        if short > 0:
            old = self.capacity
            new_capacity = max(old * 2, old + short, 4)
            if self.max_rows is not None:
                new_capacity = min(new_capacity, max(self.max_rows, old + short))
            counts = torch.zeros((new_capacity, self.vocab_size), dtype=torch.int32, device=self.device)
            in_prompt = torch.zeros((new_capacity, self.vocab_size), dtype=torch.bool, device=self.device)
            counts[:old] = self.counts
            in_prompt[:old] = self.in_prompt
            self.counts, self.in_prompt = counts, in_prompt
            self.free.extend(range(new_capacity - 1, old - 1, -1))


class Sampler:
    """Batched sampler. Row i of `logits` belongs to `requests[i]`.

    Stateless but for the host generator of the fused CUDA path's unseeded rows (module docstring):
    `seed` seeds it (default torch.initial_seed()). use_fused_kernel=True sends CUDA rows through the
    kernel (the worker turns it on unless PAGEDSERVE_FUSED_SAMPLER=0: 4.5-5x faster than the torch ops
    at 139-256 rows on the H100, docs/gpu-notes.md session 5); off CUDA the torch path is always used.
    fused_filters=False keeps rows with top-k / top-p / min-p on the torch path even then (the worker:
    PAGEDSERVE_FUSED_FILTERS=0, for A/B runs). Penalties with a StepHistory on that path run as one Triton
    pass (kernels/penalties.py) unless fused_penalties=False (PAGEDSERVE_FUSED_PENALTIES=0): torch ops.
    """

    def __init__(
        self,
        vocab_size: int,
        eos_token_ids: set[int],
        *,
        seed: int | None = None,
        use_fused_kernel: bool = False,
        fused_filters: bool = True,
        fused_penalties: bool = True,
        max_rows: int | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.max_rows = max_rows  # the most rows one step samples (max_num_seqs): caps the penalty history
        self.eos_token_ids = set(eos_token_ids)
        self.use_fused_kernel = use_fused_kernel
        self.fused_filters = fused_filters
        self.fused_penalties = fused_penalties
        self._seed_rng = np.random.default_rng(torch.initial_seed() if seed is None else seed)
        # The last batch's per-row filter parameters on the device, keyed by its SamplingParams
        # objects: consecutive decode steps of the same requests reuse them (no host work, no copy).
        self._filter_cache: tuple | None = None  # (key, device, value, the params themselves)
        self._penalty_history: PenaltyHistory | None = None  # made on the first penalized row with a history

    def __call__(
        self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Samples and brings the result to the host (waits for the device)."""
        if not requests:
            self._check(logits, requests)
            return [], []
        result = self.sample(logits, requests)
        return result.decode(result.payload.tolist())

    @staticmethod
    def _check(logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits {tuple(logits.shape)} must have one row per request ({len(requests)})")

    def sample(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest],
               history: StepHistory | None = None) -> SampleResult:
        """Queues the sampling on the logits' device without waiting for it (no host reads of
        device data: per-row parameters travel host-to-device without a sync). `history`: the step
        before's samples (the runner passes it), for penalties' device-side history (module docstring)."""
        self._check(logits, requests)
        params = [r.sampling_params for r in requests]
        if history is not None and history.finished and self._penalty_history is not None:
            self._penalty_history.release(history.finished)

        if all(self._is_plain_greedy(r) for r in requests):
            # Fast path: no logits changes, no logprobs -> one argmax.
            ids = logits.argmax(dim=-1)
            return SampleResult(ids, ids, _decode_ids)

        if any(self._needs_processing(r) for r in requests):
            if logits.dtype != torch.float32:
                logits = logits.float()  # penalties need fp32 resolution
            processed = self.process_logits(logits, requests, history)
        else:
            processed = logits  # read-only below: _sample widens what the torch path needs to fp32
        sampled = self._sample(processed, requests)

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not logprob_rows:
            return SampleResult(sampled, sampled, _decode_ids)
        return self._with_logprobs(logits, sampled, params, logprob_rows)

    # ---- logits processing (exposed so tests can check it exactly) ----

    def process_logits(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest],
                       history: StepHistory | None = None) -> torch.Tensor:
        """A new tensor: the structured-output masks, logit_bias, min_tokens masking, then
        repetition/frequency/presence penalties."""
        out = logits.clone()
        masked = [i for i, r in enumerate(requests) if r.allowed_token_bitmask is not None]
        if masked:
            apply_token_bitmask(out, masked, [requests[i].allowed_token_bitmask for i in masked])
        self._apply_allowed_tokens(out, requests)
        self._apply_bad_words(out, requests)
        self._apply_logit_bias(out, requests)
        self._apply_min_tokens(out, requests)
        self._apply_penalties(out, requests, history)
        self._rescue_dead_rows(out, requests)
        return out

    def _rescue_dead_rows(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
        """A row whose masks left no token at all (constraints that contradict each other: a complete grammar with
        min_tokens still to go, every allowed_token_id also a bad word, a grammar's next tokens outside
        allowed_token_ids) gets its first stop token back, so the request ends there instead of sampling a masked
        token (the argmax of a row of -inf is token 0). On the device, no host sync."""
        rows: list[int] = []
        cols: list[int] = []
        for i, r in enumerate(requests):
            p = r.sampling_params
            if (r.allowed_token_bitmask is None and p.allowed_token_ids is None and not p.bad_words_token_ids
                    and not self._min_tokens_active(r)):
                continue
            stops = [t for t in self._stop_ids(p) if t < logits.shape[1]]
            if stops:
                rows.append(i)
                cols.append(stops[0])
        if not rows:
            return
        index = self._index(rows, cols, logits.device)
        dead = logits[index[0]].amax(dim=-1) == float("-inf")
        logits[index] = torch.where(dead, torch.zeros((), dtype=logits.dtype, device=logits.device), logits[index])

    def _is_plain_greedy(self, req: ScheduledRequest) -> bool:
        p = req.sampling_params
        return p.greedy and p.logprobs is None and not self._needs_processing(req)

    def _needs_processing(self, req: ScheduledRequest) -> bool:
        p = req.sampling_params
        return (p.needs_penalties or bool(p.logit_bias) or self._min_tokens_active(req)
                or req.allowed_token_bitmask is not None or p.allowed_token_ids is not None
                or bool(p.bad_words_token_ids))

    def _min_tokens_active(self, req: ScheduledRequest) -> bool:
        p = req.sampling_params
        return req.output_index < p.min_tokens and bool(self._stop_ids(p))

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        # With ignore_eos, EOS is no stop at all; only explicit stop_token_ids end the request.
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.eos_token_ids
        return sorted(ids)

    def _apply_logit_bias(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        width = logits.shape[1]
        for i, r in enumerate(requests):
            for tok, bias in (r.sampling_params.logit_bias or {}).items():
                if tok < width:
                    rows.append(i)
                    cols.append(tok)
                    vals.append(bias)
        if rows:
            idx = self._index(rows, cols, logits.device)
            bias = _to_device(vals, logits.dtype, logits.device)
            logits.index_put_(idx, bias, accumulate=True)

    def _apply_bad_words(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
        """vLLM's bad_words: a one-token word is never sampled; a longer one's last token is banned where the
        output so far ends with the word's other tokens (the engine steps such requests one at a time, so the
        output is known here)."""
        rows: list[int] = []
        cols: list[int] = []
        width = logits.shape[1]
        for i, r in enumerate(requests):
            words = r.sampling_params.bad_words_token_ids
            if not words:
                continue
            output = r.output_token_ids[:r.output_index]
            for seq in words:
                head = seq[:-1]
                if seq[-1] < width and (not head or output[len(output) - len(head):] == head):
                    rows.append(i)
                    cols.append(seq[-1])
        if rows:
            logits[self._index(rows, cols, logits.device)] = float("-inf")

    def _apply_allowed_tokens(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
        """Rows with allowed_token_ids keep those logits; every other column becomes -inf."""
        rows = [i for i, r in enumerate(requests) if r.sampling_params.allowed_token_ids is not None]
        if not rows:
            return
        keep = torch.zeros((len(rows), logits.shape[1]), dtype=torch.bool)
        for j, i in enumerate(rows):
            ids = [t for t in requests[i].sampling_params.allowed_token_ids if t < logits.shape[1]]
            keep[j, ids] = True
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~keep.to(logits.device, non_blocking=True), float("-inf"))

    def _apply_min_tokens(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        width = logits.shape[1]
        for i, r in enumerate(requests):
            if self._min_tokens_active(r):
                for tok in self._stop_ids(r.sampling_params):
                    if tok < width:
                        rows.append(i)
                        cols.append(tok)
        if rows:
            logits[self._index(rows, cols, logits.device)] = float("-inf")

    def _apply_penalties(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest],
                         history: StepHistory | None = None) -> None:
        """In place, on the rows that ask:

        repetition (HF/vLLM, over prompt + output): seen tokens' logits l -> l / r if l > 0 else l * r
        frequency/presence (OpenAI, over output):  l -> l - f * count(token) - p * [count(token) > 0]

        Only device tensors index the rows (a Python list would copy its indices with a wait), so this
        queues work without waiting for the device.
        """
        pen_rows = [i for i, r in enumerate(requests) if r.sampling_params.needs_penalties]
        if not pen_rows:
            return
        device, dtype, width = logits.device, logits.dtype, logits.shape[1]
        pen_requests = [requests[i] for i in pen_rows]
        pen_params = [r.sampling_params for r in pen_requests]
        use_rep = any(p.repetition_penalty != 1.0 for p in pen_params)
        knob_rows = [[p.repetition_penalty for p in pen_params], [p.frequency_penalty for p in pen_params],
                     [p.presence_penalty for p in pen_params]]
        hist = None
        if history is not None:
            if self._penalty_history is None or self._penalty_history.device != device:
                self._penalty_history = PenaltyHistory(width, device, self.max_rows)
            hist = self._penalty_history
        if hist is not None and self.fused_penalties and self._fused_kernel_on(logits) and dtype == torch.float32:
            # One Triton pass over the penalized rows, reading the history's rows in place.
            from pagedserve.executor.kernels.penalties import apply_penalties

            slots = hist.update(pen_requests, history)
            apply_penalties(logits, _to_device(pen_rows, torch.long, device), slots, hist.counts,
                            hist.in_prompt if use_rep else None, _to_device(knob_rows, torch.float32, device))
            return
        if hist is not None:
            counts, in_prompt = hist.gather(pen_requests, history, use_rep)
        else:
            counts, in_prompt = _host_history(pen_requests, width, device, use_rep)
        all_rows = len(pen_rows) == len(requests)
        rows = None if all_rows else _to_device(pen_rows, torch.long, device)
        sub = logits if all_rows else logits.index_select(0, rows)
        knobs = _to_device(knob_rows, dtype, device).unsqueeze(2)
        seen_in_output = counts > 0
        if use_rep:
            r = knobs[0]
            seen = seen_in_output | in_prompt
            sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
        sub = sub - knobs[1] * counts.to(dtype) - knobs[2] * seen_in_output.to(dtype)
        if all_rows:
            logits.copy_(sub)
        else:
            logits.index_copy_(0, rows, sub)

    @staticmethod
    def _index(rows: list[int], cols: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        both = _to_device([rows, cols], torch.long, device)
        return both[0], both[1]

    # ---- sampling ----

    def _sample(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> torch.Tensor:
        """Token ids [S] (on device): argmax for greedy rows, the exponential race for the rest
        (fused kernel or torch, per row: see the module docstring). logits: fp32, or any float
        dtype when no row needed processing; not modified."""
        params = [r.sampling_params for r in requests]
        num_rows, vocab = len(params), logits.shape[1]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            return logits.argmax(dim=-1)
        fused = self._fused_kernel_on(logits)
        is_fast = [fused and (self.fused_filters or not _needs_filters(params[i], vocab)) for i in random_rows]
        fast_rows = [i for i, fast in zip(random_rows, is_fast) if fast]
        filtered_rows = [i for i, fast in zip(random_rows, is_fast) if not fast]
        if len(fast_rows) == num_rows:
            return self._sample_fused(logits, requests)
        if len(filtered_rows) == num_rows:
            return self._sample_filtered(logits, requests)
        device = logits.device
        if len(random_rows) < num_rows:
            ids = logits.argmax(dim=-1)  # greedy rows (the random ones are overwritten below)
        else:
            ids = torch.empty(num_rows, dtype=torch.long, device=device)
        for rows, sample_rows in ((fast_rows, self._sample_fused), (filtered_rows, self._sample_filtered)):
            if rows:
                idx = _to_device(rows, torch.long, device)
                ids[idx] = sample_rows(logits[idx], [requests[i] for i in rows])
        return ids

    def _fused_kernel_on(self, logits: torch.Tensor) -> bool:
        return self.use_fused_kernel and logits.is_cuda  # (tests patch this to run the interpreter)

    def _sample_fused(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> torch.Tensor:
        """Random rows on CUDA: one Triton pass (kernels/sample.py), after one that finds each row's
        top-k / top-p / min-p threshold (kernels/sample_filter.py) when a row asks for a filter."""
        from pagedserve.executor.kernels.sample import sample_gumbel

        num_rows = len(requests)
        vocab = logits.shape[1]
        rp = [r.sampling_params for r in requests]
        filtered = any(_needs_filters(p, vocab) for p in rp)
        # One host-to-device copy: philox seeds, offsets (output positions) and the temperatures'
        # float64 bits, as int64 [3, W]. W is even, so each row starts 16-byte aligned whatever the
        # batch: Triton specializes pointer arguments on that alignment, and an odd row count would
        # otherwise compile another kernel variant in the middle of serving.
        width = num_rows + (num_rows & 1)
        packed = np.zeros((6 if filtered else 3, width), dtype=np.int64)
        packed[0, :num_rows] = self._seed_rng.integers(0, 2**63, size=num_rows, dtype=np.int64)
        for i, r in enumerate(requests):
            if r.sampling_params.seed is not None:
                packed[0, i] = position_seed(r.sampling_params.seed, r.output_index)
        packed[1, :num_rows] = [r.output_index for r in requests]
        temps = np.array([r.sampling_params.temperature for r in requests], dtype=np.float64)
        packed[2, :num_rows] = temps.view(np.int64)
        if filtered:  # top_k (int64), top_p and min_p (float64 bits): off is 0, 1.0 and 0.0
            packed[3, :num_rows] = [p.top_k if 0 < p.top_k < vocab else 0 for p in rp]
            packed[4, :num_rows] = np.array([p.top_p for p in rp], dtype=np.float64).view(np.int64)
            packed[5, :num_rows] = np.array([p.min_p for p in rp], dtype=np.float64).view(np.int64)
        dev = torch.from_numpy(packed).to(logits.device, non_blocking=True)
        temps_dev = dev[2, :num_rows].view(torch.float64)
        thresholds = None
        if filtered:
            from pagedserve.executor.kernels.sample_filter import filter_thresholds

            thresholds = filter_thresholds(logits, temps_dev, dev[3, :num_rows], dev[4, :num_rows].view(torch.float64),
                                           dev[5, :num_rows].view(torch.float64))
        return sample_gumbel(logits, temps_dev, dev[0, :num_rows], dev[1, :num_rows], thresholds=thresholds)

    def _sample_filtered(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> torch.Tensor:
        """Random rows, torch ops: temperature and filters, softmax, then argmax(probs / q)."""
        device = logits.device
        rp = [r.sampling_params for r in requests]
        temperatures, top_k, top_p, min_p, flags = self._filter_params(rp, device, logits.shape[1])
        probs = apply_sampling_filters(logits.float(), temperatures, top_k, top_p, min_p, **flags)
        q = exponential_noise(
            tuple(probs.shape),
            [p.seed for p in rp],
            [r.output_index for r in requests],
            device,
        )
        return probs.div_(q).argmax(dim=-1)

    def _filter_params(self, rp: list[SamplingParams], device: torch.device, vocab: int) -> tuple:
        """(temperatures, top_k, top_p, min_p) as device tensors, from one host-to-device copy,
        and what apply_sampling_filters needs to know on the host; reused while the rows' params
        are the same objects as in the last call (a decode batch that did not change)."""
        key = tuple(map(id, rp))
        cached = self._filter_cache
        if cached is not None and cached[0] == key and cached[1] == device:
            return cached[2]
        packed = np.empty((4, len(rp)), dtype=np.float64)  # every top_k fits a float64 exactly
        packed[0] = [p.temperature for p in rp]
        packed[1] = [p.top_k for p in rp]
        packed[2] = [p.top_p for p in rp]
        packed[3] = [p.min_p for p in rp]
        dev = torch.from_numpy(packed)
        if device.type != "cpu":
            dev = dev.to(device, non_blocking=True)
        active_k = [p.top_k for p in rp if 0 < p.top_k < vocab]
        flags = dict(max_top_k=max(active_k, default=0), use_top_p=any(p.top_p < 1.0 for p in rp),
                     use_min_p=any(p.min_p > 0.0 for p in rp))
        value = (dev[0].float(), dev[1].long(), dev[2].float(), dev[3].float(), flags)
        # Keeping the params alive with the key: an id is only unique while its object lives.
        self._filter_cache = (key, device, value, rp)
        return value

    # ---- logprobs ----

    def _with_logprobs(
        self,
        raw_logits: torch.Tensor,
        sampled: torch.Tensor,
        params: list[SamplingParams],
        logprob_rows: list[int],
    ) -> SampleResult:
        """Logprobs of the raw model distribution (before bias, penalties, temperature), as vLLM v1."""
        rows = _to_device(logprob_rows, torch.long, raw_logits.device)
        max_n = max(params[i].logprobs or 0 for i in logprob_rows)
        tok_lp, ranks, top_lp, top_ids = logprob_stats(raw_logits[rows], sampled[rows], max_n)

        # One device-to-host copy: everything packed as float64 (token ids < 2**53 stay exact).
        num_rows, num_lp = len(params), len(logprob_rows)
        parts = [sampled, tok_lp, ranks, top_lp.flatten(), top_ids.flatten()]
        payload = torch.cat([t.double() for t in parts])

        def decode(host: list) -> tuple[list[int], list[TokenLogprobs | None]]:
            sampled_list = [int(t) for t in host[:num_rows]]
            tok_lp_list = host[num_rows:num_rows + num_lp]
            ranks_list = host[num_rows + num_lp:num_rows + 2 * num_lp]
            base = num_rows + 2 * num_lp
            flat_top_lp = host[base:base + num_lp * max_n]
            flat_top_ids = host[base + num_lp * max_n:]
            out: list[TokenLogprobs | None] = [None] * num_rows
            for j, i in enumerate(logprob_rows):
                n = params[i].logprobs or 0
                top_lp_j = flat_top_lp[j * max_n:j * max_n + n]
                top_ids_j = flat_top_ids[j * max_n:j * max_n + n]
                out[i] = TokenLogprobs(
                    token_id=sampled_list[i],
                    logprob=finite_or(tok_lp_list[j]),
                    rank=int(ranks_list[j]),
                    top=[(int(t), finite_or(lp)) for t, lp in zip(top_ids_j, top_lp_j)],
                )
            return sampled_list, out

        return SampleResult(sampled, payload, decode)


def logprob_stats(logits: torch.Tensor, token_ids: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Of each row's log-softmax (fp32): the logprob of its token in `token_ids`, that token's rank (1 = most
    likely; ties count in its favour), and the k largest logprobs with their ids, largest first ([rows, 0] for
    k = 0). The sampled tokens' logprobs and the prompt tokens' (model_runner) both come from here. k = 1
    (lm-eval's logprobs=1, the common ask) is a max: torch's top-k over a 152k-column row selects by radix passes
    even for one element (on the H200, the prompt logprobs of 131k rows took +17% time at k = 0 and +38% at
    k = 5, gpu-notes session 18). On CUDA, k <= 1 takes one fused read of the rows (kernels/logprob_stats.py)
    instead of torch's ~6 passes, unless PAGEDSERVE_FUSED_LOGPROBS=0."""
    if logits.is_cuda and k <= 1 and _FUSED_LOGPROBS and logits.stride(-1) == 1:
        from pagedserve.executor.kernels.logprob_stats import logprob_stats as fused

        tok_lp, ranks, max_lp, argmax = fused(logits, token_ids, k == 1)  # one read of the rows
        if k == 1:
            return tok_lp, ranks, max_lp.unsqueeze(1), argmax.unsqueeze(1)
        return tok_lp, ranks, tok_lp.new_empty((len(tok_lp), 0)), ranks.new_empty((len(ranks), 0))
    logprobs = logits.float().log_softmax(dim=-1)
    tok_lp = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > tok_lp).sum(dim=-1) + 1
    if k == 1:
        top_lp, top_ids = logprobs.max(dim=-1, keepdim=True)
    elif k > 1:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
    else:
        top_lp = logprobs.new_empty((logprobs.shape[0], 0))
        top_ids = torch.empty((logprobs.shape[0], 0), dtype=torch.long, device=logprobs.device)
    return tok_lp.squeeze(1), ranks, top_lp, top_ids


def _needs_filters(params: SamplingParams, vocab_size: int) -> bool:
    return 0 < params.top_k < vocab_size or params.top_p < 1.0 or params.min_p > 0.0


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without waiting for the device: torch.tensor(...,
    device=cuda) would synchronize the stream; a non-blocking copy of a pageable CPU tensor is
    staged at once and queued behind the running work."""
    host = torch.tensor(values, dtype=dtype)
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def _valid_ids(ids: Sequence[int], width: int) -> np.ndarray:
    """int64 array of the ids in [0, width), in order (numpy converts a whole list in C)."""
    a = np.asarray(ids, dtype=np.int64)
    return a[(a >= 0) & (a < width)]


def _host_history(requests: Sequence[ScheduledRequest], width: int, device: torch.device,
                  with_prompt: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(counts int32 [R, V], in_prompt bool [R, V] or None) from the host lists alone: the whole history
    each call, for callers without a StepHistory (every output before output_index must be on the host)."""
    outputs = [_valid_ids(r.output_token_ids[:r.output_index], width) + i * width for i, r in enumerate(requests)]
    flat = torch.from_numpy(np.concatenate(outputs))
    if device.type != "cpu":
        flat = flat.to(device, non_blocking=True)
    counts = torch.zeros((len(requests), width), dtype=torch.int32, device=device)
    counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    if not with_prompt:
        return counts, None
    prompt = torch.from_numpy(np.concatenate([_valid_ids(r.prompt_token_ids, width) + i * width
                                              for i, r in enumerate(requests)]))
    if device.type != "cpu":
        prompt = prompt.to(device, non_blocking=True)
    in_prompt = torch.zeros((len(requests), width), dtype=torch.bool, device=device)
    in_prompt.view(-1).index_fill_(0, prompt, True)
    return counts, in_prompt


def finite_or(x: float, floor: float = -9999.0) -> float:
    # -inf is not valid JSON; OpenAI clients expect a number (vLLM's OpenAI layer clamps to -9999 too).
    return x if math.isfinite(x) else floor
