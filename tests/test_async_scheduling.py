"""Async scheduling (step N+1 scheduled and queued while step N runs) gives exactly the outputs of
one-step-at-a-time scheduling, on the real embedded model (fp32 CPU, where the path runs the same
code with no overlap)."""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams

PROMPTS = ["Tell me a joke.", "Count to ten:", "The capital of France is", "def fib(n):", "Colors: red,"]


def mixed_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=20),  # may stop on eos: a step is computed past it
        SamplingParams(temperature=0.8, seed=3, max_tokens=16, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=30, stop=[" Paris", "."]),
        SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=9, min_tokens=5, top_k=40),
        SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, seed=11, max_tokens=12),
    ]


def summary(outputs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              [(lp.token_id, round(lp.logprob, 4), lp.rank, lp.top) for lp in c.logprobs or []])
             for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def engines(real_model_dir: str) -> dict[bool, LLM]:
    return {mode: LLM(real_model_dir, max_model_len=512, cpu_kv_cache_gib=0.2, async_scheduling=mode)
            for mode in (False, True)}


def test_async_outputs_equal_sync_outputs(engines: dict[bool, LLM]) -> None:
    sync_out = summary(engines[False].generate(PROMPTS, mixed_params(), use_tqdm=False))
    async_llm = engines[True]
    async_out = summary(async_llm.generate(PROMPTS, mixed_params(), use_tqdm=False))
    assert async_out == sync_out
    assert async_out[2][0][2] == "stop"  # the stop string case really stopped
    stats = async_llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_running"] == 0


PENALIZED = [SamplingParams(temperature=0.0, max_tokens=12, repetition_penalty=1.8),
             SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0),
             SamplingParams(temperature=0.9, seed=7, max_tokens=10, frequency_penalty=1.5, repetition_penalty=0.8)]


def test_async_with_penalties_stays_async_and_equals_sync(engines: dict[bool, LLM]) -> None:
    sync_out = summary(engines[False].generate(PROMPTS[:3], PENALIZED, use_tqdm=False))
    engine = engines[True].engine
    assert engine.async_scheduling
    for i, (prompt, params) in enumerate(zip(PROMPTS[:3], PENALIZED)):
        engine.add_request(f"pen{i}", prompt, params)
    async_steps, outputs = 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
        async_steps += engine._pending is not None  # a step left in flight: the async path ran
    engine.step()
    assert async_steps >= 10  # penalized requests no longer force one step at a time
    async_out = summary([outputs[f"pen{i}"] for i in range(3)])
    assert async_out == sync_out
    # The penalties changed something (else the comparison would not test them).
    plain = summary(engines[False].generate(PROMPTS[:2], [SamplingParams(temperature=0.0, max_tokens=12)] * 2,
                                            use_tqdm=False))
    assert plain[1][0][0] != sync_out[1][0][0]
    sampler = engine.worker.runner.sampler
    assert sampler._penalty_history is not None  # the device-side history served these steps
    # Finished requests give their rows back when the sampler next hears of them (the next step's schedule).
    engines[True].generate(PROMPTS[:2], PENALIZED[:2], use_tqdm=False)
    assert len(sampler._penalty_history.entries) >= 2
    engines[True].generate(["Hi"], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert not sampler._penalty_history.entries


@pytest.mark.parametrize(("prompt", "extra"), [
    ("Count from {i} to {j}, separated by commas:", {}),
    ("Write the word number {i} many times:", {"frequency_penalty": 0.7, "repetition_penalty": 1.2}),
], ids=["plain", "penalties"])
def test_async_preemption_matches_unconstrained(real_model_dir: str, engines: dict[bool, LLM], prompt: str,
                                                extra: dict) -> None:
    """Preempted (and recomputed) requests give the tokens of an unconstrained run; with penalties, their device-side
    history survives the preemption."""
    prompts = [prompt.format(i=i, j=i + 30) for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, **extra)
    free_run = engines[False].generate(prompts, params, use_tqdm=False)
    tokenizer = engines[False].get_tokenizer()
    blocks_needed = sum(-(-(len(tokenizer.encode(p)) + 24) // 16) for p in prompts)
    small = LLM(real_model_dir, max_model_len=512, num_kv_blocks=blocks_needed // 3, async_scheduling=True)
    tight_run = small.generate(prompts, params, use_tqdm=False)
    assert small.engine.get_stats()["num_preemptions"] > 0
    for a, b in zip(free_run, tight_run):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert small.engine.get_stats()["num_free_blocks"] == blocks_needed // 3


def test_async_abort_in_flight_leaks_no_blocks(engines: dict[bool, LLM]) -> None:
    engine = engines[True].engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"abort{i}", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._pending is not None  # a step is in flight while we abort
    engine.abort_request([f"abort{i}" for i in range(0, len(PROMPTS), 2)])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = len(out.outputs[0].token_ids)
    assert finished == {"abort1": 50, "abort3": 50}
    engine.step()  # the last step in flight (past the ends) is collected
    stats = engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
