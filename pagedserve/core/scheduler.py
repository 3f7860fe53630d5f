"""The scheduler: one token-budget rule for prefill, chunked prefill and decode (vLLM v1 style).

Each request has `num_computed_tokens`; each step hands out new tokens to compute under
`max_num_batched_tokens` (tokens) and `max_num_seqs` (running requests):

  1. RUNNING requests, oldest first: min(tokens left to compute, budget left) each (a decode is 1).
     If one can't get blocks, the NEWEST running request is preempted (recompute: its blocks freed,
     num_computed_tokens = 0, back to the FRONT of the waiting queue), until the allocation fits or
     the request has preempted itself.
  2. WAITING requests, FCFS, unless someone was preempted this step: a prefix-cache lookup, then
     as many of the remaining tokens as the budget allows (chunked prefill). The first one that
     can't get blocks stops admission.

With policy "priority" (vLLM's --scheduling-policy priority) both lists are ordered by (priority, arrival time),
lower first: the waiting queue as requests join it (a preempted request back in its place), the running list at
the start of each step, so the victims of step 1 are the lowest-priority running requests, and a higher-priority
request is admitted before any lower one waiting.

num_computed_tokens is advanced in schedule(), when a request is scheduled (as vLLM v1 does), so
the ScheduledRequest carries the value from before the step and update() only appends sampled
tokens. The engine must therefore run every SchedulerOutput it gets and pass it to update().

Async scheduling: schedule() may run again before update() got the previous step's tokens. A
request scheduled to sample holds one output placeholder until its update arrives; the next
schedule() treats the placeholder as a known token (its decode computes it, its id filled in by
the runner on the device), and skips requests whose placeholder already reaches max_tokens or the
context length: they end when the update arrives. A request that turns out to have stopped (eos,
stop string) wastes the one step computed past its end; the result is dropped in update().
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagedserve.config import SCHEDULING_POLICIES
from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.outputs import (
    PLACEHOLDER_TOKEN_ID,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprobs,
)
from pagedserve.core.request import Request, RequestStatus
from pagedserve.spec_decode import NgramProposer, SpecDecodeStats

if TYPE_CHECKING:  # (torch lives behind it)
    from pagedserve.executor.draft_model import DraftModelProposer

_MAX_DRAFT_BACKOFF = 64  # tokens a request goes without drafts after drafted steps that kept none (at most)
DRAFT_BACKOFF_AFTER = 3  # drafted steps in a row that kept none before a request backs off (benchmarks raise it)


@dataclass(slots=True)
class RequestUpdate:
    """What one step did to one request: the token(s) it got and whether it is now finished."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]  # empty when the request asked for no logprobs
    finished: bool
    embedding: list[float] | None = None  # an embedding request's pooled vector (at its last prompt token)


def window_kv_tokens(window: int, max_num_batched_tokens: int, block_size: int) -> int:
    """The most tokens of KV cache a request holds at once when every layer attends to its last `window` keys only
    (blocks behind the window go back each step): the window behind a step's tokens, a block of slack at either end."""
    return window + max_num_batched_tokens + 2 * block_size


def request_capacity_tokens(num_blocks: int, block_size: int, num_window_groups: int = 0,
                            window_tokens: int = 0) -> int:
    """The most tokens of KV cache one request can hold in num_blocks blocks. A hybrid model's request
    (core/kv_cache.py) holds its tokens in the full-attention group and up to `window_tokens` of them
    (window_kv_tokens) in each of its num_window_groups window groups, all from the same blocks."""
    if not num_window_groups:
        return num_blocks * block_size
    window_blocks = -(-window_tokens // block_size)
    if num_blocks >= (1 + num_window_groups) * window_blocks:
        return (num_blocks - num_window_groups * window_blocks) * block_size
    return num_blocks // (1 + num_window_groups) * block_size


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool,
        long_prefill_token_threshold: int | None = None,
        lora_slot_for: Callable[[Any, set[int]], int | None] | None = None,
        proposer: NgramProposer | DraftModelProposer | None = None,
        policy: str = "fcfs",
        sliding_window: int | None = None,
        num_cpu_blocks: int = 0,
        hybrid_window: int | None = None,
        num_window_groups: int = 0,
    ) -> None:
        """lora_slot_for(lora_request, slots in use): the device slot of a request's LoRA adapter, loaded into a slot
        that no running request uses if need be; None when every slot is in use (the request waits).
        proposer: speculative decoding's drafter (spec_decode.py), or None.
        policy: "fcfs", or "priority" (see the module docstring).
        sliding_window: the window of a model whose every layer attends to its last `sliding_window` keys only: a
        running request's blocks behind its window go back to the pool each step (KVCacheManager.free_outside_window).
        num_cpu_blocks: KV offloading's CPU tier (blocks of the prefix cache kept in CPU memory once evicted).
        hybrid_window / num_window_groups: a model whose windowed layers (the others attend to everything) read block
        tables of their own, in that many groups (core/kv_cache.py); None: one block table for every layer.
        """
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {policy!r}")
        self.by_priority = policy == "priority"
        self.lora_slot_for = lora_slot_for
        self.proposer = proposer
        self.spec_stats = SpecDecodeStats()
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if long_prefill_token_threshold is not None and long_prefill_token_threshold < 1:
            raise ValueError(
                f"long_prefill_token_threshold must be >= 1 or None, got {long_prefill_token_threshold}"
            )
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.kv_cache = KVCacheManager(num_blocks, block_size, enable_prefix_caching, num_cpu_blocks,
                                       hybrid_window, num_window_groups)
        self.sliding_window = sliding_window
        self.requests: dict[str, Request] = {}  # unfinished requests only
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest admission first; preemption takes from the end
        self.num_preemptions = 0
        self._finished_request_ids: list[str] = []  # since the last schedule()

    # ---- requests in and out -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queues a request. Raises ValueError for requests that could never run."""
        num_prompt = request.num_prompt_tokens
        if num_prompt == 0:
            raise ValueError("the prompt is empty: it must contain at least one token")
        # An embedding request (sampling_params.pooling) generates nothing: its prompt may fill the context.
        limit = self.max_model_len + (request.sampling_params.pooling is not None)
        if num_prompt >= limit:
            raise ValueError(
                f"the prompt has {num_prompt} tokens, but the maximum context length (max_model_len) is "
                f"{self.max_model_len} tokens, which leaves no room to generate: shorten the prompt to at "
                f"most {self.max_model_len - 1} tokens"
            )
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        # Tokens whose K/V must be cached at once: all but the last sampled token; with a sliding window on every
        # layer, the window behind a step's tokens (a step's budget at most, a block of slack at either end).
        num_kv_tokens = num_prompt + request.max_tokens - 1
        if self.sliding_window is not None:
            num_kv_tokens = min(num_kv_tokens,
                                window_kv_tokens(self.sliding_window, self.max_num_batched_tokens, self.block_size))
        capacity = self.request_capacity
        if num_kv_tokens > capacity:
            held = (f"{self.kv_cache.num_blocks} blocks x {self.block_size} tokens = {capacity}"
                    if not self.kv_cache.num_window_groups else
                    f"{capacity} tokens: {self.kv_cache.num_blocks} blocks of {self.block_size} tokens, the windowed "
                    f"layers' {self.kv_cache.num_window_groups} group(s) holding up to the window of each request")
            raise ValueError(
                f"the request needs up to {num_kv_tokens} tokens of KV cache (prompt {num_prompt} + "
                f"max_tokens {request.max_tokens} - 1), more than the whole cache holds "
                f"({held}): lower max_tokens or the prompt length, or give the KV cache more memory"
            )
        if request.request_id in self.requests:
            raise ValueError(f"a request with id {request.request_id!r} is already running or waiting")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens != 0:
            raise ValueError(
                f"request {request.request_id!r} was already scheduled (status {request.status.value})"
            )
        self.requests[request.request_id] = request
        self._enqueue(request)

    @property
    def request_capacity(self) -> int:
        """The most tokens of KV cache one request can hold (a hybrid model's window groups take their share)."""
        if self.kv_cache.window is None:
            return self.kv_cache.num_blocks * self.block_size
        return request_capacity_tokens(self.kv_cache.num_blocks, self.block_size, self.kv_cache.num_window_groups,
                                       window_kv_tokens(self.kv_cache.window, self.max_num_batched_tokens,
                                                        self.block_size))

    @staticmethod
    def _priority_key(request: Request) -> tuple[int, float]:
        return request.priority, request.arrival_time

    def _enqueue(self, request: Request, front: bool = False) -> None:
        """Into the waiting queue: at the back (fcfs; front=True: at the front, a preempted request), or in its
        place by (priority, arrival) with the priority policy."""
        if self.by_priority:
            key = self._priority_key(request)
            index = next((i for i, r in enumerate(self.waiting) if self._priority_key(r) > key), len(self.waiting))
            self.waiting.insert(index, request)
        elif front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """Ends requests at once (abort, or a stop string found by the detokenizer) and frees their
        blocks. Unknown or already finished ids are ignored. Returns the requests it ended."""
        if not status.finished:
            raise ValueError(f"finish_requests needs a finished status, got {status}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        ended = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._release(request)
            ended.append(request)
        return ended

    def abort_requests(self, request_ids: str | Iterable[str]) -> list[Request]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def _release(self, request: Request) -> None:
        """Bookkeeping for a request whose status is already a finished one."""
        self.kv_cache.free(request)
        del self.requests[request.request_id]
        if self.proposer is not None:
            self.proposer.release(request.request_id)
        self._finished_request_ids.append(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- stats ---------------------------------------------------------------------------------

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache.usage

    @property
    def prefix_cache_queries(self) -> int:
        return self.kv_cache.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.kv_cache.prefix_cache_hits

    def num_free_blocks(self) -> int:
        return self.kv_cache.num_free_blocks

    def kv_occupancy(self) -> tuple[int, int]:
        """Right after schedule(): (token slots of the blocks held by requests, of them the slots that hold no token
        once the scheduled step has run). The empty ones are the unfilled tail of each running request's last block
        (in every group of a hybrid layout: KVCacheManager.empty_slots): PagedAttention's whole waste (drafts in
        flight count as filled: the step writes their K/V). A block shared by prefix caching counts once (shared
        blocks are full)."""
        kv = self.kv_cache
        held = (kv.num_blocks - kv.num_free_blocks) * self.block_size
        empty = sum(kv.empty_slots(r.request_id, r.num_computed_tokens) for r in self.running)
        return held, empty

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache.reset_prefix_cache()

    # ---- one step ------------------------------------------------------------------------------

    def _num_new_tokens(self, request: Request, token_budget: int, num_computed: int) -> int:
        num_new = request.num_tokens + request.num_output_placeholders - num_computed
        if self.long_prefill_token_threshold is not None:
            num_new = min(num_new, self.long_prefill_token_threshold)
        return min(num_new, token_budget)

    def _schedule_one(self, request: Request, num_new: int, block_ids: list[int],
                      drafts: list[int] | None = None) -> ScheduledRequest:
        start = request.num_computed_tokens
        end = start + num_new
        # advanced here, at schedule time (see module docstring); update() takes back rejected drafts
        request.num_computed_tokens = end + len(drafts or ())
        known = request.num_tokens
        token_ids = request.all_token_ids[start:end]
        if end > known:  # the token the running step is sampling (only ever a decode's one token)
            token_ids.extend([PLACEHOLDER_TOKEN_ID] * (end - max(start, known)))
        if drafts:
            token_ids.extend(drafts)
            request.num_drafts_in_flight = len(drafts)
        needs_sample = end == known + request.num_output_placeholders
        output_index = request.num_output_tokens + request.num_output_placeholders
        if needs_sample:
            request.num_output_placeholders += 1
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=token_ids,
            num_computed_tokens=start,
            block_ids=block_ids,
            window_block_ids=self.kv_cache.get_window_block_ids(request.request_id),
            needs_sample=needs_sample,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            output_index=output_index,
            lora_slot=request.lora_slot,
            draft_token_ids=drafts or [],
            serial=request.serial,
        )

    def _ends_with_placeholder(self, request: Request) -> bool:
        """True when the token being sampled for `request` is its last one anyway (max_tokens or
        the context length), so scheduling another step for it would only be thrown away."""
        pending = request.num_output_placeholders
        return pending > 0 and (request.num_output_tokens + pending >= request.max_tokens
                                or request.num_tokens + pending >= self.max_model_len)

    def _draft_length(self, request: Request, token_budget: int) -> int:
        """How many draft tokens a decode step of `request` may carry (spec_decode.py), within the token budget,
        its max_tokens and the context length (every draft may be kept, and the step's own sample after them); 0
        when it does not draft."""
        params = request.sampling_params
        pending = request.num_output_placeholders
        if (request.num_output_tokens + pending == 0 or request.num_output_tokens < request.draft_resume_at
                or request.num_computed_tokens != request.num_tokens + pending - 1
                or params.needs_penalties or params.structured_outputs is not None or params.pooling is not None
                or params.bad_words_token_ids):
            return 0
        return max(0, min(token_budget - 1, request.max_tokens - request.num_output_tokens - pending - 1,
                          self.max_model_len - request.num_tokens - pending - 1))

    def _plan_drafts(self, token_budget: int) -> dict[str, list[int]]:
        """The drafts of this step's decodes, from one call to the proposer (a draft model runs them as one batch):
        request id -> drafts. With async scheduling a decode's input may be the token the step in flight is
        sampling (a placeholder): the proposer then guesses it too, and drafts what follows the guess (a wrong guess
        only costs the drafts; the check after the step is exact whatever they are)."""
        items: list[tuple[Request, int]] = []
        for request in self.running:
            if (request.num_drafts_in_flight or self._ends_with_placeholder(request)
                    or self._num_new_tokens(request, token_budget, request.num_computed_tokens) != 1):
                continue
            if (k := self._draft_length(request, token_budget)) > 0:
                items.append((request, k))
        if not items:
            return {}
        proposals = self.proposer.propose_many(
            [(r.request_id, r.all_token_ids, k + r.num_output_placeholders) for r, k in items])
        return {r.request_id: drafts[r.num_output_placeholders:] for (r, _), drafts in zip(items, proposals)}

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request, front=True)

    def schedule(self) -> SchedulerOutput:
        token_budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted_ids: list[str] = []

        # 1. Running requests. Victims come from the end of `running`, past `index`, so a request
        #    scheduled earlier in this step is never preempted by a later one. With the priority policy `running`
        #    is kept in (priority, arrival) order: the victims are the lowest-priority requests.
        if self.by_priority:
            self.running.sort(key=self._priority_key)
        index = 0
        drafting = self.proposer is not None and (self.proposer.config.disable_by_batch_size is None
                                                  or len(self.running) <= self.proposer.config.disable_by_batch_size)
        planned = self._plan_drafts(token_budget) if drafting else {}
        while index < len(self.running) and token_budget > 0:
            request = self.running[index]
            num_new = self._num_new_tokens(request, token_budget, request.num_computed_tokens)
            if num_new <= 0 or self._ends_with_placeholder(request) or request.num_drafts_in_flight:
                index += 1
                continue
            if (window := self.sliding_window or self.kv_cache.window) is not None:  # its next token attends to
                # keys from here on (a step in flight reads older ones, but it runs before any step that reuses their
                # blocks); a hybrid model's windowed layers only
                self.kv_cache.free_outside_window(request, request.num_computed_tokens - window + 1)
            drafts = planned.get(request.request_id, [])[: token_budget - 1] if num_new == 1 else []
            # Drafts never preempt: without the blocks for them, the step is a plain decode.
            if drafts and (block_ids := self.kv_cache.allocate_slots(request, num_new + len(drafts))) is not None:
                scheduled.append(self._schedule_one(request, num_new, block_ids, drafts))
                token_budget -= num_new + len(drafts)
                index += 1
                continue
            while (block_ids := self.kv_cache.allocate_slots(request, num_new)) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            if block_ids is None:  # it preempted itself: it was the last running request
                break
            scheduled.append(self._schedule_one(request, num_new, block_ids))
            token_budget -= num_new
            index += 1

        # 2. Waiting requests, first come first served; one whose LoRA adapter finds no free slot waits on
        #    (set aside, then back at the front in its place) while the next ones are admitted.
        set_aside: list[Request] = []
        while (
            not preempted_ids and self.waiting and token_budget > 0 and len(self.running) < self.max_num_seqs
        ):
            request = self.waiting[0]
            if request.num_drafts_in_flight:  # preempted with a drafted step in flight: its length comes with it
                set_aside.append(self.waiting.popleft())
                continue
            if request.lora_request is not None:
                slot = self.lora_slot_for(request.lora_request, {r.lora_slot for r in self.running})
                if slot is None:
                    set_aside.append(self.waiting.popleft())
                    continue
                request.lora_slot = slot
            computed_block_ids, num_cached = self.kv_cache.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, token_budget, num_cached)
            block_ids = self.kv_cache.allocate_slots(request, num_new, computed_block_ids)
            if block_ids is None:
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:  # first admission only, not after a preemption
                request.num_cached_tokens = num_cached
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._schedule_one(request, num_new, block_ids))
            token_budget -= num_new
        self.waiting.extendleft(reversed(set_aside))

        finished_ids, self._finished_request_ids = self._finished_request_ids, []
        copies_out, copies_in = self.kv_cache.take_copies()
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=self.max_num_batched_tokens - token_budget,
            finished_request_ids=finished_ids,
            preempted_request_ids=preempted_ids,
            kv_copies_out=copies_out,
            kv_copies_in=copies_in,
        )

    def update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[RequestUpdate]:
        """Appends the sampled tokens, checks stops, frees finished requests. Returns one update per
        request that got a token this step."""
        updates: list[RequestUpdate] = []
        sampled = runner_output.sampled_token_ids
        logprobs = runner_output.logprobs
        any_finished = False
        for i, scheduled in enumerate(scheduler_output.scheduled):
            if not scheduled.needs_sample:
                continue
            request = self.requests.get(scheduled.request_id)
            if request is None or (scheduled.serial >= 0 and request.serial != scheduled.serial):
                # ended (e.g. aborted, or stopped at the step before) after it was scheduled; or aborted, and its
                # id taken by a new request since (this row's token is the old one's)
                continue
            request.num_output_placeholders -= 1
            if sampled[i] is None:
                if scheduled.draft_token_ids:  # (not expected: every sampling row gets its samples) no draft kept
                    self._accepted(request, scheduled.draft_token_ids, (None, None), [])
                continue
            # A request preempted while this step ran keeps its token (it recomputes from it).
            samples = [(sampled[i], logprobs[i] if i < len(logprobs) else None)]
            if scheduled.draft_token_ids:
                samples = self._accepted(request, scheduled.draft_token_ids, samples[0], runner_output.draft_samples[i])
            was_waiting = request.status is RequestStatus.PREEMPTED
            new_ids, new_logprobs, finished = [], [], False
            for token_id, token_logprobs in samples:  # in order; tokens after one that stops it are dropped
                request.append_output_token(token_id)
                new_ids.append(token_id)
                if token_logprobs is not None:
                    new_logprobs.append(token_logprobs)
                if finished := self._check_stop(request, token_id):
                    break
            if finished:
                if was_waiting:
                    self.waiting.remove(request)
                self._release(request)
                any_finished = True
            updates.append(
                RequestUpdate(
                    request=request,
                    new_token_ids=new_ids,
                    new_logprobs=new_logprobs,
                    finished=finished,
                    embedding=runner_output.embeddings[i] if runner_output.embeddings else None,
                )
            )
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return updates

    def _accepted(self, request: Request, drafts: list[int], first: tuple, rest: list[tuple]) -> list[tuple]:
        """Speculative decoding: the samples a drafted step keeps, (token id, logprobs) each. The sample at each
        position is kept while the draft it follows was confirmed: the first sample that differs from its draft
        is the last kept (spec_decode.py says why that is exact). The rejected drafts' cache positions are given
        back: the next step computes from the last kept sample on, over them."""
        samples = [first, *rest]
        num_accepted = 0
        while num_accepted < len(drafts) and samples[num_accepted][0] == drafts[num_accepted]:
            num_accepted += 1
        if request.status is RequestStatus.RUNNING:
            request.num_computed_tokens -= len(drafts) - num_accepted
        request.num_drafts_in_flight = 0
        # Back off from drafting while drafts are not kept: after n >= 3 drafted steps in a row that kept none, none
        # for the next 2**(n - 2) tokens (at most 64), so a request whose text does not repeat soon stops paying.
        if num_accepted:
            request.num_failed_drafts = 0
        else:
            request.num_failed_drafts += 1
            if request.num_failed_drafts >= DRAFT_BACKOFF_AFTER:
                backoff = min(2 ** (request.num_failed_drafts - DRAFT_BACKOFF_AFTER + 1), _MAX_DRAFT_BACKOFF)
                request.draft_resume_at = request.num_output_tokens + 1 + backoff  # (+1: the sample kept now)
        self.spec_stats.add(len(drafts), num_accepted)
        return samples[: num_accepted + 1]

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """Sets a finished status if `token_id` (just appended) ends the request. Order: stop token
        ids / eos (not within the first min_tokens outputs), max_tokens, max_model_len."""
        params = request.sampling_params
        # The first min_tokens outputs can't stop the request; the sampler masks stop tokens there.
        if request.num_output_tokens > params.min_tokens:
            if token_id in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return True
            if not params.ignore_eos and token_id == request.eos_token_id:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
