"""Tool calling's pure parts (pagedserve/entrypoints/openai/tool_calls.py): checks of tools and tool_choice, the
constraints of the named and required modes, the hermes parser, and its streaming form, which must give the
same calls and content as the whole-answer parser however the text is cut into deltas."""

from __future__ import annotations

import json
import random

import pytest

from pagedserve.entrypoints.openai.tool_calls import (
    AutoToolStream,
    calls_from_required,
    check_tools,
    parse_hermes,
    resolve_mode,
    structured_outputs_for,
    template_messages,
)
from pagedserve.sampling_params import StructuredOutputsParams

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
ALARM = {"type": "object", "properties": {"hour": {"type": "integer"}, "loud": {"type": "boolean"},
                                           "label": {"type": "string"}, "days": {"type": "array"}}}
# the request's tools as the chat route passes them: each name with its parameters schema
NAMES = {"get_weather": WEATHER["function"]["parameters"], "get_time": {"type": "object", "properties": {}},
         "set_alarm": ALARM}


@pytest.mark.parametrize("tools, message", [
    ([], "non-empty list"),
    ([{"type": "function"}], "must be"),
    ([{"type": "retrieval", "function": {"name": "f"}}], "must be"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "function.name must be"),
    ([WEATHER, WEATHER], "used twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "JSON Schema object"),
])
def test_bad_tools_are_value_errors(tools, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_tools(tools)


def test_tool_choice_modes() -> None:
    tools = check_tools([WEATHER, TIME])
    with pytest.raises(ValueError, match="the default when tools are given"):  # None with tools = "auto", as vLLM
        resolve_mode(tools, None, auto_enabled=False)
    assert resolve_mode(tools, None, auto_enabled=True).kind == "auto"
    assert resolve_mode(None, None, auto_enabled=True).kind == "none"
    named = resolve_mode(tools, {"type": "function", "function": {"name": "get_time"}}, False)
    assert (named.kind, named.name) == ("named", "get_time")
    assert resolve_mode(tools, "required", False).kind == "required"
    for choice, message in [("auto", "--enable-auto-tool-choice"), ({"function": {"name": "nope"}}, "not among"),
                            ("sometimes", "must be"), ({"type": "function"}, "must be")]:
        with pytest.raises(ValueError, match=message):
            resolve_mode(tools, choice, auto_enabled=False)
    with pytest.raises(ValueError, match="needs tools"):
        resolve_mode(None, "required", auto_enabled=True)


def test_named_and_required_constraints() -> None:
    tools = check_tools([WEATHER, TIME])
    named = structured_outputs_for(resolve_mode(tools, {"function": {"name": "get_weather"}}, False), tools)
    assert named == {"json": WEATHER["function"]["parameters"]}
    required = structured_outputs_for(resolve_mode(tools, "required", False), tools)
    schema = required["json"]
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [o["properties"]["name"] for o in schema["items"]["anyOf"]] == [{"enum": ["get_weather"]},
                                                                          {"enum": ["get_time"]}]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    StructuredOutputsParams(**required)  # a valid constraint
    calls = calls_from_required('[{"name": "get_time", "parameters": {}}, {"name": "get_weather", '
                                '"parameters": {"city": "Oslo"}}]')
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {}), ("get_weather", {"city": "Oslo"})]
    assert calls[0]["id"].startswith("call_") and calls[0]["id"] != calls[1]["id"]
    assert calls_from_required('[{"name": "get_time", "param') is None  # cut by max_tokens


ANSWERS = [
    ("Hello there.", "Hello there.", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>', "Let me check.",
     [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    ('<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>', "same", []),  # not a tool here
    ('<tool_call>{"name": "get_weather", "arg', "same", []),  # cut, not JSON
    ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
    ('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Bern"}}]', None,
     [("get_time", {}), ("get_weather", {"city": "Bern"})]),
    ('{"answer": 42}', "same", []),
    ("x < y and <tool_ is not a tag", "same", []),
    # Llama 3.1: "parameters", several calls separated by ';', after <|python_tag|> when special tokens are kept
    ('{"name": "get_weather", "parameters": {"city": "Lima"}}; {"name": "get_time", "parameters": {}}', None,
     [("get_weather", {"city": "Lima"}), ("get_time", {})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {}}', None, [("get_time", {})]),
    # Mistral: [TOOL_CALLS] then a list
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Kyiv"}}]', None,
     [("get_weather", {"city": "Kyiv"})]),
    ('{"name": "get_time", "parameters": {}}; and then some words', "same", []),  # not calls alone: text
    ("<|python_tag|>print(1)", "same", []),  # Llama's code interpreter, not a JSON call
    ("<p>HTML, not a tag we know</p>", "same", []),
    # Qwen3-Coder's XML form inside the block; values typed by the tool's schema (a string stays as written)
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>", None,
     [("get_weather", {"city": "Paris"})]),
    ("Setting it.\n<tool_call>\n<function=set_alarm>\n<parameter=hour>\n7\n</parameter>\n<parameter=loud>\ntrue\n"
     "</parameter>\n<parameter=label>\n007\n</parameter>\n<parameter=days>\n[\"mon\", \"tue\"]\n</parameter>\n"
     "</function>\n</tool_call>", "Setting it.", [("set_alarm", {"hour": 7, "loud": True, "label": "007",
                                                                "days": ["mon", "tue"]})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork\n</parameter>\n</function>\n</tool_call>"
     "\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>", None,
     [("get_weather", {"city": "New\nYork"}), ("get_time", {})]),
    ("<tool_call>\n<function=launch_rockets>\n</function>\n</tool_call>", "same", []),  # not a tool here
    ("<tool_call>\n<function=set_alarm>\n<parameter=hour>\nseven\n</parameter>\n</function>\n</tool_call>", None,
     [("set_alarm", {"hour": "seven"})]),  # not an integer: kept as written
    # Llama 3.2 / 4's pythonic calls: a Python list of calls with literal keyword arguments
    ('[get_weather(city="Oslo"), get_time()]', None, [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ("[set_alarm(hour=7, loud=True, label=None, days=['mon', 'tue'])]", None,
     [("set_alarm", {"hour": 7, "loud": True, "label": None, "days": ["mon", "tue"]})]),
    ('[launch_rockets(count=3)]', "same", []),  # not a tool here
    ('[get_weather(city=input())]', "same", []),  # not a literal
    ('[get_weather("Oslo")]', "same", []),  # positional: not a call we can name
    ("[1, 2, 3]", "same", []),
    ('[get_weather(city="Oslo")] and more', "same", []),
]


@pytest.mark.parametrize("text, content, calls", ANSWERS)
def test_parse_hermes(text, content, calls) -> None:
    got_content, got_calls = parse_hermes(text, NAMES)
    assert got_content == (text if content == "same" else content)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got_calls] == calls


@pytest.mark.parametrize("text, content, calls", ANSWERS)
def test_streamed_auto_calls_equal_the_whole_answer_parse(text, content, calls) -> None:
    rng = random.Random(len(text))
    for _ in range(30):
        stream = AutoToolStream(NAMES)
        streamed_content, streamed_calls = "", []
        pos = 0
        while pos < len(text):
            step = rng.randint(1, 6)
            c, k = stream.feed(text[pos: pos + step])
            streamed_content += c
            streamed_calls += k
            pos += step
        c, k = stream.finish()
        streamed_content += c
        streamed_calls += k
        assert [call["index"] for call in streamed_calls] == list(range(len(streamed_calls)))
        got = [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in streamed_calls]
        if calls:
            assert got == calls
            assert streamed_content.strip() == (content or "")
        else:  # no calls: the whole text goes out as content (a block that is no call: as written)
            assert not got and streamed_content == text


def test_partial_tag_is_held_back_until_known() -> None:
    stream = AutoToolStream(NAMES)
    assert stream.feed("Sure <tool") == ("Sure ", [])
    content, calls = stream.feed('_call>{"name": "get_time", "arguments": {}}</tool_call>')
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_time"]
    stream = AutoToolStream(NAMES)
    assert stream.feed("a <tool") == ("a ", [])
    assert stream.feed("box>") == ("<toolbox>", [])


def test_template_messages_turn_arguments_into_objects() -> None:
    msgs = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "not json"}}]}]
    out = template_messages(msgs)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"tz": "UTC"}
    assert out[0]["tool_calls"][1]["function"]["arguments"] == "not json"
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == '{"tz": "UTC"}'  # the input is not changed


def test_parallel_tool_calls_false_allows_one_call() -> None:
    tools = check_tools([WEATHER, TIME])
    mode = resolve_mode(tools, "required", False, parallel_tool_calls=False)
    assert not mode.parallel and structured_outputs_for(mode, tools)["json"]["maxItems"] == 1
    assert "maxItems" not in structured_outputs_for(resolve_mode(tools, "required", False), tools)["json"]


def test_auto_answers_with_parallel_tool_calls_false_keep_the_first_call() -> None:
    from pagedserve.entrypoints.openai.serving_chat import _ToolStream, message_of
    from pagedserve.outputs import CompletionOutput

    text = ('<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    out = CompletionOutput(0, text, [1, 2], None, None, "stop", None)
    tools = check_tools([WEATHER, TIME])
    for parallel, expected in ((True, ["get_time", "get_weather"]), (False, ["get_time"])):
        mode = resolve_mode(tools, "auto", True, parallel_tool_calls=parallel)
        message, finish = message_of(out, mode)
        assert finish == "tool_calls" and [c["function"]["name"] for c in message["tool_calls"]] == expected
        stream = _ToolStream(mode)
        deltas = stream.feed(text[:30]) + stream.feed(text[30:]) + stream.finish()
        streamed = [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])]
        assert streamed == expected and stream.finish_reason(out) == "tool_calls"
