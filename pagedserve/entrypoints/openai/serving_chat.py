"""POST /v1/chat/completions: messages -> chat template -> token ids -> engine -> OpenAI shapes."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.async_engine import AsyncEngine, RequestStream
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.reasoning import ALIASES as REASONING_ALIASES
from pagedserve.entrypoints.openai.reasoning import KEEPS_SPECIAL_TOKENS, ReasoningStream
from pagedserve.entrypoints.openai.reasoning import PARSERS as REASONING_PARSERS
from pagedserve.entrypoints.openai.reasoning import split as split_reasoning
from pagedserve.entrypoints.openai.serving_base import (
    SSE_DONE,
    APIError,
    SSEResponse,
    TokenStrings,
    bad_request,
    beam_search_params,
    beam_search_stream,
    build_sampling_params,
    check_beam_prompts,
    check_model,
    check_prompt_fits,
    clamp_logprob,
    engine_error,
    error_body,
    final_or_error,
    now_created,
    prompt_logprobs_json,
    run_beam_searches,
    run_until_disconnect,
    sse,
    structured_outputs_of,
    token_strings_for,
    usage_dict,
)
from pagedserve.entrypoints.openai.tool_calls import (
    AutoToolStream,
    ToolMode,
    call_dict,
    calls_from_required,
    check_tools,
    parse_hermes,
    resolve_mode,
    structured_outputs_for,
    template_messages,
)
from pagedserve.outputs import CompletionOutput
from pagedserve.sampling_params import SamplingParams

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class OpenAIServingChat:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str], token_strings: TokenStrings,
                 enable_auto_tool_choice: bool = False, reasoning_parser: str | None = None) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.token_strings = token_strings
        self.tokens_as_ids = False  # --return-tokens-as-token-ids (build_app sets it)
        self.prompt_tokens_details = False  # --enable-prompt-tokens-details (build_app sets it)
        self.response_role = "assistant"  # --response-role (build_app sets it)
        self.enable_auto_tool_choice = enable_auto_tool_choice
        reasoning_parser = REASONING_ALIASES.get(reasoning_parser, reasoning_parser)
        if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; "
                             f"choose from {', '.join(REASONING_PARSERS)}")
        self.reasoning_parser = reasoning_parser

    async def create(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
        if req.use_beam_search:
            return await run_until_disconnect(raw_request, self._beam_search(req))
        stream, ctx = await self.start(req)
        if req.stream:
            return SSEResponse(self._stream(stream, ctx))
        return await run_until_disconnect(raw_request, self._full(stream, ctx))

    async def start(self, req: ChatCompletionRequest, id_prefix: str = "chatcmpl-"
                    ) -> tuple[RequestStream, _ChatContext]:
        """Checks the request, renders its messages and adds it to the engine: its output stream and context (the
        Responses API's route formats the same stream its own way). A bad request raises APIError."""
        arrival = time.monotonic()
        model_name = check_model(self.engine, self.served_model_names, req.model)
        self._refuse_unsupported(req)
        if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        try:
            params = build_sampling_params(req, max_tokens, logprobs, self.engine.default_sampling)
        except APIError as e:
            if e.param == "logprobs":
                e.param = "top_logprobs"
            elif e.param == "max_tokens" and req.max_completion_tokens is not None:
                e.param = "max_completion_tokens"
            raise
        tools, mode = self._tool_mode(req)
        constraint = structured_outputs_for(mode, tools or [])
        if constraint is not None:
            if params.structured_outputs is not None:
                raise bad_request(f'tool_choice "{mode.kind}" makes its own structured output; drop '
                                  f"{structured_outputs_of(req)[1]}", "tool_choice")
            params = dataclasses.replace(params, structured_outputs=constraint)
        if self.reasoning_parser in KEEPS_SPECIAL_TOKENS and params.structured_outputs is None \
                and "skip_special_tokens" not in req.model_fields_set:  # (the parser reads the markup, drops it)
            params = dataclasses.replace(params, skip_special_tokens=False)
        prompt_text, prompt_ids = await render_chat_prompt(self.engine, req, req.add_generation_prompt is not False,
                                                           tools)
        if req.truncate_prompt_tokens is not None and len(prompt_ids) > req.truncate_prompt_tokens:
            prompt_text, prompt_ids = None, prompt_ids[-req.truncate_prompt_tokens:]
        default_max = self.engine.default_sampling.get("max_tokens")
        if max_tokens is None and default_max is not None:  # the model's max_new_tokens, as far as the context allows
            params = dataclasses.replace(params, max_tokens=max(1, min(default_max,
                                                                       self.engine.max_model_len - len(prompt_ids))))
        check_prompt_fits(
            self.engine,
            prompt_ids,
            params,
            "messages",
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
        )

        request_id = f"{id_prefix}{uuid.uuid4().hex}"
        try:
            stream = await self.engine.add_request(request_id, prompt_ids, params, arrival, prompt_text,
                                                   self.engine.lora_requests.get(model_name), req.priority or 0,
                                                   req.cache_salt)
        except Exception as e:
            # A constraint the engine could not compile: the field it came from (a tool's parameters: "tools").
            raise engine_error(e, structured_outputs_of(req)[1] or ("tools" if constraint is not None else None)) from e
        ctx = _ChatContext(request_id, model_name, now_created(), len(prompt_ids), params, req, mode)
        ctx.prompt_token_ids = prompt_ids
        if req.echo:
            ctx.echo = self._echoed(req)
        # A constrained answer (response_format, structured_outputs, a forced tool call) is held to its grammar
        # from the first token: it is all answer, never reasoning.
        ctx.reasoning = self.reasoning_parser if params.structured_outputs is None else None
        return stream, ctx

    async def _beam_search(self, req: ChatCompletionRequest) -> Response:
        """use_beam_search: n beams over the rendered conversation, the n best answers the choices (beam_search.py);
        max_tokens defaults to the rest of the context, as vLLM's; streamed as vLLM streams it (each choice whole
        once the search ends)."""
        model_name = check_model(self.engine, self.served_model_names, req.model)
        self._refuse_unsupported(req)
        tools, mode = self._tool_mode(req)
        if mode.kind in ("named", "required"):
            raise bad_request("use_beam_search takes no forced tool choice (it runs no structured outputs)",
                              "tool_choice")
        _, prompt_ids = await render_chat_prompt(self.engine, req, req.add_generation_prompt is not False, tools)
        given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = beam_search_params(req, given if given is not None else max(1, self.engine.max_model_len
                                                                             - len(prompt_ids)),
                                    bool(req.logprobs) or req.prompt_logprobs is not None, param)
        check_beam_prompts(self.engine, [prompt_ids], params, param)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        num_completion = 0
        num_cached: int | None = 0 if self.prompt_tokens_details else None

        async def choices(stream: bool) -> list[dict]:
            nonlocal num_completion, num_cached
            out = (await run_beam_searches(self.engine, [prompt_ids], params, request_id,
                                           self.engine.lora_requests.get(model_name)))[0]
            if num_cached is not None:
                num_cached = out.num_cached_tokens
            found = []
            for i, seq in enumerate(out.sequences):
                generated = seq.tokens[len(prompt_ids):]
                num_completion += len(generated)
                answer = CompletionOutput(i, seq.text, generated, seq.cum_logprob, None, seq.finish_reason,
                                          seq.stop_reason)
                message, finish_reason = message_of(answer, mode, self.reasoning_parser)
                message["role"] = self.response_role
                if stream and message.get("tool_calls"):  # a delta's tool calls carry their index
                    message = {**message, "tool_calls": [{**call, "index": k}
                                                         for k, call in enumerate(message["tool_calls"])]}
                found.append({"index": i, ("delta" if stream else "message"): message, "logprobs": None,
                              "finish_reason": finish_reason, "stop_reason": seq.stop_reason})
            return found

        if req.stream:
            base = {"id": request_id, "object": "chat.completion.chunk", "created": now_created(), "model": model_name}
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(beam_search_stream(
                choices(True), base,
                (lambda: usage_dict(len(prompt_ids), num_completion, num_cached)) if include_usage else None))
        found = await choices(False)
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": now_created(),
                             "model": model_name, "choices": found,
                             "usage": usage_dict(len(prompt_ids), num_completion, num_cached),
                             "system_fingerprint": None})

    # ------------------------------------------------------------------ input checks
    def _tool_mode(self, req: ChatCompletionRequest) -> tuple[list[dict] | None, ToolMode]:
        tools = checked_tools(req.tools)
        try:
            return tools, resolve_mode(tools, req.tool_choice, self.enable_auto_tool_choice, req.parallel_tool_calls)
        except ValueError as e:
            raise bad_request(str(e), "tool_choice") from e

    @staticmethod
    def _refuse_unsupported(req: ChatCompletionRequest) -> None:
        if req.functions or (req.function_call not in (None, "none")):
            raise bad_request("functions / function_call (OpenAI's deprecated form) are not supported; "
                              "use tools and tool_choice", "functions")
        if req.modalities is not None and any(m != "text" for m in req.modalities):
            raise bad_request("only the text modality is supported", "modalities")
        if req.audio is not None:
            raise bad_request("audio output is not supported", "audio")
        if req.stream and req.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is not available when streaming", "prompt_logprobs")

    @staticmethod
    def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
        if not req.messages:
            raise bad_request("messages must be a non-empty list", "messages")
        out: list[dict[str, Any]] = []
        for i, m in enumerate(req.messages):
            role = _ROLES.get(m.role)
            if role is None:
                raise bad_request(f"messages[{i}].role must be one of {', '.join(_ROLES)}; got {m.role!r}", "messages")
            content: Any = m.content
            if isinstance(content, list):
                content = [part.model_dump() for part in content]
            elif content is None:
                content = ""  # as for an assistant turn that only made tool calls
            msg: dict[str, Any] = {"role": role, "content": content}
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                if role != "assistant":
                    raise bad_request(f"messages[{i}]: only assistant messages carry tool_calls", "messages")
                msg["tool_calls"] = m.tool_calls
            out.append(msg)
        return out

    def _echoed(self, req: ChatCompletionRequest) -> str:
        """What `echo` puts before the answer (vLLM's rule): the last message's text when its role is the
        request's (the response role; with add_generation_prompt false, the last message's own), else nothing."""
        last = req.messages[-1]
        role = self.response_role if req.add_generation_prompt is not False else last.role
        if last.role != role or last.content is None:
            return ""
        if isinstance(last.content, str):
            return last.content
        return "\n".join(part.text or "" for part in last.content if getattr(part, "text", None) is not None)

    # ------------------------------------------------------------------ outputs
    def _logprobs(self, entries: list, num_top: int, req: ChatCompletionRequest) -> list[dict]:
        strings = token_strings_for(req, self.token_strings, self.tokens_as_ids).get
        content = []
        for lp in entries:
            text, raw = strings(lp.token_id)
            tops = []
            for tid, tlp in lp.top[:num_top]:
                ttext, traw = strings(tid)
                tops.append({"token": ttext, "logprob": clamp_logprob(tlp), "bytes": traw})
            content.append({"token": text, "logprob": clamp_logprob(lp.logprob), "bytes": raw, "top_logprobs": tops})
        return content

    async def _full(self, stream: RequestStream, ctx: _ChatContext) -> Response:
        final, error = await final_or_error(self.engine, stream)
        if error is not None:
            return _error_json(error)
        choices = []
        num_completion = 0
        for out in final.outputs:
            num_completion += len(out.token_ids)
            logprobs = None
            if ctx.params.logprobs is not None and out.logprobs is not None:
                logprobs = {"content": self._logprobs(out.logprobs, ctx.params.logprobs, ctx.req)}
            message, finish_reason = message_of(out, ctx.mode, ctx.reasoning)
            message["role"] = self.response_role
            if ctx.echo:
                message["content"] = ctx.echo + (message.get("content") or "")
            choices.append(
                {
                    "index": out.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                    "stop_reason": out.stop_reason,
                    **({"token_ids": list(out.token_ids)} if ctx.req.return_token_ids else {}),
                }
            )
        body = {
            "id": ctx.request_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model_name,
            "choices": choices,
            "usage": usage_dict(ctx.num_prompt_tokens, num_completion,
                                final.num_cached_tokens if self.prompt_tokens_details else None),
            "system_fingerprint": None,
        }
        if ctx.req.return_token_ids:
            body["prompt_token_ids"] = list(ctx.prompt_token_ids)
        if ctx.req.prompt_logprobs is not None:  # vLLM's field, for the templated prompt's tokens
            body["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs,
                                                           token_strings_for(ctx.req, self.token_strings,
                                                                             self.tokens_as_ids),
                                                           ctx.req.prompt_logprobs)
        return JSONResponse(body)

    async def _stream(self, stream: RequestStream, ctx: _ChatContext) -> AsyncIterator[str]:
        n = ctx.params.n
        opts = ctx.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous_usage = include_usage and bool(opts and opts.continuous_usage_stats)
        base = {
            "id": ctx.request_id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model_name,
        }

        return_ids = bool(ctx.req.return_token_ids)
        sent_ids = [0] * n
        first = [True]

        def chunk(choice: dict, usage: dict | None = None, out: CompletionOutput | None = None) -> str:
            obj = {**base, "choices": [choice]}
            if return_ids:  # the prompt's ids in the first chunk; a choice's ids not yet sent in its next chunk
                if first[0]:
                    obj["prompt_token_ids"], first[0] = list(ctx.prompt_token_ids), False
                i = choice["index"]
                new_ids = [] if out is None else list(out.token_ids[sent_ids[i]:])
                if out is not None:
                    sent_ids[i] = len(out.token_ids)
                choice["token_ids"] = new_ids
            if include_usage:
                obj["usage"] = usage
            return sse(obj)

        sent_text = [0] * n
        sent_logprobs = [0] * n
        finished = [False] * n
        num_completion = [0] * n
        num_cached = [0]  # the prompt's tokens found in the prefix cache (known once it was scheduled)

        def cached() -> int | None:
            return num_cached[0] if self.prompt_tokens_details else None

        tool_streams = [_ToolStream(ctx.mode) for _ in range(n)] if ctx.mode.kind != "none" else None
        thinking = [ReasoningStream(ctx.reasoning) for _ in range(n)] if ctx.reasoning else None

        def answer_deltas(i: int, pieces: list[tuple[str, str]], text: str | None = None) -> list[dict]:
            """Chat deltas of choice i's new text: its reasoning (with a parser), then its content (through the
            tool-call stream when the request has tools). `text`: the new text when there is no parser."""
            deltas: list[dict] = []
            if thinking is not None:
                reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
                if reasoning:
                    deltas.append({"reasoning_content": reasoning})
                text = "".join(t for kind, t in pieces if kind == "content")
            if tool_streams is not None:
                deltas += tool_streams[i].feed(text)
            elif text or thinking is None:
                deltas.append({"content": text})
            return deltas

        try:
            for i in range(n):
                yield chunk(
                    {
                        "index": i,
                        "delta": {"role": self.response_role, "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    },
                    usage_dict(ctx.num_prompt_tokens, 0, cached()) if continuous_usage else None,
                )
                if ctx.echo:
                    yield chunk({"index": i, "delta": {"content": ctx.echo}, "logprobs": None, "finish_reason": None},
                                usage_dict(ctx.num_prompt_tokens, 0, cached()) if continuous_usage else None)
            async for output in stream:
                num_cached[0] = output.num_cached_tokens
                for out in output.outputs:
                    i = out.index
                    if finished[i]:
                        continue
                    num_completion[i] = len(out.token_ids)
                    # continuous usage: this chunk's choice's tokens (vLLM's), not the sum over the n choices
                    usage = (usage_dict(ctx.num_prompt_tokens, num_completion[i], cached()) if continuous_usage
                             else None)
                    delta_text = out.text[sent_text[i] :]
                    new_lps = None
                    if (
                        ctx.params.logprobs is not None
                        and out.logprobs is not None
                        and len(out.logprobs) > sent_logprobs[i]
                    ):
                        new_lps = out.logprobs[sent_logprobs[i] :]
                    if delta_text or new_lps:
                        sent_text[i] = len(out.text)
                        logprobs = None
                        if new_lps:
                            sent_logprobs[i] = len(out.logprobs)
                            logprobs = {"content": self._logprobs(new_lps, ctx.params.logprobs, ctx.req)}
                        pieces = thinking[i].feed(delta_text) if thinking is not None else []
                        deltas = answer_deltas(i, pieces, delta_text)
                        if not deltas and logprobs:  # text held back (a possible tool call): logprobs alone
                            deltas = [{"content": ""}]
                        for k, delta in enumerate(deltas):
                            yield chunk(
                                {
                                    "index": i,
                                    "delta": delta,
                                    "logprobs": logprobs if k == 0 else None,
                                    "finish_reason": None,
                                },
                                usage, out,
                            )
                    if out.finish_reason is not None:
                        finished[i] = True
                        finish_reason = out.finish_reason
                        if thinking is not None:  # a tag cut at the end: plain text
                            pieces = thinking[i].finish()
                            for delta in answer_deltas(i, pieces) if pieces else []:
                                yield chunk({"index": i, "delta": delta, "logprobs": None, "finish_reason": None},
                                            usage, out)
                        if tool_streams is not None:
                            for delta in tool_streams[i].finish():
                                yield chunk({"index": i, "delta": delta, "logprobs": None, "finish_reason": None},
                                            usage, out)
                            finish_reason = tool_streams[i].finish_reason(out)
                        yield chunk(
                            {
                                "index": i,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": finish_reason,
                                "stop_reason": out.stop_reason,
                            },
                            usage, out,
                        )
            if include_usage:
                yield sse({**base, "choices": [],
                           "usage": usage_dict(ctx.num_prompt_tokens, sum(num_completion), cached())})
        except Exception as e:  # engine died or shut down mid-stream: tell the client in-band
            err = engine_error(e)
            yield sse(error_body(err.message, err.type, err.param, err.code))
        finally:
            if not stream.finished:
                self.engine.abort(stream.request_id)
        yield SSE_DONE


class _ChatContext:
    __slots__ = ("request_id", "model_name", "created", "num_prompt_tokens", "params", "req", "mode", "reasoning",
                 "prompt_token_ids", "echo")

    def __init__(
        self,
        request_id: str,
        model_name: str,
        created: int,
        num_prompt_tokens: int,
        params: SamplingParams,
        req: ChatCompletionRequest,
        mode: ToolMode,
    ) -> None:
        self.request_id = request_id
        self.model_name = model_name
        self.created = created
        self.num_prompt_tokens = num_prompt_tokens
        self.params = params
        self.req = req
        self.mode = mode
        self.reasoning: str | None = None  # the reasoning parser that splits this request's answers
        self.prompt_token_ids: list[int] = []  # the templated prompt's ids (return_token_ids)
        self.echo = ""  # `echo`: the text before the answer (serving_chat._echoed)


def message_of(out: CompletionOutput, mode: ToolMode, reasoning_parser: str | None = None
                ) -> tuple[dict, str | None]:
    """The whole answer's assistant message and finish reason: its reasoning split off (with a parser), tool
    calls parsed out of the rest by the request's mode."""
    text, finish = out.text, out.finish_reason
    message: dict = {"role": "assistant"}
    if reasoning_parser is not None:
        reasoning, content = split_reasoning(reasoning_parser, text)
        message["reasoning_content"] = reasoning
        text = content or ""
    if mode.kind == "named":  # OpenAI ends a forced function call with "stop"
        return {**message, "content": None, "tool_calls": [call_dict(mode.name, text)]}, finish
    if mode.kind == "required":
        calls = calls_from_required(text)
        if calls:
            return {**message, "content": None, "tool_calls": calls}, "tool_calls"
    elif mode.kind == "auto":
        content, calls = parse_hermes(text, mode.names)
        calls = calls if mode.parallel else calls[:1]
        if calls:
            return {**message, "content": content, "tool_calls": calls}, "tool_calls"
    if reasoning_parser is not None and not text:
        return {**message, "content": None}, finish
    return {**message, "content": text}, finish


class _ToolStream:
    """One streamed choice of a request with tools: text deltas in, chat deltas (content or tool calls) out."""

    def __init__(self, mode: ToolMode) -> None:
        self.mode = mode
        self.text = ""
        self.auto = AutoToolStream(mode.names) if mode.kind == "auto" else None
        self.num_calls = 0

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        if self.mode.kind == "named":  # the arguments stream as they are written
            if not self.num_calls:  # the first delta opens the call: its id and name
                self.num_calls = 1
                return [{"tool_calls": [call_dict(self.mode.name, delta, index=0)]}]
            return [{"tool_calls": [{"index": 0, "function": {"arguments": delta}}]}] if delta else []
        if self.auto is not None:
            return self._deltas(*self.auto.feed(delta))
        return []  # required: the calls go out once the array is complete

    def finish(self) -> list[dict]:
        if self.mode.kind == "required":
            calls = calls_from_required(self.text)
            if calls:
                for k, call in enumerate(calls):
                    call["index"] = k
                self.num_calls = len(calls)
                return [{"tool_calls": calls}]
            return [{"content": self.text}] if self.text else []
        if self.auto is not None:
            return self._deltas(*self.auto.finish())
        return []

    def finish_reason(self, out: CompletionOutput) -> str | None:
        if self.num_calls and self.mode.kind in ("auto", "required"):
            return "tool_calls"
        return out.finish_reason

    def _deltas(self, content: str, calls: list[dict]) -> list[dict]:
        if not self.mode.parallel:  # parallel_tool_calls: false -> the first call only
            calls = [c for c in calls if c["index"] == 0]
        deltas = [{"content": content}] if content else []
        if calls:
            self.num_calls += len(calls)
            deltas.append({"tool_calls": calls})
        return deltas


# Names a request's chat_template_kwargs may not set: the server's own arguments to the template, and the
# parameters of transformers' apply_chat_template (the rest reach the template as variables).
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "tools", "add_generation_prompt", "tokenize", "chat_template", "conversation", "documents",
    "return_dict", "continue_final_message", "padding", "truncation", "max_length", "return_tensors",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "content_format",
})


def template_kwargs_of(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """A request's chat_template_kwargs (vLLM's field: variables the template reads, e.g. Qwen3's
    `enable_thinking`); a 400 for one that would replace the server's own arguments."""
    kwargs = kwargs or {}
    clash = sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS)
    if clash:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(clash)}", "chat_template_kwargs")
    return kwargs


def checked_tools(tools: list[Any] | None) -> list[dict] | None:
    """A request's tools checked (tool_calls.check_tools), a 400 naming `tools` for bad ones; None without any. The
    chat and tokenize routes check them alike."""
    if tools is None:
        return None
    try:
        return check_tools(tools)
    except ValueError as e:
        raise bad_request(str(e), "tools") from e


async def render_chat_prompt(engine: AsyncEngine, req: Any, add_generation_prompt: bool, tools: list[dict] | None
                             ) -> tuple[str, list[int]]:
    """A request's `messages` (with its `chat_template_kwargs`) rendered by the chat template and encoded, on the
    tokenizer thread: (text, token ids); a 400 naming `messages` when the template refuses them. The chat,
    tokenize and embeddings routes render the same way."""
    messages = template_messages(OpenAIServingChat._messages(req))
    template_kwargs = dict(template_kwargs_of(req.chat_template_kwargs))
    content_format = getattr(engine, "chat_template_content_format", "auto")
    if content_format != "auto":  # (the tokenizer's default)
        template_kwargs["content_format"] = content_format
    if getattr(req, "continue_final_message", False):  # vLLM's: the last message, an assistant's, left open
        if add_generation_prompt:
            raise bad_request("continue_final_message needs add_generation_prompt: false (the answer continues the "
                              "last message instead of starting a new one)", "continue_final_message")
        if messages[-1].get("role") != "assistant":
            raise bad_request("continue_final_message continues the last message, which must be the assistant's",
                              "messages")
        template_kwargs["continue_final_message"] = True
    if getattr(req, "documents", None):
        template_kwargs["documents"] = req.documents
    if getattr(req, "reasoning_effort", None) is not None:
        template_kwargs.setdefault("reasoning_effort", req.reasoning_effort)
    template = getattr(req, "chat_template", None)
    if template is not None and not getattr(engine, "trust_request_chat_template", False):
        # (vLLM's rule: a template is code the server runs; only a server started to trust them takes one)
        raise bad_request("this request passes its own chat_template, which the server takes only when started "
                          "with --trust-request-chat-template", "chat_template")
    try:
        return await engine.run_in_tokenizer_thread(_render_and_encode, engine.tokenizer, messages,
                                                    add_generation_prompt, tools, template_kwargs, template)
    except ValueError as e:
        raise bad_request(str(e), "messages") from e


def _render_and_encode(tokenizer: Any, messages: list[dict], add_generation_prompt: bool,
                       tools: list[dict] | None = None, template_kwargs: dict[str, Any] | None = None,
                       chat_template: str | None = None) -> tuple[str, list[int]]:
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    if chat_template is not None:
        extra["chat_template"] = chat_template
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                         **extra, **(template_kwargs or {}))
    return text, tokenizer.encode(text, add_special_tokens=False)


def _error_json(err: APIError) -> Response:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)
