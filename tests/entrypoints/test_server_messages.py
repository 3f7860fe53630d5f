"""Anthropic's Messages API (/v1/messages) on the real embedded model in a subprocess, driven by the official
`anthropic` client: answers equal the chat route's for the same conversation, whole and streamed; stop reasons;
tools (tool_use blocks, tool_result turns); token counting; Anthropic-shaped errors; the x-api-key header."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from tests.entrypoints.conftest import RealServer

pytestmark = pytest.mark.slow

KEY = "sesame"
T0 = {"temperature": 0}  # the anthropic client has no sampling arguments now: they go in the body
ASK = [{"role": "user", "content": "Write a haiku about the sea."}]
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(real_model_dir):
    s = RealServer(real_model_dir, "--max-model-len", "2048", "--cpu-kv-cache-gib", "0.5", "--enable-auto-tool-choice",
                   "--api-key", KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(server.base_url + "/v1/models", headers={"x-api-key": KEY}).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def gpt(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


def test_answers_equal_the_chat_route_whole_and_streamed(claude, gpt, model) -> None:
    system = "You are a terse poet."
    chat = gpt.chat.completions.create(model=model, messages=[{"role": "system", "content": system}, *ASK],
                                       max_tokens=24, extra_body=T0)
    m = claude.messages.create(model=model, system=system, messages=ASK, max_tokens=24, extra_body=T0)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_") and m.model == model
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == chat.choices[0].message.content
    # (Anthropic's input_tokens leaves out the tokens read from the prefix cache)
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert m.usage.output_tokens == chat.usage.completion_tokens
    assert m.stop_reason == ("max_tokens" if chat.choices[0].finish_reason == "length" else "end_turn")
    blocks = claude.messages.create(model=model, system=[{"type": "text", "text": system}], messages=ASK,
                                    max_tokens=24, extra_body=T0)
    assert blocks.content[0].text == m.content[0].text
    assert blocks.usage.cache_read_input_tokens >= 16  # the same prompt again: its blocks from the prefix cache
    assert blocks.usage.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens - \
        blocks.usage.cache_read_input_tokens
    with claude.messages.stream(model=model, system=system, messages=ASK, max_tokens=24, extra_body=T0) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text and final.content[0].text == text
    # the streamed usage agrees with the whole answer's (message_start goes out once the prefix-cache hit is known)
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert final.usage.cache_read_input_tokens >= 16 and final.usage.output_tokens == m.usage.output_tokens
    assert final.stop_reason == m.stop_reason and final.usage.output_tokens == m.usage.output_tokens


def test_stop_sequences_and_max_tokens(claude, model) -> None:
    long = claude.messages.create(model=model, messages=ASK, max_tokens=12, extra_body=T0)
    assert long.stop_reason == "max_tokens" and long.usage.output_tokens == 12
    word = long.content[0].text.split()[2]
    m = claude.messages.create(model=model, messages=ASK, max_tokens=12, extra_body=T0, stop_sequences=[word])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert long.content[0].text.startswith(m.content[0].text) and word not in m.content[0].text


def test_output_config_holds_the_answer_to_a_json_schema(claude, model) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
              "additionalProperties": False}
    m = claude.messages.create(model=model, max_tokens=40, extra_body=T0,
                               messages=[{"role": "user", "content": "The capital of Italy, as JSON."}],
                               output_config={"format": {"type": "json_schema", "schema": schema}})
    assert json.loads(m.content[0].text) == {"city": "Rome"}


def test_tool_use_then_tool_result(claude, model) -> None:
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    m = claude.messages.create(model=model, messages=ask, tools=[WEATHER], tool_choice={"type": "any"},
                               max_tokens=80, extra_body=T0)
    assert m.stop_reason == "tool_use"
    call = next(b for b in m.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input["city"] == "Paris" and call.id.startswith("toolu_")
    with claude.messages.stream(model=model, messages=ask, tools=[WEATHER], tool_choice={"type": "any"},
                                max_tokens=80, extra_body=T0) as stream:
        final = stream.get_final_message()
    streamed = next(b for b in final.content if b.type == "tool_use")
    assert (streamed.name, streamed.input) == (call.name, call.input) and final.stop_reason == "tool_use"
    auto = claude.messages.create(model=model, messages=ask, tools=[WEATHER], max_tokens=80, extra_body=T0)
    assert any(b.type == "tool_use" and b.name == "get_weather" for b in auto.content)
    follow = ask + [{"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                                       "input": call.input}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                  "content": json.dumps({"temperature": 21, "unit": "celsius"})}]}]
    r = claude.messages.create(model=model, messages=follow, tools=[WEATHER], tool_choice={"type": "none"},
                               max_tokens=40, extra_body=T0)
    assert [b.type for b in r.content] == ["text"] and "21" in r.content[0].text
    prompt = r.usage.input_tokens + r.usage.cache_read_input_tokens  # (input_tokens: those not from the cache)
    assert prompt > m.usage.input_tokens + m.usage.cache_read_input_tokens + 20  # the call and its result rendered
    counted = claude.messages.count_tokens(model=model, messages=follow, tools=[WEATHER])
    assert counted.input_tokens == prompt


def test_errors_have_anthropic_s_shape(server, claude, model) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=model, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}],
            max_tokens=5)
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    assert "'image' blocks are not supported" in bad.value.body["error"]["message"]
    r = httpx.post(server.base_url + "/v1/messages", headers={"x-api-key": KEY},
                   json={"model": model, "messages": ASK})  # no max_tokens
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(server.base_url + "/v1/messages", headers={"x-api-key": KEY}, content=b"{not json")
    assert r.status_code == 400 and r.json()["type"] == "error"
    with pytest.raises(anthropic.BadRequestError, match="output_config.format"):
        claude.messages.create(model=model, messages=ASK, max_tokens=5, output_config={"format": {"type": "xml"}})
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="no-such-model", messages=ASK, max_tokens=5)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base_url, api_key="wrong", max_retries=0).messages.create(
            model=model, messages=ASK, max_tokens=5)
    ok = httpx.post(server.base_url + "/v1/messages", headers={"authorization": f"Bearer {KEY}"},
                    json={"model": model, "messages": ASK, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["output_tokens"] == 2
