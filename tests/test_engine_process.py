"""The engine process's output path: engine without text (LLMEngine.detokenize = False) -> deltas ->
pickle -> DeltaDecoder detokenizing on the server side gives the same outputs, step by step, as the
engine detokenizing itself (tiny random-weight Qwen2 with the real Qwen tokenizer)."""

from __future__ import annotations

import os
import pickle
import time

import pytest

from pagedserve.config import EngineConfig
from pagedserve.engine import LLMEngine
from pagedserve.engine_process import DeltaDecoder, DeltaEncoder
from pagedserve.sampling_params import SamplingParams
from tests.conftest import wait_gone

REQUESTS = {
    "plain": SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),
    "specials": SamplingParams(max_tokens=30, temperature=1.0, seed=7, n=2, skip_special_tokens=False,
                               ignore_eos=True),
    "stop": SamplingParams(max_tokens=60, temperature=1.0, seed=3, stop=["e"], ignore_eos=True),
    "logprobs": SamplingParams(max_tokens=12, temperature=1.0, seed=5, logprobs=2, ignore_eos=True),
    "prompt": SamplingParams(max_tokens=5, temperature=1.0, seed=6, prompt_logprobs=2, ignore_eos=True),
}


def _view(outputs) -> list:
    return [(o.request_id, o.finished, [(c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason,
                                         None if c.logprobs is None else [lp.token_id for lp in c.logprobs])
                                        for c in o.outputs],
             None if o.prompt_logprobs is None
             else [lp and (lp.token_id, lp.logprob, lp.top) for lp in o.prompt_logprobs])
            for o in outputs]


def _run(engine: LLMEngine, suffix: str, server_side: DeltaDecoder | None) -> list:
    encoder = DeltaEncoder()
    for name, params in REQUESTS.items():
        if server_side is not None:
            server_side.expect(name + suffix, params)
        engine.add_request(name + suffix, [1000 + 37 * i for i in range(20 + len(name))], params)
    steps = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if server_side is not None:
            # As the pipe carries them: pickled deltas.
            outputs = server_side.decode(pickle.loads(pickle.dumps(encoder.encode(outputs))))
        steps.append([(rid.removesuffix(suffix), *rest) for rid, *rest in _view(outputs)])
    return steps


@pytest.fixture(scope="module")
def engine(tiny_model_dir: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_model_dir, load_format="dummy", max_model_len=512, num_kv_blocks=200,
                                  enable_prefix_caching=False))


def test_server_side_detokenizing_matches_the_engine_step_by_step(engine: LLMEngine) -> None:
    reference = _run(engine, "-a", None)
    engine.detokenize, engine.copy_outputs = False, False
    try:
        decoder = DeltaDecoder(engine.tokenizer)
        ours = _run(engine, "-b", decoder)
    finally:
        engine.detokenize, engine.copy_outputs = True, True
    assert ours == reference
    final = {rid: choices for step in reference for rid, finished, choices, _ in step if finished}
    prompt_logprobs = [plp for step in ours for rid, _, _, plp in step if rid == "prompt"]
    assert prompt_logprobs and all(plp == prompt_logprobs[0] and len(plp) == 26 for plp in prompt_logprobs)
    assert all(len(lp[2]) == 2 for lp in prompt_logprobs[0][1:])
    assert set(final) == set(REQUESTS)
    assert all(text for choices in final.values() for _, text, *_ in choices)  # real text was made
    assert final["stop"][0][3:5] == ("stop", "e")  # the engine still ends requests on stop strings
    assert len(final["specials"]) == 2
    assert not decoder._acc and not decoder._expected  # nothing kept once finished


def test_the_engine_makes_no_text_for_requests_without_stop_strings(engine: LLMEngine) -> None:
    engine.detokenize = False
    try:
        engine.add_request("no-text", [5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True))
        engine.add_request("text", [5, 6, 7], SamplingParams(max_tokens=5, ignore_eos=True, stop=["\x00never"]))
        finals = {}
        while engine.has_unfinished_requests():
            finals.update({o.request_id: o for o in engine.step() if o.finished})
    finally:
        engine.detokenize = True
    assert finals["no-text"].outputs[0].text == "" and len(finals["no-text"].outputs[0].token_ids) == 5
    assert finals["text"].outputs[0].text != ""


def test_decoder_drops_late_deltas_of_forgotten_requests(engine: LLMEngine) -> None:
    decoder = DeltaDecoder(engine.tokenizer)
    params = SamplingParams(max_tokens=4)
    decoder.expect("r", params)
    first = ("r", [1, 2], None, False, 0, None, [(0, [300], "", None, None, None, None)], None, None)
    assert decoder.decode([first])[0].outputs[0].text == engine.tokenizer.decode([300])
    decoder.forget(["r"])
    late = ("r", None, None, False, 0, None, [(0, [301], "", None, None, None, None)], None, None)
    assert decoder.decode([late]) == []
    assert not decoder._acc


def test_the_server_loads_its_own_tokenizer_from_the_source_the_engine_announces(tiny_model_dir: str) -> None:
    """A real engine process: it names its tokenizer's source early and sends no pickled tokenizer;
    the server side's two copies (HTTP side, DeltaDecoder) tokenize and decode as the engine's does."""
    import functools

    from pagedserve.engine_process import ProcessBackend

    config = EngineConfig(model=tiny_model_dir, load_format="dummy", max_model_len=256, num_kv_blocks=64)
    backend = ProcessBackend(functools.partial(LLMEngine, config), {"log_stats": False}, wait=False)
    try:
        backend.wait_ready()
        assert backend.tokenizer_source == tiny_model_dir
        tokenizer = backend.info["tokenizer"]
        decoder_tokenizer = backend._decoder._tokenizer
        assert tokenizer is not None and decoder_tokenizer is not None and tokenizer is not decoder_tokenizer
        from pagedserve.tokenizer import load_tokenizer

        reference = load_tokenizer(tiny_model_dir)  # as the engine loads it
        text = "Hello, paged world! 123"
        ids = reference.encode(text)
        assert len(ids) > 3 and tokenizer.encode(text) == ids == decoder_tokenizer.encode(text)
        assert decoder_tokenizer.decode(ids) == reference.decode(ids) == text
        assert tokenizer.eos_token_ids == reference.eos_token_ids
        assert backend.info["vocab_size"] > 0 and backend.info["max_model_len"] == 256
    finally:
        backend.stop(10)


def _announce_then_fail(on_tokenizer_source=None):
    """An engine factory (run in the spawned process) that names a tokenizer source, then fails."""
    on_tokenizer_source("/nonexistent/pagedserve-tokenizer", None)
    raise ValueError("bad engine config: max_num_seqs must be positive")


def test_a_failure_after_the_tokenizer_announcement_is_reported_not_hung() -> None:
    from pagedserve.engine_process import ProcessBackend

    backend = ProcessBackend(_announce_then_fail, {"log_stats": False}, wait=False)
    with pytest.raises(ValueError, match="max_num_seqs must be positive"):
        backend.wait_ready()
    backend.process.join(10)
    assert backend.process.exitcode is not None


def test_the_engine_process_ignores_sigterm_and_stops_when_told(tiny_model_dir: str) -> None:
    """A stop of the whole process group (systemd's SIGTERM to every process of the unit) must not end the engine
    under the server's graceful shutdown: only the server's Stop() does."""
    import functools
    import os
    import signal
    import time

    from pagedserve.engine_process import ProcessBackend

    config = EngineConfig(model=tiny_model_dir, load_format="dummy", max_model_len=256, num_kv_blocks=64)
    backend = ProcessBackend(functools.partial(LLMEngine, config), {"log_stats": False})
    try:
        os.kill(backend.process.pid, signal.SIGTERM)
        time.sleep(1.0)
        assert backend.process.is_alive()
    finally:
        backend.stop(20)
    assert backend.process.exitcode == 0  # it ended at Stop(), not killed


def test_a_server_that_exits_without_stopping_its_engine_is_not_held_up(tiny_model_dir: str) -> None:
    """multiprocessing's exit handler terminates daemonic children and joins them; the engine ignores SIGTERM, so
    without the backend's own exit handler (a kill) this program would never end."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import functools, os
        from pagedserve.config import EngineConfig
        from pagedserve.engine import LLMEngine
        from pagedserve.engine_process import ProcessBackend
        config = EngineConfig(model={tiny_model_dir!r}, load_format="dummy", max_model_len=256, num_kv_blocks=64)
        backend = ProcessBackend(functools.partial(LLMEngine, config), {{"log_stats": False}})
        print("engine pid", backend.process.pid, flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.split("engine pid")[1].split()[0])
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"


def _load_slowly():
    """An engine factory (run in the spawned process) that takes long to load, as a large model does."""
    import time

    time.sleep(120)


def test_an_engine_process_still_loading_exits_when_the_server_is_killed() -> None:
    """It reads no pipe while it loads and ignores SIGTERM: it watches its parent instead."""
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import time
        from pagedserve.engine_process import ProcessBackend
        from tests.test_engine_process import _load_slowly
        backend = ProcessBackend(_load_slowly, {"log_stats": False}, wait=False)
        print("engine pid", backend.process.pid, flush=True)
        time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        pid = int(proc.stdout.readline().split()[-1])
        time.sleep(2.0)  # the child is in its factory by now
        assert not wait_gone(pid, 0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert wait_gone(pid, 10)
    finally:
        proc.kill()
