"""What chat and completions share: errors, sampling parameters, token strings, SSE, disconnects."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedserve.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineUnavailableError,
    RequestStream,
    last_output,
)
from pagedserve.beam_search import MAX_BEAM_WIDTH, BeamSearchOutput, BeamSearchParams
from pagedserve.entrypoints.openai.protocol import SamplingFields
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

MAX_PROMPTS = 1024  # prompts in one completions or embeddings request

# -4 billion would also be "impossible"; JSON has no -Infinity, so clamp like vLLM does.
_MIN_LOGPROB = -9999.0
_SAMPLING_FIELD_NAMES = {
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "prompt_logprobs",
    "priority",
}


class APIError(Exception):
    """An error with its HTTP status, rendered as OpenAI's {"error": {...}} shape."""

    def __init__(
        self,
        status_code: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def converted_request_error(e: ValueError, messages_param: str) -> APIError:
    """A 400 for a request another API's route built for the chat route and pydantic refused (the Responses and
    Messages routes): the first error's field and message, not pydantic's whole report; an error inside the converted
    messages is named as the route's own `messages_param` (input / messages)."""
    errors = getattr(e, "errors", None)
    if not callable(errors) or not errors():
        return bad_request(f"{messages_param}: {e}", messages_param)
    first = errors()[0]
    loc = [str(x) for x in first.get("loc", ())]
    field = loc[0] if loc else messages_param
    param = messages_param if field == "messages" else field
    where = ".".join(loc) if loc and field != "messages" else messages_param
    return bad_request(f"{where}: {first.get('msg')}", param)


def engine_error(e: BaseException, param: str | None = None) -> APIError:
    """Maps exceptions out of AsyncEngine to API errors. `param`: the field a ValueError is about when its
    message names none (e.g. the field that carried a structured-output constraint the engine refused)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return bad_request(str(e), _guess_param(str(e)) or param)
    if isinstance(e, EngineUnavailableError):
        return APIError(
            503,
            str(e),
            "service_unavailable_error",
            None,
            getattr(e, "code", None) or ("queue_full" if "queue" in str(e) else "shutting_down"),
            headers={"Retry-After": str(e.retry_after)},
        )
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), "server_error", None, "engine_dead", headers={"Retry-After": "30"})
    return APIError(500, f"internal error: {e!r}", "server_error")


def _guess_param(message: str) -> str | None:
    """The request field a SamplingParams message is about: the first field name it mentions."""
    best: tuple[int, str] | None = None
    for name in _SAMPLING_FIELD_NAMES:
        m = re.search(rf"\b{name}\b", message)
        if m is not None and (best is None or m.start() < best[0]):
            best = (m.start(), name)
    return None if best is None else best[1]


def error_response(e: APIError) -> Response:
    return Response(json.dumps(e.body()), status_code=e.status_code, headers=e.headers, media_type="application/json")


# --------------------------------------------------------------------------- requests
def check_model(engine: AsyncEngine, served_names: list[str], model: str | None) -> str:
    if model is None:
        return served_names[0]
    if model in served_names:  # the base model, or one of its LoRA adapters (--lora-modules)
        return model
    raise APIError(
        404,
        f"The model `{model}` does not exist; this server serves {served_names[0]!r}.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def build_sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                          defaults: dict | None = None) -> SamplingParams:
    """`defaults`: the model's generation_config values for the fields the request leaves unset."""
    defaults = defaults or {}
    if req.stream_options is not None and not req.stream:  # (OpenAI's and vLLM's rule)
        raise bad_request("stream_options is only allowed with stream: true", "stream_options")

    def pick(name: str, builtin: float) -> float:
        value = getattr(req, name)
        return defaults.get(name, builtin) if value is None else value

    try:
        return SamplingParams(
            n=1 if req.n is None else req.n,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0),
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=pick("repetition_penalty", 1.0),
            seed=req.seed,
            stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []),
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=bool(req.ignore_eos),
            max_tokens=max_tokens,
            min_tokens=req.min_tokens or 0,
            logprobs=logprobs,
            logit_bias=req.logit_bias,
            allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words,
            skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            prompt_logprobs=req.prompt_logprobs,
            structured_outputs=structured_outputs_of(req)[0],
        )
    except APIError:
        raise
    except ValueError as e:
        raise bad_request(str(e), _guess_param(str(e))) from e
    except TypeError as e:  # a type pydantic let through that SamplingParams does not take
        raise bad_request(f"invalid sampling parameters: {e}") from e


_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}


def structured_outputs_of(req: SamplingFields) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's structured-output constraint and the field it came in, from whichever of
    response_format, structured_outputs and guided_* it uses (more than one is a 400)."""
    found: list[tuple[str, dict]] = []
    if req.response_format is not None:
        spec = _response_format_spec(req.response_format)
        if spec is not None:
            found.append(("response_format", spec))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", req.structured_outputs))
    for name, key in _GUIDED_FIELDS.items():
        value = getattr(req, name)
        if value is not None:
            found.append((name, {key: value}))
    if not found:
        return None, None
    if len(found) > 1:
        raise bad_request(f"give one structured-output constraint; got {', '.join(n for n, _ in found)}", found[1][0])
    name, spec = found[0]
    try:
        return StructuredOutputsParams(**spec), name
    except TypeError as e:  # a field StructuredOutputsParams does not have
        raise bad_request(f"{name}: {e}", name) from e
    except ValueError as e:
        raise bad_request(f"{name}: {e}", name) from e


def _response_format_spec(response_format: dict) -> dict | None:
    kind = response_format.get("type")  # (required, as OpenAI's: {} is no format at all)
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        body = response_format.get("json_schema")
        if not isinstance(body, dict):
            raise bad_request('response_format json_schema needs a "json_schema" object with a "schema"',
                              "response_format")
        schema = body.get("schema")
        if schema is None:  # OpenAI's schema is optional: then any JSON object
            return {"json_object": True}
        if not isinstance(schema, (dict, str)):
            raise bad_request("response_format.json_schema.schema must be a JSON Schema object", "response_format")
        return {"json": schema}
    raise bad_request(f'response_format type must be "text", "json_object" or "json_schema"; got {kind!r}',
                      "response_format")


def check_prompt_fits(
    engine: AsyncEngine,
    prompt_token_ids: list[int],
    params: SamplingParams,
    prompt_param: str = "prompt",
    max_tokens_param: str = "max_tokens",
) -> None:
    """The engine checks again; checking here answers before any work is queued."""
    num_prompt = len(prompt_token_ids)
    if num_prompt == 0:
        raise bad_request("the prompt is empty", prompt_param)
    if num_prompt >= engine.max_model_len:
        raise bad_request(
            f"the prompt has {num_prompt} tokens, but this model's context length is "
            f"{engine.max_model_len} tokens, leaving no room to generate; shorten the prompt",
            prompt_param,
            "context_length_exceeded",
        )
    if params.max_tokens is not None and num_prompt + params.max_tokens > engine.max_model_len:
        raise bad_request(
            f"this model's maximum context length is {engine.max_model_len} tokens, but "
            f"{num_prompt} prompt tokens plus max_tokens {params.max_tokens} make "
            f"{num_prompt + params.max_tokens}; reduce the prompt or max_tokens",
            max_tokens_param,
            "context_length_exceeded",
        )
    try:
        params.validate_for_model(engine.vocab_size)
    except ValueError as e:
        raise bad_request(str(e)) from e


def usage_dict(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object; with `num_cached_tokens` (--enable-prompt-tokens-details) also
    prompt_tokens_details.cached_tokens: the prompt tokens served from the prefix cache."""
    usage: dict = {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }
    if num_cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": num_cached_tokens}
    return usage


class TokenIdStrings:
    """vLLM's return_tokens_as_token_ids: each token in logprobs as "token_id:N" (its bytes those of that string),
    so a client that re-tokenizes nothing gets the exact ids. Same interface as TokenStrings."""

    def get(self, token_id: int) -> tuple[str, list[int]]:
        text = f"token_id:{token_id}"
        return text, list(text.encode("utf-8"))

    def text(self, token_id: int) -> str:
        return f"token_id:{token_id}"


TOKEN_ID_STRINGS = TokenIdStrings()


def token_strings_for(req: Any, token_strings: TokenStrings, ids_by_default: bool) -> TokenStrings | TokenIdStrings:
    """The request's way of writing tokens in logprobs: its return_tokens_as_token_ids, else the server's
    --return-tokens-as-token-ids."""
    as_ids = getattr(req, "return_tokens_as_token_ids", None)
    return TOKEN_ID_STRINGS if (ids_by_default if as_ids is None else as_ids) else token_strings


def prompt_logprobs_json(entries: list | None, token_strings: TokenStrings | TokenIdStrings, num_top: int
                         ) -> list | None:
    """vLLM's prompt_logprobs shape: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} holding the token itself and its num_top most likely alternatives."""
    if entries is None:
        return None
    text_of = token_strings.text
    out: list[dict | None] = []
    for lp in entries:
        if lp is None:
            out.append(None)
            continue
        top = {str(tid): {"logprob": clamp_logprob(x), "rank": rank, "decoded_token": text_of(tid)}
               for rank, (tid, x) in enumerate(lp.top[:num_top], start=1)}
        top[str(lp.token_id)] = {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank,
                                 "decoded_token": text_of(lp.token_id)}
        out.append(top)
    return out


def clamp_logprob(x: float) -> float:
    if math.isnan(x):
        return _MIN_LOGPROB
    return max(x, _MIN_LOGPROB)


# --------------------------------------------------------------------------- token strings
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: each byte is shown as one printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


class TokenStrings:
    """token id -> (text, UTF-8 bytes), cached; exact bytes for byte-level BPE vocabularies, whose
    single tokens may hold part of a character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        try:
            probe = tokenizer.convert_ids_to_tokens(tokenizer.encode(" a", add_special_tokens=False))
            self._byte_level = bool(probe) and probe[0] == "\u0120a"
        except Exception:
            self._byte_level = False

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        raw: bytes | None = None
        if self._byte_level:
            piece = self.tokenizer.convert_ids_to_tokens([token_id])[0]
            if piece is not None and all(c in _BYTE_DECODER for c in piece):
                raw = bytes(_BYTE_DECODER[c] for c in piece)
                text = raw.decode("utf-8", errors="replace")
        if raw is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            raw = text.encode("utf-8")
        hit = (text, list(raw))
        self._cache[token_id] = hit
        return hit

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]


# --------------------------------------------------------------------------- SSE and disconnects
def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its generator, so a request's `finally` (which
    aborts it in the engine) runs at once when the client goes away, wherever the generator was
    suspended (Starlette only cancels the task, which can leave it parked at a `yield`)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Runs a non-streaming handler, cancelling it (and so aborting its engine requests) when the
    client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - the client is gone; nothing to report to
        pass
    return Response(status_code=499)


def now_created() -> int:
    return int(time.time())


async def tokenize_prompts(engine: AsyncEngine, prompt: Any, param: str = "prompt", add_special_tokens: bool = True
                           ) -> list[tuple[str | None, list[int]]]:
    """A completions `prompt` / embeddings `input` (a string, a list of strings, a list of token ids, or a list
    of token-id lists) -> [(prompt text or None, token ids)]; empty prompts and ids outside the vocabulary are
    400s naming `param`. Texts are encoded on the tokenizer thread."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise bad_request(f"{param} must not be empty", param)
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param)
    texts = [p for p in items if isinstance(p, str)]
    encoded: list[list[int]] = []
    if texts:
        encode = engine.tokenizer.encode
        try:
            encoded = await engine.run_in_tokenizer_thread(
                lambda: [encode(t) if add_special_tokens else encode(t, add_special_tokens=False) for t in texts])
        except ValueError as e:  # (text that cannot be tokenized: a lone surrogate)
            raise bad_request(str(e), param) from None
    out: list[tuple[str | None, list[int]]] = []
    it = iter(encoded)
    for p in items:
        if isinstance(p, str):
            if not p:
                raise bad_request(f"{param} must not be empty", param)
            out.append((p, next(it)))
        else:
            for t in p:
                if not 0 <= t < engine.vocab_size:
                    raise bad_request(f"prompt token id {t} is outside the vocabulary [0, {engine.vocab_size})", param)
            out.append((None, list(p)))
    return out


async def final_or_error(engine: AsyncEngine, stream: RequestStream
                         ) -> tuple[RequestOutput, None] | tuple[None, APIError]:
    """(a stream's final output, None), or (None, the API error of the engine's failure); an unfinished stream (an
    error, a cancelled handler) is aborted."""
    try:
        return await last_output(stream), None
    except Exception as e:
        return None, engine_error(e)
    finally:
        if not stream.finished:
            engine.abort(stream.request_id)


async def finals_or_error(engine: AsyncEngine, streams: list[RequestStream]
                          ) -> tuple[list[RequestOutput], None] | tuple[None, Response]:
    """(the streams' final outputs, None), or (None, the error response) when the engine failed them; streams left
    unfinished (an error, a cancelled handler) are aborted."""
    try:
        return list(await asyncio.gather(*(last_output(s) for s in streams))), None
    except Exception as e:
        err = engine_error(e)
        return None, JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)
    finally:
        engine.abort([s.request_id for s in streams if not s.finished])



def beam_search_params(req: SamplingFields, max_tokens: int | None, logprobs: bool,
                       max_tokens_param: str = "max_tokens") -> BeamSearchParams:
    """use_beam_search: the request's BeamSearchParams (n beams), or a 400 for what beam search does not do here."""
    if logprobs:
        raise bad_request("use_beam_search returns no logprobs", "logprobs")
    constraint, field_name = structured_outputs_of(req)
    if constraint is not None:
        raise bad_request("use_beam_search takes no structured outputs", field_name)
    if req.n is not None and req.n > MAX_BEAM_WIDTH:
        raise bad_request(f"with use_beam_search, n (the beam width) is at most {MAX_BEAM_WIDTH}", "n")
    try:
        return BeamSearchParams(beam_width=req.n or 1, max_tokens=max_tokens if max_tokens is not None else 16,
                                ignore_eos=bool(req.ignore_eos), temperature=float(req.temperature or 0.0),
                                length_penalty=1.0 if req.length_penalty is None else float(req.length_penalty),
                                include_stop_str_in_output=bool(req.include_stop_str_in_output))
    except ValueError as e:
        raise bad_request(str(e), max_tokens_param if "max_tokens" in str(e) else "length_penalty") from e


def check_beam_prompts(engine: AsyncEngine, prompts: list[list[int]], params: BeamSearchParams,
                       max_tokens_param: str = "max_tokens") -> None:
    """Room for every beam's answer after each prompt (a 400 before any work or stream starts)."""
    for ids in prompts:
        check_prompt_fits(engine, ids, SamplingParams(max_tokens=params.max_tokens), max_tokens_param=max_tokens_param)


async def run_beam_searches(engine: AsyncEngine, prompts: list[list[int]], params: BeamSearchParams,
                            request_id: str, lora_request: Any = None) -> list[BeamSearchOutput]:
    """One beam search a prompt, together (check_beam_prompts first); an engine failure becomes the APIError
    engine_error makes."""
    tasks = [asyncio.ensure_future(engine.beam_search(ids, params, f"{request_id}-{p}", lora_request))
             for p, ids in enumerate(prompts)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException as e:
        for task in tasks:  # the others stop too (each aborts its step in flight)
            task.cancel()
        if isinstance(e, Exception):
            raise engine_error(e) from e
        raise


async def beam_search_stream(search: Awaitable[list[dict]], base: dict, usage: Callable[[], dict] | None
                             ) -> AsyncIterator[str]:
    """use_beam_search with stream: true, as vLLM streams it: nothing until the search ends, then one chunk a
    choice (its whole answer; `search` gives the choices), the usage chunk when asked (`usage()` after the search),
    and [DONE]; an engine error is an error event."""
    try:
        choices = await search
    except APIError as e:
        yield sse(error_body(e.message, e.type, e.param, e.code))
        yield SSE_DONE
        return
    for choice in choices:
        yield sse({**base, "choices": [choice]})
    if usage is not None:
        yield sse({**base, "choices": [], "usage": usage()})
    yield SSE_DONE
