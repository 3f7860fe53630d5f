"""Speculative decoding by n-gram lookup (pagedserve/spec_decode.py): the proposer, the config, and the engine on
the real embedded model (fp32 CPU), whose outputs with drafts must equal those without: greedy and seeded random
sampling, logprobs, stop strings, min_tokens, n > 1, length limits; and no KV block leaks."""

from __future__ import annotations

import numpy as np
import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.spec_decode import NgramProposer, SpecDecodeStats, SpeculativeConfig, ngram_propose

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}


def propose(tokens, k=4, lo=1, hi=4):
    return ngram_propose(np.asarray(tokens, dtype=np.int64), k, lo, hi)


def test_ngram_propose_takes_the_longest_then_most_recent_match() -> None:
    # The last token 3 follows 2 at index 2 and 9 at index 6: the 2-gram (2, 3) only matches at index 2.
    assert propose([1, 2, 3, 4, 5, 9, 3, 7, 8, 2, 3]) == [4, 5, 9, 3]
    # Two occurrences of the same 2-gram: the most recent one's continuation.
    assert propose([5, 6, 1, 6, 5, 6, 2, 6, 5, 6]) == [2, 6, 5, 6]
    # A continuation that runs into the end of the sequence goes on by copying its own period (3 here).
    assert propose([7, 1, 2, 8, 1, 2], k=5) == [8, 1, 2, 8, 1]


def test_ngram_propose_repeats_a_short_loop_and_respects_lengths() -> None:
    assert propose([4, 9, 9, 9], k=5) == [9, 9, 9, 9, 9]  # period 1
    assert propose([1, 2, 1, 2, 1, 2], k=5) == [1, 2, 1, 2, 1]  # period 2
    assert propose([1, 2, 3, 4], k=3) == []  # the last token never occurred before
    assert propose([1, 2, 3, 1], k=3) == [2, 3, 1]
    assert propose([1, 2, 3, 1], k=3, lo=2) == []  # a 1-gram match is too short
    assert propose([5, 1, 2, 3, 1, 2], k=2, lo=2, hi=2) == [3, 1]
    assert propose([1], k=3) == [] and propose([3, 3], k=0) == []


def test_proposer_grows_its_buffer_incrementally() -> None:
    proposer = NgramProposer(SpeculativeConfig.parse(SPEC))
    tokens = [1, 2, 3, 1]
    assert proposer.propose("a", tokens, 4) == [2, 3, 1, 2]
    tokens += [2, 3, 7]
    assert proposer.propose("a", tokens, 2) == []  # 7 is new
    tokens += list(range(100, 400)) + [2, 3]
    assert proposer.propose("a", tokens, 4) == [7, 100, 101, 102]
    proposer.release("a")
    assert proposer.propose("a", [9, 9], 3) == [9, 9, 9]


def test_speculative_config_parse() -> None:
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}')
    assert (c.num_speculative_tokens, c.prompt_lookup_min, c.prompt_lookup_max) == (3, 5, 5)
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 4})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)
    assert SpeculativeConfig.parse({"model": "[ngram]", "num_speculative_tokens": 2}).method == "ngram"
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 8})
    assert c.disable_by_batch_size == 8 and c.as_dict()["disable_by_batch_size"] == 8
    c = SpeculativeConfig.parse({"model": "path/to/draft", "num_speculative_tokens": 3})  # vLLM: a model drafts
    assert (c.method, c.model) == ("draft_model", "path/to/draft")
    assert SpeculativeConfig.parse(c.as_dict()) == c
    for bad, words in [("{", "JSON"), ({"method": "eagle", "num_speculative_tokens": 2}, "not yet supported"),
                       ({"method": "ngram"}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "[1, 16]"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3,
                         "prompt_lookup_max": 2}, "prompt_lookup_min"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "draft_size": 1}, "unknown"),
                       ({"method": "draft_model", "num_speculative_tokens": 2}, "needs \"model\""),
                       ({"method": "draft_model", "model": "m", "num_speculative_tokens": 2,
                         "draft_tensor_parallel_size": 2}, "must be 1"),
                       ({"method": "ngram", "model": "m", "num_speculative_tokens": 2}, "takes no model"),
                       ([1], "JSON object"), ({"num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
                        "disable_by_batch_size")]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[")):
            SpeculativeConfig.parse(bad)


def test_stats_count_accepted_by_position() -> None:
    s = SpecDecodeStats()
    s.add(4, 2)
    s.add(2, 2)
    s.add(4, 0)
    d = s.as_dict()
    assert (d["num_drafts"], d["num_draft_tokens"], d["num_accepted_tokens"]) == (3, 10, 4)
    assert d["accepted_per_position"] == [2, 2, 0, 0]
    assert d["mean_acceptance_length"] == pytest.approx(1 + 4 / 3)


# --- the engine ---------------------------------------------------------------------------------

# Prompts whose answers repeat their own text (lists, code), so drafts are both kept and rejected.
PROMPTS = [
    "Repeat this list three times: apple, banana, cherry, date, elderberry, fig, grape.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Count from 1 to 40, separated by commas: 1, 2, 3,",
    "Write the word 'echo' ten times:",
    "The capital of France is",
]


def mixed_params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=48, logprobs=2),
        SamplingParams(temperature=0.8, seed=3, max_tokens=40, logprobs=1),  # seeded: the same samples
        SamplingParams(temperature=0.0, max_tokens=60, stop=[", 12,"], min_tokens=4),
        SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=30, top_k=40, top_p=0.95),
        SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),  # length-limited mid-draft
    ]


def summary(outputs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def logprob_rows(outputs) -> list:
    return [(lp.token_id, lp.logprob, lp.rank, [t for t, _ in lp.top])
            for o in outputs for c in o.outputs for lp in c.logprobs or []]


@pytest.fixture(scope="module")
def engines(real_model_dir: str) -> dict[bool, LLM]:
    kw = dict(max_model_len=512, cpu_kv_cache_gib=0.2)
    return {False: LLM(real_model_dir, **kw), True: LLM(real_model_dir, speculative_config=SPEC, **kw)}


def test_drafted_outputs_equal_plain_outputs(engines: dict[bool, LLM]) -> None:
    plain = engines[False].generate(PROMPTS, mixed_params(), use_tqdm=False)
    spec_llm = engines[True]
    spec = spec_llm.generate(PROMPTS, mixed_params(), use_tqdm=False)
    assert summary(spec) == summary(plain)
    a, b = logprob_rows(spec), logprob_rows(plain)
    assert len(a) == len(b) > 60
    for x, y in zip(a, b):
        assert (x[0], x[2], x[3]) == (y[0], y[2], y[3])
        assert x[1] == pytest.approx(y[1], abs=1e-4)
    assert plain[2].outputs[0].finish_reason == "stop" and ", 12," not in spec[2].outputs[0].text
    assert len(spec[4].outputs[0].token_ids) == 13
    stats = spec_llm.engine.get_stats()
    drafts = stats["spec_decode"]
    # Drafts were made, some kept and some not (the equality above covers both paths).
    assert drafts["num_drafts"] > 10 and 0 < drafts["num_accepted_tokens"] < drafts["num_draft_tokens"]
    assert drafts["accepted_per_position"][0] >= drafts["accepted_per_position"][-1]
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_running"] == 0


def test_drafts_save_steps_and_keep_the_prefix_cache_right(engines: dict[bool, LLM]) -> None:
    """A repetitive greedy answer takes fewer steps with drafts; run again, its prompt hits the prefix cache (whose
    blocks were written by drafted steps: a rejected draft's K/V must never be cached as a real token's)."""
    engine = engines[True].engine
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    prompt = "Count from 1 to 100, separated by commas: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
    want = engines[False].generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    outs = []
    for run in range(2):
        engine.add_request(f"count{run}", prompt, params)
        steps = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outs.append(out)
            steps += 1
        assert outs[-1].outputs[0].token_ids == want
        assert steps < 64 * 0.6, steps  # most steps kept more than one token
    assert outs[1].num_cached_tokens > 0
    # A continuation of the first answer reuses the blocks filled during drafted steps.
    more = engines[True].generate([prompt + engine.tokenizer.decode(want)], params, use_tqdm=False)[0]
    again = engines[False].generate([prompt + engine.tokenizer.decode(want)], params, use_tqdm=False)[0]
    assert more.num_cached_tokens >= 64 and more.outputs[0].token_ids == again.outputs[0].token_ids


def test_requests_with_penalties_or_grammars_do_not_draft(engines: dict[bool, LLM]) -> None:
    llm = engines[True]
    before = dict(llm.engine.get_stats()["spec_decode"])
    params = [SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputsParams(
                  choice=["apple, banana, apple, banana", "cherry"]))]
    got = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    assert llm.engine.get_stats()["spec_decode"]["num_drafts"] == before["num_drafts"]
    want = engines[False].generate(PROMPTS[:2], params, use_tqdm=False)
    assert summary(got) == summary(want)


def test_drafts_with_async_scheduling_equal_plain_outputs(real_model_dir: str, engines: dict[bool, LLM]) -> None:
    """Async scheduling stays on: drafts guessed past the token in flight, drafting requests sitting out a step."""
    llm = LLM(real_model_dir, max_model_len=512, cpu_kv_cache_gib=0.2, async_scheduling=True, speculative_config=SPEC)
    assert llm.engine.async_scheduling
    got = llm.generate(PROMPTS, mixed_params(), use_tqdm=False)
    assert summary(got) == summary(engines[False].generate(PROMPTS, mixed_params(), use_tqdm=False))
    stats = llm.engine.get_stats()
    assert 0 < stats["spec_decode"]["num_accepted_tokens"] < stats["spec_decode"]["num_draft_tokens"]
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_requests_whose_drafts_fail_back_off() -> None:
    """Drafted steps that keep nothing: from the third in a row, the request drafts again only after 2, 4, 8, ... (at
    most 64) more tokens."""
    from pagedserve.core.outputs import RunnerOutput
    from pagedserve.core.request import Request
    from pagedserve.core.scheduler import Scheduler

    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512, num_blocks=64, block_size=4,
                      enable_prefix_caching=True, proposer=NgramProposer(SpeculativeConfig.parse(SPEC)))
    request = Request("r", [1, 2, 3] * 5, SamplingParams(temperature=0.0), max_tokens=200)
    sched.add_request(request)
    # The "model": after a 1 comes a token never seen before, after anything else a 1. Drafts happen only after a 1
    # (the one token that recurs) and always guess a token seen before: every one is wrong.
    drafted_at, fresh = [], 1000
    while request.num_output_tokens < 120:
        out = sched.schedule()
        (step,) = out.scheduled
        drafts = step.draft_token_ids
        last = step.token_ids[len(step.token_ids) - 1 - len(drafts)]
        if drafts:
            drafted_at.append(request.num_output_tokens)
            assert last == 1 and drafts[0] != fresh + 1
        fresh += 1
        sample = fresh if last == 1 else 1
        sched.update(out, RunnerOutput([sample], [None], draft_samples=[[(7, None)] * len(drafts)] if drafts else None))
    # Gaps 2, 2, then 4, 6, 10, 18, 34 (a back-off of 2, 4, 8, 16, 32 tokens after the one kept, then to the next 1).
    assert drafted_at == [1, 3, 5, 9, 15, 25, 43, 77]
    assert sched.spec_stats.num_drafts == 8 and sched.spec_stats.num_accepted_tokens == 0
    assert request.num_computed_tokens == request.num_tokens - 1  # every rejected draft's position given back


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_drafts_under_preemption_equal_plain_outputs(real_model_dir: str, async_scheduling: bool) -> None:
    """A KV cache too small for every request at once: running requests are preempted (their blocks freed, recomputed
    later), some with a drafted step in flight (async), and the answers still equal a plain engine's."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs, stats = [], []
    for spec in (None, SPEC):
        llm = LLM(real_model_dir, max_model_len=256, num_kv_blocks=12, block_size=16, max_num_seqs=4,
                  async_scheduling=async_scheduling, speculative_config=spec)
        outs.append([o.outputs[0].token_ids for o in llm.generate(PROMPTS[:4], params, use_tqdm=False)])
        stats.append(llm.engine.get_stats())
    assert outs[0] == outs[1]
    assert stats[1]["num_preemptions"] > 0 and stats[1]["spec_decode"]["num_accepted_tokens"] > 0
    assert stats[1]["num_free_blocks"] == stats[1]["num_total_blocks"]


def test_no_drafts_while_more_requests_run_than_disable_by_batch_size(real_model_dir: str) -> None:
    spec = {**SPEC, "disable_by_batch_size": 2}
    llm = LLM(real_model_dir, max_model_len=256, cpu_kv_cache_gib=0.1, speculative_config=spec)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm.generate(PROMPTS[1:4], params, use_tqdm=False)  # three at once: no drafts till one ends (none does early)
    assert llm.engine.get_stats()["spec_decode"]["num_drafts"] == 0
    llm.generate(PROMPTS[1:3], params, use_tqdm=False)  # two: drafts
    assert llm.engine.get_stats()["spec_decode"]["num_drafts"] > 0


def test_bad_speculative_config_is_a_value_error(real_model_dir: str) -> None:
    with pytest.raises(ValueError, match="not yet supported"):
        LLM(real_model_dir, speculative_config={"method": "eagle", "num_speculative_tokens": 2})


def test_the_stats_line_reports_the_intervals_drafts() -> None:
    from pagedserve.engine_core import format_stats_line

    prev = {"spec_decode": {"num_drafts": 10, "num_draft_tokens": 40, "num_accepted_tokens": 20}}
    cur = {"spec_decode": {"num_drafts": 14, "num_draft_tokens": 56, "num_accepted_tokens": 32}}
    assert format_stats_line(prev, cur, 5.0).endswith(", drafts accepted: 75.0% (4.00 tokens a drafted step)")
    assert "drafts" not in format_stats_line(cur, cur, 5.0) and "drafts" not in format_stats_line({}, {}, 5.0)
