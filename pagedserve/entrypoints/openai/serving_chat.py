"""POST /v1/chat/completions: messages -> chat template -> token ids -> engine -> OpenAI shapes."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.async_engine import AsyncEngine, RequestStream
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.serving_base import (
    SSE_DONE,
    APIError,
    SSEResponse,
    TokenStrings,
    bad_request,
    build_sampling_params,
    check_model,
    check_prompt_fits,
    clamp_logprob,
    engine_error,
    error_body,
    now_created,
    run_until_disconnect,
    sse,
    structured_outputs_of,
    usage_dict,
)
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class OpenAIServingChat:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str], token_strings: TokenStrings) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.token_strings = token_strings

    async def create(self, req: ChatCompletionRequest, raw_request: Request) -> Response:
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
        messages = self._messages(req)
        try:
            prompt_text, prompt_ids = await self.engine.run_in_tokenizer_thread(
                _render_and_encode, self.engine.tokenizer, messages, req.add_generation_prompt is not False
            )
        except ValueError as e:
            raise bad_request(str(e), "messages") from e
        check_prompt_fits(
            self.engine,
            prompt_ids,
            params,
            "messages",
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
        )

        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            stream = await self.engine.add_request(request_id, prompt_ids, params, arrival, prompt_text)
        except Exception as e:
            raise engine_error(e, structured_outputs_of(req)[1]) from e
        ctx = _ChatContext(request_id, model_name, now_created(), len(prompt_ids), params, req)
        if req.stream:
            return SSEResponse(self._stream(stream, ctx))
        return await run_until_disconnect(raw_request, self._full(stream, ctx))

    # ------------------------------------------------------------------ input checks
    @staticmethod
    def _refuse_unsupported(req: ChatCompletionRequest) -> None:
        if req.tools and req.tool_choice != "none":
            raise bad_request(
                'tool calling is not supported by this server; send no tools (or tool_choice: "none")',
                "tools",
            )
        if req.functions or (req.function_call not in (None, "none")):
            raise bad_request("function calling is not supported by this server", "functions")
        if req.modalities is not None and any(m != "text" for m in req.modalities):
            raise bad_request("only the text modality is supported", "modalities")
        if req.audio is not None:
            raise bad_request("audio output is not supported", "audio")

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
            out.append(msg)
        return out

    # ------------------------------------------------------------------ outputs
    def _logprobs(self, entries: list, num_top: int) -> list[dict]:
        strings = self.token_strings.get
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
        final: RequestOutput | None = None
        try:
            async for output in stream:
                final = output
        except Exception as e:
            return _error_json(engine_error(e))
        finally:
            if not stream.finished:
                self.engine.abort(stream.request_id)
        assert final is not None
        choices = []
        num_completion = 0
        for out in final.outputs:
            num_completion += len(out.token_ids)
            logprobs = None
            if ctx.params.logprobs is not None and out.logprobs is not None:
                logprobs = {"content": self._logprobs(out.logprobs, ctx.params.logprobs)}
            choices.append(
                {
                    "index": out.index,
                    "message": {"role": "assistant", "content": out.text},
                    "logprobs": logprobs,
                    "finish_reason": out.finish_reason,
                    "stop_reason": out.stop_reason,
                }
            )
        body = {
            "id": ctx.request_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model_name,
            "choices": choices,
            "usage": usage_dict(ctx.num_prompt_tokens, num_completion),
            "system_fingerprint": None,
        }
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

        def chunk(choice: dict, usage: dict | None = None) -> str:
            obj = {**base, "choices": [choice]}
            if include_usage:
                obj["usage"] = usage
            return sse(obj)

        sent_text = [0] * n
        sent_logprobs = [0] * n
        finished = [False] * n
        num_completion = [0] * n
        try:
            for i in range(n):
                yield chunk(
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    },
                    usage_dict(ctx.num_prompt_tokens, 0) if continuous_usage else None,
                )
            async for output in stream:
                for out in output.outputs:
                    i = out.index
                    if finished[i]:
                        continue
                    num_completion[i] = len(out.token_ids)
                    usage = usage_dict(ctx.num_prompt_tokens, sum(num_completion)) if continuous_usage else None
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
                            logprobs = {"content": self._logprobs(new_lps, ctx.params.logprobs)}
                        yield chunk(
                            {
                                "index": i,
                                "delta": {"content": delta_text},
                                "logprobs": logprobs,
                                "finish_reason": None,
                            },
                            usage,
                        )
                    if out.finish_reason is not None:
                        finished[i] = True
                        yield chunk(
                            {
                                "index": i,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": out.finish_reason,
                                "stop_reason": out.stop_reason,
                            },
                            usage,
                        )
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage_dict(ctx.num_prompt_tokens, sum(num_completion))})
        except Exception as e:  # engine died or shut down mid-stream: tell the client in-band
            err = engine_error(e)
            yield sse(error_body(err.message, err.type, err.param, err.code))
        finally:
            if not stream.finished:
                self.engine.abort(stream.request_id)
        yield SSE_DONE


class _ChatContext:
    __slots__ = ("request_id", "model_name", "created", "num_prompt_tokens", "params", "req")

    def __init__(
        self,
        request_id: str,
        model_name: str,
        created: int,
        num_prompt_tokens: int,
        params: SamplingParams,
        req: ChatCompletionRequest,
    ) -> None:
        self.request_id = request_id
        self.model_name = model_name
        self.created = created
        self.num_prompt_tokens = num_prompt_tokens
        self.params = params
        self.req = req


def _render_and_encode(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return text, tokenizer.encode(text, add_special_tokens=False)


def _error_json(err: APIError) -> Response:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)
