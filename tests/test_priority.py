"""Priority scheduling through the offline API (scheduling_policy="priority", vLLM's): one sequence at a time, the
prompts run in priority order (ties: submission order), with the same answers as first come first served; what is
refused."""

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
