"""AsyncEngine: one LLMEngine driven by a dedicated thread, served to asyncio code.

    event loop (HTTP, tokenization hand-off)          engine thread (owns the LLMEngine)
    ─────────────────────────────────────────          ───────────────────────────────────
    add_request() ─► inbox (list + Condition) ───────► drain inbox: add / abort
    abort()       ─►                                    step()
    RequestStream ◄── loop.call_soon_threadsafe ◄────── acks + this step's RequestOutputs

Invariants:
- Only the engine thread calls the LLMEngine (it is not thread-safe). Everything else talks to it
  through the inbox, which is drained before every step, in order (an abort after its add is seen
  after it).
- The thread blocks on the Condition when it has nothing to do: no busy spinning.
- Outputs are cumulative (text, token ids, logprobs so far), so a RequestStream keeps only the
  newest one: a slow consumer skips intermediate outputs and loses nothing.
- An exception in the engine thread marks the engine dead: every pending request fails with
  EngineDeadError, new ones are refused, and /health turns 503.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread failed; the server can no longer serve."""


class EngineUnavailableError(RuntimeError):
    """The request cannot be taken now (queue full or shutting down); the client may retry."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(EngineUnavailableError):
    pass


class ShuttingDownError(EngineUnavailableError):
    pass


class EngineLike(Protocol):  # what AsyncEngine needs of LLMEngine (tests pass a fake)
    tokenizer: Any
    model_name: str
    max_model_len: int

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
    ) -> None: ...
    def abort_request(self, request_id: str | list[str]) -> None: ...
    def step(self) -> list[RequestOutput]: ...
    def has_unfinished_requests(self) -> bool: ...
    def get_stats(self) -> dict: ...


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    prompt_text: str | None


@dataclass(slots=True)
class _Abort:
    request_ids: list[str]


class RequestStream:
    """The event-loop side of one request: an accept/refuse answer, then its newest output."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.accepted: asyncio.Future[None] = loop.create_future()
        self.finished = False
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        # Timing state for metrics (see AsyncEngine._deliver).
        self.num_tokens_seen = 0
        self.last_token_time: float | None = None

    def _put(self, output: RequestOutput) -> None:
        self._latest = output
        if output.finished:
            self.finished = True
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()  # mark retrieved: the awaiting side may be gone already
        self._error = error
        self.finished = True
        self._event.set()

    async def get(self) -> RequestOutput:
        """Waits for an output newer than the last one returned."""
        while self._latest is None:
            if self._error is not None:
                raise self._error
            self._event.clear()
            await self._event.wait()
        output, self._latest = self._latest, None
        return output

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while True:
            output = await self.get()
            yield output
            if output.finished:
                return


OutputObserver = Callable[[RequestStream, RequestOutput], None]


class AsyncEngine:
    def __init__(
        self,
        engine: EngineLike,
        *,
        max_queued_requests: int | None = None,
        log_stats: bool = True,
        log_stats_interval: float = 5.0,
        retry_after_seconds: int = 1,
    ) -> None:
        self.engine = engine
        # The HTTP side (tokenizer thread, logprob token strings) uses its own copy, so it never
        # shares mutable tokenizer state with the engine thread's detokenizer.
        self.tokenizer = _private_copy(engine.tokenizer)
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.vocab_size: int = getattr(engine, "vocab_size", None) or int(engine.tokenizer.vocab_size)
        self.max_queued_requests = max_queued_requests
        self.log_stats = log_stats
        self.log_stats_interval = log_stats_interval
        self.retry_after_seconds = retry_after_seconds
        self.observers: list[OutputObserver] = []
        self.stats: dict = engine.get_stats()  # newest snapshot; replaced (not mutated) by the thread

        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort] = []
        self._stop_thread = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._accepting = True
        self._live_ids: set[str] = set()  # engine thread only: added and not yet finished
        self.dead_error: BaseException | None = None
        # Tokenization runs here, off both the event loop and the engine thread.
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-tokenizer")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Starts the engine thread; call from the event loop that will consume outputs."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def stop_accepting(self) -> None:
        self._accepting = False

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stops accepting, lets in-flight requests finish up to `timeout` s, aborts the rest,
        and stops the engine thread."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and not self.is_dead and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._streams:
            logger.warning("shutdown: aborting %d unfinished request(s)", len(self._streams))
            streams = list(self._streams.values())
            self.abort([s.request_id for s in streams])
            for stream in streams:
                stream._fail(ShuttingDownError("the server is shutting down; request aborted"))
        with self._cond:
            self._stop_thread = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self._tokenizer_pool.shutdown(wait=False)

    # ------------------------------------------------------------------ tokenization (off-loop)
    async def run_in_tokenizer_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    # ------------------------------------------------------------------ requests
    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
    ) -> RequestStream:
        """Submits a request and waits until the engine thread accepted it.

        Raises ValueError (bad input), QueueFullError / ShuttingDownError (retry later), or
        EngineDeadError. Prefer token ids as `prompt`: tokenizing text here would run in the
        engine thread.
        """
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine has stopped: {self.dead_error!r}")
        if not self._accepting:
            raise ShuttingDownError("the server is shutting down", self.retry_after_seconds)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        assert self._loop is not None, "AsyncEngine.start() was not called"
        stream = RequestStream(request_id, self._loop)
        self._streams[request_id] = stream
        self._submit(
            _Add(
                request_id,
                prompt,
                params,
                arrival_time if arrival_time is not None else time.monotonic(),
                prompt_text,
            )
        )
        try:
            await asyncio.shield(stream.accepted)
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been added meanwhile
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs until the request finishes; closing or cancelling the
        consumer aborts the request (its KV blocks are freed at the engine's next drain)."""
        stream = await self.add_request(request_id, prompt, params, arrival_time, prompt_text)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.finished = True
        if self.dead_error is None:
            self._submit(_Abort(ids))

    def _submit(self, item: _Add | _Abort) -> None:
        with self._cond:
            self._inbox.append(item)
            self._cond.notify()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        engine = self.engine
        logger.debug("engine thread started")
        self._log_state = _StatsLogState(time.monotonic(), self.stats)
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._stop_thread and not engine.has_unfinished_requests():
                        self._cond.wait(timeout=self._idle_wait_timeout())
                        self._maybe_log_stats()
                    inbox, self._inbox = self._inbox, []
                    stop = self._stop_thread
                acks = self._drain(inbox)
                if stop:
                    self._abort_all()
                    self.stats = engine.get_stats()
                    break
                outputs = engine.step() if engine.has_unfinished_requests() else []
                for output in outputs:
                    if output.finished:
                        self._live_ids.discard(output.request_id)
                self.stats = engine.get_stats()
                if acks or outputs:
                    self._post(self._deliver, acks, outputs)
                self._maybe_log_stats()
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine, and must be told
            logger.exception("engine thread failed; the server is now unhealthy")
            self.dead_error = e
            self._post(self._fail_all, e)
        logger.debug("engine thread stopped")

    def _drain(self, inbox: list[_Add | _Abort]) -> list[tuple[str, BaseException | None]]:
        engine = self.engine
        acks: list[tuple[str, BaseException | None]] = []
        num_waiting: int | None = None
        for item in inbox:
            if isinstance(item, _Abort):
                engine.abort_request(item.request_ids)
                self._live_ids.difference_update(item.request_ids)
                continue
            if self.max_queued_requests is not None:
                if num_waiting is None:
                    num_waiting = int(engine.get_stats()["num_waiting"])
                if num_waiting > 0 and num_waiting >= self.max_queued_requests:
                    acks.append(
                        (
                            item.request_id,
                            QueueFullError(
                                f"the waiting queue is full ({num_waiting} waiting, --max-queued-requests "
                                f"{self.max_queued_requests}); retry later",
                                self.retry_after_seconds,
                            ),
                        )
                    )
                    continue
            try:
                engine.add_request(
                    item.request_id,
                    item.prompt,
                    item.params,
                    arrival_time=item.arrival_time,
                    prompt_text=item.prompt_text,
                )
            except ValueError as e:
                acks.append((item.request_id, e))
                continue
            self._live_ids.add(item.request_id)
            if num_waiting is not None:
                num_waiting += item.params.n
            acks.append((item.request_id, None))
        return acks

    def _abort_all(self) -> None:
        if self._live_ids:
            self.engine.abort_request(list(self._live_ids))
            self._live_ids.clear()

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    # ------------------------------------------------------------------ event loop side
    def _deliver(self, acks: list[tuple[str, BaseException | None]], outputs: list[RequestOutput]) -> None:
        for request_id, error in acks:
            stream = self._streams.get(request_id)
            if stream is None or stream.accepted.done():
                continue
            if error is None:
                stream.accepted.set_result(None)
            else:
                self._streams.pop(request_id, None)
                stream.accepted.set_exception(error)
        for output in outputs:
            if output.finished:
                stream = self._streams.pop(output.request_id, None)
            else:
                stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted by its consumer
            for observer in self.observers:
                try:
                    observer(stream, output)
                except Exception:  # metrics must never break serving
                    logger.exception("output observer failed")
            stream._put(output)

    def _fail_all(self, error: BaseException) -> None:
        dead = EngineDeadError(f"the engine has stopped: {error!r}")
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(dead)

    # ------------------------------------------------------------------ periodic stats line
    def _idle_wait_timeout(self) -> float | None:
        state = self._log_state
        if not self.log_stats or not state.active_since_log:
            return None  # nothing to report: sleep until woken
        return max(0.0, state.last_log_time + self.log_stats_interval - time.monotonic())

    def _maybe_log_stats(self) -> None:
        state = self._log_state
        now = time.monotonic()
        stats = self.stats
        if stats is not state.last_seen_stats:
            state.last_seen_stats = stats
            if (
                stats.get("prompt_tokens_total", 0) != state.last_stats.get("prompt_tokens_total", 0)
                or stats.get("generation_tokens_total", 0)
                != state.last_stats.get("generation_tokens_total", 0)
                or stats.get("num_running", 0)
                or stats.get("num_waiting", 0)
            ):
                state.active_since_log = True
        if not self.log_stats or now - state.last_log_time < self.log_stats_interval:
            return
        if state.active_since_log:
            logger.info(format_stats_line(state.last_stats, stats, now - state.last_log_time))
        state.last_log_time = now
        state.last_stats = stats
        state.active_since_log = False


@dataclass(slots=True)
class _StatsLogState:
    last_log_time: float
    last_stats: dict
    last_seen_stats: dict | None = None
    active_since_log: bool = False


def _private_copy(tokenizer: Any) -> Any:
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # noqa: BLE001 - an uncopyable tokenizer is shared (HF fast ones are copyable)
        logger.debug("tokenizer cannot be copied; sharing it with the engine thread")
        return tokenizer


def format_stats_line(prev: dict, cur: dict, seconds: float) -> str:
    seconds = max(seconds, 1e-9)
    prompt_tps = (cur.get("prompt_tokens_total", 0) - prev.get("prompt_tokens_total", 0)) / seconds
    gen_tps = (cur.get("generation_tokens_total", 0) - prev.get("generation_tokens_total", 0)) / seconds
    queries = cur.get("prefix_cache_queries", 0) - prev.get("prefix_cache_queries", 0)
    hits = cur.get("prefix_cache_hits", 0) - prev.get("prefix_cache_hits", 0)
    hit_rate = f"{100.0 * hits / queries:.1f}%" if queries else "n/a"
    return (
        f"prompt: {prompt_tps:.1f} tokens/s, generation: {gen_tps:.1f} tokens/s, "
        f"running: {cur.get('num_running', 0)} reqs, waiting: {cur.get('num_waiting', 0)} reqs, "
        f"KV cache usage: {100.0 * cur.get('kv_cache_usage', 0.0):.1f}%, "
        f"prefix cache hit rate: {hit_rate}, preemptions: {cur.get('num_preemptions', 0)}"
    )
