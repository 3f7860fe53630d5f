"""vLLM's bad_words through the engine (the tiny random-weight Qwen2 with the real tokenizer): a banned one-token word
never comes, a banned two-token word's last token is refused right after its first (and only there), the same with
async scheduling (such requests step one at a time), words tokenized as vLLM does; bad values refused."""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llms(tiny_model_dir):
    return [LLM(tiny_model_dir, load_format="dummy", cpu_kv_cache_gib=0.25, async_scheduling=mode)
            for mode in (False, True)]


def _greedy(llm: LLM, prompt: list[int], **kw) -> list[int]:
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, **kw)
    return llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("mode", [0, 1], ids=["sync", "async"])
def test_banned_words_are_not_generated(llms, mode) -> None:
    llm = llms[mode]
    prompt = [9, 10, 11, 12]
    ref = _greedy(llm, prompt)
    one = _greedy(llm, prompt, bad_words_token_ids=[[ref[2]]])
    assert one[:2] == ref[:2] and ref[2] not in one
    pair = _greedy(llm, prompt, bad_words_token_ids=[[ref[1], ref[2]]])
    assert pair[:2] == ref[:2] and pair[2] != ref[2]
    assert all(pair[i:i + 2] != ref[1:3] for i in range(len(pair) - 1))
    assert _greedy(llm, prompt, bad_words_token_ids=[[ref[0] + 1, ref[1]]])[:2] == ref[:2]  # the prefix differs
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_words_are_tokenized_as_vllm_does(llms) -> None:
    llm = llms[0]
    tok = llm.get_tokenizer()
    ids = llm.engine._bad_words_ids(["  hello world", "x"])
    expected = [tok.encode(text, add_special_tokens=False) for text in ("hello world", " hello world", "x", " x")]
    assert ids == [seq for i, seq in enumerate(expected) if seq not in expected[:i]]
    text_ref = _greedy(llm, [5, 6, 7])
    word = tok.decode(text_ref[:1])
    banned = _greedy(llm, [5, 6, 7], bad_words=[word])
    assert text_ref[0] not in banned[:1]


@pytest.mark.parametrize("value", ["word", [""], [1, 2]])
def test_bad_values_are_refused(value) -> None:
    with pytest.raises(ValueError, match="bad_words must be a list of non-empty strings"):
        SamplingParams(bad_words=value)
