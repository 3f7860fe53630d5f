"""File datasets of the benches (bench/datasets.py file_requests): ShareGPT conversations and JSONL prompts, with
vLLM's length filter, seeded order, fixed output lengths and clear errors."""

from __future__ import annotations

import json

import pytest

from pagedserve.bench.datasets import file_requests


class WordTokenizer:
    """One token a word (a BOS with special tokens), enough to count lengths."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [len(w) + 2 for w in text.split()]


def sharegpt_file(tmp_path) -> str:
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    data = [
        {"conversations": [{"from": "human", "value": words(10)}, {"from": "gpt", "value": words(20)}]},
        {"conversations": [{"from": "human", "value": words(2)}, {"from": "gpt", "value": words(20)}]},  # short
        {"conversations": [{"from": "human", "value": words(10)}, {"from": "gpt", "value": words(3)}]},  # short
        {"conversations": [{"from": "human", "value": words(1500)}, {"from": "gpt", "value": words(5)}]},  # long
        {"conversations": [{"from": "human", "value": words(900)}, {"from": "gpt", "value": words(1200)}]},  # >2048
        {"conversations": [{"from": "human", "value": words(5)}]},  # one turn
        {"id": "x"},
        {"conversations": [{"from": "human", "value": words(30)}, {"from": "gpt", "value": words(7)},
                           {"from": "human", "value": words(4)}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_sharegpt_keeps_what_vllm_keeps(tmp_path) -> None:
    path = sharegpt_file(tmp_path)
    got = file_requests("sharegpt", path, 2, WordTokenizer(), seed=0)
    assert sorted((len(r.prompt_token_ids), r.output_len) for r in got) == [(11, 20), (31, 7)]
    again = file_requests("sharegpt", path, 2, WordTokenizer(), seed=0)
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in got]  # seeded order
    fixed = file_requests("sharegpt", path, 2, WordTokenizer(), seed=1, output_len=9)
    assert {r.output_len for r in fixed} == {9}
    with pytest.raises(ValueError, match="has 2 usable sharegpt entries"):
        file_requests("sharegpt", path, 3, WordTokenizer())


def test_custom_jsonl_and_errors(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a b c", "output_tokens": 5}\n\n{"prompt": "d e"}\n')
    got = file_requests("custom", str(path), 2, WordTokenizer(), output_len=12)
    assert sorted((len(r.prompt_token_ids), r.output_len) for r in got) == [(3, 12), (4, 5)]
    assert {r.output_len for r in file_requests("custom", str(path), 2, WordTokenizer())} == {5, 256}
    bad = tmp_path / "bad.jsonl"
    for text, words in (('{"text": "x"}\n', "no \"prompt\""), ('{"prompt": "x", "output_tokens": 0}\n', ">= 1"),
                        ("not json\n", "not JSONL")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=words):
            file_requests("custom", str(bad), 1, WordTokenizer())
    with pytest.raises(ValueError, match="dataset-path"):
        file_requests("sharegpt", str(tmp_path / "missing.json"), 1, WordTokenizer())
    (tmp_path / "obj.json").write_text("{}")
    with pytest.raises(ValueError, match="list of entries"):
        file_requests("sharegpt", str(tmp_path / "obj.json"), 1, WordTokenizer())
