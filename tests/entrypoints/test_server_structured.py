"""Structured outputs and tool calling through the server, driven by the official openai client: OpenAI's
response_format (json_object, json_schema) and tools (named, required, auto; whole and streamed; a tool result
fed back) on the real embedded model; vLLM's structured_outputs and guided_* fields, streaming, and every kind
of bad constraint or tool request (a 400 naming the field, and the server goes on serving) on a tiny
random-weight model, where only the grammar keeps the output valid."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from tests.entrypoints.conftest import RealServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    s = RealServer(tiny_model_dir, "--load-format", "dummy", "--cpu-kv-cache-gib", "0.25", "--max-model-len", "256")
    yield s
    s.stop()


def client_of(server: RealServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def model_of(server: RealServer) -> str:
    return httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]


MESSAGES = [{"role": "user", "content": "hello"}]


def test_vllm_fields_constrain_chat_and_completions(tiny) -> None:
    client, model = client_of(tiny), model_of(tiny)
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20, n=3, seed=1,
                                       extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert [c.message.content for c in r.choices] and all(
        c.message.content in ("red", "green", "blue") and c.finish_reason == "stop" for c in r.choices)
    r = client.completions.create(model=model, prompt="Code:", max_tokens=30, seed=2,
                                  extra_body={"guided_regex": r"[A-Z]{3}-\d{2}"})
    assert re.fullmatch(r"[A-Z]{3}-\d{2}", r.choices[0].text), r.choices[0].text
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=30, seed=3,
        extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
    assert 0 <= json.loads(r.choices[0].message.content)["n"] <= 9
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=30, seed=4,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")


def test_streamed_constrained_chat_equals_non_streamed(tiny) -> None:
    client, model = client_of(tiny), model_of(tiny)
    body = {"guided_grammar": 'root ::= "(" [0-9] ("," [0-9])* ")"'}
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, seed=7, extra_body=body)
    text = full.choices[0].message.content
    assert re.fullmatch(r"\([0-9](,[0-9])*\)", text), text
    chunks = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=40, seed=7, extra_body=body,
                                            stream=True)
    streamed, finish = "", None
    for chunk in chunks:
        for c in chunk.choices:
            streamed += c.delta.content or ""
            finish = c.finish_reason or finish
    assert streamed == text and finish == "stop"


@pytest.mark.parametrize("path, extra, param, message", [
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format", "response_format type must be"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format", '"json_schema" object'),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
     "response_format", "must be a JSON Schema object"),
    ("/v1/chat/completions", {"guided_regex": "(("}, "guided_regex", "regex constraint does not compile"),
    ("/v1/completions", {"guided_json": {"type": "objekt"}}, "guided_json", 'Unsupported type "objekt"'),
    ("/v1/completions", {"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs", "EBNF parser error"),
    ("/v1/completions", {"structured_outputs": {"jsn": {}}}, "structured_outputs", "unexpected keyword"),
    ("/v1/completions", {"guided_choice": []}, "guided_choice", "choice must be a list"),
    ("/v1/chat/completions", {"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "give one"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex",
     "give one"),
])
def test_bad_constraints_are_400s_and_the_server_keeps_serving(tiny, path, extra, param, message) -> None:
    model = model_of(tiny)
    body = {"model": model, "max_tokens": 5, **extra}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "hi"})
    r = httpx.post(tiny.base_url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err
    ok = httpx.post(tiny.base_url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


@pytest.fixture(scope="module")
def real(real_model_dir):
    s = RealServer(real_model_dir, "--max-model-len", "2048", "--cpu-kv-cache-gib", "0.5", "--enable-auto-tool-choice")
    yield s
    s.stop()


def test_response_format_on_the_real_model(real) -> None:
    server = real
    if True:
        client, model = client_of(server), model_of(server)
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "country": {"type": "string", "maxLength": 20}},
                  "required": ["city", "country"], "additionalProperties": False}
        r = client.chat.completions.create(
            model=model, temperature=0, max_tokens=40,
            messages=[{"role": "user", "content": "Name the capital of Italy and its country, as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}})
        value = json.loads(r.choices[0].message.content)
        assert value["city"] == "Rome" and value["country"] == "Italy", value
        r = client.chat.completions.create(
            model=model, temperature=0, max_tokens=60, response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Give a JSON object with the key 'answer' set to 2 + 2."}])
        assert json.loads(r.choices[0].message.content)["answer"] == 4


# --------------------------------------------------------------------------- tool calling
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def streamed(client, **kwargs) -> tuple[str, dict, str | None]:
    """(content, {index: {"id", "name", "arguments"}}, finish_reason) of a streamed chat answer."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            content += c.delta.content or ""
            for t in c.delta.tool_calls or []:
                entry = calls.setdefault(t.index, {"id": None, "name": "", "arguments": ""})
                entry["id"] = t.id or entry["id"]
                entry["name"] = (t.function.name if t.function and t.function.name else entry["name"])
                entry["arguments"] += (t.function.arguments or "") if t.function else ""
            finish = c.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("tool_choice, finish", [
    ({"type": "function", "function": {"name": "get_time"}}, "stop"),  # OpenAI ends a forced call with "stop"
    ("required", "tool_calls"),
    ("auto", "tool_calls"),
    (None, "tool_calls"),  # with --enable-auto-tool-choice, tools without a tool_choice mean "auto"
])
def test_tool_calls_whole_and_streamed(real, tool_choice, finish) -> None:
    client, model = client_of(real), model_of(real)
    kwargs = dict(model=model, messages=ASK, tools=TOOLS, temperature=0, max_tokens=80)
    if tool_choice is not None:
        kwargs["tool_choice"] = tool_choice
    r = client.chat.completions.create(**kwargs)
    choice = r.choices[0]
    assert choice.finish_reason == finish and choice.message.content is None, choice
    call = choice.message.tool_calls[0]  # (required: the model may add a call to the other tool)
    expected_name = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else "get_weather"
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == expected_name
    args = json.loads(call.function.arguments)
    assert args["city"] == "Paris" and set(args) <= {"city", "unit"}
    whole = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert all(name in ("get_weather", "get_time") and isinstance(a, dict) for name, a in whole)
    assert len({c.id for c in choice.message.tool_calls}) == len(whole)
    content, calls, stream_finish = streamed(client, **kwargs)
    assert stream_finish == finish and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == whole
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_tool_results_go_back_into_the_conversation(real) -> None:
    client, model = client_of(real), model_of(real)
    call = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="required",
                                          temperature=0, max_tokens=80).choices[0].message.tool_calls[0]
    followup = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": "celsius"})},
    ]
    r = client.chat.completions.create(model=model, messages=followup, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=40)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert "21" in r.choices[0].message.content
    # The prompt rendered the call and its result: more tokens than the question alone.
    assert r.usage.prompt_tokens > client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1).usage.prompt_tokens + 30


@pytest.mark.parametrize("extra, param, message", [
    ({"tools": [{"type": "function"}]}, "tools", "must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among the tools"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "--enable-auto-tool-choice"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "drop response_format"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "a"}]}]}, "messages",
     "only assistant messages"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
      "tool_choice": "required"}, "tools", 'Unsupported type "objekt"'),
])
def test_bad_tool_requests_are_400s(tiny, extra, param, message) -> None:
    body = {"model": model_of(tiny), "messages": MESSAGES, "max_tokens": 5, **extra}
    r = httpx.post(tiny.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message in err["message"], err


def metric(server: RealServer, name: str) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_constrained_and_plain_streams_under_load_with_drops(tiny) -> None:
    """20 concurrent streams, constrained (several kinds) and plain, every other one dropped mid-stream: the
    kept constrained ones are valid, and the KV cache and the running count come back to zero."""
    import asyncio

    model = model_of(tiny)
    kinds = [{"guided_regex": "[a-z]{5,40}"}, {"guided_choice": ["alpha", "beta"]},
             {"structured_outputs": {"json": {"type": "object", "required": ["k"], "properties": {
                 "k": {"type": "integer", "minimum": 0, "maximum": 999}}}, "disable_any_whitespace": True}},
             {}]

    async def one(client: httpx.AsyncClient, i: int, drop: bool):
        body = {"model": model, "messages": MESSAGES, "max_tokens": 40, "stream": True, "seed": i, **kinds[i % 4]}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            text, finish, n = "", None, 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                n += 1
                if drop and n == 3:
                    return None  # leaving the block closes the connection mid-stream
                finish = choice["finish_reason"] or finish
            return i % 4, text, finish

    async def main():
        async with httpx.AsyncClient(base_url=tiny.base_url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i, drop=(i // 4) % 2 == 0) for i in range(20)))

    results = [r for r in asyncio.run(main()) if r is not None]
    assert len(results) == 8
    for kind, text, finish in results:
        if kind == 0:
            assert re.fullmatch("[a-z]{5,40}", text) and finish == "stop", text
        elif kind == 1:
            assert text in ("alpha", "beta") and finish == "stop"
        elif kind == 2:
            assert isinstance(json.loads(text)["k"], int) and finish == "stop", text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (metric(tiny, "pagedserve:kv_cache_usage_perc") > 0
                                           or metric(tiny, "pagedserve:num_requests_running") > 0):
        time.sleep(0.2)
    assert metric(tiny, "pagedserve:num_requests_running") == 0
    assert metric(tiny, "pagedserve:num_free_kv_blocks") == metric(tiny, "pagedserve:num_total_kv_blocks")
