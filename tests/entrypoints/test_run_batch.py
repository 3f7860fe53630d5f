"""`pagedserve run-batch` (OpenAI's batch file format, offline) in a subprocess on the tiny random-weight Qwen2:
results in input order, answers equal to the offline API's on the same weights, the endpoints' refusals and the
lines that are not requests, each with its own result line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pagedserve.entrypoints.openai.run_batch import parse_request

pytestmark = pytest.mark.slow

PROMPTS = ["def fib(n):", "The capital of France is", "1, 2, 3,"]
CHAT = [{"role": "user", "content": "Tell me a joke."}]


def _line(custom_id, url: str, body: dict, method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def test_run_batch_answers_each_line_in_order(tiny_model_dir, tmp_path) -> None:
    from pagedserve import LLM, SamplingParams

    greedy = {"model": "tiny", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    lines = [_line(f"cmpl-{i}", "/v1/completions", {**greedy, "prompt": p}) for i, p in enumerate(PROMPTS)]
    lines += [
        _line("chat", "/v1/chat/completions", {**greedy, "messages": CHAT}),
        _line("emb", "/v1/embeddings", {"model": "tiny", "input": "hello world"}),
        _line("score", "/v1/score", {"model": "tiny", "text_1": "hello world", "text_2": ["hi", "bye"]}),
        _line("bad-max-tokens", "/v1/completions", {**greedy, "prompt": "x", "max_tokens": -1}),
        _line("wrong-model", "/v1/completions", {**greedy, "model": "gpt-4", "prompt": "x"}),
        _line("priority", "/v1/completions", {**greedy, "prompt": "x", "priority": 3}),  # fcfs: priority 0 only
        _line("bad-url", "/v1/moderations", {"input": "x"}),
        _line("stream", "/v1/completions", {**greedy, "prompt": "x", "stream": True}),
        _line("get", "/v1/completions", {**greedy, "prompt": "x"}, method="GET"),
        "not json",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),  # no custom_id
        "",  # a blank line: skipped
    ]
    out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "pagedserve.entrypoints.cli", "run-batch", "-i", "-", "-o", str(out),
         "--model", tiny_model_dir, "--load-format", "dummy", "--cpu-kv-cache-gib", "0.25",
         "--served-model-name", "tiny", "--max-concurrency", "3"],
        input="\n".join(lines), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run-batch: 14 requests, 6 answered 200, 8 refused" in proc.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [
        "cmpl-0", "cmpl-1", "cmpl-2", "chat", "emb", "score", "bad-max-tokens", "wrong-model", "priority", "bad-url",
        "stream", "get", None, None]  # (the blank line has no result)
    assert len({r["id"] for r in results}) == len(results)
    status = {r["custom_id"]: r["response"]["status_code"] for r in results if r["custom_id"]}
    assert status == {"cmpl-0": 200, "cmpl-1": 200, "cmpl-2": 200, "chat": 200, "emb": 200, "score": 200,
                      "bad-max-tokens": 400,
                      "wrong-model": 404, "priority": 400, "bad-url": 400, "stream": 400, "get": 400}

    # The answers are the offline API's on the same (seeded dummy) weights.
    llm = LLM(tiny_model_dir, load_format="dummy", cpu_kv_cache_gib=0.25)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    for i, text in enumerate(expected):
        body = results[i]["response"]["body"]
        assert body["choices"][0]["text"] == text and body["usage"]["completion_tokens"] == 6
        assert results[i]["response"]["request_id"] == body["id"] and results[i]["error"] is None
    chat = results[3]["response"]["body"]["choices"][0]["message"]["content"]
    assert chat == llm.chat(CHAT, params, use_tqdm=False)[0].outputs[0].text
    embedding = results[4]["response"]["body"]["data"][0]["embedding"]
    assert embedding == pytest.approx(llm.embed(["hello world"])[0].outputs.embedding, abs=1e-5)
    scores = [d["score"] for d in results[5]["response"]["body"]["data"]]
    assert scores == pytest.approx([o.outputs.score for o in llm.score("hello world", ["hi", "bye"])], abs=1e-5)
    results = results[:5] + results[6:]  # (the refusals below by their old places)

    # Refusals: the endpoint's error JSON as the body; lines that are not requests: `error`, no body.
    assert results[5]["response"]["body"]["error"]["param"] == "max_tokens" and results[5]["error"] is None
    assert results[6]["response"]["body"]["error"]["code"] == "model_not_found"
    assert results[7]["response"]["body"]["error"]["param"] == "priority"
    for r, words in zip(results[8:], ["url '/v1/moderations' is not supported", "stream is not supported",
                                      "method 'GET'", "not JSON", "custom_id must be"], strict=True):
        assert r["response"]["body"] is None and r["error"]["code"] == 400 and words in r["error"]["message"]


def test_an_unreadable_input_fails_before_the_model_loads(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pagedserve.entrypoints.cli", "run-batch", "-i", str(tmp_path / "missing.jsonl"),
         "-o", str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "no-such-model")],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cannot read the batch input" in proc.stderr and "No such file" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("line,message", [
    ('{"custom_id": "a", "url": "/v1/completions", "body": []}', "body must be a JSON object"),
    ('{"custom_id": "", "url": "/v1/completions", "body": {}}', "custom_id must be a non-empty string"),
    ('[1, 2]', "must be a JSON object with custom_id"),
])
def test_lines_that_are_not_requests(line: str, message: str) -> None:
    request, error = parse_request(line)
    assert request is None and message in error["error"]["message"]
    assert error["response"]["status_code"] == 400
    good = parse_request('{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}}')
    assert good[1] is None and good[0]["body"] == {"prompt": "x"}  # method defaults to POST
