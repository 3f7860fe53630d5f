"""POST /v1/messages: Anthropic's Messages API over the chat route's pipeline, so the official `anthropic` client
(and tools built on it) talk to a pagedserve server unchanged; POST /v1/messages/count_tokens counts a request's
prompt tokens.

A request becomes a chat request: `system` (a string or text blocks) as the system message; each message's content
(a string or blocks: `text`, an assistant's `tool_use`, a user's `tool_result`; `thinking` blocks an assistant turn
carries back are dropped) as chat messages and tool calls / tool messages; `max_tokens`, `stop_sequences`,
`temperature`, `top_p`, `top_k` (the current anthropic client sends these through `extra_body`); `output_config`'s
JSON Schema `format` as a json_schema response_format; `thinking` ({"type": "enabled" | "disabled"}) as the chat
template's `enable_thinking` (Qwen3's switch); `tools` ({name, description, input_schema}) as function tools
and `tool_choice`
(auto / any / tool / none) as the chat route's auto / required / named / none. It runs through OpenAIServingChat.start
and comes back as a `message`: content blocks (`thinking` with a reasoning parser, `text`, `tool_use` with the
call's parsed input), `stop_reason` (end_turn, max_tokens, stop_sequence with the `stop_sequence` that matched,
tool_use) and `usage` (input / output tokens, cache reads from the prefix cache). With stream=true: Anthropic's
server-sent events (message_start, content_block_start / _delta / _stop, message_delta, message_stop), text as it
comes; with tools, each block whole once the answer is complete (a tool call's input in one input_json_delta).

Errors have Anthropic's shape ({"type": "error", "error": {"type": "invalid_request_error", "message"}}) and status
codes; the API key may come as `x-api-key` (the anthropic client's header) or a bearer token. Not supported, each a
400: image / document blocks, server tools.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.async_engine import RequestStream
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest, Int, OpenAIBaseModel
from pagedserve.entrypoints.openai.reasoning import ReasoningStream
from pagedserve.entrypoints.openai.serving_base import (
    APIError,
    SSEResponse,
    bad_request,
    converted_request_error,
    engine_error,
    final_or_error,
    run_until_disconnect,
)
from pagedserve.entrypoints.openai.serving_chat import message_of
from pagedserve.outputs import CompletionOutput, RequestOutput

# Anthropic's error types by HTTP status
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error"}


class MessagesRequest(OpenAIBaseModel):
    model: str | None = None
    max_tokens: Int = Field(ge=1)
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: Int | None = Field(default=None, ge=-1)
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None  # accepted (user_id is not used)
    # {"type": "enabled" | "disabled"}: the chat template's enable_thinking (Qwen3's switch); with --reasoning-parser
    # the thinking comes back as a thinking block
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # {"format": {"type": "json_schema", "schema"}}; effort accepted


class CountTokensRequest(OpenAIBaseModel):
    model: str | None = None
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


def anthropic_error(e: APIError) -> JSONResponse:
    kind = _ERROR_TYPES.get(e.status_code, "api_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": e.message}}, status_code=e.status_code,
                        headers=e.headers)


def validated(model: type[OpenAIBaseModel], body: Any) -> Any:
    """The request model of a JSON body; a 400 naming the first bad field otherwise."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise bad_request(f"{where}: {first.get('msg')}", where) from None


def _text_of(content: Any, where: str) -> str:
    """A string, or text blocks joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of text blocks", where)
    parts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise bad_request(f"{where}.{j}: only text blocks are supported here, got {kind!r}", where)
        parts.append(block["text"])
    return "".join(parts)


def chat_messages_of(system: Any, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Anthropic's system + messages as the chat route's messages."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text_of(system, "system")})
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise bad_request(f"{where}.role must be user or assistant", where)
        role, content = message["role"], message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content must be a string or a list of content blocks", where)
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        results = 0
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            at = f"{where}.content.{j}"
            if kind == "text":
                if not isinstance(block.get("text"), str):
                    raise bad_request(f"{at}.text must be a string", at)
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                        or not isinstance(block.get("input"), dict):
                    raise bad_request(f"{at}: a tool_use block needs id, name and an input object", at)
                calls.append({"id": block["id"], "type": "function",
                              "function": {"name": block["name"], "arguments": json.dumps(block["input"])}})
            elif kind == "tool_result" and role == "user":
                if not isinstance(block.get("tool_use_id"), str):
                    raise bad_request(f"{at}: a tool_result block needs tool_use_id", at)
                result = _text_of(block.get("content") or "", f"{at}.content")
                if block.get("is_error"):
                    result = f"Error: {result}"
                out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
                results += 1
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # an earlier turn's thinking, sent back: not part of the prompt
            else:
                raise bad_request(f"{at}: {kind!r} blocks are not supported in {role} messages (text, and tool_use / "
                                  "tool_result)", at)
        if role == "assistant":
            out.append({"role": "assistant", "content": "".join(texts) if texts or not calls else None,
                        **({"tool_calls": calls} if calls else {})})
        elif texts or not results:
            out.append({"role": "user", "content": "".join(texts)})
    return out


def _chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or tool.get("type") not in (None,
                                                                                                           "custom"):
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise bad_request(f"tools.{i}: only client tools ({{name, description, input_schema}}) are supported, "
                              f"got type {kind!r}", f"tools.{i}")
        schema = tool.get("input_schema") or {"type": "object", "properties": {}}
        fn = {"name": tool["name"], "parameters": schema,
              **({"description": tool["description"]} if tool.get("description") else {})}
        out.append({"type": "function", "function": fn})
    return out


def _chat_tool_choice(choice: dict[str, Any]) -> tuple[Any, bool | None]:
    """(the chat route's tool_choice, parallel_tool_calls)."""
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise bad_request('tool_choice must be {"type": "auto" | "any" | "none"} or {"type": "tool", "name": ...}',
                      "tool_choice")


def chat_request_of(req: MessagesRequest) -> ChatCompletionRequest:
    fields: dict[str, Any] = {
        "model": req.model,
        "messages": chat_messages_of(req.system, req.messages),
        "max_completion_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": req.stop_sequences or None,
        "stream": bool(req.stream),
    }
    kind = (req.thinking or {}).get("type")
    if kind in ("enabled", "disabled"):
        fields["chat_template_kwargs"] = {"enable_thinking": kind == "enabled"}
    fmt = (req.output_config or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            raise bad_request('output_config.format must be {"type": "json_schema", "schema": {...}}',
                              "output_config.format")
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    if req.tools:
        fields["tools"] = _chat_tools(req.tools)
        fields["tool_choice"], fields["parallel_tool_calls"] = _chat_tool_choice(req.tool_choice or {"type": "auto"})
    elif req.tool_choice is not None and req.tool_choice.get("type") not in ("auto", "none"):
        raise bad_request("tool_choice needs tools", "tool_choice")
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValueError as e:  # pydantic's ValidationError: a message shape or a field the chat route refuses
        raise converted_request_error(e, "messages") from None


def _stop_reason(out: CompletionOutput, finish: str | None) -> tuple[str, str | None]:
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if isinstance(out.stop_reason, str):
        return "stop_sequence", out.stop_reason
    return "end_turn", None


def _blocks(out: CompletionOutput, ctx: Any) -> tuple[list[dict[str, Any]], str, str | None]:
    """The answer's content blocks, stop_reason and stop_sequence."""
    message, finish = message_of(out, ctx.mode, ctx.reasoning)
    blocks: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        try:
            arguments = json.loads(call["function"]["arguments"] or "{}")
        except ValueError:
            arguments = {"_raw": call["function"]["arguments"]}
        blocks.append({"type": "tool_use", "id": call["id"].replace("call_", "toolu_", 1), "name":
                       call["function"]["name"], "input": arguments if isinstance(arguments, dict) else
                       {"value": arguments}})
    if not blocks:
        blocks.append({"type": "text", "text": ""})
    reason, sequence = _stop_reason(out, finish)
    return blocks, reason, sequence


def _usage(ctx: Any, num_output: int, num_cached: int) -> dict[str, int]:
    # Anthropic's convention: input_tokens counts the prompt's tokens not read from the cache (the whole prompt is
    # input_tokens + cache_read_input_tokens + cache_creation_input_tokens)
    return {"input_tokens": ctx.num_prompt_tokens - num_cached, "output_tokens": num_output,
            "cache_read_input_tokens": num_cached, "cache_creation_input_tokens": 0}


def _event(kind: str, **fields: Any) -> str:
    data = json.dumps({"type": kind, **fields}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n"


class AnthropicServingMessages:
    def __init__(self, chat) -> None:
        self.chat = chat  # OpenAIServingChat: checks, templating and the engine request

    async def create(self, body: Any, raw_request: Request) -> Response:
        try:
            req = validated(MessagesRequest, body)
            if req.tools and (req.tool_choice or {}).get("type", "auto") == "auto" \
                    and not self.chat.enable_auto_tool_choice:
                raise bad_request('tool_choice "auto" (the default with tools) needs the server started with '
                                  '--enable-auto-tool-choice; or use {"type": "any"} or {"type": "tool", "name": ...}',
                                  "tool_choice")
            stream, ctx = await self.chat.start(chat_request_of(req), id_prefix="msg_")
        except APIError as e:
            return anthropic_error(e)
        if req.stream:
            return SSEResponse(self._stream(stream, ctx))
        return await run_until_disconnect(raw_request, self._full(stream, ctx))

    async def count_tokens(self, body: Any) -> Response:
        from pagedserve.entrypoints.openai.serving_chat import render_chat_prompt

        try:
            req = validated(CountTokensRequest, body)
            fields: dict[str, Any] = {"model": req.model, "messages": chat_messages_of(req.system, req.messages)}
            if req.tools:
                fields["tools"] = _chat_tools(req.tools)
            chat_req = ChatCompletionRequest.model_validate(fields)
            tools, _ = self.chat._tool_mode(chat_req) if req.tools else (None, None)
            _, ids = await render_chat_prompt(self.chat.engine, chat_req, True, tools)
        except APIError as e:
            return anthropic_error(e)
        except ValueError as e:
            return anthropic_error(bad_request(str(e), "messages"))
        return JSONResponse({"input_tokens": len(ids)})

    def _message(self, ctx: Any, content: list, stop_reason: str | None, stop_sequence: str | None,
                 usage: dict) -> dict[str, Any]:
        return {"id": ctx.request_id, "type": "message", "role": "assistant", "model": ctx.model_name,
                "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    async def _full(self, stream: RequestStream, ctx: Any) -> Response:
        final, error = await final_or_error(self.chat.engine, stream)
        if error is not None:
            return anthropic_error(error)
        out = final.outputs[0]
        blocks, reason, sequence = _blocks(out, ctx)
        return JSONResponse(self._message(ctx, blocks, reason, sequence,
                                          _usage(ctx, len(out.token_ids), final.num_cached_tokens)))

    async def _stream(self, stream: RequestStream, ctx: Any) -> AsyncIterator[str]:
        # message_start goes with the first output: its usage then knows the prompt's tokens read from the prefix cache
        def start(output: RequestOutput) -> str:
            return _event("message_start", message=self._message(ctx, [], None, None,
                                                                  _usage(ctx, 0, output.num_cached_tokens)))

        final: RequestOutput | None = None
        index = 0
        try:
            if ctx.mode.kind != "none":  # tools: each block whole once the answer is complete
                async for output in stream:
                    final = output
                assert final is not None
                yield start(final)
                blocks, reason, sequence = _blocks(final.outputs[0], ctx)
                for index, block in enumerate(blocks):
                    for chunk in _whole_block(index, block):
                        yield chunk
            else:
                thinking = ReasoningStream(ctx.reasoning) if ctx.reasoning else None
                open_kind: str | None = None  # the block being streamed: "thinking" or "text"
                sent = 0
                async for output in stream:
                    if final is None:
                        yield start(output)
                    final = output
                    out = output.outputs[0]
                    new, sent = out.text[sent:], len(out.text)
                    pieces = thinking.feed(new) if thinking is not None else [("content", new)]
                    if out.finish_reason is not None and thinking is not None:
                        pieces += thinking.finish()
                    for kind, text in pieces:
                        if not text:
                            continue
                        kind = "thinking" if kind == "reasoning" else "text"
                        if open_kind != kind:
                            if open_kind is not None:
                                yield _event("content_block_stop", index=index)
                                index += 1
                            open_kind = kind
                            yield _event("content_block_start", index=index,
                                         content_block={"type": "thinking", "thinking": "", "signature": ""}
                                         if kind == "thinking" else {"type": "text", "text": ""})
                        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" \
                            else {"type": "text_delta", "text": text}
                        yield _event("content_block_delta", index=index, delta=delta)
                if open_kind != "text":  # an answer with no text still has its text block
                    if open_kind is not None:
                        yield _event("content_block_stop", index=index)
                        index += 1
                    yield _event("content_block_start", index=index, content_block={"type": "text", "text": ""})
                yield _event("content_block_stop", index=index)
                assert final is not None
                reason, sequence = _stop_reason(final.outputs[0], final.outputs[0].finish_reason)  # no tool calls
            out = final.outputs[0]
            yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                         usage=_usage(ctx, len(out.token_ids), final.num_cached_tokens))
            yield _event("message_stop")
        except Exception as e:  # engine died or shut down mid-stream: Anthropic's error event
            err = e if isinstance(e, APIError) else engine_error(e)
            yield _event("error", error={"type": _ERROR_TYPES.get(err.status_code, "api_error"),
                                         "message": err.message})
        finally:
            if not stream.finished:
                self.chat.engine.abort(stream.request_id)


def _whole_block(index: int, block: dict[str, Any]) -> list[str]:
    if block["type"] == "tool_use":
        start = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
    elif block["type"] == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        delta = {"type": "thinking_delta", "thinking": block["thinking"]}
    else:
        start = {"type": "text", "text": ""}
        delta = {"type": "text_delta", "text": block["text"]}
    return [_event("content_block_start", index=index, content_block=start),
            _event("content_block_delta", index=index, delta=delta),
            _event("content_block_stop", index=index)]


__all__ = ["AnthropicServingMessages", "MessagesRequest", "anthropic_error", "chat_messages_of"]
