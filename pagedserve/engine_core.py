"""EngineCore: the step loop around one LLMEngine, with no asyncio and no transport of its own.

It runs in the AsyncEngine's engine process (engine_process.py, the default for the server) or in
its thread (tests, --no-engine-process); either way it is handed two functions:

    receive(timeout) -> [AddRequest | AbortRequests | Stop]    wait up to timeout s (None: forever)
    emit(acks, outputs, stats)                                  after each step that did something

Each loop: drain what arrived (adds, aborts, in order), step if anything is unfinished, emit.
When nothing is unfinished it blocks in receive(): no busy spinning.

A request with a structured-output constraint is not added at once: its grammar compiles on a worker
thread (LLMEngine.compile_structured_async) while the loop keeps stepping the others, and its ack (accepted,
or refused when the constraint does not compile) goes out with the first emit after the compile ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve.async_engine")  # the stats line's home, wherever it runs


@dataclass(slots=True)
class AddRequest:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    prompt_text: str | None
    lora_request: Any = None  # a LoRARequest (pagedserve/lora.py), or None
    priority: int = 0
    cache_salt: str | None = None


@dataclass(slots=True)
class AbortRequests:
    request_ids: list[str]


@dataclass(slots=True)
class Stop:
    pass


@dataclass(slots=True)
class EngineCall:
    """One of the engine's control calls (CALLS) between steps, acked under `token`; refused with the ValueError's
    message (e.g. while requests hold KV blocks)."""

    token: str
    method: str
    kwargs: dict = field(default_factory=dict)


# reset_prefix_cache: forget cached prefixes (e.g. after new weights); sleep(level) / wake_up(tags): sleep mode;
# load_weights(weights): new weights from a safetensors folder; init_weights_update_group /
# update_weights_from_distributed: new weights broadcast by a trainer (executor/weight_sync.py).
CALLS = ("reset_prefix_cache", "sleep", "wake_up", "load_weights", "init_weights_update_group",
         "update_weights_from_distributed")


@dataclass(slots=True)
class Refusal:
    """Why an AddRequest (or an EngineCall) was not taken: "invalid" (ValueError), "queue_full", "sleeping",
    "replica_lost" (data parallelism: the replica died before answering), or "error" (an unexpected exception: a
    500, the engine goes on)."""

    kind: str
    message: str
    retry_after: int = 1


Ack = tuple[str, Refusal | None]  # (request_id, None if accepted)
_COMPILE_POLL_S = 0.002  # how often an idle loop looks for finished grammar compiles
Receive = Callable[[float | None], list]
Emit = Callable[[list[Ack], list[RequestOutput], dict], None]


class EngineCore:
    def __init__(
        self,
        engine: Any,
        *,
        max_queued_requests: int | None = None,
        log_stats: bool = True,
        log_stats_interval: float = 5.0,
        retry_after_seconds: int = 1,
    ) -> None:
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.log_stats = log_stats
        self.log_stats_interval = log_stats_interval
        self.retry_after_seconds = retry_after_seconds
        self._live_ids: set[str] = set()  # added and not yet finished or aborted
        # Constrained requests whose grammar is compiling (not yet added, not yet acked), in arrival order.
        self._compiling: dict[str, tuple[AddRequest, Future]] = {}
        self._compiles = callable(getattr(engine, "compile_structured_async", None))
        stats = engine.get_stats()
        self._log = _StatsLogState(time.monotonic(), stats)
        self._loop_steps = 0  # steps since the last stats line, and the loop's own seconds in them
        self._receive_s = 0.0
        self._emit_s = 0.0

    def run(self, receive: Receive, emit: Emit) -> None:
        """The loop; returns after a Stop (having aborted everything). Engine errors propagate."""
        engine = self.engine
        last_emitted: dict | None = None
        while True:
            busy = engine.has_unfinished_requests()
            t0 = time.perf_counter()
            timeout = 0.0 if busy else self._idle_timeout()
            if self._compiling and not busy:
                timeout = _COMPILE_POLL_S if timeout is None else min(timeout, _COMPILE_POLL_S)
            items = receive(timeout)
            if busy:
                self._receive_s += time.perf_counter() - t0
            acks, stop = self._handle(items)
            if stop:
                if self._live_ids:
                    engine.abort_request(list(self._live_ids))
                    self._live_ids.clear()
                self._compiling.clear()  # never acked: their callers are failed by the shutdown
                emit(acks, [], engine.get_stats())
                return
            if self._compiling:
                acks.extend(self._add_compiled())
            outputs = engine.step() if engine.has_unfinished_requests() else []
            for output in outputs:
                if output.finished:
                    self._live_ids.discard(output.request_id)
            stats = engine.get_stats()
            if acks or outputs or stats != last_emitted:  # aborts change stats without outputs
                t0 = time.perf_counter()
                emit(acks, outputs, stats)
                self._emit_s += time.perf_counter() - t0
                last_emitted = stats
            self._loop_steps += busy
            self._maybe_log_stats(stats)

    def _handle(self, items: list) -> tuple[list[Ack], bool]:
        engine = self.engine
        acks: list[Ack] = []
        stop = False
        num_waiting: int | None = None
        for item in items:
            if isinstance(item, AbortRequests):
                for request_id in item.request_ids:
                    self._compiling.pop(request_id, None)  # its compile may finish; nobody adds it
                engine.abort_request(item.request_ids)
                self._live_ids.difference_update(item.request_ids)
            elif isinstance(item, Stop):
                stop = True
            elif isinstance(item, EngineCall):
                acks.append((item.token, self._call(item)))
            elif isinstance(item, AddRequest):
                if self.max_queued_requests is not None:
                    if num_waiting is None:
                        # Requests the next step admits into free running slots do not queue: a burst into an
                        # idle engine takes max_num_seqs + max_queued_requests (negative: slots still free).
                        stats = engine.get_stats()
                        free = max(0, int(getattr(engine, "max_num_seqs", 0)) - int(stats.get("num_running", 0)))
                        num_waiting = int(stats["num_waiting"]) + len(self._compiling) - free
                    # An empty queue always takes one request, so a limit of 0 still serves.
                    if num_waiting > 0 and num_waiting >= self.max_queued_requests:
                        message = (
                            f"the waiting queue is full ({num_waiting} waiting, --max-queued-requests "
                            f"{self.max_queued_requests}); retry later"
                        )
                        acks.append((item.request_id, Refusal("queue_full", message, self.retry_after_seconds)))
                        continue
                if self._compiles and item.params.structured_outputs is not None:
                    try:
                        future = engine.compile_structured_async(item.params.structured_outputs)
                    except ValueError as e:
                        acks.append((item.request_id, Refusal("invalid", str(e))))
                        continue
                    self._compiling[item.request_id] = (item, future)
                    if num_waiting is not None:
                        num_waiting += 1
                    continue
                ack = self._add(item)
                acks.append(ack)
                if ack[1] is None and num_waiting is not None:
                    num_waiting += item.params.n
        return acks, stop

    def _call(self, item: EngineCall) -> Refusal | None:
        method = getattr(self.engine, item.method, None) if item.method in CALLS else None
        if method is None:
            return Refusal("invalid", f"this engine has no {item.method!r} call")
        try:
            result = method(**item.kwargs)
        except ValueError as e:
            return Refusal("invalid", str(e))
        except Exception as e:  # noqa: BLE001 - one failed call (an unreadable file, a bug) must not stop the engine
            logger.exception("%s failed", item.method)
            return Refusal("error", f"{item.method} failed: {type(e).__name__}: {e}")
        if item.method == "reset_prefix_cache" and not result:
            return Refusal("invalid", "the prefix cache can be reset only while no request holds KV blocks; retry "
                                      "when the engine is idle")
        return None

    def _add(self, item: AddRequest, compiled_grammar: Any = None) -> Ack:
        is_sleeping = getattr(self.engine, "is_sleeping", None)
        if is_sleeping is not None and is_sleeping():
            return item.request_id, Refusal("sleeping", "the engine is asleep (sleep mode): POST /wake_up first, or "
                                                        "retry later", self.retry_after_seconds)
        kwargs = {} if compiled_grammar is None else {"compiled_grammar": compiled_grammar}
        if item.lora_request is not None:
            kwargs["lora_request"] = item.lora_request
        if item.priority:
            kwargs["priority"] = item.priority
        if item.cache_salt is not None:
            kwargs["cache_salt"] = item.cache_salt
        try:
            self.engine.add_request(item.request_id, item.prompt, item.params, arrival_time=item.arrival_time,
                                    prompt_text=item.prompt_text, **kwargs)
        except ValueError as e:
            return item.request_id, Refusal("invalid", str(e))
        except Exception as e:  # noqa: BLE001 - a bug in checking one request must not stop the engine for all
            logger.exception("adding request %s failed", item.request_id)
            self.engine.abort_request([item.request_id])  # (in case it got in before the error)
            return item.request_id, Refusal("error", f"internal error while adding the request: {e!r}")
        self._live_ids.add(item.request_id)
        return item.request_id, None

    def _add_compiled(self) -> list[Ack]:
        """Adds the constrained requests whose grammars are ready (refuses those that did not compile)."""
        acks: list[Ack] = []
        for request_id, (item, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            error = future.exception()
            if error is None:
                acks.append(self._add(item, future.result()))
            elif isinstance(error, ValueError):
                acks.append((request_id, Refusal("invalid", str(error))))
            else:
                raise error  # not the request's fault: the engine fails as for any step error
        return acks

    # ------------------------------------------------------------------ periodic stats line
    def _idle_timeout(self) -> float | None:
        if not self.log_stats or not self._log.active_since_log:
            return None  # nothing left to report: sleep until something arrives
        return max(0.0, self._log.last_log_time + self.log_stats_interval - time.monotonic())

    def _maybe_log_stats(self, stats: dict | None = None) -> None:
        state = self._log
        now = time.monotonic()
        if stats is not None:
            prev = state.last_stats
            if (
                stats.get("prompt_tokens_total", 0) != prev.get("prompt_tokens_total", 0)
                or stats.get("generation_tokens_total", 0) != prev.get("generation_tokens_total", 0)
                or stats.get("num_running", 0)
                or stats.get("num_waiting", 0)
            ):
                state.active_since_log = True
            state.newest_stats = stats
        if not self.log_stats or now - state.last_log_time < self.log_stats_interval:
            return
        if state.active_since_log:
            logger.info(format_stats_line(state.last_stats, state.newest_stats, now - state.last_log_time))
            timing = getattr(self.engine, "step_timing", None)
            if timing is not None and timing.totals:
                # Where the engine loop's time went since the last line (engine process or thread).
                logger.info("step timing: %s; loop: receive %.2f ms/step, emit %.2f ms/step", timing.summary(),
                            *(1e3 * t / max(self._loop_steps, 1) for t in (self._receive_s, self._emit_s)))
                timing.totals.clear()
                self._loop_steps = 0
                self._receive_s = self._emit_s = 0.0
        state.last_log_time = now
        state.last_stats = state.newest_stats
        state.active_since_log = False


@dataclass(slots=True)
class _StatsLogState:
    last_log_time: float
    last_stats: dict
    newest_stats: dict | None = None
    active_since_log: bool = False

    def __post_init__(self) -> None:
        self.newest_stats = self.last_stats


def format_stats_line(prev: dict, cur: dict, seconds: float) -> str:
    seconds = max(seconds, 1e-9)
    prompt_tps = (cur.get("prompt_tokens_total", 0) - prev.get("prompt_tokens_total", 0)) / seconds
    gen_tps = (cur.get("generation_tokens_total", 0) - prev.get("generation_tokens_total", 0)) / seconds
    queries = cur.get("prefix_cache_queries", 0) - prev.get("prefix_cache_queries", 0)
    hits = cur.get("prefix_cache_hits", 0) - prev.get("prefix_cache_hits", 0)
    hit_rate = f"{100.0 * hits / queries:.1f}%" if queries else "n/a"
    line = (
        f"prompt: {prompt_tps:.1f} tokens/s, generation: {gen_tps:.1f} tokens/s, "
        f"running: {cur.get('num_running', 0)} reqs, waiting: {cur.get('num_waiting', 0)} reqs, "
        f"KV cache usage: {100.0 * cur.get('kv_cache_usage', 0.0):.1f}%, "
        f"prefix cache hit rate: {hit_rate}, preemptions: {cur.get('num_preemptions', 0)}"
    )
    if cur.get("spec_decode") is not None:  # speculative decoding over the interval: drafts kept, tokens a drafted step
        from pagedserve.spec_decode import since

        d = since(cur["spec_decode"], prev.get("spec_decode"))
        if d["num_drafts"]:
            line += (f", drafts accepted: {100.0 * d['acceptance_rate']:.1f}% "
                     f"({d['mean_acceptance_length']:.2f} tokens a drafted step)")
    return line
