"""The engine in its own process, so HTTP handling never competes with the step loop for the GIL.

    server process                                       engine process (spawned)
    AsyncEngine ── AddRequest / AbortRequests / Stop ──► Pipe ─► EngineCore.run(receive, emit)
    reader thread ◄── pickled ("out", acks, deltas, stats) ◄── Pipe ◄─ sender thread ◄─ DeltaEncoder
      └─ loop.call_soon_threadsafe ─► DeltaDecoder (+ detokenizing) ─► cumulative RequestOutputs

Outputs cross as deltas (new token ids, new text, new logprobs per choice), so a step costs the same
to send at token 10 as at token 10,000; the decoder rebuilds the cumulative RequestOutputs the rest
of the server reads. Measured on an H100 with 256 streams (docs/server.md): with the engine in a
thread of the server, streaming ran at 26-36% of offline speed (the event loop held the GIL the
step loop needed); in this process, at 60-63%.

The step loop does as little per request as it can, because under load its host work is what a step
costs once it exceeds the device's time:
- Text: the engine runs with `LLMEngine.detokenize = False`, so only requests with stop strings are
  detokenized there (a stop string ends the request, which the scheduler must know at once); for the
  others the server side's DeltaDecoder turns token ids into text, with the same IncrementalDetokenizer
  and the request's own settings (it learns them from the AddRequest it forwards).
- Pickling happens in the step loop's thread, and the sender thread only writes bytes (a write
  releases the GIL; pickling in the sender would hold the GIL against the step loop).

Messages engine -> server: at start ("tokenizer", source, chat_template) when the engine can name its
tokenizer's source (the server then loads its own copy while the engine loads, instead of receiving a
pickled one after: ~2 s off start-up on the GPU machine), then ("ready", info) | ("failed", exc_type,
message); then ("out", acks, deltas, stats)*, and ("dead", message) or ("stopped",) last.
"""

from __future__ import annotations

import atexit
import copy
import functools
import inspect
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedserve.engine import needs_engine_text, stop_token_ends_text
from pagedserve.engine_core import AbortRequests, AddRequest, EngineCore, Stop
from pagedserve.gc_control import freeze_startup_objects
from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

_METRIC_FIELDS = ("arrival_time", "first_scheduled_time", "first_token_time", "last_token_time", "finished_time")

# One choice's delta: (index, new token ids, new text, new logprobs or None, finish_reason, stop_reason,
# cumulative_logprob). One request's: (request_id, prompt token ids on the first delta else None,
# prompt, finished, num_cached_tokens, metrics tuple or None, [choice deltas], prompt logprobs on the first
# delta else None, an embedding request's vector or None).
RequestDelta = tuple


class DeltaEncoder:
    """Engine side: cumulative RequestOutputs -> deltas since the last one sent."""

    def __init__(self) -> None:
        self._sent: dict[str, dict[int, tuple[int, int, int]]] = {}

    def encode(self, outputs: list[RequestOutput]) -> list[RequestDelta]:
        deltas = []
        for out in outputs:
            sent = self._sent.get(out.request_id)
            first = sent is None
            if sent is None:
                sent = {}
            choices = []
            for c in out.outputs:
                num_ids, num_chars, num_lps = sent.get(c.index, (0, 0, 0))
                lps = c.logprobs
                choices.append(
                    (
                        c.index,
                        c.token_ids[num_ids:],
                        c.text[num_chars:],
                        None if lps is None else lps[num_lps:],
                        c.finish_reason,
                        c.stop_reason,
                        c.cumulative_logprob,
                    )
                )
                sent[c.index] = (len(c.token_ids), len(c.text), 0 if lps is None else len(lps))
            if out.finished:
                self._sent.pop(out.request_id, None)
            else:
                self._sent[out.request_id] = sent
            m = out.metrics
            metrics = None if m is None else (m.arrival_time, m.first_scheduled_time, m.first_token_time,
                                              m.last_token_time, m.finished_time)  # _METRIC_FIELDS' order
            deltas.append(
                (
                    out.request_id,
                    out.prompt_token_ids if first else None,
                    out.prompt if first else None,
                    out.finished,
                    out.num_cached_tokens,
                    metrics,
                    choices,
                    out.prompt_logprobs if first else None,
                    out.embedding,
                )
            )
        return deltas

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._sent.pop(rid, None)


@dataclass(slots=True)
class _Accumulated:
    prompt_token_ids: list[int]
    prompt: str | None
    params: SamplingParams | None  # set when this side detokenizes the request
    prompt_logprobs: list | None = None
    choices: dict[int, CompletionOutput] = field(default_factory=dict)
    detokenizers: dict[int, IncrementalDetokenizer] = field(default_factory=dict)


class DeltaDecoder:
    """Server side: deltas -> cumulative RequestOutputs (token id and logprob lists are shared
    and only ever extended; each output gets its own CompletionOutput with a text snapshot).

    With a tokenizer, requests announced by expect() without stop strings are detokenized here (the
    engine process sends no text for them); without one, text comes only from the deltas."""

    def __init__(self, tokenizer: Any = None) -> None:
        self._tokenizer = tokenizer
        self._eos_token_ids: set[int] = set(getattr(tokenizer, "eos_token_ids", ()) or ())
        self._acc: dict[str, _Accumulated] = {}
        self._expected: dict[str, SamplingParams] = {}  # added, no delta seen yet: detokenize here

    def expect(self, request_id: str, params: SamplingParams) -> None:
        """A request was sent to the engine; its text is made here unless it has stop strings."""
        if self._tokenizer is not None and not needs_engine_text(params) and params.detokenize:
            self._expected[request_id] = params

    def decode(self, deltas: list[RequestDelta]) -> list[RequestOutput]:
        outputs = []
        for rid, prompt_ids, prompt, finished, num_cached, metrics, choices, prompt_logprobs, embedding in deltas:
            acc = self._acc.get(rid)
            if acc is None:
                if prompt_ids is None:
                    continue  # a late delta of a request forgotten (aborted) since its first one
                acc = self._acc[rid] = _Accumulated(prompt_ids, prompt, self._expected.pop(rid, None),
                                                    prompt_logprobs)
            params = acc.params
            for index, new_ids, new_text, new_lps, finish, stop, cumulative in choices:
                c = acc.choices.get(index)
                if c is None:
                    c = acc.choices[index] = CompletionOutput(index, "", [], None, None if new_lps is None else [])
                c.token_ids.extend(new_ids)
                if params is None:
                    c.text += new_text
                else:
                    detok = acc.detokenizers.get(index)
                    if detok is None:
                        detok = acc.detokenizers[index] = IncrementalDetokenizer(
                            self._tokenizer, acc.prompt_token_ids, skip_special_tokens=params.skip_special_tokens
                        )
                    text_ids = new_ids
                    if new_ids and stop_token_ends_text(params, c.token_ids, finish, self._eos_token_ids):
                        text_ids = new_ids[:-1]
                    if text_ids:
                        detok.add_tokens(text_ids)
                    if finish is not None and c.finish_reason is None:
                        detok.flush()
                    c.text = detok.text
                if new_lps:
                    c.logprobs.extend(new_lps)
                c.finish_reason, c.stop_reason, c.cumulative_logprob = finish, stop, cumulative
            snapshot = [
                CompletionOutput(
                    c.index, c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason
                )
                for c in sorted(acc.choices.values(), key=lambda c: c.index)
            ]
            if finished:
                del self._acc[rid]
            outputs.append(
                RequestOutput(
                    request_id=rid,
                    prompt=acc.prompt,
                    prompt_token_ids=acc.prompt_token_ids,
                    outputs=snapshot,
                    finished=finished,
                    num_cached_tokens=num_cached,
                    metrics=None if metrics is None else RequestMetrics(**dict(zip(_METRIC_FIELDS, metrics))),
                    prompt_logprobs=acc.prompt_logprobs,
                    embedding=embedding,
                )
            )
        return outputs

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._acc.pop(rid, None)
            self._expected.pop(rid, None)


def engine_info(engine: Any, send_tokenizer: bool = True) -> dict:
    """What the server needs to know of the engine (sent once; the tokenizer too unless the server
    loads its own from the announced source)."""
    return {
        "model_name": engine.model_name,
        "max_model_len": engine.max_model_len,
        "vocab_size": getattr(engine, "vocab_size", None) or int(engine.tokenizer.vocab_size),
        "tokenizer": engine.tokenizer if send_tokenizer else None,
        "config": getattr(engine, "config", None),
        "default_sampling": dict(getattr(engine, "default_sampling", None) or {}),
        "class_labels": getattr(engine, "class_labels", None),
        "stats": engine.get_stats(),
    }


def run_engine_process(
    engine_factory: Callable[[], Any],
    core_kwargs: dict,
    conn_in: Any,
    conn_out: Any,
    log_level: int,
) -> None:
    """Entry point of the spawned engine process."""
    # Ctrl-C and a stop of the whole process group (systemd's SIGTERM to every process of the unit) reach this
    # process too; the server decides when the engine stops (Stop() after its graceful shutdown, or its pipe
    # closing when it is killed), so the requests still running finish instead of failing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if core_kwargs.get("log_stats", True):
        pkg = logging.getLogger("pagedserve")
        if pkg.getEffectiveLevel() > logging.INFO:
            pkg.setLevel(logging.INFO)
    logger.info("engine process started (imports done); building the engine")
    import multiprocessing

    # For its whole life: while it loads it reads no pipe, and later a step can wait long (a weight-update group, a
    # tensor-parallel collective) before it reads its pipe again and sees the server gone.
    parent = multiprocessing.parent_process()
    exit_if_orphaned("the engine process", parent.pid if parent is not None else os.getppid())
    announced = []

    def announce_tokenizer(source: str, chat_template: str | None) -> None:
        conn_out.send(("tokenizer", source, chat_template))
        announced.append(source)

    try:
        takes_hook = "on_tokenizer_source" in inspect.signature(engine_factory).parameters
        engine = engine_factory(on_tokenizer_source=announce_tokenizer) if takes_hook else engine_factory()
        # Outputs become deltas in this thread right after each step: no copies needed. Text is
        # made on the server side (DeltaDecoder), except for requests with stop strings.
        engine.copy_outputs = False
        engine.detokenize = False
        # The process's start-up objects live until it exits: out of the collector's walks from now on.
        freeze_startup_objects("engine process")
        conn_out.send(("ready", engine_info(engine, send_tokenizer=not announced)))
    except BaseException as e:  # noqa: BLE001 - the server reports it and exits
        conn_out.send(("failed", type(e).__name__, str(e)))
        return

    encoder = DeltaEncoder()

    def receive(timeout: float | None) -> list:
        items: list = []
        try:
            if conn_in.poll(timeout):
                while True:
                    item = conn_in.recv()
                    if isinstance(item, AbortRequests):
                        encoder.forget(item.request_ids)
                    items.append(item)
                    if not conn_in.poll(0):
                        break
        except (EOFError, OSError):  # the server is gone: stop
            items.append(Stop())
        return items

    sender = _Sender(conn_out)

    def emit(acks: list, outputs: list[RequestOutput], stats: dict) -> None:
        sender.put(pickle.dumps(("out", acks, encoder.encode(outputs), stats), protocol=pickle.HIGHEST_PROTOCOL))

    profile_path = os.environ.get("PAGEDSERVE_ENGINE_PROFILE")  # diagnostics: cProfile of the step loop
    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        EngineCore(engine, **core_kwargs).run(receive, emit)
    except BaseException as e:  # noqa: BLE001 - any failure kills the engine, and must be told
        logger.exception("engine process failed")
        sender.close(("dead", f"{type(e).__name__}: {e}"))
        os._exit(1)
    if profiler is not None:
        import pstats

        profiler.disable()
        with open(profile_path, "w") as f:
            stats = pstats.Stats(profiler, stream=f)
            stats.sort_stats("tottime").print_stats(35)
            stats.sort_stats("cumulative").print_stats(35)
    worker = getattr(engine, "worker", None)
    if worker is not None:
        worker.close()  # tensor parallelism: the other ranks' processes end too
    sender.close(("stopped",))
    # Out now, without the interpreter's teardown: the start-up objects frozen out of the collector would be
    # reported by Triton's bindings as leaked (dozens of "nanobind: leaked ..." lines in the server's log at every
    # stop), and tearing down ~250k objects only costs time. Everything this process owns is closed above.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


class _Sender:
    """Writes messages into a pipe from its own thread, in order, so the caller never waits on a slow
    reader: the engine's step loop (payloads it pickled itself, as bytes: a write releases the GIL,
    pickling here would hold it against the step loop) and the server's event loop (requests, pickled
    here; the engine reads its pipe only between steps)."""

    def __init__(self, conn: Any, name: str = "pagedserve-engine-sender") -> None:
        self._conn = conn
        self._cond = threading.Condition()
        self._pending: list[Any] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, payload: Any) -> None:
        """bytes: written as they are (already pickled); anything else: pickled by the thread."""
        with self._cond:
            self._pending.append(payload)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                batch, self._pending = self._pending, []
                closing = self._closing
            for payload in batch:
                try:
                    if isinstance(payload, bytes):
                        self._conn.send_bytes(payload)
                    else:
                        self._conn.send(payload)
                except (OSError, ValueError):
                    return  # the other side is gone
            if closing:
                return

    def close(self, last_message: tuple | None = None, timeout: float = 10.0) -> None:
        """Writes what is pending, then `last_message` (if any) from the calling thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if last_message is None:
            return
        try:
            self._conn.send(last_message)
        except (OSError, ValueError):
            pass


class _Loading:
    """A result computed in a daemon thread; result() re-raises its exception. Not a ThreadPoolExecutor:
    its threads are joined at interpreter exit, so a server failing at start-up would wait for the load."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="pagedserve-tokenizer", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self._error = e

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"the server could not load the tokenizer: {self._error}") from self._error
        return self._value


def _load_tokenizer_pair_in_thread(source: str, chat_template: str | None) -> _Loading:
    """Two copies of the engine's tokenizer (the HTTP side's tokenizer thread and the DeltaDecoder each
    use their own), loaded the way the engine loads it."""
    def load() -> tuple[Any, Any]:
        from pagedserve.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(source, chat_template=chat_template)
        return tokenizer, copy.deepcopy(tokenizer)

    return _Loading(load)


def exit_if_orphaned(what: str, parent: int, interval: float = 0.5) -> None:
    """A thread that watches this process's parent for the rest of its life and exits the process (status 1) if the
    parent dies (killed, or stopped by a SIGTERM this process ignores): a child that loads for minutes reading no
    pipe, or waits in a collective for a rank 0 that is gone, would go on for nobody. `parent`: its pid as the
    parent knew it (the parent may be gone already, and this process adopted by another)."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                logger.warning("%s: its parent (pid %d) is gone; exiting", what, parent)
                os._exit(1)

    threading.Thread(target=watch, name="pagedserve-parent-watch", daemon=True).start()


def _kill_if_alive(process: Any) -> None:
    if process.is_alive():
        process.kill()


class ProcessBackend:
    """The server side of the engine process: spawn, pipes, a reader thread, the delta decoder."""

    def __init__(self, engine_factory: Callable[[], Any], core_kwargs: dict, *, wait: bool = True) -> None:
        """Spawns the engine process; with wait=False returns at once (call wait_ready() later:
        the caller's own start-up work then overlaps the engine's)."""
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self._from_engine, child_out = ctx.Pipe(duplex=False)
        child_in, self._to_engine = ctx.Pipe(duplex=False)
        log_level = logging.getLogger().getEffectiveLevel()
        self.process = ctx.Process(
            target=run_engine_process,
            args=(engine_factory, core_kwargs, child_in, child_out, log_level),
            name="pagedserve-engine",
            daemon=True,
        )
        self.process.start()
        # The process ignores SIGTERM (the server decides when it stops), so multiprocessing's own exit handler,
        # which terminates daemonic children and then joins them, would wait on it forever if this side exited
        # without stop(): killed first instead (handlers registered later run first).
        self._kill_at_exit = functools.partial(_kill_if_alive, self.process)
        atexit.register(self._kill_at_exit)
        child_in.close()
        child_out.close()
        self.info: dict | None = None
        self.tokenizer_source: str | None = None  # set when the engine named it (and this side loaded it)
        self._decoder = DeltaDecoder()  # replaced once the engine's tokenizer is here (wait_ready)
        self._sender = _Sender(self._to_engine, name="pagedserve-engine-submit")
        self._reader: Any = None
        self._stopping = False
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Blocks until the engine is loaded. Raises like AsyncEngine.in_process."""
        if self.info is not None:
            return
        loading = None  # the server's own tokenizers (HTTP side, DeltaDecoder), loading while the engine does
        while True:
            try:
                message = self._from_engine.recv()
            except (EOFError, OSError):
                self.process.join(5)
                code = self.process.exitcode
                raise RuntimeError(f"the engine process exited during startup (exit code {code})") from None
            if message[0] != "tokenizer":
                break
            self.tokenizer_source = message[1]
            loading = _load_tokenizer_pair_in_thread(message[1], message[2])
        if message[0] == "failed":
            _, exc_type, text = message
            self.process.join(5)
            if exc_type == "ValueError":
                raise ValueError(text)
            raise RuntimeError(f"the engine failed to start: {exc_type}: {text}")
        self.info = message[1]
        if self.info["tokenizer"] is None:
            if loading is None:
                raise RuntimeError("the engine sent no tokenizer and named no source for one")
            self.info["tokenizer"], decoder_tokenizer = loading.result()
        else:
            # Its own copy: the HTTP side's tokenizer thread uses info["tokenizer"] concurrently.
            decoder_tokenizer = copy.deepcopy(self.info["tokenizer"])
        self._decoder = DeltaDecoder(decoder_tokenizer)

    def start(self, post: Callable[..., None]) -> None:
        self._reader = threading.Thread(target=self._read, args=(post,), name="pagedserve-engine-reader", daemon=True)
        self._reader.start()

    def _read(self, post: Callable[..., None]) -> None:
        while True:
            try:
                message = self._from_engine.recv()
            except (EOFError, OSError):
                if not self._stopping:
                    self.process.join(1)
                    post("dead", RuntimeError(f"the engine process exited (exit code {self.process.exitcode})"))
                return
            kind = message[0]
            if kind == "out":
                post("out", message[1], message[2], message[3])
            elif kind == "dead":
                post("dead", RuntimeError(message[1]))
                return
            elif kind == "stopped":
                return

    def submit(self, item: Any) -> None:
        """Never blocks: the pipe holds ~64 KB and the engine reads it only between steps, so a
        burst of long prompts (500 x 2,000 tokens) written from the event loop would stall all HTTP
        work for a step each few requests. A thread writes them, in order."""
        if isinstance(item, AddRequest):
            self._decoder.expect(item.request_id, item.params)
        self._sender.put(item)  # if the engine is gone, the reader thread reports it

    def decode(self, deltas: list[RequestDelta]) -> list[RequestOutput]:
        return self._decoder.decode(deltas)

    def forget(self, request_ids: list[str]) -> None:
        self._decoder.forget(request_ids)

    def stop(self, timeout: float) -> None:
        self._stopping = True
        self.submit(Stop())
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("the engine process did not stop in %.0f s; killing it", timeout)
            self.process.kill()  # (it ignores SIGTERM)
            self.process.join(5)
        atexit.unregister(self._kill_at_exit)
        if self._reader is not None:
            self._reader.join(2)
        self._sender.close(timeout=2)
        self._to_engine.close()
