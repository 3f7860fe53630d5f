"""The server in a subprocess on the real embedded model, driven by the official openai client
(sync and async) and raw httpx. Issue 3 acceptance 1, 2, 4, 6 (graceful SIGTERM) and 7.

One module-scoped server serves every test; the SIGTERM test runs last and stops it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from tests.entrypoints.conftest import REPO_ROOT, RealServer

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]


@pytest.fixture(scope="module")
def server(real_model_dir):
    s = RealServer(real_model_dir, "--max-model-len", "1024", "--cpu-kv-cache-gib", "0.5", "--shutdown-timeout", "60")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_tokenizer(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric(server, name: str) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# --------------------------------------------------------------------------- acceptance 1
def test_chat_sync_usage_matches_tokenizer(client, model, hf_tokenizer) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0)
    expected_prompt = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected_prompt, list):  # newer transformers return a BatchEncoding
        expected_prompt = expected_prompt["input_ids"]
    assert r.usage.prompt_tokens == len(expected_prompt)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completions_usage_and_prompt_forms(client, model, hf_tokenizer) -> None:
    text = "def fibonacci(n):"
    ids = hf_tokenizer.encode(text)
    r = client.completions.create(model=model, prompt=text, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 4
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    multi = client.completions.create(model=model, prompt=[ids, ids[:3]], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text == r.choices[0].text[: len(multi.choices[0].text)]
    assert multi.usage.prompt_tokens == len(ids) + 3 and multi.usage.completion_tokens == 12
    echo = client.completions.create(model=model, prompt=text, max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text == text + r.choices[0].text


def test_echo_logprobs_score_continuations_as_lm_eval_does(client, model, hf_tokenizer, real_model_dir) -> None:
    """lm-eval-harness's loglikelihood request (token-id prompts, echo, logprobs 1, max_tokens 1): the sums of
    the continuations' token_logprobs equal Transformers' fp32 log-likelihoods, and the likelier answer wins.
    max_tokens 0 returns the prompt alone, with the same logprobs."""
    from transformers import AutoModelForCausalLM

    context = hf_tokenizer.encode("The capital of France is")
    answers = [hf_tokenizer.encode(" Paris"), hf_tokenizer.encode(" a banana split")]
    prompts = [context + a for a in answers]
    r = client.completions.create(model=model, prompt=prompts, max_tokens=1, echo=True, logprobs=1, temperature=0)
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    scores = []
    for choice, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts, strict=True):
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        expected = sum(ref[p - 1, ids[p]].item() for p in range(len(context), len(ids)))
        got = sum(lp.token_logprobs[len(context):-1])  # lm-eval's slice: the continuation, not the new token
        assert got == pytest.approx(expected, abs=1e-3)
        scores.append(got)
        is_greedy = all(t == max(top.values()) for t, top in zip(lp.token_logprobs[len(context):-1],
                                                                 lp.top_logprobs[len(context):-1]))
        assert is_greedy == (ids is prompts[0])
    assert scores[0] > scores[1]
    only = client.completions.create(model=model, prompt=prompts[0], max_tokens=0, echo=True, logprobs=1)
    assert len(only.choices[0].logprobs.tokens) == len(prompts[0]) and only.usage.completion_tokens == 0
    assert only.choices[0].logprobs.token_logprobs[0] is None
    assert only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        r.choices[0].logprobs.token_logprobs[1:-1], abs=1e-4)


def test_a_stop_token_that_ends_a_request_is_not_in_its_text(client, model, hf_tokenizer) -> None:
    """The server side makes these texts (engine_process.DeltaDecoder): vLLM's rule as offline (test_llm.py),
    whole and streamed."""
    chat = [{"role": "user", "content": "Say hi."}]
    bang = hf_tokenizer.encode("!")
    cases = [({"skip_special_tokens": False}, "Hello! How can I assist you today?"),
             ({"skip_special_tokens": False, "include_stop_str_in_output": True},
              "Hello! How can I assist you today?<|im_end|>"),
             ({"stop_token_ids": bang}, "Hello"),
             ({"stop_token_ids": bang, "include_stop_str_in_output": True}, "Hello!")]
    for extra, expected in cases:
        r = client.chat.completions.create(model=model, messages=chat, max_tokens=40, temperature=0, extra_body=extra)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop"), extra
        stream = client.chat.completions.create(model=model, messages=chat, max_tokens=40, temperature=0,
                                                extra_body=extra, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected, extra


def test_chat_stream_equals_non_stream(client, model) -> None:
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_async_client_concurrent_stream_and_non_stream(server, model) -> None:
    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)

        async def streamed(prompt):
            s = await client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0, stream=True)
            return "".join([c.choices[0].text async for c in s if c.choices])

        async def whole(prompt):
            r = await client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0)
            return r.choices[0].text

        prompts = ["import numpy as np\n", "The capital of France is", "# sort a list\n", "SELECT * FROM"]
        return await asyncio.gather(*(streamed(p) for p in prompts)), await asyncio.gather(*(whole(p) for p in prompts))

    streamed, whole = asyncio.run(main())
    assert streamed == whole and all(whole)


def test_n3_stream_by_index_matches_non_stream(server, client, model) -> None:
    kwargs = dict(model=model, messages=MESSAGES, max_tokens=6, temperature=0.8, seed=7, n=3)
    full = client.chat.completions.create(**kwargs)
    assert sorted(c.index for c in full.choices) == [0, 1, 2]
    with httpx.stream(
        "POST", server.base_url + "/v1/chat/completions", json={**kwargs, "stream": True}, timeout=120
    ) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
    assert texts == {c.index: c.message.content for c in full.choices}
    num_length = sum(c.finish_reason == "length" for c in full.choices)
    assert 6 * num_length + 1 * (3 - num_length) <= full.usage.completion_tokens <= 18  # all three choices


def test_stop_string(client, model) -> None:
    base = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert "6" in text, text
    stopped = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=["6"])
    assert stopped.choices[0].text == text[: text.index("6")]
    assert stopped.choices[0].finish_reason == "stop"


def test_allowed_token_ids_limit_what_is_sampled(client, model, hf_tokenizer) -> None:
    """vLLM's allowed_token_ids (extra_body in the official client): hot sampling draws only those tokens."""
    allowed = hf_tokenizer.encode(" yes no maybe")
    r = client.completions.create(model=model, prompt="Is the sky blue? Answer:", max_tokens=12, temperature=1.5,
                                  seed=7, logprobs=0, extra_body={"allowed_token_ids": allowed})
    pieces = r.choices[0].logprobs.tokens  # each sampled token's text
    assert len(pieces) == 12 and set(pieces) <= {hf_tokenizer.decode([t]) for t in allowed}, pieces
    assert len(set(pieces)) > 1  # hot sampling: not one forced token


def test_seed_reproducibility(client, model) -> None:
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": "Name a random animal."}],
        max_tokens=8,
        temperature=1.0,
        top_p=0.95,
    )
    a = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    assert a == b


def test_logprobs_and_top_logprobs(client, model) -> None:
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely
        assert abs(entry.logprob - tops[0]) < 1e-4
    if r.choices[0].finish_reason == "length":
        assert bytes(b for e in content for b in e.bytes).decode() == r.choices[0].message.content
    c = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(t) >= 2 for t in lp.top_logprobs)


# --------------------------------------------------------------------------- acceptance 2
INVALID = [
    ("bad JSON", "/v1/chat/completions", b'{"messages": [{"role": "user"', None),
    ("wrong type", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, None),
    ("empty messages", "/v1/chat/completions", {"messages": []}, "messages"),
    ("negative max_tokens", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": -5}, "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 10**6}, "max_tokens"),
    ("n=0", "/v1/chat/completions", {"messages": MESSAGES, "n": 0}, "n"),
    ("n too large", "/v1/chat/completions", {"messages": MESSAGES, "n": 129}, "n"),
    ("temperature -1", "/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, "temperature"),
    ("top_p 2", "/v1/chat/completions", {"messages": MESSAGES, "top_p": 2}, "top_p"),
    ("logprobs 50", "/v1/completions", {"prompt": "a", "logprobs": 50}, "logprobs"),
    (
        "top_logprobs 50",
        "/v1/chat/completions",
        {"messages": MESSAGES, "logprobs": True, "top_logprobs": 50},
        "top_logprobs",
    ),
    ("prompt over the context", "/v1/completions", {"prompt": "hello " * 1100, "max_tokens": 1}, "prompt"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-17", "messages": MESSAGES}, "model"),
    ("beam search logprobs", "/v1/completions", {"prompt": "a", "use_beam_search": True, "logprobs": 1},
     "logprobs"),
    ("beam search n 11", "/v1/chat/completions", {"messages": MESSAGES, "use_beam_search": True, "n": 11}, "n"),
    ("beam search too long", "/v1/completions",
     {"prompt": "a", "use_beam_search": True, "stream": True, "max_tokens": 5000}, "max_tokens"),
    ("beam search json", "/v1/chat/completions",
     {"messages": MESSAGES, "use_beam_search": True, "response_format": {"type": "json_object"}}, "response_format"),
    # Lone surrogates ("\ud800" alone in JSON) cannot be tokenized: 400s, not 500s; in bad_words (tokenized in the
    # engine process) one used to stop the engine for good.
    ("surrogate chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi\ud800"}]}, None),
    ("surrogate completions", "/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}, None),
    ("surrogate suffix", "/v1/completions", {"prompt": "a", "suffix": "\ud800", "max_tokens": 2}, None),
    ("surrogate bad_words", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "bad_words": ["\ud800"]},
     None),
    ("surrogate tokenize", "/tokenize", {"prompt": "\udfff"}, None),
    ("surrogate stop", "/v1/completions", {"prompt": "a", "max_tokens": 2, "stop": ["\ud800"]}, "stop"),
    ("surrogate choice", "/v1/completions", {"prompt": "a", "max_tokens": 2, "guided_choice": ["\ud800"]}, None),
    ("surrogate embeddings", "/v1/embeddings", {"input": "x\ud800"}, None),
    ("surrogate responses", "/v1/responses", {"input": "hi\ud800", "max_output_tokens": 2}, None),
    ("tool call function string", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": "f"}]}]}, None),
    ("tool call function number", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": 5}]}]}, None),
    ("repetition_penalty 1e-300", "/v1/completions", {"prompt": "a", "repetition_penalty": 1e-300},
     "repetition_penalty"),
]


@pytest.mark.parametrize("name,path,body,param", INVALID, ids=[i[0] for i in INVALID])
def test_invalid_input(server, name, path, body, param) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.base_url + path, content=content, headers={"content-type": "application/json"})
    status = 404 if name == "unknown model" else 400
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if name == "huge max_tokens":
        assert "1024" in err["message"] and str(10**6) in err["message"]
    if name == "prompt over the context":
        assert "1024" in err["message"]
    if name.startswith("surrogate"):
        assert "surrogate" in err["message"], err
    if name.startswith("tool call"):
        assert "tool_calls[0]" in err["message"], err
    ok = httpx.post(server.base_url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


def test_extreme_length_penalty_and_contradicting_constraints(server) -> None:
    """A beam search's length_penalty of +-1e308 (the scores overflow / underflow) answers; constraints that leave no
    token (a chosen answer complete with min_tokens to go; the only allowed token banned) end the answer at its stop
    token instead of sampling a masked one (token 0, "!")."""
    for route, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        for penalty in (1e308, -1e308):
            r = httpx.post(server.base_url + route, timeout=120,
                           json={**body, "max_tokens": 3, "use_beam_search": True, "n": 2, "length_penalty": penalty})
            assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    r = httpx.post(server.base_url + "/v1/completions", timeout=120,
                   json={"prompt": "x", "max_tokens": 8, "guided_choice": ["yes"], "min_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "yes", r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    tokenize = httpx.post(server.base_url + "/tokenize", json={"prompt": "a", "add_special_tokens": False}).json()
    r = httpx.post(server.base_url + "/v1/completions", timeout=120,
                   json={"prompt": "x", "max_tokens": 4, "allowed_token_ids": tokenize["tokens"], "bad_words": ["a"]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "", r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_beam_search_completions_and_chat(client, model) -> None:
    """vLLM's use_beam_search (an extra body field for the official client): n beams, the n best answers."""
    prompt = "The capital of France is"
    beams = client.completions.create(model=model, prompt=prompt, max_tokens=6, n=3,
                                      extra_body={"use_beam_search": True})
    assert [c.index for c in beams.choices] == [0, 1, 2]
    assert len({c.text for c in beams.choices}) == 3 and all(c.text for c in beams.choices)
    assert all(c.finish_reason in ("stop", "length") for c in beams.choices)
    assert beams.usage.completion_tokens <= 18 and beams.usage.prompt_tokens > 0
    # One beam is greedy decoding (no EOS within these 6 tokens)
    one = client.completions.create(model=model, prompt=prompt, max_tokens=6, n=1, extra_body={"use_beam_search": True})
    greedy = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
    assert one.choices[0].text == greedy.choices[0].text
    # Two prompts: choice index = prompt index * n + beam
    two = client.completions.create(model=model, prompt=[prompt, "1, 2, 3,"], max_tokens=3, n=2,
                                    extra_body={"use_beam_search": True})
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text in {c.text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=3, n=2, extra_body={"use_beam_search": True}).choices}
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, n=2,
                                          extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.message.content for c in chat.choices)
    assert chat.usage.completion_tokens <= 10
    # Streamed as vLLM streams it: each choice whole once the search ends, then the usage chunk when asked.
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=6, n=3, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"use_beam_search": True}))
    assert [c.choices[0].text for c in chunks if c.choices] == [c.text for c in beams.choices]
    assert chunks[-1].usage.completion_tokens == beams.usage.completion_tokens
    chat_chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, n=2, stream=True,
                                                      extra_body={"use_beam_search": True, "length_penalty": 0.5}))
    assert [c.choices[0].delta.content for c in chat_chunks] == [c.message.content for c in chat.choices]
    assert [c.choices[0].finish_reason for c in chat_chunks] == [c.finish_reason for c in chat.choices]


# --------------------------------------------------------------------------- acceptance 4
def test_dropped_streams_free_the_kv_cache(server, model) -> None:
    async def one(client: httpx.AsyncClient, i: int, drop: bool):
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Count from {i} upwards."}],
            "max_tokens": 16,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            text, finish, done, n = "", None, False, 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    text += delta
                    n += 1
                    if drop and n == 3:
                        return None  # leaving the block closes the connection mid-stream
                finish = chunk["choices"][0]["finish_reason"] or finish
            return text, finish, done

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i, drop=i % 2 == 0) for i in range(20)))

    results = asyncio.run(main())
    kept = [r for i, r in enumerate(results) if i % 2 == 1]
    assert all(r is not None and r[0] and r[1] == "length" and r[2] for r in kept), kept
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        metric(server, "pagedserve:kv_cache_usage_perc") > 0 or metric(server, "pagedserve:num_requests_running") > 0
    ):
        time.sleep(0.2)
    assert metric(server, "pagedserve:kv_cache_usage_perc") == 0
    assert metric(server, "pagedserve:num_requests_running") == 0
    assert metric(server, "pagedserve:num_requests_waiting") == 0
    assert metric(server, "pagedserve:num_free_kv_blocks") == metric(server, "pagedserve:num_total_kv_blocks")


# --------------------------------------------------------------------------- acceptance 7
def test_load_test_example_runs_unchanged(server, model) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "load_test.py"),
            "--base-url",
            server.base_url + "/v1",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "total time:" in out.stdout, out.stdout
    assert "completion tokens: 400" in out.stdout, out.stdout  # 100 answers of exactly 4 tokens (ignore_eos)
    print(out.stdout)
    assert metric(server, "pagedserve:time_to_first_token_seconds_count") >= 100
    assert metric(server, "pagedserve:e2e_request_latency_seconds_count") >= 100


def test_metrics_and_stats_line(server) -> None:
    assert metric(server, "pagedserve:generation_tokens_total") > 0
    assert metric(server, "pagedserve:prompt_tokens_total") > 0
    assert metric(server, "pagedserve:prefix_cache_hits_total") > 0  # the shared chat system prompt
    assert "generation:" in server.output() and "tokens/s" in server.output()


def test_tokenize_and_detokenize_agree_with_the_tokenizer_and_the_chat_route(server, client, model,
                                                                              hf_tokenizer) -> None:
    """vLLM's /tokenize and /detokenize: a prompt's ids are the tokenizer's, chat messages count exactly the
    prompt tokens a chat completion reports, and ids decode back to the text."""
    url = server.base_url
    text = "The quick brown fox: 狐狸 🦊"
    r = httpx.post(url + "/tokenize", json={"model": model, "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == hf_tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024
    assert body["token_strs"] == hf_tokenizer.convert_ids_to_tokens(body["tokens"])
    chat = httpx.post(url + "/tokenize", json={"messages": MESSAGES}).json()
    usage = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens and chat["token_strs"] is None
    expected = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert httpx.post(url + "/detokenize", json={"tokens": chat["tokens"]}).json() == {"prompt": expected}
    assert httpx.post(url + "/detokenize", json={"model": model, "tokens": body["tokens"]}).json()["prompt"] == text
    bad = httpx.post(url + "/detokenize", json={"tokens": [1, -3]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(url + "/tokenize", json={"model": "gpt-9", "prompt": "a"}).status_code == 404
    assert httpx.get(url + "/health").status_code == 200


def test_completion_suffix_fills_in_the_middle(client, model, real_model_dir) -> None:
    """suffix: the embedded Qwen2.5-Coder gets its own FIM prompt (<|fim_prefix|> ... <|fim_suffix|> ...
    <|fim_middle|>): the answer equals a completion of those token ids, and the usage counts them."""
    from pagedserve.tokenizer import load_tokenizer

    prefix, suffix = "def fib(n):\n    ", "\n\nprint(fib(10))\n"
    r = client.completions.create(model=model, prompt=prefix, suffix=suffix, max_tokens=24, temperature=0)
    ids = load_tokenizer(real_model_dir).fim_ids(prefix, suffix)
    same = client.completions.create(model=model, prompt=ids, max_tokens=24, temperature=0)
    assert r.choices[0].text == same.choices[0].text and r.choices[0].text.strip()
    assert r.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError, match="text prompts"):
        client.completions.create(model=model, prompt=[1, 2, 3], suffix="x", max_tokens=2)


# --------------------------------------------------------------------------- the Responses API
def test_responses_equal_chat_for_the_same_conversation(client, model) -> None:
    """/v1/responses through the official client: `instructions` + `input` parts are the chat route's system +
    user messages, so greedy text, finish and usage equal a chat completion's."""
    chat = client.chat.completions.create(
        model=model, max_tokens=24, temperature=0,
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name two planets."}])
    r = client.responses.create(
        model=model, instructions="Answer briefly.", max_output_tokens=24, temperature=0,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Name two "},
                                            {"type": "input_text", "text": "planets."}]}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == model
    assert r.output_text == chat.choices[0].message.content
    assert r.output[-1].type == "message" and r.output[-1].role == "assistant"
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == chat.usage.total_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    s = client.responses.create(model=model, input="Name two planets.", max_output_tokens=24, temperature=0)
    plain = client.chat.completions.create(model=model, max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": "Name two planets."}])
    assert s.output_text == plain.choices[0].message.content  # a string input is one user message


def test_responses_incomplete_at_max_output_tokens(client, model) -> None:
    r = client.responses.create(model=model, input="Count from one to a hundred.", max_output_tokens=5,
                                temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output_text


def test_responses_stream_events_add_up(client, model) -> None:
    """stream=true: the API's typed events in order, numbered; the text deltas add up to the final response's text,
    which equals the non-streamed one."""
    kwargs = dict(model=model, input="Write one sentence about rivers.", max_output_tokens=20, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_responses_json_schema_format(client, model) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    r = client.responses.create(model=model, input="Name the capital of France as JSON.", temperature=0,
                                max_output_tokens=40,
                                text={"format": {"type": "json_schema", "name": "capital", "schema": schema}})
    assert set(json.loads(r.output_text)) == {"city"}


def test_responses_previous_response_id_continues_the_conversation(client, model) -> None:
    """A second turn through previous_response_id answers as the chat route does given the whole conversation."""
    first = client.responses.create(model=model, input="My name is Ada. Say hello.", max_output_tokens=12,
                                    temperature=0)
    second = client.responses.create(model=model, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(model=model, max_tokens=12, temperature=0, messages=[
        {"role": "user", "content": "My name is Ada. Say hello."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"}])
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens


def test_responses_named_function_call(client, model) -> None:
    """A named tool_choice forces the call through structured outputs: a function_call item whose arguments
    parse as the tool's parameters."""
    tools = [{"type": "function", "name": "get_weather", "description": "the weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                             "additionalProperties": False}}]
    r = client.responses.create(model=model, input="What is the weather in Oslo?", tools=tools, temperature=0,
                                tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather", r.output
    assert set(json.loads(calls[0].arguments)) == {"city"}


def test_responses_logprobs_equal_chat_logprobs(client, model) -> None:
    """include ["message.output_text.logprobs"] + top_logprobs: the output text's tokens with their logprobs and
    alternatives, as the chat route gives them for the same conversation; streamed, the text deltas carry the same
    entries in order (all but a final stop token, which has no text), and the done event all of them."""
    messages = [{"role": "user", "content": "Name three colors."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                          logprobs=True, top_logprobs=3)
    want = [(c.token, c.logprob, [(t.token, t.logprob) for t in c.top_logprobs])
            for c in chat.choices[0].logprobs.content]
    kwargs = dict(model=model, input="Name three colors.", max_output_tokens=12, temperature=0, top_logprobs=3,
                  include=["message.output_text.logprobs"])
    r = client.responses.create(**kwargs)
    part = r.output[-1].content[0]
    got = [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in part.logprobs]
    assert len(got) == len(want) >= 5
    for (token, lp, tops), (w_token, w_lp, w_tops) in zip(got, want, strict=True):  # (other batches: 1e-3)
        assert token == w_token and lp == pytest.approx(w_lp, abs=1e-3)
        assert [t for t, _ in tops] == [t for t, _ in w_tops]
        assert [x for _, x in tops] == pytest.approx([x for _, x in w_tops], abs=1e-3)
    events = list(client.responses.create(stream=True, **kwargs))
    streamed = [e for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs]
    done = next(ev for ev in events if ev.type == "response.output_text.done")
    # (a stop token has no text: no delta carries it; the done event does)
    assert len(want) - 1 <= len(streamed) <= len(want)
    assert [e.token for e in streamed] == [t for t, _, _ in want][: len(streamed)]
    assert [e.logprob for e in streamed] == pytest.approx([lp for _, lp, _ in want][: len(streamed)], abs=1e-3)
    assert len(done.logprobs) == len(want) and events[-1].response.output[-1].content[0].logprobs[0].token == want[0][0]
    plain = client.responses.create(model=model, input="Name three colors.", max_output_tokens=4, temperature=0)
    assert plain.output[-1].content[0].logprobs == []


@pytest.mark.parametrize("body,param", [
    ({"input": "hi", "include": ["message.output_text.logprobs"],
      "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}, "include"),
    ({"input": "hi", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "hi", "include": ["reasoning.encrypted_content", "bogus"]}, "include"),  # (the first is OpenAI's)
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "hi", "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input"),
    ({"input": [{"type": "file_search_call", "id": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": []}, "input"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "temperature": "hot"}, "temperature"),
    ({}, "input"),
])
def test_responses_bad_requests_get_400(server, body, param) -> None:
    r = httpx.post(server.base_url + "/v1/responses", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    ok = httpx.post(server.base_url + "/v1/responses", json={"input": "hi", "max_output_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["status"] == "incomplete"  # still serving


# --------------------------------------------------------------------------- embeddings
@pytest.fixture(scope="module")
def hf_last_hidden(real_model_dir):
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(real_model_dir, dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([ids])).last_hidden_state[0, -1]

    return run


def test_embeddings_with_the_official_client_equal_transformers(client, model, hf_tokenizer, hf_last_hidden) -> None:
    """The openai client asks for base64 and decodes it; float, dimensions, token-id inputs and usage too."""
    texts = ["A sentence to embed.", "def add(a, b):\n    return a + b\n"]
    r = client.embeddings.create(model=model, input=texts)
    assert r.object == "list" and r.model == model and [d.index for d in r.data] == [0, 1]
    ids = [hf_tokenizer.encode(t) for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    for d, one in zip(r.data, ids):
        ref = torch.nn.functional.normalize(hf_last_hidden(one), dim=0)
        assert torch.allclose(torch.tensor(d.embedding), ref, atol=1e-4)
    floats = client.embeddings.create(model=model, input=ids[1], encoding_format="float", dimensions=64)
    cut = torch.nn.functional.normalize(hf_last_hidden(ids[1])[:64], dim=0)
    assert len(floats.data) == 1 and torch.allclose(torch.tensor(floats.data[0].embedding), cut, atol=1e-4)
    raw = httpx.post(client.base_url.join("embeddings").__str__(), timeout=60,
                     json={"input": [ids[0]], "normalize": False, "truncate_prompt_tokens": 3}).json()
    assert raw["usage"]["prompt_tokens"] == 3
    assert torch.allclose(torch.tensor(raw["data"][0]["embedding"]), hf_last_hidden(ids[0][-3:]), atol=1e-3)


def test_embeddings_of_a_conversation_equal_its_rendered_prompts(server, model) -> None:
    """vLLM's chat form: `messages` rendered with the chat template (as /tokenize renders them), then embedded."""
    url = server.base_url
    rendered = httpx.post(url + "/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False}).json()
    by_messages = httpx.post(url + "/v1/embeddings", json={"messages": MESSAGES}, timeout=60).json()
    by_ids = httpx.post(url + "/v1/embeddings", json={"input": rendered["tokens"]}, timeout=60).json()
    assert by_messages["usage"]["prompt_tokens"] == rendered["count"]
    assert by_messages["data"][0]["embedding"] == pytest.approx(by_ids["data"][0]["embedding"], abs=1e-6)


@pytest.mark.parametrize("body,param", [
    ({"input": "hi", "messages": MESSAGES}, "input"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": "hi", "dimensions": 0}, "dimensions"),
    ({"input": "hi", "dimensions": 100000}, "dimensions"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": [[1, 2], [10**9]]}, "input"),
    ({"input": "hello " * 1100}, "input"),
    ({}, "input"),
])
def test_embeddings_bad_requests_get_400(server, body, param) -> None:
    r = httpx.post(server.base_url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    ok = httpx.post(server.base_url + "/v1/embeddings", json={"input": "hi"}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 896  # still serving


def test_score_and_rerank_are_cosines_of_transformers_embeddings(server, model, hf_tokenizer, hf_last_hidden) -> None:
    """/score (1:N and N:N pairs) and /rerank (sorted, top_n, documents) as vLLM serves them for an embedding model:
    cosine similarities of the texts' normalized last hidden states, each text embedded once."""
    query, docs = "How do I add two numbers in Python?", ["def add(a, b):\n    return a + b\n",
                                                          "Paris is the capital of France.", "a + b"]
    ids = {t: hf_tokenizer.encode(t) for t in [query, *docs]}
    vec = {t: torch.nn.functional.normalize(hf_last_hidden(i), dim=0) for t, i in ids.items()}
    expected = [float(vec[query] @ vec[d]) for d in docs]
    r = httpx.post(server.base_url + "/score", json={"model": model, "text_1": query, "text_2": docs}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-4)
    assert body["usage"]["prompt_tokens"] == sum(len(i) for i in ids.values())  # the query once
    pairwise = httpx.post(server.base_url + "/v1/score", json={"text_1": docs[:2], "text_2": [query, docs[0]]},
                          timeout=60).json()
    assert [d["score"] for d in pairwise["data"]] == pytest.approx([expected[0], float(vec[docs[1]] @ vec[docs[0]])],
                                                                   abs=1e-4)
    ranked = httpx.post(server.base_url + "/v1/rerank", json={"query": query, "documents": docs, "top_n": 2},
                        timeout=60).json()
    order = sorted(range(3), key=lambda i: -expected[i])[:2]
    assert [x["index"] for x in ranked["results"]] == order
    assert [x["relevance_score"] for x in ranked["results"]] == pytest.approx([expected[i] for i in order], abs=1e-4)
    assert ranked["results"][0]["document"]["text"] == docs[order[0]]
    bare = httpx.post(server.base_url + "/rerank", json={"query": query, "documents": docs, "return_documents": False},
                      timeout=60).json()
    assert len(bare["results"]) == 3 and "document" not in bare["results"][0]


@pytest.mark.parametrize("path,body,param", [
    ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
    ("/score", {"text_1": [], "text_2": "c"}, "text_1"),
    ("/score", {"text_1": "a"}, "text_2"),
    ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": -1}, "top_n"),
    ("/v1/score", {"text_1": "hello " * 1100, "text_2": "x"}, "text_1"),
])
def test_score_and_rerank_bad_requests_get_400(server, path, body, param) -> None:
    r = httpx.post(server.base_url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_continue_final_message_and_truncation(server, client, model, hf_tokenizer) -> None:
    """vLLM's continue_final_message: the last (assistant) message rendered open, as Transformers renders it, on
    /tokenize and the chat route; it needs add_generation_prompt false; truncate_prompt_tokens keeps the last N."""
    convo = MESSAGES + [{"role": "assistant", "content": "Waves fold into"}]
    expected = hf_tokenizer.apply_chat_template(convo, continue_final_message=True, tokenize=True)
    if not isinstance(expected, list):
        expected = expected["input_ids"]
    url = server.base_url
    tokens = httpx.post(url + "/tokenize", json={"messages": convo, "add_generation_prompt": False,
                                                 "continue_final_message": True}).json()["tokens"]
    assert tokens == expected and hf_tokenizer.decode(tokens).endswith("Waves fold into")
    r = client.chat.completions.create(model=model, messages=convo, max_tokens=2, temperature=0,
                                       extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert r.usage.prompt_tokens == len(expected)
    short = client.chat.completions.create(model=model, messages=convo, max_tokens=2, temperature=0,
                                           extra_body={"truncate_prompt_tokens": 5})
    assert short.usage.prompt_tokens == 5
    bad = httpx.post(url + "/v1/chat/completions", json={"messages": convo, "continue_final_message": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message"
    bad = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "continue_final_message": True,
                                                         "add_generation_prompt": False})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"


def test_runtime_lora_routes_are_off_by_default(server) -> None:
    r = httpx.post(server.base_url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/tmp"})
    assert r.status_code == 404


# --------------------------------------------------------------------------- acceptance 6 (runs last)
def test_return_token_ids_whole_and_streamed(server, model, hf_tokenizer) -> None:
    """vLLM's return_token_ids: the templated prompt's ids and each choice's ids (their text decodes from them);
    streamed, the prompt's in the first chunk only and the chunks' ids adding up to the whole answer's."""
    url = server.base_url + "/v1"
    chat = {"model": model, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    whole = httpx.post(url + "/chat/completions", json=chat, timeout=120).json()
    expected_prompt = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    expected_prompt = list(getattr(expected_prompt, "input_ids", expected_prompt))
    assert whole["prompt_token_ids"] == expected_prompt
    ids = whole["choices"][0]["token_ids"]
    assert len(ids) == whole["usage"]["completion_tokens"] == 12
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == whole["choices"][0]["message"]["content"]
    with httpx.stream("POST", url + "/chat/completions", json={**chat, "stream": True}, timeout=120) as r:
        events = [e for e in sse_events(r) if e != "[DONE]"]
    assert events[0]["prompt_token_ids"] == expected_prompt
    assert all("prompt_token_ids" not in e for e in events[1:])
    assert [t for e in events for t in e["choices"][0]["token_ids"]] == ids
    plain = httpx.post(url + "/chat/completions", json={**chat, "return_token_ids": False}, timeout=120).json()
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]

    prompts = ["def add(a, b):", "import os"]
    body = {"model": model, "prompt": prompts, "max_tokens": 6, "temperature": 0, "return_token_ids": True}
    whole = httpx.post(url + "/completions", json=body, timeout=120).json()
    by_index = sorted(whole["choices"], key=lambda c: c["index"])
    for prompt, choice in zip(prompts, by_index, strict=True):
        assert choice["prompt_token_ids"] == hf_tokenizer.encode(prompt)
        assert hf_tokenizer.decode(choice["token_ids"], skip_special_tokens=True) == choice["text"]
    with httpx.stream("POST", url + "/completions", json={**body, "stream": True}, timeout=120) as r:
        events = [e for e in sse_events(r) if e != "[DONE]"]
    for i, prompt in enumerate(prompts):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["prompt_token_ids"] == hf_tokenizer.encode(prompt)
        assert all("prompt_token_ids" not in c for c in mine[1:])
        assert [t for c in mine for t in c["token_ids"]] == by_index[i]["token_ids"]


def test_zz_sigterm_lets_in_flight_requests_finish(server, model) -> None:
    """Stops the module's server: keep it the last test of this file."""
    results: list = []

    async def one(client: httpx.AsyncClient, started: asyncio.Event, i: int):
        body = {
            "model": model,
            "prompt": f"List {i} fruits:",
            "max_tokens": 24,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        async with client.stream("POST", "/v1/completions", json=body) as r:
            n, finish, done = 0, None, False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    c = json.loads(line[6:])["choices"][0]
                    n += 1
                    finish = c["finish_reason"] or finish
                    if n == 2:
                        started.set()
            results.append((finish, done))

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
            events = [asyncio.Event() for _ in range(3)]
            tasks = [asyncio.create_task(one(client, events[i], i + 3)) for i in range(3)]
            await asyncio.gather(*(e.wait() for e in events))
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
            with pytest.raises(httpx.ConnectError):  # the listener is closed: no new requests
                await client.get("/health")
            await asyncio.gather(*tasks)

    asyncio.run(main())
    assert results == [("length", True)] * 3
    assert server.proc.wait(timeout=60) == 0
    log = server.output()
    assert "received SIGTERM" in log and "Traceback" not in log

