"""The HTTP layer on the fake engine (uvicorn in a thread; no model): protocol shapes, every error
path, auth, limits, disconnects, queue limit, engine death. Seconds in all."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.entrypoints.fake_engine import TEXT, FakeEngine

MODEL = "fake-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if param != "any":
        assert err["param"] == param, err
    return err


@pytest.fixture
def server(start_fake_server):
    return start_fake_server()


def test_chat_completion_shape_and_usage(server) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=7)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == TEXT[:7]
    assert r.choices[0].finish_reason == "length"
    prompt = "<user>hi\n<assistant>"  # the fake chat template
    assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_max_completion_tokens_alias_and_text_parts(server) -> None:
    body = {
        "model": MODEL,
        "max_completion_tokens": 3,
        "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
    }
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    assert r.json()["usage"]["prompt_tokens"] == len("<system>be brief\n<user>a\nb\n<assistant>")


def test_chat_stream_n3_by_index_with_usage(server) -> None:
    body = {**CHAT, "n": 3, "stream": True, "stream_options": {"include_usage": True}, "seed": 0}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 15
    texts, roles_first, finish = {}, {}, {}
    for c in chunks[:-1]:
        assert c["object"] == "chat.completion.chunk" and c["usage"] is None
        (choice,) = c["choices"]
        i = choice["index"]
        if i not in roles_first:
            roles_first[i] = choice["delta"].get("role")
        assert i not in finish, "nothing after finish_reason"
        texts[i] = texts.get(i, "") + (choice["delta"].get("content") or "")
        if choice["finish_reason"]:
            finish[i] = choice["finish_reason"]
    assert roles_first == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert texts == {i: TEXT[i : i + 5] for i in range(3)}  # the fake rotates by seed + index


def test_async_client_streaming(server) -> None:
    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused")
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=9, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(main()) == TEXT[:9]


def test_stop_string(server) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=30, stop=["brown"]
    )
    assert r.choices[0].message.content == "the quick " and r.choices[0].finish_reason == "stop"


def test_chat_logprobs_format(server) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == list(TEXT[:3])
    assert content[0].bytes == [ord("t")] and content[0].logprob == -0.5
    assert [t.token for t in content[0].top_logprobs] == ["t", "z"]


def test_truncate_prompt_tokens_and_cache_salt_fields(server) -> None:
    """Completions keep the prompts' last N tokens (truncate_prompt_tokens); cache_salt is taken, an empty one is a
    400 naming it."""
    body = {"model": MODEL, "prompt": ["abcdefgh", "xy"], "max_tokens": 2, "truncate_prompt_tokens": 3,
            "cache_salt": "tenant"}
    r = httpx.post(server.base_url + "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 3 + 2
    r = httpx.post(server.base_url + "/v1/completions", json={**body, "cache_salt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


def test_return_tokens_as_token_ids(server, start_fake_server) -> None:
    """vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N" (chat, completions, streamed, prompt
    logprobs); --return-tokens-as-token-ids makes it the default, which a request may turn off."""
    ids = [f"token_id:{ord(c)}" for c in TEXT[:3]]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       logprobs=True, top_logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == ids and content[0].bytes == list(ids[0].encode())
    assert [t.token for t in content[0].top_logprobs] == [ids[0], f"token_id:{ord('z')}"]
    assert r.choices[0].message.content == TEXT[:3]  # the text itself is unchanged
    c = client.completions.create(model=MODEL, prompt="ab", max_tokens=3, logprobs=1, echo=True,
                                  extra_body={"return_tokens_as_token_ids": True, "prompt_logprobs": 1})
    assert c.choices[0].logprobs.tokens == ["token_id:97", "token_id:98", *ids]
    assert c.choices[0].logprobs.top_logprobs[2] == {ids[0]: -0.5}
    assert c.choices[0].prompt_logprobs[1][str(ord("b"))]["decoded_token"] == f"token_id:{ord('b')}"
    body = {"model": MODEL, "prompt": "ab", "max_tokens": 3, "logprobs": 0, "stream": True,
            "return_tokens_as_token_ids": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body) as stream:
        events = sse_events(stream)
    assert [t for e in events[:-1] for ch in e["choices"] for t in ch["logprobs"]["tokens"]] == ids
    by_default = start_fake_server(return_tokens_as_token_ids=True)
    client = openai.OpenAI(base_url=by_default.base_url + "/v1", api_key="unused")
    on = client.completions.create(model=MODEL, prompt="ab", max_tokens=3, logprobs=0)
    off = client.completions.create(model=MODEL, prompt="ab", max_tokens=3, logprobs=0,
                                    extra_body={"return_tokens_as_token_ids": False})
    assert on.choices[0].logprobs.tokens == ids and off.choices[0].logprobs.tokens == list(TEXT[:3])


@pytest.mark.parametrize(
    "prompt,num_prompts", [("ab", 1), (["ab", "cd", "ef"], 3), ([97, 98], 1), ([[97, 98], [99]], 2)]
)
def test_completion_prompt_forms(server, prompt, num_prompts) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, n=2)
    assert r.object == "text_completion"
    assert [c.index for c in r.choices] == list(range(2 * num_prompts))
    assert all(c.text == TEXT[c.index % 2 : c.index % 2 + 4] for c in r.choices)
    assert r.usage.completion_tokens == 8 * num_prompts


def test_completion_stream_multi_prompt(server) -> None:
    body = {
        "model": MODEL,
        "prompt": ["a", "b"],
        "max_tokens": 6,
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 24
    texts: dict[int, str] = {}
    for c in events[:-2]:
        for choice in c["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {i: TEXT[i % 2 : i % 2 + 6] for i in range(4)}


def test_completion_echo_and_legacy_logprobs(server) -> None:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    r = client.completions.create(model=MODEL, prompt="ab", max_tokens=3, echo=True)
    assert r.choices[0].text == "ab" + TEXT[:3]
    r = client.completions.create(model=MODEL, prompt=[120, 121], max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == list(TEXT[:3]) and lp.token_logprobs == [-0.5] * 3
    assert lp.text_offset == [0, 1, 2] and lp.top_logprobs[0] == {"t": -0.5, "z": -1.5}


def test_completion_echo_with_logprobs_leads_with_the_prompts(server) -> None:
    """echo + logprobs (lm-eval's loglikelihood request): the prompt's tokens lead the legacy logprobs, the
    first with none; max_tokens 0 gives the prompt alone; a stream carries the same entries."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=2, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "abc" + TEXT[:2]
    assert lp.tokens == ["a", "b", "c", *TEXT[:2]]
    assert lp.token_logprobs == [None, -0.25, -0.5, -0.5, -0.5]
    assert lp.top_logprobs[0] is None and lp.top_logprobs[1] == {"p": -0.1, "b": -0.25}
    assert lp.top_logprobs[3] == {"t": -0.5}
    assert lp.text_offset == [0, 1, 2, 3, 4]
    only = client.completions.create(model=MODEL, prompt=[97, 98, 99], max_tokens=0, echo=True, logprobs=0)
    assert only.choices[0].text == "abc" and only.choices[0].finish_reason == "length"
    assert only.choices[0].logprobs.token_logprobs == [None, -0.25, -0.5]
    assert only.choices[0].logprobs.top_logprobs[2] == {"c": -0.5}
    assert only.usage.completion_tokens == 0 and only.usage.prompt_tokens == 3
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 2, "echo": True, "logprobs": 1, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body) as resp:
        events = sse_events(resp)
    tokens, token_logprobs, offsets, text = [], [], [], ""
    for e in events[:-1]:
        (choice,) = e["choices"]
        text += choice["text"]
        if choice["logprobs"]:
            tokens += choice["logprobs"]["tokens"]
            token_logprobs += choice["logprobs"]["token_logprobs"]
            offsets += choice["logprobs"]["text_offset"]
    assert text == r.choices[0].text and tokens == lp.tokens
    assert token_logprobs == lp.token_logprobs and offsets == lp.text_offset


def test_prompt_logprobs_field(server) -> None:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: logprob, rank, decoded_token},
    on each completion choice and at the top of a chat completion."""
    r = httpx.post(server.base_url + "/v1/completions",
                   json={"model": MODEL, "prompt": "ab", "max_tokens": 1, "prompt_logprobs": 1, "n": 2})
    assert r.status_code == 200, r.text
    expected = [None, {"112": {"logprob": -0.1, "rank": 1, "decoded_token": "p"},
                       "98": {"logprob": -0.25, "rank": 1, "decoded_token": "b"}}]
    assert [c["prompt_logprobs"] for c in r.json()["choices"]] == [expected, expected]
    assert r.json()["choices"][0]["logprobs"] is None
    r = httpx.post(server.base_url + "/v1/chat/completions", json={**CHAT, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    plp = r.json()["prompt_logprobs"]
    prompt = "<user>hi\n<assistant>"
    assert len(plp) == len(prompt) and plp[0] is None
    assert plp[2] == {str(ord("s")): {"logprob": -0.5, "rank": 2, "decoded_token": "s"}}  # "<us"
    assert "prompt_logprobs" not in httpx.post(server.base_url + "/v1/chat/completions", json=CHAT).json()


# --------------------------------------------------------------------------- errors
BAD_CHAT = [
    ("bad json", b'{"messages": [', None),
    ("not an object", b"[]", None),
    ("messages wrong type", {"messages": "hi"}, "messages"),
    ("empty messages", {"messages": []}, "messages"),
    ("bad role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages",
    ),
    ("max_tokens string", {**CHAT, "max_tokens": "5"}, "max_tokens"),
    ("max_tokens negative", {**CHAT, "max_tokens": -1}, "max_tokens"),
    ("max_tokens zero", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("max_tokens huge", {**CHAT, "max_tokens": 10**9}, "max_tokens"),
    ("max_completion_tokens huge", {**CHAT, "max_completion_tokens": 10**30}, "max_completion_tokens"),
    ("n zero", {**CHAT, "n": 0}, "n"),
    ("n too large", {**CHAT, "n": 1000}, "n"),
    ("n bool", {**CHAT, "n": True}, "n"),
    ("temperature -1", {**CHAT, "temperature": -1}, "temperature"),
    ("temperature string", {**CHAT, "temperature": "hot"}, "temperature"),
    ("temperature NaN", {**CHAT, "temperature": float("nan")}, "temperature"),
    ("top_p 2", {**CHAT, "top_p": 2}, "top_p"),
    ("top_logprobs 50", {**CHAT, "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ("top_logprobs without logprobs", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("too many stops", {**CHAT, "stop": [str(i) for i in range(200)]}, "stop"),
    ("presence_penalty 5", {**CHAT, "presence_penalty": 5}, "presence_penalty"),
    ("logit_bias bad key", {**CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ("response_format without type", {**CHAT, "response_format": {}}, "response_format"),
    ("logit_bias spaced key", {**CHAT, "logit_bias": {" 5 ": 1}}, "logit_bias"),
    ("logit_bias other digits", {**CHAT, "logit_bias": {"\u0663": 1}}, "logit_bias"),
    ("logit_bias negative key", {**CHAT, "logit_bias": {"-5": 1}}, "logit_bias"),
    ("logit_bias out of vocab", {**CHAT, "logit_bias": {"999999": 1}}, None),
    ("allowed_token_ids empty", {**CHAT, "allowed_token_ids": []}, "allowed_token_ids"),
    ("allowed_token_ids negative", {**CHAT, "allowed_token_ids": [3, -1]}, "allowed_token_ids.1"),
    ("allowed_token_ids out of vocab", {**CHAT, "allowed_token_ids": [999999]}, None),
    ("seed huge", {**CHAT, "seed": 10**30}, "seed"),
    ("malformed tools", {**CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ("unknown response_format", {**CHAT, "response_format": {"type": "xml"}}, "response_format"),
    ("prompt over the context", {**CHAT, "messages": [{"role": "user", "content": "x" * 300}]}, "messages"),
    ("prompt_logprobs streamed", {**CHAT, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("prompt_logprobs string", {**CHAT, "prompt_logprobs": "1"}, "prompt_logprobs"),
]


@pytest.mark.parametrize("name,body,param", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_invalid_chat_requests_get_400(server, name, body, param) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
    )
    err = assert_error(r, 400, param)
    assert err["type"] == "invalid_request_error"
    if name == "max_tokens huge":
        assert "256" in err["message"] and str(10**9) in err["message"]  # context and max_tokens
    if name == "temperature NaN":
        assert "NaN" in err["message"], err
    assert httpx.post(server.base_url + "/v1/chat/completions", json=CHAT).status_code == 200


BAD_COMPLETION = [
    ("missing prompt", {"max_tokens": 2}, "prompt"),
    ("empty prompt", {"prompt": "", "max_tokens": 2}, "prompt"),
    ("empty list", {"prompt": [], "max_tokens": 2}, "prompt"),
    ("token id out of vocab", {"prompt": [1, 10**6], "max_tokens": 2}, "prompt"),
    ("negative token id", {"prompt": [-1], "max_tokens": 2}, "prompt"),
    ("mixed prompt list", {"prompt": ["a", [1]], "max_tokens": 2}, None),
    ("logprobs 50", {"prompt": "a", "logprobs": 50}, "logprobs"),
    ("max_tokens 0 without echo", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("prompt_logprobs 50", {"prompt": "a", "prompt_logprobs": 50}, "prompt_logprobs"),
    ("prompt_logprobs negative", {"prompt": "a", "prompt_logprobs": -1}, "prompt_logprobs"),
    ("prompt_logprobs streamed", {"prompt": "a", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("suffix", {"prompt": "a", "suffix": "b"}, "suffix"),
    ("best_of", {"prompt": "a", "best_of": 3}, "best_of"),
    ("prompt + max_tokens over context", {"prompt": "a" * 200, "max_tokens": 100}, "max_tokens"),
]


@pytest.mark.parametrize("name,body,param", BAD_COMPLETION, ids=[b[0] for b in BAD_COMPLETION])
def test_invalid_completion_requests_get_400(server, name, body, param) -> None:
    r = httpx.post(server.base_url + "/v1/completions", json=body)
    if param is None:
        assert_error(r, 400)
    else:
        assert_error(r, 400, param)
    assert httpx.post(server.base_url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200


def test_unknown_fields_are_ignored(server) -> None:
    body = {
        **CHAT,
        "frobnicate": 3,
        "store": True,
        "metadata": {"a": "b"},
        "user": "u",
        "parallel_tool_calls": False,
        "messages": [{"role": "user", "content": "hi", "extra": 1}],
    }
    assert httpx.post(server.base_url + "/v1/chat/completions", json=body).status_code == 200
    streamed = {**body, "stream": True, "stream_options": {"zzz": 1}}  # (stream_options needs stream)
    assert httpx.post(server.base_url + "/v1/chat/completions", json=streamed).status_code == 200


def test_unknown_model_route_and_method(server) -> None:
    err = assert_error(
        httpx.post(server.base_url + "/v1/chat/completions", json={**CHAT, "model": "gpt-9"}), 404, "model"
    )
    assert err["code"] == "model_not_found"
    assert_error(httpx.post(server.base_url + "/v1/completions", json={"model": "x", "prompt": "a"}), 404, "model")
    assert_error(httpx.get(server.base_url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.base_url + "/v1/chat/completions"), 405)
    assert_error(httpx.get(server.base_url + "/v1/models/gpt-9"), 404)
    assert httpx.get(server.base_url + "/v1/models/" + MODEL).json()["id"] == MODEL


def test_models_version_health(server) -> None:
    models = httpx.get(server.base_url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 256
    (permission,) = models["data"][0]["permission"]  # vLLM's card carries one, as OpenAI's legacy API
    assert permission["object"] == "model_permission" and permission["allow_sampling"] is True
    assert permission["id"].startswith("modelperm-")
    assert httpx.get(server.base_url + "/version").json()["version"]
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_oversized_body_gets_413(start_fake_server) -> None:
    server = start_fake_server(max_request_body_bytes=1000)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    assert_error(httpx.post(server.base_url + "/v1/chat/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield json.dumps(big).encode()

    assert_error(
        httpx.post(
            server.base_url + "/v1/chat/completions",
            content=chunks(),
            headers={"content-type": "application/json"},
        ),
        413,
    )
    assert httpx.post(server.base_url + "/v1/chat/completions", json=CHAT).status_code == 200


def test_invocations_dispatches_by_the_body(server) -> None:
    """SageMaker's /invocations (as vLLM's): messages -> chat, prompt -> completions; other bodies are 400s."""
    url = server.base_url + "/invocations"
    chat = httpx.post(url, json=CHAT).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == TEXT[:5]
    completion = httpx.post(url, json={"model": MODEL, "prompt": "hi", "max_tokens": 3}).json()
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == TEXT[:3]
    streamed = httpx.post(url, json={**CHAT, "stream": True}).text
    assert streamed.startswith("data: ") and streamed.rstrip().endswith("data: [DONE]")
    assert_error(httpx.post(url, json={"model": MODEL}), 400)
    assert_error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(url, json=[1, 2]), 400)
    assert assert_error(httpx.post(url, json={**CHAT, "max_tokens": -1}), 400)["param"] == "max_tokens"
    # JSON sent as text/plain: refused as the routes whose body FastAPI parses refuse it; no Content-Type is JSON.
    body = json.dumps(CHAT).encode()
    for route in ("/invocations", "/v1/chat/completions"):
        err = assert_error(httpx.post(server.base_url + route, content=body, headers={"content-type": "text/plain"}),
                           400)
        assert route == "/v1/chat/completions" or "Content-Type" in err["message"], route
    r = httpx.post(server.base_url + "/v1/messages", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 400 and r.json()["type"] == "error" and "Content-Type" in r.json()["error"]["message"]
    bare = httpx.post(url, content=body, headers={"content-type": ""})
    assert bare.status_code == 200 and bare.json()["object"] == "chat.completion"
    ok = httpx.post(url, content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_api_key(start_fake_server) -> None:
    server = start_fake_server(api_key="sesame")
    url = server.base_url + "/v1/chat/completions"
    err = assert_error(httpx.post(url, json=CHAT), 401)
    assert err["code"] == "invalid_api_key"
    assert_error(httpx.post(url, json=CHAT, headers={"Authorization": "Bearer sesam"}), 401)
    assert_error(httpx.get(server.base_url + "/v1/models", headers={"Authorization": "sesame"}), 401)
    assert httpx.post(url, json=CHAT, headers={"Authorization": "Bearer sesame"}).status_code == 200
    for path in ("/health", "/ping", "/metrics", "/version"):
        assert httpx.get(server.base_url + path).status_code == 200
    assert httpx.post(server.base_url + "/ping").json() == {"status": "ok"}
    assert_error(httpx.post(server.base_url + "/tokenize", json={"prompt": "a"}), 401)
    assert_error(httpx.post(server.base_url + "/detokenize", json={"tokens": [97]}), 401)
    assert_error(httpx.post(server.base_url + "/invocations", json=CHAT), 401)
    for path in ("/score", "/rerank", "/v2/rerank"):  # the scoring routes outside /v1 too
        assert_error(httpx.post(server.base_url + path, json={"text_1": "a", "text_2": "b"}), 401)
    key = {"Authorization": "Bearer sesame"}
    assert httpx.post(server.base_url + "/detokenize", json={"tokens": [97]}, headers=key).json() == {"prompt": "a"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong").models.list()
    assert openai.OpenAI(base_url=server.base_url + "/v1", api_key="sesame").models.list().data[0].id == MODEL


def _metric(server, name: str) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_client_disconnect_aborts_and_frees_kv(start_fake_server) -> None:
    engine = FakeEngine(step_delay=0.01, max_model_len=100_000)
    server = start_fake_server(engine)
    body = {**CHAT, "max_tokens": 50_000, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()  # (leaving a for loop over it would close the connection)
        for _ in range(10):
            next(lines)
        assert _metric(server, "pagedserve:kv_cache_usage_perc") > 0
    deadline = time.monotonic() + 5
    while _metric(server, "pagedserve:kv_cache_usage_perc") > 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _metric(server, "pagedserve:kv_cache_usage_perc") == 0
    assert _metric(server, "pagedserve:num_free_kv_blocks") == _metric(server, "pagedserve:num_total_kv_blocks")
    assert not engine._reqs
    # counted as vLLM counts it: request_success_total with finished_reason "abort" (it was in no counter)
    aborted = [line for line in httpx.get(server.base_url + "/metrics").text.splitlines()
               if line.startswith("pagedserve:request_success_total{") and 'finished_reason="abort"' in line]
    assert len(aborted) == 1 and float(aborted[0].rsplit(" ", 1)[1]) == 1.0, aborted


def test_non_streaming_disconnect_aborts(start_fake_server) -> None:
    engine = FakeEngine(step_delay=0.01, max_model_len=100_000)
    server = start_fake_server(engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/chat/completions", json={**CHAT, "max_tokens": 50_000}, timeout=0.5)
    deadline = time.monotonic() + 5
    while engine._reqs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine._reqs


def test_queue_full_gets_503_with_retry_after(start_fake_server) -> None:
    server = start_fake_server(FakeEngine(max_num_seqs=1, step_delay=0.01), max_queued_requests=1)

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 20}) for _ in range(10))
            )

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes, codes
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1
            assert assert_error(r, 503)["code"] == "queue_full"
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"


def test_more_prompts_than_the_queue_ever_takes_is_a_400(start_fake_server) -> None:
    """Found by stress-testing: each prompt of a list is a request of the waiting queue, so a list longer than
    --max-queued-requests got 503 queue_full (retry) forever, even on an idle server; it is a 400 naming the limit.
    A list that fits is served whole."""
    server = start_fake_server(FakeEngine(max_num_seqs=2, step_delay=0.01), max_queued_requests=3)
    body = {"model": MODEL, "prompt": [f"p{i}" for i in range(4)], "max_tokens": 2}
    err = assert_error(httpx.post(server.base_url + "/v1/completions", json=body, timeout=30), 400, "prompt")
    assert "--max-queued-requests 3" in err["message"]
    r = httpx.post(server.base_url + "/v1/completions", json={**body, "prompt": body["prompt"][:3]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 3


def test_engine_death_turns_health_503(start_fake_server) -> None:
    server = start_fake_server(FakeEngine(fail_at_step=5))
    r = httpx.post(server.base_url + "/v1/chat/completions", json={**CHAT, "max_tokens": 50})
    assert_error(r, 503)
    assert_error(httpx.get(server.base_url + "/health"), 503)
    assert_error(httpx.post(server.base_url + "/ping"), 503)
    assert_error(httpx.post(server.base_url + "/v1/chat/completions", json=CHAT), 503)
    assert _metric(server, "pagedserve:engine_healthy") == 0


def test_metrics_names(server) -> None:
    httpx.post(server.base_url + "/v1/chat/completions", json=CHAT)
    text = httpx.get(server.base_url + "/metrics").text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "num_preemptions_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "kernel_compiles_while_serving_total",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "request_queue_time_seconds_bucket",
        "request_success_total",
        "request_prefill_time_seconds_bucket",
        "request_decode_time_seconds_bucket",
        "request_inference_time_seconds_bucket",
        "time_per_output_token_seconds_bucket",
        "request_prompt_tokens_bucket",
        "request_generation_tokens_bucket",
        "request_params_n_bucket",
    ):
        assert f"pagedserve:{name}" in text, name
    assert _metric(server, "pagedserve:generation_tokens_total") == 5
    assert _metric(server, "pagedserve:time_to_first_token_seconds_count") == 1
    # per finished request: its token counts and its choices (vLLM's request histograms)
    assert _metric(server, "pagedserve:request_generation_tokens_sum") == 5
    assert _metric(server, "pagedserve:request_prompt_tokens_sum") == len("<user>hi\n<assistant>")
    assert _metric(server, "pagedserve:request_params_n_sum") == 1
    assert _metric(server, "pagedserve:time_per_output_token_seconds_count") == 1
    assert _metric(server, "pagedserve:request_inference_time_seconds_sum") >= \
        _metric(server, "pagedserve:request_decode_time_seconds_sum")


def test_cpu_prefix_cache_hits_metric_with_kv_offloading(start_fake_server) -> None:
    from tests.entrypoints.fake_engine import FakeEngine

    engine = FakeEngine()
    engine.extra_stats = {"cpu_prefix_cache_hits": 96}  # as the engine reports them with --kv-offloading-size
    server = start_fake_server(engine)
    httpx.post(server.base_url + "/v1/chat/completions", json=CHAT)
    assert _metric(server, "pagedserve:cpu_prefix_cache_hits_total") == 96
    plain = start_fake_server()
    assert "cpu_prefix_cache_hits" not in httpx.get(plain.base_url + "/metrics").text


def test_vllm_metric_names(start_fake_server) -> None:
    """--vllm-metric-names: the same series under vLLM's own prefix (its dashboards read them unchanged)."""
    server = start_fake_server(vllm_metric_names=True)
    httpx.post(server.base_url + "/v1/chat/completions", json=CHAT)
    text = httpx.get(server.base_url + "/metrics").text
    assert "pagedserve:" not in text
    for name in ("num_requests_running", "kv_cache_usage_perc", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "request_success_total", "engine_healthy"):
        assert f"vllm:{name}" in text, name
    assert _metric(server, "vllm:generation_tokens_total") == 5


def test_tokenize_and_detokenize(server) -> None:
    url = server.base_url
    body = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": "hi"}).json()
    assert body == {"count": 2, "max_model_len": 256, "tokens": [104, 105], "token_strs": None}
    strs = httpx.post(url + "/tokenize", json={"prompt": "hi", "return_token_strs": True}).json()["token_strs"]
    assert strs == ["h", "i"]
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    rendered = "<user>hi\n<assistant>"  # the fake tokenizer's template
    assert chat["tokens"] == list(rendered.encode()) and chat["count"] == len(rendered)
    quiet = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                                "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert quiet["tokens"] == list(("<no_think>" + rendered).encode())
    no_gen = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                                 "add_generation_prompt": False}).json()
    assert no_gen["count"] == len("<user>hi\n")
    assert httpx.post(url + "/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert_error(httpx.post(url + "/detokenize", json={"tokens": [104, 9999]}), 400, "tokens")
    assert_error(httpx.post(url + "/detokenize", json={"tokens": ["a"]}), 400)
    assert_error(httpx.post(url + "/tokenize", json={"prompt": 5}), 400)
    assert_error(httpx.post(url + "/tokenize", json={}), 400)
    assert_error(httpx.post(url + "/tokenize", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
    image = {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    assert_error(httpx.post(url + "/tokenize", json=image), 400, "messages")
    assert_error(httpx.post(url + "/tokenize", json={"model": "gpt-9", "prompt": "a"}), 404, "model")
    # tools the chat route would refuse are refused here too (a count for a request that cannot be sent)
    messages = [{"role": "user", "content": "hi"}]
    for tools in ([{"type": "function", "function": {"name": "bad name!"}}], [{"type": "web_search"}]):
        assert_error(httpx.post(url + "/tokenize", json={"messages": messages, "tools": tools}), 400, "tools")
        assert_error(httpx.post(url + "/v1/chat/completions", json={**CHAT, "tools": tools}), 400, "tools")
    ok = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert httpx.post(url + "/tokenize", json={"messages": messages, "tools": ok}).status_code == 200


def test_chat_template_kwargs_reach_the_template(server) -> None:
    """vLLM's chat_template_kwargs (e.g. Qwen3's enable_thinking) are template variables; the server's own
    template arguments cannot be replaced through them."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    plain = client.chat.completions.create(**CHAT)
    quiet = client.chat.completions.create(**CHAT, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert quiet.usage.prompt_tokens == plain.usage.prompt_tokens + len("<no_think>")
    for reserved in ({"messages": []}, {"add_generation_prompt": False}, {"tools": []}):
        err = assert_error(httpx.post(server.base_url + "/v1/chat/completions",
                                      json={**CHAT, "chat_template_kwargs": reserved}), 400, "chat_template_kwargs")
        assert next(iter(reserved)) in err["message"]


def test_reasoning_parser_splits_whole_and_streamed_answers(start_fake_server) -> None:
    """--reasoning-parser qwen3: message.reasoning_content holds the thinking and content the answer, whole and
    streamed (the tags arrive one character a step); the openai client reads both; without the parser the
    text is untouched."""
    thought = "<think>\nadd them\n</think>\n\nFour. "
    server = start_fake_server(FakeEngine(text=thought), reasoning_parser="qwen3")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    body = {**CHAT, "max_tokens": len(thought)}
    whole = client.chat.completions.create(**body).choices[0].message
    assert whole.model_extra["reasoning_content"] == "\nadd them\n" and whole.content == "Four. "
    cut = client.chat.completions.create(**{**body, "max_tokens": 12}).choices[0]  # still thinking when cut
    assert cut.message.model_extra["reasoning_content"] == "\nadd " and cut.message.content is None
    assert cut.finish_reason == "length"
    events = sse_events(httpx.post(server.base_url + "/v1/chat/completions", json={**body, "stream": True}))
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning, content) == ("\nadd them\n", "Four. ")
    assert not any("<" in (d.get("content") or "") + (d.get("reasoning_content") or "") for d in deltas)
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    constrained = client.chat.completions.create(**body, response_format=schema).choices[0].message
    assert constrained.content == thought  # a constrained answer is all answer (the fake ignores the grammar)
    plain = start_fake_server(FakeEngine(text=thought))
    plain_client = openai.OpenAI(base_url=plain.base_url + "/v1", api_key="unused")
    message = plain_client.chat.completions.create(**body).choices[0].message
    assert message.content == thought and "reasoning_content" not in (message.model_extra or {})
    # /v1/responses: the thinking is a reasoning item before the message, whole and streamed
    r = client.responses.create(input="2 + 2?", max_output_tokens=len(thought))
    assert [item.type for item in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "\nadd them\n" and r.output_text == "Four. "
    events = list(client.responses.create(input="2 + 2?", max_output_tokens=len(thought), stream=True))
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "\nadd them\n"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Four. "
    done = [e.item.type for e in events if e.type == "response.output_item.done"]
    assert done == ["reasoning", "message"] and events[-1].response.output_text == "Four. "
    assert plain_client.responses.create(input="2 + 2?", max_output_tokens=len(thought)).output_text == thought


def test_harmony_reasoning_parser_reads_the_special_tokens(start_fake_server) -> None:
    """--reasoning-parser openai_gptoss (gpt-oss's harmony channels): the chat route asks the engine to keep the
    special tokens (the markup the parser reads), unless the request says otherwise; reasoning and content come
    split, whole and streamed, with the markup dropped."""
    answer = "<|channel|>analysis<|message|>2+2=4<|end|><|start|>assistant<|channel|>final<|message|>Four."
    seen = []

    class Recording(FakeEngine):
        def add_request(self, request_id, prompt, params, *args, **kwargs):
            seen.append(params.skip_special_tokens)
            return super().add_request(request_id, prompt, params, *args, **kwargs)

    server = start_fake_server(Recording(text=answer), reasoning_parser="openai_gptoss")
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    body = {**CHAT, "max_tokens": len(answer)}
    message = client.chat.completions.create(**body).choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == ("2+2=4", "Four.")
    events = sse_events(httpx.post(server.base_url + "/v1/chat/completions", json={**body, "stream": True}))
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "2+2=4"
    assert "".join(d.get("content") or "" for d in deltas) == "Four."
    client.chat.completions.create(**body, extra_body={"skip_special_tokens": True})
    assert seen == [False, False, True]
    # A function call (the commentary channel to=functions.NAME): a tool call with --enable-auto-tool-choice.
    call = ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary "
            'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')
    server = start_fake_server(FakeEngine(text=call), reasoning_parser="gpt_oss", enable_auto_tool_choice=True)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    choice = client.chat.completions.create(**{**CHAT, "max_tokens": len(call)}, tools=tools).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.model_extra["reasoning_content"] == "Need weather."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    events = sse_events(httpx.post(server.base_url + "/v1/chat/completions",
                                   json={**CHAT, "max_tokens": len(call), "tools": tools, "stream": True}))
    calls = [c for e in events[:-1] if e["choices"] for c in e["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(c["function"].get("arguments") or "" for c in calls)) == {"city": "Paris"}


def test_responses_function_calls_and_their_outputs(start_fake_server) -> None:
    """/v1/responses with function tools (--enable-auto-tool-choice, the hermes format): a call is a function_call
    output item, whole and streamed (each item whole at the end); function_call and function_call_output input
    items continue the conversation as the chat route's assistant tool_calls and tool messages."""
    answer = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    server = start_fake_server(FakeEngine(text=answer), enable_auto_tool_choice=True)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    tools = [{"type": "function", "name": "get_weather", "description": "current weather",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    kwargs = dict(input="Weather in Paris?", tools=tools, max_output_tokens=len(answer))
    r = client.responses.create(**kwargs)
    assert [item.type for item in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and r.tools[0].name == "get_weather"
    events = list(client.responses.create(stream=True, **kwargs))
    assert r.status == "incomplete"  # the fake engine stops at max_output_tokens only
    assert [e.type for e in events][2:] == ["response.output_item.added", "response.function_call_arguments.delta",
                                            "response.function_call_arguments.done", "response.output_item.done",
                                            "response.incomplete"]
    assert json.loads(events[-1].response.output[0].arguments) == {"city": "Paris"}
    follow = client.responses.create(
        tools=tools, max_output_tokens=3,
        input=[{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}])
    assert follow.usage.input_tokens > r.usage.input_tokens  # the call and its output are in the prompt
    for bad in ({"type": "web_search"}, {"type": "function", "name": "bad name"}):
        err = assert_error(httpx.post(server.base_url + "/v1/responses", json={"input": "x", "tools": [bad]}), 400,
                           "tools")
        assert err["message"]
    assert_error(httpx.post(server.base_url + "/v1/responses",
                            json={"input": [{"type": "function_call", "name": "f"}]}), 400, "input")
    # vLLM's extra sampling fields, refused by the chat request they become: the field and its reason, not pydantic's
    # whole report
    for field, value in (("top_k", -5), ("min_p", 2), ("repetition_penalty", 0)):
        err = assert_error(httpx.post(server.base_url + "/v1/responses", json={"input": "x", field: value}), 400,
                           field)
        assert err["message"].startswith(f"{field}: ") and "pydantic" not in err["message"], err


def test_responses_are_stored_and_continued(start_fake_server) -> None:
    """store (the default): previous_response_id continues a stored conversation, so its prompt is the chat route's
    prompt of the whole conversation (the stored answer as the assistant turn; this request's instructions only);
    GET returns the stored object, DELETE removes it; store=false keeps nothing; unknown ids are 404s."""
    server = start_fake_server(FakeEngine(text="Hello there. "))
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    first = client.responses.create(input="hi", instructions="be brief", max_output_tokens=6)
    second = client.responses.create(input="and more?", previous_response_id=first.id, max_output_tokens=4,
                                     instructions="be kind")
    assert second.previous_response_id == first.id and first.store
    chat = client.chat.completions.create(model=CHAT["model"], max_tokens=4, messages=[
        {"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "and more?"}])
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    third = client.responses.create(input="last", previous_response_id=second.id, max_output_tokens=2)
    assert third.usage.input_tokens > second.usage.input_tokens  # the chain carries both turns
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    assert_error(httpx.get(server.base_url + f"/v1/responses/{first.id}"), 404)
    err = assert_error(httpx.post(server.base_url + "/v1/responses",
                                  json={"input": "x", "previous_response_id": first.id}), 404, "previous_response_id")
    assert "No stored response" in err["message"]
    unstored = client.responses.create(input="hi", store=False, max_output_tokens=2)
    assert not unstored.store
    assert_error(httpx.get(server.base_url + f"/v1/responses/{unstored.id}"), 404)


def test_cors_preflight_and_headers(start_fake_server) -> None:
    """As vLLM's defaults, any origin may call the API from a browser: the preflight (no API key) is answered, and
    responses carry the allow-origin header; --allowed-origins narrows it."""
    server = start_fake_server(api_key="k")
    pre = httpx.options(server.base_url + "/v1/chat/completions",
                        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                 "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*"
    assert "POST" in pre.headers["access-control-allow-methods"]
    r = httpx.post(server.base_url + "/v1/chat/completions", json=CHAT,
                   headers={"Origin": "https://app.example", "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    narrow = start_fake_server(allowed_origins=["https://ok.example"], allow_credentials=True)
    ok = httpx.get(narrow.base_url + "/v1/models", headers={"Origin": "https://ok.example"})
    assert ok.headers["access-control-allow-origin"] == "https://ok.example"
    assert ok.headers["access-control-allow-credentials"] == "true"
    other = httpx.get(narrow.base_url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    bad = httpx.options(narrow.base_url + "/v1/models",
                        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert bad.status_code == 400


def test_https_with_the_ssl_flags(tmp_path) -> None:
    """--ssl-keyfile / --ssl-certfile: the server as run_server builds it answers over HTTPS (a self-signed
    certificate made with openssl)."""
    import argparse
    import shutil
    import ssl
    import subprocess
    import threading

    from pagedserve.async_engine import AsyncEngine
    from pagedserve.entrypoints.openai.cli_serve import add_server_args
    from pagedserve.entrypoints.openai.server import ServerSettings, _make_uvicorn_server, build_app
    from tests.entrypoints.conftest import free_port

    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    port = free_port()
    args = parser.parse_args(["--port", str(port), "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
                              "--uvicorn-log-level", "warning", "--disable-access-log"])
    engine = AsyncEngine(FakeEngine())
    server = _make_uvicorn_server(build_app(engine, ServerSettings()), args, engine.stop_accepting)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the HTTPS server did not start"
            time.sleep(0.02)
        r = httpx.post(f"https://127.0.0.1:{port}/v1/chat/completions", json=CHAT,
                       verify=ssl.create_default_context(cafile=str(cert)))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == TEXT[:5]
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is not served
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_cors_flags_take_json_lists() -> None:
    import argparse

    from pagedserve.entrypoints.openai.cli_serve import add_server_args

    parser = argparse.ArgumentParser()
    add_server_args(parser)
    args = parser.parse_args(["--allowed-origins", '["https://a.example", "https://b.example"]', "--allow-credentials"])
    assert args.allowed_origins == ["https://a.example", "https://b.example"] and args.allow_credentials
    assert parser.parse_args([]).allowed_origins == ["*"]
    for bad in ("https://a.example", '{"a": 1}', "[1]"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--allowed-origins", bad])


def test_a_routes_bug_is_a_500_and_the_connection_lives_on(start_fake_server) -> None:
    """An unexpected exception in a route is a 500 OpenAI error (a ValueError a 400) answered inside the app: the
    keep-alive connection stays usable (left to Starlette's outer error middleware the exception was re-raised to
    uvicorn, which dropped the connection: the client's next request on it failed with a reset)."""
    server = start_fake_server()

    async def boom() -> None:
        raise KeyError("a bug")

    async def bad() -> None:
        raise ValueError("a bad value")

    server.app.add_api_route("/boom", boom)
    server.app.add_api_route("/bad", bad)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for _ in range(3):
            r = client.get("/boom")
            assert r.status_code == 500 and r.json()["error"] == {
                "message": "internal server error: KeyError", "type": "server_error", "param": None, "code": None}
            r = client.get("/bad")
            assert r.status_code == 400 and r.json()["error"]["message"] == "a bad value"
            assert client.get("/health").status_code == 200  # the same connection
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_request_cancelled_at_shutdown_is_a_503(start_fake_server) -> None:
    """Found by stress-testing: the requests still running when --shutdown-timeout ends are cancelled by uvicorn, which
    answered each with a plain-text 500 (and a traceback in the log); they get the JSON 503 of a shutting-down server,
    and the connection lives on."""
    import asyncio

    server = start_fake_server()

    async def cancelled() -> None:  # what uvicorn's cancel looks like from inside a route
        raise asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded")

    server.app.add_api_route("/cancelled", cancelled)
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        r = client.get("/cancelled")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "shutting_down" and "shutdown timeout" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200


def test_a_list_of_prompts_is_submitted_at_once(start_fake_server) -> None:
    """Found by stress-testing: /v1/completions added a list's prompts one at a time, each waiting for the engine to
    accept it between two steps, so 80 prompts took 80 steps to go in (and trickled in after the client had gone).
    All are accepted together now, whole and streamed."""
    engine = FakeEngine(step_delay=0.02, max_num_seqs=64)
    server = start_fake_server(engine)
    prompts = [f"prompt {i}" for i in range(40)]
    for stream in (False, True):
        before = engine.num_steps
        r = httpx.post(server.base_url + "/v1/completions",
                       json={"model": MODEL, "prompt": prompts, "max_tokens": 2, "stream": stream}, timeout=60)
        assert r.status_code == 200
        assert engine.num_steps - before <= 6, engine.num_steps - before  # (one at a time: 40+ steps)
        if not stream:
            assert sorted(c["index"] for c in r.json()["choices"]) == list(range(40))


def test_messages_and_responses_name_what_is_wrong(start_fake_server) -> None:
    """Found by fuzzing: a null text block was "not supported" (it is a text block with no string), and tools without
    a tool_choice on a server without --enable-auto-tool-choice were refused in the chat route's words."""
    server = start_fake_server()
    base = {"model": CHAT["model"], "max_tokens": 4}
    r = httpx.post(server.base_url + "/v1/messages",
                   json={**base, "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]})
    assert r.status_code == 400 and r.json()["error"]["message"] == "messages.0.content.0.text must be a string"
    tool = {"name": "f", "input_schema": {"type": "object"}}
    r = httpx.post(server.base_url + "/v1/messages",
                   json={**base, "tools": [tool], "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["type"] == "error"
    assert '{"type": "any"}' in r.json()["error"]["message"], r.text
    r = httpx.post(server.base_url + "/v1/messages", json={**base, "tools": [tool], "tool_choice": {"type": "any"},
                                                           "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    err = assert_error(httpx.post(server.base_url + "/v1/responses", json={
        "input": [{"role": "user", "content": [{"type": "input_text", "text": None}]}]}), 400, "input")
    assert err["message"] == "input.0.content.0.text must be a string"


def test_echoed_token_ids_keep_special_tokens_and_offsets_index_the_text(server) -> None:
    """Found by the session 30 stress round: a token-id prompt was echoed without its special tokens while its
    tokens and text_offset counted them, so the offsets pointed past the text. Each token now sits at its offset."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt=[104, 105, 256, 106], max_tokens=3, echo=True, logprobs=1,
                                      stream=stream)
        chunks = list(r) if stream else [r]
        text = "".join(c.choices[0].text for c in chunks)
        tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
        assert text == "hi<eos>j" + TEXT[:3]
        assert tokens[:4] == ["h", "i", "<eos>", "j"] and len(tokens) == len(offsets) == 7
        assert all(text[o : o + len(t)] == t for t, o in zip(tokens, offsets)), (tokens, offsets, text)


def test_stream_options_echo_with_suffix_and_request_templates_are_refused(start_fake_server) -> None:
    """stream_options without stream (OpenAI's and vLLM's 400), echo with suffix (the model's prompt is the FIM
    markup, not the prompt), and a request's own chat_template unless the server trusts them (vLLM's
    --trust-request-chat-template); with it, the request's template renders the prompt."""
    server = start_fake_server()
    url = server.base_url
    assert_error(httpx.post(url + "/v1/chat/completions", json={**CHAT, "stream_options": {"include_usage": True}}),
                 400, "stream_options")
    assert_error(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2,
                                                           "stream_options": {"include_usage": True}}),
                 400, "stream_options")
    assert_error(httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "a", "suffix": "b",
                                                           "echo": True, "max_tokens": 2}), 400, "echo")
    template = {**CHAT, "chat_template": "custom: {last}!"}
    assert_error(httpx.post(url + "/v1/chat/completions", json=template), 400, "chat_template")
    assert_error(httpx.post(url + "/tokenize", json={"model": MODEL, "messages": CHAT["messages"],
                                                     "chat_template": "x"}), 400, "chat_template")
    assert httpx.post(url + "/v1/chat/completions", json=CHAT).status_code == 200  # still serving
    trusted = start_fake_server(trust_request_chat_template=True)
    r = httpx.post(trusted.base_url + "/v1/chat/completions", json=template)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len("custom: hi!")
    r = httpx.post(trusted.base_url + "/tokenize", json={"model": MODEL, "messages": CHAT["messages"],
                                                         "chat_template": "custom: {last}!"})
    assert r.status_code == 200 and r.json()["tokens"] == list(b"custom: hi!"), r.text
    # --chat-template-content-format reaches the template's renderer (Tokenizer.apply_chat_template's content_format)
    parts = start_fake_server(chat_template_content_format="openai")
    r = httpx.post(parts.base_url + "/tokenize", json={"model": MODEL, "messages": CHAT["messages"]})
    assert r.status_code == 200 and bytes(r.json()["tokens"]).startswith(b"<openai>"), r.text


def test_continuous_usage_counts_each_choice_alone(server) -> None:
    """stream_options.continuous_usage_stats with n = 2 (vLLM's field): a chunk's usage counts its own choice's
    tokens, as vLLM's; it added up both choices (1, 2, 3, ... up to 2 x max_tokens)."""
    for route, body in (("/v1/chat/completions", {**CHAT, "max_tokens": 4}),
                        ("/v1/completions", {"model": MODEL, "prompt": ["ab", "abc"], "max_tokens": 4})):
        body = {**body, "n": 2, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        with httpx.stream("POST", server.base_url + route, json=body, timeout=30) as r:
            events = [e for e in sse_events(r) if e != "[DONE]"]
        last: dict[int, int] = {}
        for e in events:
            if not e["choices"]:
                continue
            i, usage = e["choices"][0]["index"], e["usage"]
            assert usage["completion_tokens"] >= last.get(i, 0) and usage["completion_tokens"] <= 4, (route, e)
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            last[i] = usage["completion_tokens"]
        assert last == {i: 4 for i in last} and len(last) == (2 if "chat" in route else 4), (route, last)
        final = events[-1]["usage"]
        assert final["completion_tokens"] == 4 * len(last)
        if "chat" not in route:  # each chunk's prompt is its own choice's
            prompts = {e["choices"][0]["index"]: e["usage"]["prompt_tokens"] for e in events if e["choices"]}
            assert prompts == {0: 2, 1: 2, 2: 3, 3: 3} and final["prompt_tokens"] == 5


def test_seed_bounds_are_stated_exactly(server) -> None:
    """Seeds are 64-bit (either sign's range); 2**64 is a 400 whose message states the bound as an integer (it read
    18446744073709552000, a float's rendering); 2**64 - 1 and -2**63 are served."""
    url = server.base_url + "/v1/completions"
    body = {"model": MODEL, "prompt": "a", "max_tokens": 2}
    err = assert_error(httpx.post(url, json={**body, "seed": 2**64}), 400, "seed")
    assert "18446744073709551615" in err["message"], err
    for seed in (2**64 - 1, -(2**63)):
        assert httpx.post(url, json={**body, "seed": seed}).status_code == 200


def test_chat_echo_puts_the_continued_message_first(server) -> None:
    """vLLM's chat `echo`: the last message's text, when it is the assistant's (continued), comes before the answer:
    in the message, or streamed as the first content delta; a last message of another role echoes nothing."""
    body = {"model": MODEL, "max_tokens": 4, "echo": True, "add_generation_prompt": False,
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}]}
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello there" + TEXT[:4]
    events = sse_events(httpx.post(server.base_url + "/v1/chat/completions", json={**body, "stream": True}))
    deltas = [e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]]
    assert deltas[1] == "Hello there" and "".join(deltas) == "Hello there" + TEXT[:4]
    plain = httpx.post(server.base_url + "/v1/chat/completions", json={**CHAT, "echo": True}).json()
    assert plain["choices"][0]["message"]["content"] == TEXT[:5]  # the last message is the user's: nothing echoed
    # add_generation_prompt false: the request's role is the last message's own, so it is echoed whatever it is
    raw = httpx.post(server.base_url + "/v1/chat/completions",
                     json={**CHAT, "echo": True, "add_generation_prompt": False}).json()
    assert raw["choices"][0]["message"]["content"] == "hi" + TEXT[:5]


def test_chat_route_takes_max_new_tokens_within_the_context(start_fake_server) -> None:
    """A chat request without max_tokens gets the model's max_new_tokens, cut to what the context leaves (as vLLM:
    never a 400 for a value the client did not send); its own max_tokens wins."""
    for default, prompt, want in ((3, "hi", 3), (1000, "x" * 200, None)):
        engine = FakeEngine(max_model_len=256)
        engine.default_sampling = {"max_tokens": default}
        server = start_fake_server(engine)
        body = {"model": "fake-model", "messages": [{"role": "user", "content": prompt}]}
        r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        if want is not None:
            assert usage["completion_tokens"] == want
        else:  # up to the context's end
            assert usage["prompt_tokens"] + usage["completion_tokens"] == 256
        own = httpx.post(server.base_url + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=30)
        assert own.json()["usage"]["completion_tokens"] == 2



def test_a_hub_download_of_an_adapter_does_not_hold_up_other_requests(start_fake_server, monkeypatch) -> None:
    """/v1/load_lora_adapter with a Hub repo id downloads in a thread of its own: the tokenizer thread, which every
    text request's tokenization goes through, stays free meanwhile (the Hub is stood in for by a 3 s sleep)."""
    import threading
    import types

    import huggingface_hub

    from tests.entrypoints.fake_engine import FakeEngine

    def slow_snapshot_download(repo_id, **kwargs):
        time.sleep(3.0)
        raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", slow_snapshot_download)
    engine = FakeEngine()
    engine.config = types.SimpleNamespace(enable_lora=True, hf_token=None, download_dir=None)
    server = start_fake_server(engine, allow_runtime_lora_updating=True)
    answers = {}

    def load() -> None:
        answers["load"] = httpx.post(server.base_url + "/v1/load_lora_adapter",
                                     json={"lora_name": "x", "lora_path": "someone/adapter"}, timeout=30)

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(0.3)  # the download is under way
    t0 = time.monotonic()
    r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=30)
    waited = time.monotonic() - t0
    loader.join(30)
    assert r.status_code == 200 and waited < 2.0, waited
    bad = answers["load"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
    assert "Hub could not give it" in bad.json()["error"]["message"]
