"""POST /v1/embeddings: one engine request per input, each returning its last token's final hidden state
(SamplingParams.for_pooling; pooling_params.py), L2-normalized unless `normalize` is false, cut to `dimensions`.
vLLM's chat form (`messages` instead of `input`) embeds one conversation rendered with the chat template.

Inputs may be a string, a list of strings, a list of token ids, or a list of token-id lists, as for completions.
`encoding_format` "base64" (what the official openai client asks for) sends each vector as the base64 of its
little-endian float32 bytes. An input may take the whole context length (nothing is generated).
"""

from __future__ import annotations

import base64
import time
import uuid

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.async_engine import AsyncEngine, RequestStream
from pagedserve.entrypoints.openai.protocol import EmbeddingRequest
from pagedserve.entrypoints.openai.serving_base import (
    APIError,
    bad_request,
    check_model,
    engine_error,
    finals_or_error,
    now_created,
    run_until_disconnect,
    tokenize_prompts,
)
from pagedserve.entrypoints.openai.serving_chat import render_chat_prompt
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams


class OpenAIServingEmbedding:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str]) -> None:
        self.engine = engine
        self.served_model_names = served_model_names

    async def create(self, req: EmbeddingRequest, raw_request: Request) -> Response:
        arrival = time.monotonic()
        model_name = check_model(self.engine, self.served_model_names, req.model)
        try:
            pooling = PoolingParams(normalize=True if req.normalize is None else req.normalize,
                                    dimensions=req.dimensions)
        except ValueError as e:
            raise bad_request(str(e), "dimensions") from e
        if (req.input is None) == (req.messages is None):
            raise bad_request("give exactly one of input and messages", "input")
        if req.messages is not None:
            # (no generation prompt by default: the conversation as it stands)
            prompts = [await render_chat_prompt(self.engine, req, req.add_generation_prompt, None)]
        else:
            prompts = await tokenize_prompts(self.engine, req.input, "input", req.add_special_tokens)
        if req.truncate_prompt_tokens is not None:
            prompts = [(text if len(ids) <= req.truncate_prompt_tokens else None, ids[-req.truncate_prompt_tokens:])
                       for text, ids in prompts]
        base_id = f"embd-{uuid.uuid4().hex}"
        streams = await submit_pooling(self.engine, prompts, pooling, base_id, model_name, arrival)
        return await run_until_disconnect(raw_request, self._full(streams, base_id, model_name, req))

    async def _full(self, streams: list[RequestStream], base_id: str, model_name: str,
                    req: EmbeddingRequest) -> Response:
        finals, error = await pooled_finals(self.engine, streams)
        if error is not None:
            return error
        data = []
        for i, final in enumerate(finals):
            vector = final.embedding
            if req.encoding_format == "base64":
                vector = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
            data.append({"index": i, "object": "embedding", "embedding": vector})
        num_tokens = sum(len(f.prompt_token_ids) for f in finals)
        return JSONResponse({"id": base_id, "object": "list", "created": now_created(), "model": model_name,
                             "data": data, "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}})


async def submit_pooling(engine: AsyncEngine, prompts: list[tuple[str | None, list[int]]], pooling: PoolingParams,
                         base_id: str, model_name: str, arrival: float, param: str = "input") -> list[RequestStream]:
    """One pooling request per prompt (ids `{base_id}-{i}`), each checked against the context length first (a 400
    naming `param`); on an error the ones already added are aborted."""
    limit = engine.max_model_len
    for i, (_, ids) in enumerate(prompts):
        if len(ids) > limit:
            raise bad_request(
                f"{param} {i} has {len(ids)} tokens, but this model's context length is {limit} tokens; shorten "
                "it or set truncate_prompt_tokens", param, "context_length_exceeded")
    params = SamplingParams.for_pooling(pooling)
    streams: list[RequestStream] = []
    try:
        for i, (text, ids) in enumerate(prompts):
            streams.append(await engine.add_request(f"{base_id}-{i}", ids, params, arrival, text,
                                                    engine.lora_requests.get(model_name)))
    except BaseException as e:
        engine.abort([s.request_id for s in streams])
        if isinstance(e, Exception):
            raise engine_error(e, "dimensions" if "dimensions" in str(e) else param) from e
        raise
    return streams


async def pooled_finals(engine: AsyncEngine, streams: list[RequestStream]):
    """(the final outputs, each with its embedding, None), or (None, the error response)."""
    finals, error = await finals_or_error(engine, streams)
    if error is not None:
        return None, error
    if any(final.embedding is None for final in finals):  # aborted inside the engine (e.g. the server is stopping)
        err = APIError(503, "the request ended before its embedding was computed", "server_error")
        return None, JSONResponse(err.body(), status_code=err.status_code)
    return finals, None


__all__ = ["OpenAIServingEmbedding", "pooled_finals", "submit_pooling"]
