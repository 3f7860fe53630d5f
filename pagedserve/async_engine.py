"""AsyncEngine: an LLMEngine served to asyncio code, with the step loop off the event loop.

    event loop (HTTP, tokenization hand-off)            engine: EngineCore.run (engine_core.py)
    ────────────────────────────────────────            ────────────────────────────────────────
    add_request() ─► AddRequest   ───────────────────►  drain inputs (adds, aborts, in order)
    abort()       ─► AbortRequests ──────────────────►  step()
    RequestStream ◄── loop.call_soon_threadsafe ◄─────  acks + this step's outputs + stats

Two places for the engine, one API:
- `AsyncEngine.in_process(factory)`: a spawned process (engine_process.py); the server's default.
  HTTP handling then never holds the GIL the step loop needs.
- `AsyncEngine(engine)`: a thread of this process (tests with a fake engine; --no-engine-process).

Invariants:
- Only the engine's own thread or process calls the LLMEngine (it is not thread-safe).
- Outputs are cumulative, so a RequestStream keeps only the newest one: a slow consumer skips
  intermediate outputs and loses nothing.
- An engine failure marks the AsyncEngine dead: pending requests fail with EngineDeadError, new
  ones are refused, and /health turns 503.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from pagedserve.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from pagedserve.engine_core import AbortRequests, Ack, AddRequest, EngineCall, EngineCore, Refusal, Stop
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine failed; the server can no longer serve."""


class EngineUnavailableError(RuntimeError):
    """The request cannot be taken now (queue full or shutting down); the client may retry."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(EngineUnavailableError):
    pass


class ShuttingDownError(EngineUnavailableError):
    pass


class EngineSleepingError(EngineUnavailableError):
    """Sleep mode: the engine gave its memory back; POST /wake_up (or retry later)."""

    code = "engine_sleeping"


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


class RequestStream:
    """The event-loop side of one request: an accept/refuse answer, then its newest output."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.accepted: asyncio.Future[None] = loop.create_future()
        self.finished = False
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        # Timing state for metrics observers.
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
        engine: EngineLike | None = None,
        *,
        max_queued_requests: int | None = None,
        log_stats: bool = True,
        log_stats_interval: float = 5.0,
        retry_after_seconds: int = 1,
        _backend: _Backend | None = None,
    ) -> None:
        core_kwargs = dict(
            max_queued_requests=max_queued_requests,
            log_stats=log_stats,
            log_stats_interval=log_stats_interval,
            retry_after_seconds=retry_after_seconds,
        )
        if _backend is None:
            assert engine is not None, "pass an engine, or use AsyncEngine.in_process()"
            _backend = _ThreadBackend(engine, core_kwargs)
        self._backend = _backend
        self.max_queued_requests = max_queued_requests  # (the routes refuse a request that could never be queued)
        info = _backend.info
        # The HTTP side (tokenizer thread, logprob token strings) has its own tokenizer object, so
        # it shares no mutable tokenizer state with the engine's detokenizer.
        self.tokenizer = info["tokenizer"]
        self.model_name: str = info["model_name"]
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        self.engine_config = info.get("config")
        # A sequence classifier's label names (it classifies and scores only: /classify, /score, /rerank); else None.
        self.class_labels: list[str] | None = info.get("class_labels")
        # Sampling fields a request leaves unset take these (the model's generation_config.json).
        self.default_sampling: dict = info.get("default_sampling") or {}
        self.retry_after_seconds = retry_after_seconds
        self.observers: list[OutputObserver] = []
        # Called with each request's stream that abort() ends before it finished (a client gone, a cancel): metrics
        self.abort_observers: list[Callable[[RequestStream], None]] = []
        self.stats: dict = info["stats"]  # newest snapshot; replaced, never mutated
        self.dead_error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._accepting = True
        self._sleeping: set[str] = set()  # sleep mode: what sleeps ("weights", "kv_cache"), from the acked calls
        self.sleep_level = 0  # 0 awake, else the deepest level slept at since the last full wake-up
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-tokenizer")
        # The server's LoRA adapters by served name (--lora-modules); a request naming one runs with it.
        self.lora_requests: dict[str, Any] = {}

    @classmethod
    def in_process(cls, engine_factory: Callable[[], EngineLike] | None = None, *, backend: Any = None,
                   **kwargs: Any) -> AsyncEngine:
        """Starts the engine in a spawned process (blocks until it is loaded). `engine_factory`
        must be picklable, e.g. functools.partial(LLMEngine, config). `backend`: a ProcessBackend
        already spawned with wait=False (with the same kwargs). Raises ValueError when the engine
        refuses its configuration, RuntimeError on other startup failures."""
        from pagedserve.engine_process import ProcessBackend

        if backend is None:
            backend = ProcessBackend(engine_factory, dict(kwargs), wait=False)
        backend.wait_ready()
        return cls(_backend=backend, **kwargs)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Starts delivering outputs to the running event loop (call once, from that loop)."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._backend.start(self._post)

    @property
    def is_dead(self) -> bool:
        return self.dead_error is not None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def stop_accepting(self) -> None:
        self._accepting = False

    def begin_shutdown(self, timeout: float) -> None:
        """(Any thread, a signal handler included.) Stops accepting; the requests still running `timeout` s from now
        are aborted then, each answered by its route as an engine error (a 503, or an in-band error event that ends
        its stream in the API's own format), so the HTTP server's own deadline, which cancels the tasks still
        running and cuts streams mid-body, is only a backstop."""
        self.stop_accepting()
        drain = getattr(self._backend, "begin_shutdown", None)  # data parallelism: no replica restarts from now on
        if drain is not None:
            drain()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.call_later, max(0.0, timeout), self._abort_unfinished, "shutdown timeout")

    def _abort_unfinished(self, why: str) -> None:
        if not self._streams:
            return
        logger.warning("%s: aborting %d unfinished request(s)", why, len(self._streams))
        streams = list(self._streams.values())
        self.abort([s.request_id for s in streams])
        for stream in streams:
            stream._fail(ShuttingDownError("the server is shutting down (its shutdown timeout ended before this "
                                           "request finished); request aborted"))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stops accepting, lets in-flight requests finish up to `timeout` s, aborts the rest,
        and stops the engine."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and not self.is_dead and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._abort_unfinished("shutdown")
        await asyncio.get_running_loop().run_in_executor(None, self._backend.stop, 10.0)
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
        lora_request: Any = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> RequestStream:
        """Submits a request and waits until the engine accepted it. lora_request: its LoRA adapter, or None;
        priority: lower first, with the priority scheduling policy; cache_salt: a prefix-cache namespace.

        Raises ValueError (bad input), QueueFullError / ShuttingDownError (retry later), or
        EngineDeadError. Pass token ids as `prompt`: text would be tokenized by the engine.
        """
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine has stopped: {self.dead_error}")
        if not self._accepting:
            raise ShuttingDownError("the server is shutting down", self.retry_after_seconds)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        assert self._loop is not None, "AsyncEngine.start() was not called"
        stream = RequestStream(request_id, self._loop)
        self._streams[request_id] = stream
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        self._backend.submit(AddRequest(request_id, prompt, params, arrival, prompt_text, lora_request, priority,
                                        cache_salt))
        try:
            await asyncio.shield(stream.accepted)
        except asyncio.CancelledError:
            self.abort(request_id)  # it may have been added meanwhile
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    async def call(self, method: str, **kwargs: Any) -> None:
        """One of the engine's control calls between its steps (engine_core.CALLS), awaited until it ran;
        ValueError with the engine's reason when it refused."""
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine has stopped: {self.dead_error}")
        assert self._loop is not None, "AsyncEngine.start() was not called"
        token = f"{method}-{uuid.uuid4().hex}"
        stream = RequestStream(token, self._loop)  # (only its acceptance is awaited)
        self._streams[token] = stream
        try:
            self._backend.submit(EngineCall(token, method, kwargs))
            await asyncio.shield(stream.accepted)
        finally:
            self._streams.pop(token, None)

    async def reset_prefix_cache(self) -> None:
        """Makes the engine forget its prefix cache (vLLM's POST /reset_prefix_cache); ValueError while requests
        hold KV blocks."""
        await self.call("reset_prefix_cache")

    async def sleep(self, level: int = 1) -> None:
        """Sleep mode (LLMEngine.sleep): ValueError while requests are unfinished; requests get EngineSleepingError
        until wake_up."""
        await self.call("sleep", level=level)
        self._sleeping = {"weights", "kv_cache"}
        self.sleep_level = level if self.sleep_level != 2 else 2  # (level 1 after 2 keeps the weights discarded)

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self.call("wake_up", tags=tags)
        self._sleeping -= {"weights", "kv_cache"} if tags is None else set(tags)
        if not self._sleeping:
            self.sleep_level = 0

    def is_sleeping(self) -> bool:
        return bool(self._sleeping)

    async def init_weights_update_group(self, **kwargs: Any) -> None:
        """LLMEngine.init_weights_update_group between steps (it blocks the engine until the trainer joins)."""
        await self.call("init_weights_update_group", **kwargs)

    async def update_weights_from_distributed(self, **kwargs: Any) -> None:
        """LLMEngine.update_weights_from_distributed between steps (the trainer broadcasts meanwhile)."""
        await self.call("update_weights_from_distributed", **kwargs)

    async def load_weights(self, path: str) -> None:
        """New weights from a folder of safetensors on the engine's machine (LLMEngine.load_weights); ValueError
        while requests are unfinished, for names or shapes the model lacks, or while the weights sleep."""
        await self.call("load_weights", weights=path)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        arrival_time: float | None = None,
        prompt_text: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yields outputs until the request finishes, as params.output_kind says: the whole output so far
        (CUMULATIVE), what is new since the last one (DELTA: text, token ids and logprobs; prompt logprobs in the
        first), or only the finished output (FINAL_ONLY). Closing or cancelling the consumer aborts the request
        (its KV blocks are freed before the engine's next step)."""
        stream = await self.add_request(request_id, prompt, params, arrival_time, prompt_text, priority=priority)
        kind = params.output_kind
        sent: dict[int, tuple[int, int, int, bool]] = {}  # DELTA, per choice: chars, tokens, logprobs, finish sent
        try:
            async for output in stream:
                if kind is RequestOutputKind.FINAL_ONLY and not output.finished:
                    continue
                if kind is RequestOutputKind.DELTA:
                    output = _delta_output(output, sent)
                    if output is None:
                        continue
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    async def beam_search(self, prompt_token_ids: list[int], params: BeamSearchParams, request_id: str,
                          lora_request: Any = None) -> BeamSearchOutput:
        """Beam search for one prompt (beam_search.py): each step's beams go in as requests of one token
        (ids `{request_id}-{step}-{beam}`), awaited together; cancelling it aborts the step in flight. Raises as
        add_request does."""
        search = BeamSearch(prompt_token_ids, params, self.tokenizer.eos_token_ids)
        step = params.step_params()
        num_cached = 0
        while pending := search.pending():
            streams: list[RequestStream] = []
            try:
                for j, tokens in enumerate(pending):
                    streams.append(await self.add_request(f"{request_id}-{search.steps}-{j}", tokens, step,
                                                          lora_request=lora_request))
                finals = await asyncio.gather(*(last_output(s) for s in streams))
            finally:
                self.abort([s.request_id for s in streams if not s.finished])
            if search.steps == 0:  # one beam: the prompt itself
                num_cached = finals[0].num_cached_tokens
            search.advance([final.outputs[0].logprobs[0] for final in finals])
        return dataclasses.replace(search.result(self.tokenizer.decode), num_cached_tokens=num_cached)

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        if not ids:
            return
        for rid in ids:
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.finished = True
                for observer in self.abort_observers:
                    try:
                        observer(stream)
                    except Exception:  # metrics must never break serving
                        logger.exception("abort observer failed")
        self._backend.forget(ids)
        if self.dead_error is None:
            self._backend.submit(AbortRequests(ids))

    # ------------------------------------------------------------------ event loop side
    def _post(self, fn_name: str, *args: Any) -> None:
        """Called from the backend's thread: run self.<fn_name>(*args) on the event loop."""
        if fn_name == "dead" and self.dead_error is None:
            self.dead_error = args[0]  # at once, so /health sees it even before the loop runs
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._dispatch, fn_name, args)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    def _dispatch(self, fn_name: str, args: tuple) -> None:
        if fn_name == "out":
            acks, outputs, stats = args
            self._deliver(acks, self._backend.decode(outputs), stats)
        elif fn_name == "dead":
            self._fail_all(args[0])
        elif fn_name == "fail":  # some requests lost (a data-parallel replica died); the engine goes on
            request_ids, error = args
            for rid in request_ids:
                stream = self._streams.pop(rid, None)
                if stream is not None:
                    stream._fail(error)
            self._backend.forget(request_ids)

    def _deliver(self, acks: list[Ack], outputs: list[RequestOutput], stats: dict) -> None:
        self.stats = stats
        for request_id, refusal in acks:
            stream = self._streams.get(request_id)
            if stream is None or stream.accepted.done():
                continue
            if refusal is None:
                stream.accepted.set_result(None)
            else:
                self._streams.pop(request_id, None)
                self._backend.forget([request_id])
                stream.accepted.set_exception(_refusal_error(refusal))
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
        if self.dead_error is None:
            self.dead_error = error
        dead = EngineDeadError(f"the engine has stopped: {error}")
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(dead)


def _refusal_error(refusal: Refusal) -> Exception:
    if refusal.kind == "queue_full":
        return QueueFullError(refusal.message, refusal.retry_after)
    if refusal.kind == "sleeping":
        return EngineSleepingError(refusal.message, refusal.retry_after)
    if refusal.kind == "error":
        return RuntimeError(refusal.message)
    if refusal.kind == "replica_lost":
        from pagedserve.data_parallel import ReplicaLostError

        return ReplicaLostError(refusal.message, refusal.retry_after)
    return ValueError(refusal.message)


# --------------------------------------------------------------------------- backends
Post = Callable[..., None]  # post("out", acks, outputs, stats) | post("dead", error) | post("fail", request_ids, error)


class _Backend(Protocol):
    info: dict

    def start(self, post: Post) -> None: ...
    def submit(self, item: AddRequest | AbortRequests | Stop) -> None: ...
    def decode(self, outputs: Any) -> list[RequestOutput]: ...
    def forget(self, request_ids: list[str]) -> None: ...
    def stop(self, timeout: float) -> None: ...


class _ThreadBackend:
    """EngineCore in a thread of this process; inputs through a list guarded by a Condition."""

    def __init__(self, engine: EngineLike, core_kwargs: dict) -> None:
        self.core = EngineCore(engine, **core_kwargs)
        self.info = {
            "model_name": engine.model_name,
            "max_model_len": engine.max_model_len,
            "vocab_size": getattr(engine, "vocab_size", None) or int(engine.tokenizer.vocab_size),
            "tokenizer": _private_copy(engine.tokenizer),
            "config": getattr(engine, "config", None),
            "default_sampling": dict(getattr(engine, "default_sampling", None) or {}),
            "class_labels": getattr(engine, "class_labels", None),
            "stats": engine.get_stats(),
        }
        self._cond = threading.Condition()
        self._inbox: list = []
        self._thread: threading.Thread | None = None

    def start(self, post: Post) -> None:
        self._thread = threading.Thread(target=self._run, args=(post,), name="pagedserve-engine", daemon=True)
        self._thread.start()

    def _receive(self, timeout: float | None) -> list:
        with self._cond:
            if not self._inbox and timeout != 0:
                self._cond.wait(timeout)
            items, self._inbox = self._inbox, []
        return items

    def _run(self, post: Post) -> None:
        try:
            self.core.run(self._receive, lambda acks, outputs, stats: post("out", acks, outputs, stats))
        except BaseException as e:  # noqa: BLE001 - any failure kills the engine, and must be told
            logger.exception("engine thread failed; the server is now unhealthy")
            post("dead", e)

    def submit(self, item: AddRequest | AbortRequests | Stop) -> None:
        with self._cond:
            self._inbox.append(item)
            self._cond.notify()

    def decode(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        return outputs

    def forget(self, request_ids: list[str]) -> None:
        pass

    def stop(self, timeout: float) -> None:
        self.submit(Stop())
        if self._thread is not None:
            self._thread.join(timeout)


def _private_copy(tokenizer: Any) -> Any:
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # noqa: BLE001 - an uncopyable tokenizer is shared (HF fast ones are copyable)
        logger.debug("tokenizer cannot be copied; sharing it with the engine thread")
        return tokenizer


async def last_output(stream: RequestStream) -> RequestOutput:
    """A request's final output (non-streaming routes, beam search)."""
    final = None
    async for output in stream:
        final = output
    assert final is not None
    return final


def _delta_output(output: RequestOutput, sent: dict[int, tuple[int, int, int, bool]]) -> RequestOutput | None:
    """A copy of `output` holding only the choices with something not yielded yet (text, token ids, logprobs, or
    their finish), each cut to that, as `sent` records (and is updated); None when there is nothing new and the
    request is not finished. Prompt logprobs come with the first."""
    first = not sent
    choices = []
    for c in output.outputs:
        chars, tokens, lps, finish_sent = sent.get(c.index, (0, 0, 0, False))
        num_lps = 0 if c.logprobs is None else len(c.logprobs)
        if (len(c.text), len(c.token_ids), num_lps) == (chars, tokens, lps) and (
                finish_sent or c.finish_reason is None):
            continue
        logprobs = None if c.logprobs is None else c.logprobs[lps:]
        choices.append(CompletionOutput(c.index, c.text[chars:], c.token_ids[tokens:], c.cumulative_logprob,
                                        logprobs, c.finish_reason, c.stop_reason))
        sent[c.index] = (len(c.text), len(c.token_ids), num_lps, c.finish_reason is not None)
    if not choices and not output.finished:
        return None
    return dataclasses.replace(output, outputs=choices,
                               prompt_logprobs=output.prompt_logprobs if first else None)
