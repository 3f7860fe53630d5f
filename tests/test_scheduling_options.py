"""Scheduling options through the offline API: priority scheduling (scheduling_policy="priority", vLLM's): one
sequence at a time, the prompts run in priority order (ties: submission order), with the same answers as first come
first served, and what is refused; long_prefill_token_threshold (chunks of a long prompt beside a short one)."""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams

PROMPTS = ["one", "two", "three", "four", "five"]


def test_prompts_run_in_priority_order(tiny_model_dir) -> None:
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    llm = LLM(tiny_model_dir, load_format="dummy", cpu_kv_cache_gib=0.25, max_num_seqs=1, scheduling_policy="priority")
    outs = llm.generate(PROMPTS, params, use_tqdm=False, priority=[3, 0, 2, 0, -1])
    started = sorted(range(len(PROMPTS)), key=lambda i: outs[i].metrics.first_scheduled_time)
    assert started == [4, 1, 3, 2, 0]
    fcfs = LLM(tiny_model_dir, load_format="dummy", cpu_kv_cache_gib=0.25, max_num_seqs=1)
    reference = fcfs.generate(PROMPTS, params, use_tqdm=False)
    started = sorted(range(len(PROMPTS)), key=lambda i: reference[i].metrics.first_scheduled_time)
    assert started == [0, 1, 2, 3, 4]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]
    # fcfs takes priority 0 only; the priorities must match the prompts and be integers
    with pytest.raises(ValueError, match="priority 1 needs the priority scheduling policy"):
        fcfs.generate(PROMPTS[:2], params, use_tqdm=False, priority=[0, 1])
    with pytest.raises(ValueError, match="got 1 priorities for 2 prompts"):
        llm.generate(PROMPTS[:2], params, use_tqdm=False, priority=[0])
    with pytest.raises(ValueError, match="priority must be an integer"):
        llm.generate(PROMPTS[:1], params, use_tqdm=False, priority=[0.5])
    assert fcfs.engine.get_stats()["num_free_blocks"] == fcfs.engine.get_stats()["num_total_blocks"]
    with pytest.raises(ValueError, match="scheduling_policy must be one of"):
        LLM(tiny_model_dir, load_format="dummy", scheduling_policy="lifo")


def test_long_prefill_token_threshold_chunks_a_long_prompt(tiny_model_dir) -> None:
    """A 40-token and a 5-token prompt in a 64-token step: without a threshold both prefill in the first step; with
    8 the long one takes 5 steps of 8 tokens and the short one is done in the first, with the same answers."""
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3, 43))}, {"prompt_token_ids": [7, 8, 9, 10, 11]}]
    answers, steps = {}, {}
    for threshold in (None, 8):
        llm = LLM(tiny_model_dir, load_format="dummy", cpu_kv_cache_gib=0.25, max_num_batched_tokens=64,
                  long_prefill_token_threshold=threshold)
        scheduled: list[list[int]] = []
        schedule = llm.engine.scheduler.schedule

        def counted(schedule=schedule, scheduled=scheduled):
            out = schedule()
            if out.scheduled:
                scheduled.append([len(s.token_ids) for s in out.scheduled])
            return out

        llm.engine.scheduler.schedule = counted
        answers[threshold] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        steps[threshold] = scheduled
    assert answers[None] == answers[8]
    assert steps[None] == [[40, 5]]
    assert steps[8] == [[8, 5], [8], [8], [8], [8]]
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be >= 1"):
        LLM(tiny_model_dir, load_format="dummy", long_prefill_token_threshold=0)


def test_cache_salt_separates_prefix_caches(tiny_model_dir) -> None:
    """vLLM's cache_salt: a request reuses cached prompt blocks only from requests with the same salt (none is a
    namespace of its own); the answers are the same."""
    llm = LLM(tiny_model_dir, load_format="dummy", cpu_kv_cache_gib=0.25, block_size=4)
    engine = llm.engine
    prompt = list(range(3, 40))
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    def run(request_id: str, salt: str | None) -> tuple[list[int], int]:
        hits = engine.get_stats()["prefix_cache_hits"]
        engine.add_request(request_id, prompt, params, cache_salt=salt)
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens = out.outputs[0].token_ids
        return tokens, engine.get_stats()["prefix_cache_hits"] - hits

    first, hits = run("a", "tenant-1")
    assert hits == 0
    assert run("b", "tenant-2")[1] == 0 and run("c", None)[1] == 0  # other namespaces: no hit
    again, hits = run("d", "tenant-1")
    assert hits == 36 and again == first  # the same salt: all full blocks of the prompt
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        engine.add_request("e", prompt, params, cache_salt="")


def test_offline_cache_salt_in_a_prompt_dict(tiny_model_dir) -> None:
    """LLM.generate takes vLLM's {"prompt_token_ids": ..., "cache_salt": ...}: another salt reuses nothing."""
    llm = LLM(tiny_model_dir, load_format="dummy", cpu_kv_cache_gib=0.25, block_size=4)
    params = SamplingParams(max_tokens=1, temperature=0)
    ids = list(range(3, 23))
    llm.generate([{"prompt_token_ids": ids, "cache_salt": "a"}], params, use_tqdm=False)
    hits = llm.engine.get_stats()["prefix_cache_hits"]
    llm.generate([{"prompt_token_ids": ids, "cache_salt": "b"}], params, use_tqdm=False)
    assert llm.engine.get_stats()["prefix_cache_hits"] == hits
    llm.generate([{"prompt_token_ids": ids, "cache_salt": "a"}], params, use_tqdm=False)
    assert llm.engine.get_stats()["prefix_cache_hits"] == hits + 16
