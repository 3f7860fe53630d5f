"""Prompt logprobs (SamplingParams.prompt_logprobs, the server's echo + logprobs) on the real embedded model,
fp32 on CPU, against Transformers: chunked prefill, batches that mix them with other requests, prefix caching,
n > 1, preemption, async scheduling. (Tensor parallelism: tests/executor/test_tensor_parallel.py.)"""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams

PROMPT = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n"
          "    return fibonacci(n - 1) + fibonacci(n - 2)\n")


@pytest.fixture(scope="module")
def llm(real_model_dir: str) -> LLM:
    # A 16-token budget: the ~40-token prompt spans three chunks, each giving its own rows.
    return LLM(real_model_dir, max_model_len=512, cpu_kv_cache_gib=0.25, max_num_batched_tokens=16,
               enable_prefix_caching=True)


@pytest.fixture(scope="module")
def hf_logprobs(real_model_dir: str):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return run


def assert_matches_hf(prompt_ids: list[int], entries: list, ref: torch.Tensor, k: int) -> None:
    assert len(entries) == len(prompt_ids) and entries[0] is None
    for p in range(1, len(prompt_ids)):
        e, row = entries[p], ref[p - 1]
        assert e.token_id == prompt_ids[p]
        assert e.logprob == pytest.approx(row[prompt_ids[p]].item(), abs=1e-4)
        assert e.rank == int((row > row[prompt_ids[p]]).sum()) + 1
        top_lp, top_ids = row.topk(k)
        assert [lp for _, lp in e.top] == pytest.approx(top_lp.tolist(), abs=1e-4)
        assert [t for t, _ in e.top] == top_ids.tolist()


def test_prompt_logprobs_equal_transformers_over_chunks_beside_other_requests(llm: LLM, hf_logprobs) -> None:
    """Every prompt token's logprob, rank and top 3 equal Transformers' log-softmax of the position before it,
    with the prompt computed in three chunks beside a request that asks nothing (and one with k = 0)."""
    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(PROMPT)
    assert len(ids) > 32
    asks = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=3, logprobs=1)
    plain = SamplingParams(max_tokens=6, temperature=0)
    zero = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids}, "Hello there, how", {"prompt_token_ids": ids[:20]}],
                        [asks, plain, zero], use_tqdm=False)
    ref = hf_logprobs(ids)
    assert_matches_hf(ids, outs[0].prompt_logprobs, ref, 3)
    assert outs[1].prompt_logprobs is None
    assert [e and (e.token_id, round(e.logprob, 3), e.top) for e in outs[2].prompt_logprobs] == \
        [e and (e.token_id, round(e.logprob, 3), []) for e in outs[0].prompt_logprobs[:20]]
    # The generated tokens are the same as without prompt logprobs.
    again = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_prompt_logprobs_skip_the_prefix_cache_and_n_computes_them_once(llm: LLM, hf_logprobs) -> None:
    """A cached prompt cannot give its logits: a request asking for prompt logprobs computes its whole prompt,
    and its prompt blocks serve later requests as usual. With n = 2 the first choice computes them."""
    ids = llm.get_tokenizer().encode(PROMPT)
    llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)  # caches the prompt
    stats = llm.engine.get_stats()
    params = SamplingParams(n=2, max_tokens=3, temperature=0, prompt_logprobs=1)
    (out,) = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    assert_matches_hf(ids, out.prompt_logprobs, hf_logprobs(ids), 1)
    assert out.outputs[0].token_ids == out.outputs[1].token_ids  # greedy
    after = llm.engine.get_stats()
    # The second choice hit the cached prompt (all but its last partial block); the first computed it all.
    hits = after["prefix_cache_hits"] - stats["prefix_cache_hits"]
    assert hits == (len(ids) - 1) // 16 * 16
    (later,) = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)
    assert later.num_cached_tokens == (len(ids) - 1) // 16 * 16


def test_prompt_logprobs_survive_preemption_and_async_scheduling(real_model_dir: str, hf_logprobs) -> None:
    """A KV cache too small for the batch preempts requests (recomputed from scratch); async scheduling queues
    the next step before the last one's tokens are known. The prompt logprobs equal Transformers' either way."""
    tokenizer_llm = None
    prompts = [f"Count from {i} to {i + 30}, separated by commas:" for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    for kwargs in ({"num_kv_blocks": 8}, {"async_scheduling": True}):
        small = LLM(real_model_dir, max_model_len=256, max_num_batched_tokens=32, **kwargs)
        tokenizer_llm = tokenizer_llm or small
        outs = small.generate(prompts, params, use_tqdm=False)
        if "num_kv_blocks" in kwargs:
            assert small.engine.get_stats()["num_preemptions"] > 0
        for out in outs:
            assert_matches_hf(out.prompt_token_ids, out.prompt_logprobs, hf_logprobs(out.prompt_token_ids), 1)
            assert len(out.outputs[0].token_ids) == 24


def test_logprobs_read_as_vllm_dicts_of_logprob(llm: LLM, hf_logprobs) -> None:
    """vLLM's offline shape: each position of `outputs[0].logprobs` and `prompt_logprobs` is a dict[int, Logprob]
    (the token itself first, then its alternatives most likely first, the token once), each Logprob's logprob,
    rank and decoded_token as Transformers' log-softmax and the tokenizer give them."""
    from pagedserve.outputs import Logprob

    tokenizer = llm.get_tokenizer()
    ids = tokenizer.encode(PROMPT)[:24]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=11, logprobs=3, prompt_logprobs=2)
    (out,) = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    generated = out.outputs[0].token_ids
    ref = hf_logprobs(ids + generated)
    positions = [(ids[p], ref[p - 1], out.prompt_logprobs[p], 2) for p in range(1, len(ids))]
    positions += [(tok, ref[len(ids) - 1 + i], out.outputs[0].logprobs[i], 3) for i, tok in enumerate(generated)]
    assert out.prompt_logprobs[0] is None
    seen_extra = 0
    for token_id, row, entry, k in positions:
        top_ids = row.topk(k).indices.tolist()
        expected_keys = [token_id] + [t for t in top_ids if t != token_id]
        assert list(entry) == expected_keys and len(entry) == len(expected_keys)
        seen_extra += len(entry) == k + 1
        for key, value in entry.items():
            assert isinstance(value, Logprob)
            assert value.logprob == pytest.approx(row[key].item(), abs=1e-4)
            assert value.rank == int((row > row[key]).sum()) + 1
            assert value.decoded_token == tokenizer.decode([key], skip_special_tokens=False)
        assert entry[token_id].logprob == entry.logprob and token_id in entry
        assert 10**9 not in entry and entry.get(10**9) is None
    assert seen_extra > 0  # some sampled or prompt tokens were outside the top k: k + 1 entries there
    assert out.outputs[0].cumulative_logprob == pytest.approx(
        sum(out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(generated)), abs=1e-4)


@pytest.mark.parametrize("value", [-1, 21, True, 1.5, "2"])
def test_bad_prompt_logprobs_are_value_errors(value) -> None:
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
