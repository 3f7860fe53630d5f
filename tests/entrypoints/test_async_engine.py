"""AsyncEngine on the fake engine: threading, aborts, queue limit, failure, shutdown, stats line."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import Future

import pytest

from pagedserve.async_engine import AsyncEngine, EngineDeadError, QueueFullError, ShuttingDownError
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams
from tests.entrypoints.fake_engine import TEXT, FakeEngine


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _started(engine: FakeEngine, **kwargs) -> AsyncEngine:
    ae = AsyncEngine(engine, **kwargs)
    engine.calling_threads.clear()  # __init__ read one stats snapshot before the thread existed
    ae.start()
    return ae


async def _started_process(**engine_kwargs) -> AsyncEngine:
    core_keys = {"max_queued_requests", "log_stats", "log_stats_interval"}
    core = {k: engine_kwargs.pop(k) for k in list(engine_kwargs) if k in core_keys}
    ae = await asyncio.get_running_loop().run_in_executor(
        None, lambda: AsyncEngine.in_process(functools.partial(FakeEngine, **engine_kwargs), **core)
    )
    ae.start()
    return ae


def test_generate_yields_cumulative_outputs_until_finished() -> None:
    async def main():
        engine = FakeEngine()
        ae = await _started(engine)
        outs = [o async for o in ae.generate([1, 2, 3], SamplingParams(max_tokens=7), "r1")]
        await ae.shutdown(1)
        return outs, engine

    outs, engine = run(main())
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].outputs[0].text == TEXT[:7]
    assert outs[-1].outputs[0].finish_reason == "length"
    texts = [o.outputs[0].text for o in outs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    # Only the engine thread ever touched the engine.
    assert len(engine.calling_threads) == 1 and threading.get_ident() not in engine.calling_threads


def test_output_kind_delta_and_final_only() -> None:
    """SamplingParams.output_kind (vLLM's RequestOutputKind): DELTA yields only what is new (its pieces add up to
    the cumulative output), FINAL_ONLY one finished output."""
    from pagedserve.sampling_params import RequestOutputKind

    async def main():
        ae = await _started(FakeEngine(step_delay=0.01))
        outs = {}
        for kind in RequestOutputKind:
            params = SamplingParams(max_tokens=7, n=2, logprobs=1, output_kind=kind)
            outs[kind] = [o async for o in ae.generate([1, 2, 3], params, f"r-{kind.name}")]
        await ae.shutdown(1)
        return outs

    outs = run(main())
    cumulative, delta, final = (outs[k] for k in RequestOutputKind)
    assert len(final) == 1 and final[0].finished and len(delta) >= 2
    for index in (0, 1):
        whole = next(c for c in cumulative[-1].outputs if c.index == index)
        pieces = [c for o in delta for c in o.outputs if c.index == index]
        assert "".join(c.text for c in pieces) == whole.text and len(whole.text) == 7
        assert [t for c in pieces for t in c.token_ids] == whole.token_ids
        assert [lp for c in pieces for lp in c.logprobs] == whole.logprobs and len(whole.logprobs) == 7
        assert sum(bool(c.token_ids) for c in pieces) >= 2  # it came in pieces
        assert next(c for c in final[0].outputs if c.index == index).text == whole.text
    assert all(o.outputs for o in cumulative) and delta[-1].finished
    for index in (0, 1):  # each choice's finish comes once, in its last piece
        finishes = [c.finish_reason for o in delta for c in o.outputs if c.index == index]
        assert finishes[-1] == "length" and finishes.count("length") == 1
    assert all(c.token_ids or c.finish_reason for o in delta for c in o.outputs)  # no empty pieces


def test_cancelling_the_consumer_aborts_and_frees_blocks() -> None:
    async def main():
        engine = FakeEngine(step_delay=0.01)
        ae = await _started(engine)

        async def consume():
            async for _ in ae.generate(list(range(40)), SamplingParams(max_tokens=200), "r1"):
                pass

        task = asyncio.create_task(consume())
        while ae.stats["num_running"] == 0:
            await asyncio.sleep(0.005)
        assert ae.stats["num_free_blocks"] < ae.stats["num_total_blocks"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 2
        while ae.stats["num_free_blocks"] != ae.stats["num_total_blocks"] and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        stats = ae.stats
        await ae.shutdown(1)
        return stats, engine

    stats, engine = run(main())
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["kv_cache_usage"] == 0.0
    assert not engine.has_unfinished_requests()


def test_bad_request_raises_value_error_and_engine_lives_on() -> None:
    async def main():
        ae = await _started(FakeEngine(max_model_len=64))
        with pytest.raises(ValueError, match="maximum context length is 64"):
            await ae.add_request("r1", [1] * 10, SamplingParams(max_tokens=100))
        outs = [o async for o in ae.generate([1], SamplingParams(max_tokens=2), "r2")]
        await ae.shutdown(1)
        return outs

    assert run(main())[-1].outputs[0].text == TEXT[:2]


def test_a_bug_while_adding_one_request_fails_only_that_one() -> None:
    """An unexpected exception in add_request (a bug: the engine once died of a TypeError from the tokenizer) is that
    request's RuntimeError; the engine stays alive and serves the next one."""

    class Buggy(FakeEngine):
        def add_request(self, request_id, prompt, *args, **kwargs) -> None:
            if prompt == [13]:
                raise TypeError("a bug")
            super().add_request(request_id, prompt, *args, **kwargs)

    async def main():
        ae = await _started(Buggy(max_model_len=64))
        with pytest.raises(RuntimeError, match="internal error while adding the request: TypeError"):
            await ae.add_request("r1", [13], SamplingParams(max_tokens=2))
        assert ae.dead_error is None
        outs = [o async for o in ae.generate([1], SamplingParams(max_tokens=2), "r2")]
        await ae.shutdown(1)
        return outs

    assert run(main())[-1].outputs[0].text == TEXT[:2]


def test_a_failing_control_call_is_its_callers_error_and_the_engine_lives_on() -> None:
    """A control call that raises something other than ValueError (an unreadable weights file once stopped the
    engine): the caller's RuntimeError, and the engine serves on."""

    class Failing(FakeEngine):
        def load_weights(self, weights) -> int:
            raise OSError("header too small")

    async def main():
        ae = await _started(Failing(max_model_len=64))
        with pytest.raises(RuntimeError, match="load_weights failed: OSError: header too small"):
            await ae.load_weights("/somewhere")
        assert ae.dead_error is None
        outs = [o async for o in ae.generate([1], SamplingParams(max_tokens=2), "r2")]
        await ae.shutdown(1)
        return outs

    assert run(main())[-1].outputs[0].text == TEXT[:2]


def test_queue_limit_refuses_with_queue_full() -> None:
    async def main():
        engine = FakeEngine(max_num_seqs=1, step_delay=0.01)
        ae = await _started(engine, max_queued_requests=2)
        streams = [await ae.add_request("run", [1], SamplingParams(max_tokens=50))]
        while ae.stats["num_running"] == 0:
            await asyncio.sleep(0.005)
        streams.append(await ae.add_request("w1", [1], SamplingParams(max_tokens=5)))
        streams.append(await ae.add_request("w2", [1], SamplingParams(max_tokens=5)))
        with pytest.raises(QueueFullError) as info:
            await ae.add_request("w3", [1], SamplingParams(max_tokens=5))
        finals = []
        for s in streams:
            finals.append([o async for o in s][-1])
        await ae.shutdown(1)
        return info.value, finals

    error, finals = run(main())
    assert error.retry_after >= 1 and "--max-queued-requests 2" in str(error)
    assert all(f.finished for f in finals)


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_engine_failure_fails_pending_requests_and_marks_dead(backend: str) -> None:
    async def main():
        if backend == "thread":
            ae = await _started(FakeEngine(fail_at_step=3))
        else:
            ae = await _started_process(fail_at_step=3)
        with pytest.raises(EngineDeadError):
            async for _ in ae.generate([1], SamplingParams(max_tokens=50), "r1"):
                pass
        assert ae.is_dead
        with pytest.raises(EngineDeadError):
            await ae.add_request("r2", [1], SamplingParams(max_tokens=5))
        await ae.shutdown(1)

    run(main())


def test_shutdown_lets_requests_finish_then_aborts_the_rest() -> None:
    async def main():
        engine = FakeEngine(step_delay=0.01, max_model_len=100_000)
        ae = await _started(engine)
        short = await ae.add_request("short", [1], SamplingParams(max_tokens=5))
        long = await ae.add_request("long", [1], SamplingParams(max_tokens=10_000))
        t0 = time.monotonic()
        await ae.shutdown(timeout=0.5)
        elapsed = time.monotonic() - t0
        with pytest.raises(ShuttingDownError):
            await ae.add_request("late", [1], SamplingParams(max_tokens=5))
        short_final = [o async for o in short][-1]
        with pytest.raises(ShuttingDownError):
            async for _ in long:
                pass
        return elapsed, short_final, engine

    elapsed, short_final, engine = run(main())
    assert 0.4 < elapsed < 3
    assert short_final.finished and short_final.outputs[0].finish_reason == "length"
    assert not engine.has_unfinished_requests()


def test_begin_shutdown_aborts_what_still_runs_at_the_timeout_and_tells_the_backend() -> None:
    """From the server's signal handler: no new requests; `timeout` s later the requests still running fail with
    ShuttingDownError (their routes answer it), those done by then finished normally; a backend with its own drain
    (data parallelism: no replica restarts from now on) is told at once."""

    async def main():
        engine = FakeEngine(step_delay=0.01, max_model_len=100_000)
        ae = await _started(engine)
        drained = []
        ae._backend.begin_shutdown = lambda: drained.append(time.monotonic())
        short = await ae.add_request("short", [1], SamplingParams(max_tokens=5))
        long = await ae.add_request("long", [1], SamplingParams(max_tokens=10_000))
        t0 = time.monotonic()
        ae.begin_shutdown(0.5)
        assert drained
        with pytest.raises(ShuttingDownError):
            await ae.add_request("late", [1], SamplingParams(max_tokens=5))
        short_final = [o async for o in short][-1]
        with pytest.raises(ShuttingDownError, match="shutdown timeout ended"):
            async for _ in long:
                pass
        aborted_after = time.monotonic() - t0
        await ae.shutdown(timeout=0.1)
        return aborted_after, short_final, engine

    aborted_after, short_final, engine = run(main())
    assert 0.4 < aborted_after < 3
    assert short_final.finished and short_final.outputs[0].finish_reason == "length"
    assert not engine.has_unfinished_requests()

def test_idle_engine_thread_does_not_spin() -> None:
    async def main():
        ae = await _started(FakeEngine(), log_stats=False)
        await asyncio.sleep(0.05)
        clock = time.pthread_getcpuclockid(ae._backend._thread.ident)
        before = time.clock_gettime(clock)
        await asyncio.sleep(0.5)
        used = time.clock_gettime(clock) - before
        await ae.shutdown(1)
        return used

    assert run(main()) < 0.02


def test_periodic_stats_line(caplog: pytest.LogCaptureFixture) -> None:
    async def main():
        ae = await _started(FakeEngine(step_delay=0.01), log_stats_interval=0.2)
        async for _ in ae.generate([1, 2, 3, 4], SamplingParams(max_tokens=40), "r1"):
            pass
        await asyncio.sleep(0.3)
        await ae.shutdown(1)

    with caplog.at_level(logging.INFO, logger="pagedserve.async_engine"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if "tokens/s" in r.getMessage()]
    assert lines, caplog.text
    assert "generation:" in lines[0] and "running:" in lines[0] and "KV cache usage:" in lines[0]


# --------------------------------------------------------------------------- engine in a process
def test_process_backend_generates_aborts_and_reports_stats() -> None:
    async def main():
        ae = await _started_process(step_delay=0.01, max_model_len=100_000)
        assert ae.model_name == "fake-model" and ae.max_model_len == 100_000
        assert ae.tokenizer.encode("ab") == [97, 98]
        outs = [o async for o in ae.generate([1, 2, 3], SamplingParams(max_tokens=7, logprobs=2), "r1")]
        final = outs[-1]
        assert final.finished and final.outputs[0].text == TEXT[:7]
        assert len(final.outputs[0].token_ids) == 7 and len(final.outputs[0].logprobs) == 7
        texts = [o.outputs[0].text for o in outs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
        n3 = [o async for o in ae.generate([1], SamplingParams(max_tokens=4, n=3, seed=0), "r2")][-1]
        assert [c.text for c in n3.outputs] == [TEXT[i : i + 4] for i in range(3)]

        async def consume():
            async for _ in ae.generate(list(range(40)), SamplingParams(max_tokens=50_000), "r3"):
                pass

        task = asyncio.create_task(consume())
        while ae.stats["num_running"] == 0:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 5
        while ae.stats["num_free_blocks"] != ae.stats["num_total_blocks"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert ae.stats["kv_cache_usage"] == 0.0
        with pytest.raises(ValueError, match="maximum context length"):
            await ae.add_request("r4", [1], SamplingParams(max_tokens=200_000))
        process = ae._backend.process
        await ae.shutdown(2)
        return process

    process = run(main())
    assert process.exitcode == 0


def test_queue_limit_counts_what_waits_beyond_free_slots() -> None:
    """A burst into an idle engine: the requests its free running slots take do not count as queued, so
    max_num_seqs + max_queued_requests are accepted (a stress round saw 4 of 20 taken with 4 slots and a queue of 4,
    where 8 fit)."""
    async def main():
        ae = await _started(FakeEngine(max_num_seqs=4, step_delay=0.01), max_queued_requests=4)
        # nine at once (one batch of adds for the engine thread, before any of them runs); 40 steps each
        added = await asyncio.gather(*(ae.add_request(f"r{i}", [1], SamplingParams(max_tokens=40)) for i in range(9)),
                                     return_exceptions=True)
        streams = [a for a in added if not isinstance(a, BaseException)]
        refused = [a for a in added if isinstance(a, QueueFullError)]
        finals = []
        for s in streams:
            finals.append([o async for o in s][-1])
        await ae.shutdown(1)
        return finals, refused

    finals, refused = run(main())
    assert len(finals) == 8 and len(refused) == 1 and all(f.finished for f in finals)


def test_process_backend_queue_limit() -> None:
    async def main():
        ae = await _started_process(max_num_seqs=1, step_delay=0.01, max_queued_requests=1)
        first = await ae.add_request("a", [1], SamplingParams(max_tokens=30))
        while ae.stats["num_running"] == 0:
            await asyncio.sleep(0.005)
        second = await ae.add_request("b", [1], SamplingParams(max_tokens=3))
        with pytest.raises(QueueFullError):
            await ae.add_request("c", [1], SamplingParams(max_tokens=3))
        finals = [[o async for o in first][-1], [o async for o in second][-1]]
        await ae.shutdown(2)
        return finals

    assert all(f.finished for f in run(main()))


def test_process_backend_startup_error_is_raised() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        AsyncEngine.in_process(functools.partial(FakeEngine, max_num_seqs="bad"))


class _CompilingEngine(FakeEngine):
    """FakeEngine whose structured-output compiles are futures the test finishes by hand."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.compiles: dict[str, Future] = {}  # regex -> its compile
        self.grammars: dict[str, object] = {}  # request id -> the compiled grammar it was added with

    def compile_structured_async(self, spec):
        self._touch()
        return self.compiles.setdefault(spec.regex, Future())

    def add_request(self, request_id, prompt, params, arrival_time=None, prompt_text=None, compiled_grammar=None):
        super().add_request(request_id, prompt, params, arrival_time, prompt_text)
        self.grammars[request_id] = compiled_grammar


def test_a_compiling_grammar_does_not_hold_up_other_requests() -> None:
    """The engine loop keeps stepping while a constraint compiles; the request is acked (accepted or refused)
    once its compile ends, and one aborted while compiling is never added."""

    def constrained(regex: str) -> SamplingParams:
        return SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(regex=regex))

    async def main():
        engine = _CompilingEngine(step_delay=0.002)
        ae = await _started(engine)
        slow = asyncio.create_task(ae.add_request("slow", [1, 2], constrained("a+")))
        bad = asyncio.create_task(ae.add_request("bad", [1, 2], constrained("(")))
        gone = asyncio.create_task(ae.add_request("gone", [1, 2], constrained("b+")))
        while len(engine.compiles) < 3:
            await asyncio.sleep(0.002)
        # Meanwhile another request runs from start to finish.
        outs = [o async for o in ae.generate([3, 4], SamplingParams(max_tokens=20), "free")]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 20
        assert not slow.done() and not bad.done() and not gone.done()
        assert ae.stats["num_waiting"] == 0 and set(engine.grammars) == {"free"}
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        await asyncio.sleep(0.05)  # the abort reaches the engine loop before the compile ends
        grammar = object()
        engine.compiles["a+"].set_result(grammar)
        engine.compiles["("].set_exception(ValueError("the regex constraint does not compile: unbalanced"))
        engine.compiles["b+"].set_result(object())
        stream = await slow
        final = [o async for o in stream][-1]
        with pytest.raises(ValueError, match="does not compile: unbalanced"):
            await bad
        await asyncio.sleep(0.05)
        stats = ae.stats
        await ae.shutdown(1)
        return final, grammar, engine, stats

    final, grammar, engine, stats = run(main())
    assert final.finished and len(final.outputs[0].token_ids) == 5
    assert engine.grammars == {"free": None, "slow": grammar}  # "bad" refused, "gone" never added
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
