"""LLMEngine behaviour that needs no big model: warm-up leaves no trace (tiny random-weight Qwen2)."""

from __future__ import annotations

import pytest

from pagedserve.config import EngineConfig
from pagedserve.engine import LLMEngine
from pagedserve.sampling_params import SamplingParams


def test_warm_up_runs_every_step_kind_and_leaves_the_engine_clean(tiny_model_dir: str) -> None:
    engine = LLMEngine(EngineConfig(model=tiny_model_dir, load_format="dummy", max_model_len=4096,
                                    num_kv_blocks=400))
    total_blocks = engine.get_stats()["num_total_blocks"]
    engine.warm_up()
    stats = engine.get_stats()
    assert not engine.has_unfinished_requests()
    assert stats["num_free_blocks"] == total_blocks and stats["kv_cache_usage"] == 0.0
    assert stats["prompt_tokens_total"] == stats["generation_tokens_total"] == 0
    assert stats["prefix_cache_queries"] == stats["prefix_cache_hits"] == 0
    assert engine.step_timing.totals == {}
    # It runs a prefill step, a mixed step (a prefill beside a decode) and decode steps.
    kinds: set[str] = set()
    decodes_beside_prefill: list[int] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        lens = [len(r.token_ids) for r in out.scheduled]
        if lens:
            kinds.add("mixed" if 1 in lens and max(lens) > 1 else "decode" if max(lens) == 1 else "prefill")
            if 1 in lens and max(lens) > 1:
                decodes_beside_prefill.append(lens.count(1))
        return out

    engine.scheduler.schedule = recording_schedule
    sampler = engine.worker.runner.sampler
    paths: list[str] = []
    for method in ("_sample_filtered", "_with_logprobs"):  # the torch paths whose first use loads GPU kernels
        original = getattr(sampler, method)

        def recording(*args, _original=original, _name=method, **kwargs):
            paths.append(_name)
            return _original(*args, **kwargs)

        setattr(sampler, method, recording)
    engine.warm_up()
    assert kinds == {"prefill", "mixed", "decode"}
    assert {"_sample_filtered", "_with_logprobs"} <= set(paths), paths
    # Mixed steps with many decodes (the decode kernel unsplit on a GPU) and with few (split).
    assert max(decodes_beside_prefill) >= 33 and min(decodes_beside_prefill) <= 3, decodes_beside_prefill
    # And the engine serves normally afterwards.
    engine.add_request("real", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 3
    m = outputs[-1].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert engine.get_stats()["num_free_blocks"] == total_blocks


def test_async_scheduling_flag_reaches_the_engine(tiny_model_dir: str) -> None:
    """--async-scheduling / --no-async-scheduling / neither (auto: on only for CUDA)."""
    import argparse

    from pagedserve.entrypoints.args import add_engine_args, config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    base = ["--model", tiny_model_dir, "--load-format", "dummy", "--num-kv-blocks", "64"]
    for flags, expected in (([], None), (["--async-scheduling"], True), (["--no-async-scheduling"], False)):
        config = config_from_args(parser.parse_args(base + flags))
        assert config.async_scheduling is expected
    engine = LLMEngine(config_from_args(parser.parse_args(base + ["--async-scheduling"])))
    assert engine.async_scheduling  # forced on, even on CPU
    assert not LLMEngine(config_from_args(parser.parse_args(base))).async_scheduling  # auto on CPU: off


def test_without_max_tokens_a_request_fills_a_cache_smaller_than_the_context(tiny_model_dir: str) -> None:
    """Found by stress-testing: with a KV cache holding fewer tokens than max_model_len, every request without
    max_tokens (max_model_len - prompt by default) was refused as needing more than the whole cache; it now generates
    until its prompt and answer fill the cache. An explicit max_tokens past the cache is still refused."""
    import pytest

    engine = LLMEngine(EngineConfig(model=tiny_model_dir, load_format="dummy", max_model_len=256, num_kv_blocks=4,
                                    block_size=16, skip_warmup=True))  # 64 tokens of cache
    engine.add_request("a", list(range(1, 11)), SamplingParams(temperature=0, ignore_eos=True, max_tokens=None))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    assert final.outputs[0].finish_reason == "length" and len(final.outputs[0].token_ids) == 64 + 1 - 10
    assert engine.get_stats()["num_free_blocks"] == 4
    with pytest.raises(ValueError, match="more than the whole cache holds"):
        engine.add_request("b", list(range(1, 11)), SamplingParams(max_tokens=60))


def _tiny_llm(tmp_path, **kwargs):
    from pagedserve import LLM
    from tests.executor.helpers import save_tiny_model

    save_tiny_model("qwen2", tmp_path, seed=3)
    return LLM(str(tmp_path), max_model_len=128, num_kv_blocks=64, **kwargs)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _run(engine: LLMEngine) -> dict:
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    return outs


def test_a_child_id_taken_by_another_request_adds_nothing(tmp_path) -> None:
    """Found by session 30's stress round: request "a" with n = 2 makes children "a#0" and "a#1"; with "a#1" already
    running, the refusal came after "a#0" was in the scheduler, and every later step failed (KeyError 'a')."""
    llm = _tiny_llm(tmp_path)
    engine = llm.engine
    engine.add_request("a#1", [1, 2, 3], _greedy(4))
    with pytest.raises(ValueError, match="'a#1' is already running or waiting"):
        engine.add_request("a", [1, 2, 3], SamplingParams(n=2, temperature=0.0, max_tokens=4, ignore_eos=True))
    assert sorted(engine.scheduler.requests) == ["a#1"]
    assert set(_run(engine)) == {"a#1"}
    assert llm.generate([[5, 6, 7]], _greedy(3), use_tqdm=False)[0].outputs[0].token_ids  # still serving
    stats = engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_an_id_reused_after_an_abort_gets_none_of_the_old_steps_tokens(tmp_path) -> None:
    """Async scheduling: a step is in flight when its request is aborted and a new request takes the id at once;
    the step's token was handed to the new request (its answer began with the old one's token). The new request's
    answer must equal the same prompt's answer alone."""
    llm = _tiny_llm(tmp_path, async_scheduling=True)
    engine = llm.engine
    assert engine.async_scheduling
    old = [(j * 7) % 250 + 1 for j in range(20)]
    new = [(j * 11) % 250 + 3 for j in range(30)]
    want = llm.generate([new], _greedy(8), use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("x", old, _greedy(16))
    for _ in range(3):
        engine.step()
    engine.abort_request("x")
    engine.add_request("x", new, _greedy(8))
    assert _run(engine)["x"] == want
    stats = engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_n_choices_with_the_largest_seed_wrap_their_seeds(tmp_path) -> None:
    """seed 2**64 - 1 is valid; with n = 2 the second choice's seed + 1 went past the range and the request was
    refused naming a seed it never sent. The children's seeds wrap into the range, and stay reproducible."""
    llm = _tiny_llm(tmp_path)
    params = SamplingParams(n=2, seed=2**64 - 1, max_tokens=4, ignore_eos=True)
    first = [o.token_ids for o in llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs]
    again = [o.token_ids for o in llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs]
    assert first == again and len(first) == 2
    wrapped = SamplingParams(seed=2**64 - 1 + 1 - 2**64, max_tokens=4, ignore_eos=True)  # the second child's seed
    assert llm.generate([[1, 2, 3]], wrapped, use_tqdm=False)[0].outputs[0].token_ids == first[1]
