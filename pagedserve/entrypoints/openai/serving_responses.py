"""POST /v1/responses: OpenAI's Responses API over the chat route's pipeline (text in, text out).

A request becomes a chat request (`instructions` as the system message, `input` as a string or a list of message
items, `max_output_tokens`, `text.format` as response_format, vLLM's sampling extras as they are) and runs through
OpenAIServingChat.start; the answer comes back as a `response` object, or, with stream=true, as the API's typed
server-sent events (response.created ... response.output_text.delta ... response.completed). With a reasoning
parser the model's thinking is a `reasoning` output item before the message.

Function tools work as on the chat route (tool_choice "auto" with --enable-auto-tool-choice and the hermes parser,
"required", or a named function, the last two through structured outputs): a call is a `function_call` output
item, and `function_call` / `function_call_output` input items continue the conversation. With tools, a stream
sends each output item whole once the answer is complete (the call's arguments in one delta).

Responses are stored (`store`, true by default as in OpenAI's API) in the server process, the newest
MAX_STORED_RESPONSES kept: `previous_response_id` continues a stored conversation (its input items and output,
before this request's input; each request's own `instructions` apply), and GET / DELETE /v1/responses/{id} read
and remove one. An unknown or evicted id is a 404.

Logprobs: `include: ["message.output_text.logprobs"]` (or `top_logprobs` > 0) returns each generated token's logprob
and `top_logprobs` alternatives on the message's output_text (and, streaming, on each text delta the tokens that
made it), as OpenAI's API does; not with a reasoning parser or tools (their text is not the tokens' in order: a 400).

Not supported, each a 400 naming its field: non-text input parts, built-in tools (web search, files, ...).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field
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
from pagedserve.entrypoints.openai.serving_chat import message_of as chat_message_of
from pagedserve.outputs import RequestOutput

_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")
# SamplingFields a Responses request may carry as vLLM-style extras (OpenAI's own are mapped one by one below).
_EXTRAS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "seed", "stop", "stop_token_ids", "ignore_eos",
           "presence_penalty", "frequency_penalty", "logit_bias", "allowed_token_ids", "skip_special_tokens",
           "include_stop_str_in_output", "structured_outputs", "priority")


class ResponsesRequest(OpenAIBaseModel):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: Int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool | None = False
    store: bool | None = True  # keep this response for previous_response_id and GET
    previous_response_id: str | None = None  # a stored response this one continues
    tools: list[dict[str, Any]] | None = None  # function tools, in the Responses API's flat shape
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"type": "function", "name"}
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    reasoning: dict[str, Any] | None = None  # accepted (effort / summary are not used)
    metadata: dict[str, str] | None = None
    truncation: str | None = None  # "disabled" (the default) only
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)
    include: list[str] | None = None  # "message.output_text.logprobs" returns the tokens' logprobs
    user: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM extra
    # vLLM's sampling extras, as on the chat route
    top_k: Int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[Int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    structured_outputs: dict[str, Any] | None = None
    priority: Int | None = None  # vLLM's, with --scheduling-policy priority


MAX_STORED_RESPONSES = 1024


class ResponseStore:
    """Finished responses by id, the newest MAX_STORED_RESPONSES: each one's response object and its conversation
    as chat messages (everything before it, its input, its output), without the system instructions."""

    def __init__(self, capacity: int = MAX_STORED_RESPONSES) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def put(self, body: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        self._items[body["id"]] = (body, conversation)
        self._items.move_to_end(body["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        try:
            return self._items[response_id]
        except KeyError:
            raise APIError(404, f"No stored response with id {response_id!r} (not stored, deleted, or evicted: "
                                f"the server keeps the newest {self.capacity}).", "invalid_request_error",
                           param, "response_not_found") from None

    def delete(self, response_id: str) -> None:
        self.get(response_id)
        del self._items[response_id]


def chat_request_of(req: ResponsesRequest, history: list[dict[str, Any]] | None = None) -> ChatCompletionRequest:
    """The chat request that computes this response (history: a stored conversation it continues); a 400
    (APIError) for what the Responses route does not take."""
    if req.truncation not in (None, "disabled"):
        raise bad_request('truncation must be "disabled": a prompt over the context is an error', "truncation")
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    messages += [dict(m) for m in history or []]
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        if not req.input:
            raise bad_request("input must be a string or a non-empty list of messages", "input")
        for i, item in enumerate(req.input):
            _add_item(messages, item, f"input.{i}")
    fields: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stream": bool(req.stream),
        "chat_template_kwargs": req.chat_template_kwargs,
    }
    for name in _EXTRAS:
        value = getattr(req, name)
        if value is not None:
            fields[name] = value
    response_format = _response_format_of(req.text)
    if response_format is not None:
        fields["response_format"] = response_format
    if req.tools:
        fields["tools"] = [_chat_tool(tool, i) for i, tool in enumerate(req.tools)]
    if req.tool_choice is not None:
        fields["tool_choice"] = _chat_tool_choice(req.tool_choice)
    if req.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = req.parallel_tool_calls
    unknown = [value for value in req.include or [] if value not in INCLUDE_VALUES]
    if unknown:
        raise bad_request(f"include: unknown value(s) {', '.join(map(repr, unknown))}; OpenAI's are "
                          f"{', '.join(INCLUDE_VALUES)}", "include")
    if wants_logprobs(req):
        if req.tools:
            raise bad_request("logprobs are not returned with tools (the output items are parsed from the text)",
                              "include")
        fields["logprobs"], fields["top_logprobs"] = True, req.top_logprobs or 0
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValueError as e:  # pydantic's ValidationError: a message shape or a field the chat route refuses
        raise converted_request_error(e, "input") from None


# OpenAI's `include` values: the output text's logprobs are returned; the others name what this server never makes
# (tool results, images, encrypted reasoning): accepted (clients send some by default) and nothing is added.
INCLUDE_VALUES = ("message.output_text.logprobs", "reasoning.encrypted_content", "file_search_call.results",
                  "web_search_call.results", "web_search_call.action.sources", "message.input_image.image_url",
                  "computer_call_output.output.image_url", "code_interpreter_call.outputs")


def wants_logprobs(req: ResponsesRequest) -> bool:
    """`include` names the output text's logprobs, or top_logprobs asks for alternatives."""
    return "message.output_text.logprobs" in (req.include or []) or bool(req.top_logprobs)


def _chat_tool(tool: Any, i: int) -> dict[str, Any]:
    """A Responses function tool ({"type": "function", "name", "parameters", ...}) in the chat route's shape."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
        raise bad_request(f"tools[{i}]: only function tools are supported, got {kind!r}", "tools")
    fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
    return {"type": "function", "function": fn}


def _chat_tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}',
                              "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _add_item(messages: list[dict[str, Any]], item: Any, where: str) -> None:
    """One input item as chat messages: a message, a function call (joined to the assistant turn before it when
    that turn is calls too), or a function call's output (a tool message)."""
    if not isinstance(item, dict):
        raise bad_request(f"{where} must be an object", "input")
    kind = item.get("type", "message")
    if kind == "function_call":
        if not all(isinstance(item.get(k), str) for k in ("call_id", "name", "arguments")):
            raise bad_request(f"{where}: a function_call item needs call_id, name and arguments strings", "input")
        call = {"id": item["call_id"], "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") and not last["content"]:
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        return
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(item.get("call_id"), str) or not isinstance(output, str):
            raise bad_request(f"{where}: a function_call_output item needs call_id and output strings", "input")
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        return
    messages.append(_message_of_item(item, where))


def _message_of_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind != "message":
        raise bad_request(f"{where}: input items of type {kind!r} are not supported (messages, function_call, "
                          "function_call_output)", "input")
    role = item.get("role")
    if role not in _ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(_ROLES)}; got {role!r}", "input")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of text parts", "input")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(f"{where}.content.{j}: only text parts are supported, got {kind!r}", "input")
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content.{j}.text must be a string", "input")
        texts.append(part["text"])
    return {"role": role, "content": "".join(texts)}


def _response_format_of(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request('text.format.type must be "text", "json_object" or "json_schema"', "text")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    if not isinstance(fmt.get("schema"), dict):
        raise bad_request("text.format with type json_schema needs a schema object", "text")
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "response"), "schema": fmt["schema"],
                                                   "strict": fmt.get("strict")}}


class OpenAIServingResponses:
    def __init__(self, chat, store: ResponseStore | None = None) -> None:
        self.chat = chat  # OpenAIServingChat: checks, templating and the engine request
        self.store = store or ResponseStore()

    async def create(self, req: ResponsesRequest, raw_request: Request) -> Response:
        history = (self.store.get(req.previous_response_id, "previous_response_id")[1]
                   if req.previous_response_id is not None else [])
        chat_req = chat_request_of(req, history)
        if wants_logprobs(req) and self.chat.reasoning_parser is not None:
            raise bad_request("logprobs are not returned with a reasoning parser (the text is split from the tokens)",
                              "include")
        stream, ctx = await self.chat.start(chat_req, id_prefix="resp_")
        shell = _Shell(ctx.request_id, ctx.model_name, req, ctx.reasoning)
        if chat_req.logprobs:
            top = chat_req.top_logprobs or 0
            shell.logprobs_of = lambda entries: self.chat._logprobs(entries, top, chat_req)
        if req.store is not False:
            # the conversation so far, without the system instructions in front (each request brings its own)
            messages = chat_req.model_dump(exclude_none=True)["messages"]
            shell.conversation = messages[1:] if req.instructions else messages
            shell.store = self.store
        if req.stream:
            return SSEResponse(self._stream(stream, ctx, shell))
        return await run_until_disconnect(raw_request, self._full(stream, ctx, shell))

    async def _full(self, stream: RequestStream, ctx, shell: _Shell) -> Response:
        final, err = await final_or_error(self.chat.engine, stream)
        if err is not None:
            return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)
        out = final.outputs[0]
        usage = _usage(ctx.num_prompt_tokens, len(out.token_ids), final.num_cached_tokens)
        return JSONResponse(shell.finished(_status(out.finish_reason), shell.items_of(out, ctx.mode), usage,
                                           out.finish_reason))

    async def _stream(self, stream: RequestStream, ctx, shell: _Shell) -> AsyncIterator[str]:
        events = _Events()
        yield events.emit("response.created", response=shell.response("in_progress", [], None))
        yield events.emit("response.in_progress", response=shell.response("in_progress", [], None))
        # tools: each item whole once the answer is complete; else the text as it comes
        body = self._whole_item_events if ctx.mode.kind != "none" else self._text_events
        try:
            async for chunk in body(stream, ctx, shell, events):
                yield chunk
        except Exception as e:  # engine died or shut down mid-stream: the API's error event
            err = e if isinstance(e, APIError) else engine_error(e)
            yield events.emit("error", code=err.code, message=err.message, param=err.param)
        finally:
            if not stream.finished:
                self.chat.engine.abort(stream.request_id)

    async def _text_events(self, stream: RequestStream, ctx, shell: _Shell, events: _Events) -> AsyncIterator[str]:
        """The answer's reasoning (with a parser) and text items, opened as their first text arrives."""
        thinking = ReasoningStream(shell.reasoning) if shell.reasoning else None
        items: list[dict] = []  # the finished output items
        current: dict | None = None  # the item being streamed, its text so far in content[0]
        sent = 0
        final: RequestOutput | None = None

        def close() -> list[str]:
            nonlocal current
            if current is None:
                return []
            items.append(current)
            current = None
            return _text_item_closed(events, len(items) - 1, items[-1])

        def switch_to(kind: str) -> list[str]:
            nonlocal current
            if current is not None and current["type"] == kind:
                return []
            chunks = close()
            current = shell.reasoning_item("") if kind == "reasoning" else shell.message_item("")
            return chunks + _text_item_opened(events, len(items), current)

        pending_lps: list[dict] = []  # logprobs of tokens whose text no delta has carried yet
        sent_lps = 0
        async for output in stream:
            final = output
            out = output.outputs[0]
            new = out.text[sent:]
            sent = len(out.text)
            if shell.logprobs_of is not None and out.logprobs is not None and len(out.logprobs) > sent_lps:
                pending_lps += shell.logprobs_of(out.logprobs[sent_lps:])
                sent_lps = len(out.logprobs)
            pieces = thinking.feed(new) if thinking is not None else [("content", new)]
            if out.finish_reason is not None and thinking is not None:
                pieces += thinking.finish()
            for kind, text in pieces:
                if text:
                    for chunk in switch_to("reasoning" if kind == "reasoning" else "message"):
                        yield chunk
                    current["content"][0]["text"] += text
                    lps, pending_lps = (pending_lps, []) if current["type"] == "message" else ([], pending_lps)
                    if shell.logprobs_of is not None and current["type"] == "message":
                        current["content"][0]["logprobs"] += lps
                    yield _text_delta(events, len(items), current, text, lps)
        if pending_lps and current is not None and current["type"] == "message":
            current["content"][0]["logprobs"] += pending_lps  # (tokens whose text never showed, e.g. a stop)
        if not any(item["type"] == "message" for item in [*items, current] if item is not None):
            for chunk in switch_to("message"):  # an answer with no text still has its message item
                yield chunk
        for chunk in close():
            yield chunk
        assert final is not None
        yield self._final_event(events, ctx, shell, final, items)

    async def _whole_item_events(self, stream: RequestStream, ctx, shell: _Shell, events: _Events
                                 ) -> AsyncIterator[str]:
        final: RequestOutput | None = None
        async for output in stream:
            final = output
        assert final is not None
        items = shell.items_of(final.outputs[0], ctx.mode)
        for index, item in enumerate(items):
            if item["type"] == "function_call":
                for chunk in _call_item_events(events, index, item):
                    yield chunk
            else:
                for chunk in [*_text_item_opened(events, index, item),
                              _text_delta(events, index, item, item["content"][0]["text"]),
                              *_text_item_closed(events, index, item)]:
                    yield chunk
        yield self._final_event(events, ctx, shell, final, items)

    @staticmethod
    def _final_event(events: _Events, ctx, shell: _Shell, final: RequestOutput, items: list[dict]) -> str:
        out = final.outputs[0]
        usage = _usage(ctx.num_prompt_tokens, len(out.token_ids), final.num_cached_tokens)
        status = _status(out.finish_reason)
        name = "response.completed" if status == "completed" else "response.incomplete"
        return events.emit(name, response=shell.finished(status, items, usage, out.finish_reason))


def _text_item_opened(events: _Events, index: int, item: dict[str, Any]) -> list[str]:
    """A message or reasoning item opened: in progress, then its (empty) content part."""
    part = {**item["content"][0], "text": ""}
    return [events.emit("response.output_item.added", output_index=index,
                        item={**item, "status": "in_progress", "content": []}),
            events.emit("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part=part)]


def _text_delta(events: _Events, index: int, item: dict[str, Any], text: str, logprobs: list | None = None) -> str:
    if item["type"] == "reasoning":
        return events.emit("response.reasoning_text.delta", item_id=item["id"], output_index=index, content_index=0,
                           delta=text)
    return events.emit("response.output_text.delta", item_id=item["id"], output_index=index, content_index=0,
                       delta=text, logprobs=logprobs or [])


def _text_item_closed(events: _Events, index: int, item: dict[str, Any]) -> list[str]:
    """A message or reasoning item done: its whole text, its content part, the item."""
    part = item["content"][0]
    if item["type"] == "reasoning":
        done = events.emit("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=part["text"])
    else:
        done = events.emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=part["text"], logprobs=part.get("logprobs") or [])
    return [done,
            events.emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=part),
            events.emit("response.output_item.done", output_index=index, item=item)]


def _call_item_events(events: _Events, index: int, item: dict[str, Any]) -> list[str]:
    """A finished function call: added, its arguments in one delta, done."""
    return [events.emit("response.output_item.added", output_index=index,
                        item={**item, "status": "in_progress", "arguments": ""}),
            events.emit("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                        delta=item["arguments"]),
            events.emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                        arguments=item["arguments"]),
            events.emit("response.output_item.done", output_index=index, item=item)]


def _status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason in ("length", "abort") else "completed"


def _usage(num_prompt: int, num_output: int, num_cached: int) -> dict[str, Any]:
    return {"input_tokens": num_prompt, "input_tokens_details": {"cached_tokens": num_cached},
            "output_tokens": num_output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": num_prompt + num_output}


class _Shell:
    """The parts of one response object that do not change while it is generated."""

    def __init__(self, request_id: str, model_name: str, req: ResponsesRequest, reasoning: str | None) -> None:
        self.id = request_id
        self.model_name = model_name
        self.req = req
        self.reasoning = reasoning  # the reasoning parser, if any
        self.created_at = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"
        self.conversation: list[dict[str, Any]] | None = None  # with store: the messages this response answered
        self.store: ResponseStore | None = None
        # with logprobs asked: the engine's TokenLogprobs -> the API's JSON entries (the chat route's)
        self.logprobs_of: Any = None

    def finished(self, status: str, output: list[dict], usage: dict | None,
                 finish_reason: str | None) -> dict[str, Any]:
        """The final response object; stored (with its conversation and answer) when the request asked."""
        body = self.response(status, output, usage, finish_reason)
        if self.store is not None and self.conversation is not None:
            answer: list[dict[str, Any]] = []  # the output as the input items of a next turn would give it
            for item in output:
                if item["type"] == "function_call" or (item["type"] == "message" and item["content"][0]["text"]):
                    _add_item(answer, item, "output")
            self.store.put(body, self.conversation + answer)
        return body

    def items_of(self, out, mode) -> list[dict[str, Any]]:
        """A finished answer's output items: its reasoning (with a parser), its text, its function calls (parsed
        by the request's tool mode, as on the chat route)."""
        message, _ = chat_message_of(out, mode, self.reasoning)
        items = []
        if message.get("reasoning_content"):
            items.append(self.reasoning_item(message["reasoning_content"]))
        calls = message.get("tool_calls") or []
        if message.get("content") or not calls:
            items.append(self.message_item(message.get("content") or ""))
            if self.logprobs_of is not None and out.logprobs:
                items[-1]["content"][0]["logprobs"] = self.logprobs_of(out.logprobs)
        for call in calls:
            items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                          "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                          "status": "completed"})
        return items

    def message_item(self, text: str) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    def reasoning_item(self, text: str) -> dict[str, Any]:
        return {"type": "reasoning", "id": self.reasoning_id, "status": "completed", "summary": [],
                "content": [{"type": "reasoning_text", "text": text}]}

    def response(self, status: str, output: list[dict], usage: dict | None,
                 finish_reason: str | None = None) -> dict[str, Any]:
        req = self.req
        incomplete = None
        if status == "incomplete":
            incomplete = {"reason": "max_output_tokens" if finish_reason == "length" else "interrupted"}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "model": self.model_name, "output": output, "usage": usage, "error": None,
            "incomplete_details": incomplete, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "metadata": req.metadata or {}, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "previous_response_id": req.previous_response_id,
            "text": req.text or {"format": {"type": "text"}}, "reasoning": req.reasoning,
            "store": req.store is not False, "truncation": "disabled", "user": req.user,
        }


class _Events:
    """Server-sent events of the Responses API: `event:` names the type, the data carries it and a sequence number."""

    def __init__(self) -> None:
        self.sequence = 0

    def emit(self, type: str, **fields: Any) -> str:
        data = json.dumps({"type": type, "sequence_number": self.sequence, **fields}, ensure_ascii=False,
                          separators=(",", ":"))
        self.sequence += 1
        return f"event: {type}\ndata: {data}\n\n"


__all__ = ["MAX_STORED_RESPONSES", "OpenAIServingResponses", "ResponseStore", "ResponsesRequest", "chat_request_of"]
