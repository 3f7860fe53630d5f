"""POST /v1/completions: one engine request per prompt; choice index = prompt_index * n + i.

Prompts may be a string, a list of strings, a list of token ids, or a list of token-id lists.
Logprobs use the legacy completions format: tokens, token_logprobs, top_logprobs (dicts),
text_offset (character offsets into the choice's text, echo included).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.async_engine import AsyncEngine, RequestStream
from pagedserve.entrypoints.openai.protocol import CompletionRequest
from pagedserve.entrypoints.openai.serving_base import (
    SSE_DONE,
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
    finals_or_error,
    now_created,
    prompt_logprobs_json,
    run_beam_searches,
    run_until_disconnect,
    sse,
    structured_outputs_of,
    token_strings_for,
    tokenize_prompts,
    usage_dict,
)
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

MAX_CHOICES = 1024  # prompts x n in one request


class OpenAIServingCompletion:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str], token_strings: TokenStrings) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.token_strings = token_strings
        self.tokens_as_ids = False  # --return-tokens-as-token-ids (build_app sets it)
        self.prompt_tokens_details = False  # --enable-prompt-tokens-details (build_app sets it)

    async def create(self, req: CompletionRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        model_name = check_model(self.engine, self.served_model_names, req.model)
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise bad_request("best_of is not supported unless it equals n", "best_of")
        if req.stream and req.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is not available when streaming; echo with logprobs streams the "
                              "prompt's logprobs in the legacy format", "prompt_logprobs")
        if req.suffix and req.echo:
            raise bad_request("echo is not available with suffix (the model's prompt is the fill-in-the-middle "
                              "markup around prompt and suffix, not the prompt)", "echo")
        if req.use_beam_search:
            return await run_until_disconnect(raw_request, self._beam_search(req, model_name))
        echo_only = req.max_tokens == 0  # the prompt alone (lm-eval's loglikelihood requests, with logprobs)
        if echo_only and not req.echo:
            raise bad_request("max_tokens must be at least 1 (0 is allowed only with echo)", "max_tokens")
        params = build_sampling_params(req, 1 if echo_only else req.max_tokens, req.logprobs,
                                       self.engine.default_sampling)
        if req.echo and req.logprobs is not None:  # the echoed prompt carries its tokens' logprobs
            params.prompt_logprobs = max(params.prompt_logprobs or 0, req.logprobs)
        if req.suffix:  # fill in the middle: the model's FIM prompt around each prompt text
            prompts = await self._fim_prompts(req.prompt, req.suffix)
        else:
            prompts = await tokenize_prompts(self.engine, req.prompt)
        if req.truncate_prompt_tokens is not None:  # vLLM's: each prompt's last N tokens
            keep = req.truncate_prompt_tokens
            prompts = [(text if len(ids) <= keep else None, ids[-keep:]) for text, ids in prompts]
        if len(prompts) * params.n > MAX_CHOICES:
            raise bad_request(
                f"{len(prompts)} prompts x n={params.n} make {len(prompts) * params.n} "
                f"choices; at most {MAX_CHOICES} per request",
                "n",
            )
        for _, ids in prompts:
            check_prompt_fits(self.engine, ids, params)
        queue = self.engine.max_queued_requests
        if queue is not None and len(prompts) > max(queue, 1):  # (each prompt is a request of the queue)
            raise bad_request(f"{len(prompts)} prompts are more requests than the waiting queue ever takes at once "
                              f"(--max-queued-requests {queue}); send at most {max(queue, 1)} prompts a request",
                              "prompt")

        base_id = f"cmpl-{uuid.uuid4().hex}"
        request_ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]

        async def answer() -> Response:
            # Every prompt submitted at once (the engine takes them all between two steps: added one at a time, a
            # list of P prompts waited P steps), the client's disconnect watched meanwhile (run_until_disconnect).
            lora = self.engine.lora_requests.get(model_name)
            adds = [asyncio.ensure_future(self.engine.add_request(rid, ids, params, arrival, text, lora,
                                                                  req.priority or 0, req.cache_salt))
                    for rid, (text, ids) in zip(request_ids, prompts)]
            try:
                streams: list[RequestStream] = list(await asyncio.gather(*adds))
            except BaseException as e:
                for add in adds:  # (each add aborts its request when cancelled)
                    add.cancel()
                self.engine.abort(request_ids)
                if isinstance(e, Exception):
                    raise engine_error(e, structured_outputs_of(req)[1]) from e
                raise
            ctx = _Context(base_id, model_name, now_created(), prompts, params, req)
            if req.stream:
                return SSEResponse(self._stream(streams, ctx))
            return await self._full(streams, ctx)

        return await run_until_disconnect(raw_request, answer())

    async def _fim_prompts(self, prompt, suffix: str) -> list[tuple[str | None, list[int]]]:
        """Each prompt text (the code before the hole) with `suffix` (the code after it) as the model's
        fill-in-the-middle prompt (Tokenizer.fim_ids); a 400 for token-id prompts or a model without FIM tokens."""
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise bad_request("suffix needs text prompts (the code before the insertion), not token ids", "suffix")
        fim = getattr(self.engine.tokenizer, "fim_ids", None)
        if fim is None:
            raise bad_request("this model's tokenizer has no fill-in-the-middle tokens: suffix needs a code model "
                              "trained for insertion", "suffix")
        try:
            ids = await self.engine.run_in_tokenizer_thread(lambda: [fim(t, suffix) for t in texts])
        except ValueError as e:
            raise bad_request(str(e), "suffix") from None
        return [(None, i) for i in ids]

    async def _beam_search(self, req: CompletionRequest, model_name: str) -> Response:
        """use_beam_search: n beams a prompt, the n best answers its choices (beam_search.py); streamed as vLLM
        streams it (each choice whole once the search ends)."""
        if req.echo:
            raise bad_request("use_beam_search does not echo", "echo")
        params = beam_search_params(req, req.max_tokens, req.logprobs is not None or req.prompt_logprobs is not None)
        if req.suffix:  # fill in the middle: the model's FIM prompt around each prompt text
            prompts = await self._fim_prompts(req.prompt, req.suffix)
        else:
            prompts = await tokenize_prompts(self.engine, req.prompt)
        if len(prompts) * params.beam_width > MAX_CHOICES:
            raise bad_request(f"{len(prompts)} prompts x n={params.beam_width} make more than {MAX_CHOICES} choices",
                              "n")
        check_beam_prompts(self.engine, [ids for _, ids in prompts], params)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        num_prompt = sum(len(ids) for _, ids in prompts)
        num_completion = 0
        num_cached: int | None = 0 if self.prompt_tokens_details else None

        async def choices() -> list[dict]:
            nonlocal num_completion, num_cached
            outputs = await run_beam_searches(self.engine, [ids for _, ids in prompts], params, request_id,
                                              self.engine.lora_requests.get(model_name))
            if num_cached is not None:
                num_cached = sum(out.num_cached_tokens for out in outputs)
            found = []
            for p, (out, (_, ids)) in enumerate(zip(outputs, prompts, strict=True)):
                for i, seq in enumerate(out.sequences):
                    num_completion += len(seq.tokens) - len(ids)
                    found.append({"index": p * params.beam_width + i, "text": seq.text, "logprobs": None,
                                  "finish_reason": seq.finish_reason, "stop_reason": seq.stop_reason})
            return found

        base = {"id": request_id, "object": "text_completion", "created": now_created(), "model": model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            usage = (lambda: usage_dict(num_prompt, num_completion, num_cached)) if include_usage else None
            return SSEResponse(beam_search_stream(choices(), base, usage))
        found = await choices()
        return JSONResponse({**base, "choices": found, "usage": usage_dict(num_prompt, num_completion, num_cached),
                             "system_fingerprint": None})

    # ------------------------------------------------------------------ outputs
    def _prompt_text(self, ctx: _Context, prompt_index: int) -> str:
        text, ids = ctx.prompts[prompt_index]
        if text is None:  # token ids: their text with special tokens, as the echoed tokens and offsets have them
            text = self.engine.tokenizer.decode(ids, skip_special_tokens=False)
            ctx.prompts[prompt_index] = (text, ids)
        return text

    def _logprobs(self, entries: list, num_top: int, offset: int, req: CompletionRequest) -> tuple[dict, int]:
        """Legacy logprobs for `entries` (TokenLogprobs, or a bare token id: the echoed prompt's first token,
        which has none); offsets start at `offset`. Returns (dict, next offset)."""
        text_of = token_strings_for(req, self.token_strings, self.tokens_as_ids).text
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for lp in entries:
            if isinstance(lp, int):
                text = text_of(lp)
                tokens.append(text)
                token_logprobs.append(None)
                top_logprobs.append(None)
                offsets.append(offset)
                offset += len(text)
                continue
            text = text_of(lp.token_id)
            tokens.append(text)
            token_logprobs.append(clamp_logprob(lp.logprob))
            top: dict[str, float] = {text_of(tid): clamp_logprob(x) for tid, x in lp.top[:num_top]}
            top.setdefault(text, clamp_logprob(lp.logprob))
            top_logprobs.append(top)
            offsets.append(offset)
            offset += len(text)
        return (
            {
                "tokens": tokens,
                "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs,
                "text_offset": offsets,
            },
            offset,
        )

    def _prompt_entries(self, ctx: _Context, output: RequestOutput) -> list:
        """The echoed prompt's legacy logprob entries (echo with logprobs): its first token's id, then the
        TokenLogprobs of the others; [] without echo or logprobs."""
        if not ctx.req.echo or ctx.params.logprobs is None or output.prompt_logprobs is None:
            return []
        return [output.prompt_token_ids[0], *output.prompt_logprobs[1:]]

    async def _full(self, streams: list[RequestStream], ctx: _Context) -> Response:
        finals, error = await finals_or_error(self.engine, streams)
        if error is not None:
            return error
        n = ctx.params.n
        choices = []
        num_completion = 0
        for p, final in enumerate(finals):
            echo = self._prompt_text(ctx, p) if ctx.req.echo else ""
            prompt_entries = self._prompt_entries(ctx, final)
            prompt_logprobs = None
            if ctx.req.prompt_logprobs is not None:
                prompt_logprobs = prompt_logprobs_json(final.prompt_logprobs,
                                                       token_strings_for(ctx.req, self.token_strings,
                                                                         self.tokens_as_ids),
                                                       ctx.req.prompt_logprobs)
            for out in final.outputs:
                text, entries = (echo, []) if ctx.echo_only else (echo + out.text, out.logprobs)
                num_completion += 0 if ctx.echo_only else len(out.token_ids)
                logprobs = None
                if ctx.params.logprobs is not None and entries is not None:
                    logprobs, _ = self._logprobs(prompt_entries + entries, ctx.params.logprobs,
                                                 0 if prompt_entries else len(echo), ctx.req)
                choice = {
                    "index": p * n + out.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": out.finish_reason,
                    "stop_reason": out.stop_reason,
                }
                if prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs
                if ctx.req.return_token_ids:  # vLLM's: the choice's prompt and generated ids
                    choice["prompt_token_ids"] = list(ctx.prompts[p][1])
                    choice["token_ids"] = [] if ctx.echo_only else list(out.token_ids)
                choices.append(choice)
        body = {
            "id": ctx.request_id,
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model_name,
            "choices": choices,
            "usage": usage_dict(ctx.num_prompt_tokens, num_completion,
                                sum(f.num_cached_tokens for f in finals) if self.prompt_tokens_details else None),
            "system_fingerprint": None,
        }
        return JSONResponse(body)

    async def _stream(self, streams: list[RequestStream], ctx: _Context) -> AsyncIterator[str]:
        n = ctx.params.n
        opts = ctx.req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous_usage = include_usage and bool(opts and opts.continuous_usage_stats)
        base = {
            "id": ctx.request_id,
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model_name,
        }
        num_choices = len(streams) * n
        sent_text = [0] * num_choices
        sent_logprobs = [0] * num_choices
        text_offset = [0] * num_choices
        echoed = [not ctx.req.echo] * num_choices
        finished = [False] * num_choices
        num_completion = [0] * num_choices
        sent_ids = [0] * num_choices  # return_token_ids: generated ids sent so far
        ids_started = [False] * num_choices

        num_cached = [0] * len(streams)  # each prompt's tokens found in the prefix cache

        def cached() -> int | None:
            return sum(num_cached) if self.prompt_tokens_details else None

        def chunk(choice: dict) -> str:
            obj = {**base, "choices": [choice]}
            if include_usage:  # continuous: the usage of this chunk's choice (its prompt, its tokens), as vLLM's
                i = choice["index"]
                obj["usage"] = usage_dict(len(ctx.prompts[i // n][1]), num_completion[i],
                                          num_cached[i // n] if self.prompt_tokens_details else None) \
                    if continuous_usage else None
            return sse(obj)

        try:
            async for p, output in _merge(streams):
                num_cached[p] = output.num_cached_tokens
                for out in output.outputs:
                    i = p * n + out.index
                    if finished[i]:
                        continue
                    out_text, out_lps = ("", []) if ctx.echo_only else (out.text, out.logprobs)
                    num_completion[i] = 0 if ctx.echo_only else len(out.token_ids)
                    delta_text = out_text[sent_text[i] :]
                    new_lps = None
                    if (
                        ctx.params.logprobs is not None
                        and out_lps is not None
                        and len(out_lps) > sent_logprobs[i]
                    ):
                        new_lps = out_lps[sent_logprobs[i] :]
                    if not echoed[i]:
                        echoed[i] = True
                        prefix = self._prompt_text(ctx, p)
                        delta_text = prefix + delta_text
                        text_offset[i] = len(prefix)
                        prompt_entries = self._prompt_entries(ctx, output)
                        if prompt_entries:  # the prompt's logprobs lead the first chunk's, offsets from 0
                            new_lps, text_offset[i] = prompt_entries + (new_lps or []), 0
                    last = out.finish_reason is not None
                    new_ids = [] if ctx.echo_only else out.token_ids[sent_ids[i]:]
                    if delta_text or new_lps or last:
                        sent_text[i] = len(out_text)
                        logprobs = None
                        if new_lps:
                            sent_logprobs[i] = len(out_lps)
                            logprobs, text_offset[i] = self._logprobs(new_lps, ctx.params.logprobs, text_offset[i],
                                                                      ctx.req)
                        if last:
                            finished[i] = True
                        choice = {
                            "index": i,
                            "text": delta_text,
                            "logprobs": logprobs,
                            "finish_reason": out.finish_reason,
                            "stop_reason": out.stop_reason if last else None,
                        }
                        if ctx.req.return_token_ids:  # the prompt's ids in a choice's first chunk, then new ids
                            if not ids_started[i]:
                                choice["prompt_token_ids"], ids_started[i] = list(ctx.prompts[p][1]), True
                            choice["token_ids"] = list(new_ids)
                            sent_ids[i] += len(new_ids)
                        yield chunk(choice)
            if include_usage:
                yield sse({**base, "choices": [],
                           "usage": usage_dict(ctx.num_prompt_tokens, sum(num_completion), cached())})
        except Exception as e:
            err = engine_error(e)
            yield sse(error_body(err.message, err.type, err.param, err.code))
        finally:
            self.engine.abort([s.request_id for s in streams if not s.finished])
        yield SSE_DONE


class _Context:
    __slots__ = ("request_id", "model_name", "created", "prompts", "params", "req", "num_prompt_tokens",
                 "echo_only")

    def __init__(
        self,
        request_id: str,
        model_name: str,
        created: int,
        prompts: list[tuple[str | None, list[int]]],
        params: SamplingParams,
        req: CompletionRequest,
    ) -> None:
        self.request_id = request_id
        self.model_name = model_name
        self.created = created
        self.prompts = prompts
        self.params = params
        self.req = req
        self.num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        self.echo_only = bool(req.echo) and req.max_tokens == 0  # the one token generated is not shown




async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(p: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((p, output, None))
        except Exception as e:
            queue.put_nowait((p, None, e))
            return
        queue.put_nowait((p, None, None))

    tasks = [asyncio.ensure_future(pump(p, s)) for p, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            p, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                remaining -= 1
                continue
            yield p, output
    finally:
        for t in tasks:
            t.cancel()
