"""The Messages API's request -> chat request conversion (serving_messages.chat_request_of), without a server."""

from __future__ import annotations

import pytest

from pagedserve.entrypoints.openai.serving_base import APIError
from pagedserve.entrypoints.openai.serving_messages import MessagesRequest, chat_request_of


def convert(**fields):
    return chat_request_of(MessagesRequest.model_validate({"model": "m", "max_tokens": 8, **fields}))


def test_a_tool_conversation_becomes_chat_messages() -> None:
    req = convert(system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                          {"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21C"},
                                     {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                                      "content": [{"type": "text", "text": "timeout"}]}]},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Rome?"}]},
    ], tools=[{"name": "w", "input_schema": {"type": "object"}}], tool_choice={"type": "any",
                                                                              "disable_parallel_tool_use": True},
        stop_sequences=["END"], thinking={"type": "disabled"}, temperature=0.5, top_k=5,
        output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}})
    messages = req.model_dump(exclude_none=True)["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[2]["content"] == "Checking." and messages[2]["tool_calls"][0]["id"] == "toolu_1"
    assert messages[2]["tool_calls"][0]["function"] == {"name": "w", "arguments": '{"c": "Paris"}'}
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "21C"}
    assert messages[4] == {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timeout"}
    assert messages[5] == {"role": "user", "content": "And Rome?"} and len(messages) == 6
    assert req.tool_choice == "required" and req.parallel_tool_calls is False
    assert req.stop == ["END"] and req.temperature == 0.5 and req.top_k == 5 and req.max_completion_tokens == 8
    assert req.chat_template_kwargs == {"enable_thinking": False}
    assert req.response_format["type"] == "json_schema"
    assert convert(messages=[{"role": "user", "content": "x"}], tools=[{"name": "w"}],
                   tool_choice={"type": "tool", "name": "w"}).tool_choice == {"type": "function",
                                                                              "function": {"name": "w"}}


@pytest.mark.parametrize("fields, where", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b", "input": {}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "a", "name": "b"}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "s"}]},
     "tools.0"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "w"}], "tool_choice": {"type": "sometimes"}},
     "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x"}], "system": [{"type": "image"}]}, "system"),
])
def test_what_the_route_refuses(fields, where) -> None:
    with pytest.raises(APIError) as e:
        convert(**fields)
    assert e.value.status_code == 400 and e.value.param == where, e.value.message


def test_reasoning_effort_and_thinking_reach_the_chat_template(real_model_dir) -> None:
    """OpenAI's reasoning_effort is the template's `reasoning_effort`; the Messages API's thinking switch its
    `enable_thinking` (a template that prints both)."""
    import asyncio

    from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
    from pagedserve.entrypoints.openai.serving_chat import render_chat_prompt
    from pagedserve.tokenizer import load_tokenizer

    template = "{{ reasoning_effort }}/{{ enable_thinking }}|{% for m in messages %}{{ m.content }}{% endfor %}"
    tokenizer = load_tokenizer(real_model_dir, chat_template=template)

    class Engine:
        def __init__(self) -> None:
            self.tokenizer = tokenizer

        async def run_in_tokenizer_thread(self, fn, *args):
            return fn(*args)

    def rendered(req) -> str:
        return asyncio.run(render_chat_prompt(Engine(), req, True, None))[0]

    hi = [{"role": "user", "content": "hi"}]
    assert rendered(ChatCompletionRequest.model_validate({"messages": hi, "reasoning_effort": "low"})) == "low/|hi"
    assert rendered(ChatCompletionRequest.model_validate({"messages": hi})) == "/|hi"
    assert rendered(convert(messages=hi, thinking={"type": "enabled", "budget_tokens": 1024})) == "/True|hi"
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"messages": hi, "reasoning_effort": "extreme"})
