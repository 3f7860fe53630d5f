"""POST /score (/v1/score), /rerank (/v1/rerank, /v2/rerank) and /classify (/v1/classify), as vLLM serves them. For an
embedding model each text is embedded (its last token's final hidden state, L2-normalized: serving_embedding.py) and
a pair's score is the cosine similarity of its two embeddings (a bi-encoder); for a one-label sequence classifier (a
cross-encoder reranker) a pair's score is its probability for the two texts tokenized together (the tokenizer's pair
encoding). /classify runs a sequence classifier on each input:

    /classify {"input": str | [str] | token ids}: -> {"data": [{"index", "label", "probs", "num_classes"}], "usage"}

    /score   {"text_1": str | [str], "text_2": str | [str]}: 1 to 1, 1 to N or N to N pairs (a single text_1 is paired
             with every text_2) -> {"data": [{"index", "object": "score", "score"}], "usage"}
    /rerank  {"query": str, "documents": [str], "top_n": N}: the documents by score, best first, the first N (0 or
             none: all) -> {"results": [{"index", "document": {"text"}, "relevance_score"}], "usage"} (Jina's and
             Cohere's shape)

Every distinct text is embedded once (bi-encoder). `truncate_prompt_tokens` keeps each text's (a pair's) last N
tokens.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.async_engine import AsyncEngine
from pagedserve.entrypoints.openai.protocol import Int, OpenAIBaseModel
from pagedserve.entrypoints.openai.serving_base import (
    bad_request,
    check_model,
    now_created,
    run_until_disconnect,
    tokenize_prompts,
)
from pagedserve.entrypoints.openai.serving_embedding import pooled_finals, submit_pooling
from pagedserve.pooling_params import PoolingParams, score_pairs


class ScoreRequest(OpenAIBaseModel):
    model: str | None = None
    text_1: str | list[str] = Field(description="one text, or a list (one per pair, or one for every text_2)")
    text_2: str | list[str] = Field(description="one text, or a list")
    truncate_prompt_tokens: Int | None = Field(default=None, ge=1, description="score only each text's last N tokens")
    add_special_tokens: bool = True
    user: str | None = None


class ClassifyRequest(OpenAIBaseModel):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] = Field(description="texts or token ids to classify")
    truncate_prompt_tokens: Int | None = Field(default=None, ge=1, description="classify only the last N tokens")
    add_special_tokens: bool = True
    user: str | None = None


class RerankRequest(OpenAIBaseModel):
    model: str | None = None
    query: str
    documents: list[str]
    top_n: Int | None = Field(default=None, ge=0, description="the best N documents (0 or none: all)")
    return_documents: bool = True
    truncate_prompt_tokens: Int | None = Field(default=None, ge=1)
    add_special_tokens: bool = True
    user: str | None = None


def _pairs(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[str, str]]:
    try:
        return score_pairs(text_1, text_2)
    except ValueError as e:
        raise bad_request(str(e), "text_1" if "text_1 must" in str(e) else "text_2") from e


class OpenAIServingScore:
    def __init__(self, engine: AsyncEngine, served_model_names: list[str]) -> None:
        self.engine = engine
        self.served_model_names = served_model_names

    async def score(self, req: ScoreRequest, raw_request: Request) -> Response:
        model_name = check_model(self.engine, self.served_model_names, req.model)
        pairs = _pairs(req.text_1, req.text_2)

        async def work() -> Response:
            scores, tokens = await self._cosines(pairs, model_name, req.truncate_prompt_tokens, req.add_special_tokens)
            if isinstance(scores, Response):
                return scores
            data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
            return JSONResponse({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": now_created(),
                                 "model": model_name, "data": data,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})

        return await run_until_disconnect(raw_request, work())

    async def rerank(self, req: RerankRequest, raw_request: Request) -> Response:
        model_name = check_model(self.engine, self.served_model_names, req.model)
        if not req.documents:
            raise bad_request("documents must hold at least one text", "documents")
        pairs = [(req.query, doc) for doc in req.documents]

        async def work() -> Response:
            scores, tokens = await self._cosines(pairs, model_name, req.truncate_prompt_tokens, req.add_special_tokens)
            if isinstance(scores, Response):
                return scores
            order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n or None]
            results = []
            for i in order:
                result = {"index": i, "relevance_score": scores[i]}
                if req.return_documents:
                    result["document"] = {"text": req.documents[i]}
                results.append(result)
            return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "model": model_name, "results": results,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

        return await run_until_disconnect(raw_request, work())

    async def classify(self, req: ClassifyRequest, raw_request: Request) -> Response:
        model_name = check_model(self.engine, self.served_model_names, req.model)
        labels = self.engine.class_labels
        if labels is None:
            raise bad_request("this model is not a sequence classification model (*ForSequenceClassification): "
                              "/classify needs one", "model")
        prompts = await tokenize_prompts(self.engine, req.input, "input", req.add_special_tokens)

        async def work() -> Response:
            probs, tokens = await self._classified(prompts, model_name, req.truncate_prompt_tokens, "input")
            if isinstance(probs, Response):
                return probs
            data = [{"index": i, "object": "classification", "label": labels[int(np.argmax(p))], "probs": p,
                     "num_classes": len(p)} for i, p in enumerate(probs)]
            return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": now_created(),
                                 "model": model_name, "data": data,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}})

        return await run_until_disconnect(raw_request, work())

    async def _classified(self, prompts: list[tuple[str | None, list[int]]], model_name: str, truncate: int | None,
                          param: str) -> tuple[list[list[float]] | Response, int]:
        """The class probabilities of each prompt and the prompt tokens run."""
        if truncate is not None:
            prompts = [(text if len(ids) <= truncate else None, ids[-truncate:]) for text, ids in prompts]
        streams = await submit_pooling(self.engine, prompts, PoolingParams(task="classify"),
                                       f"classify-{uuid.uuid4().hex}", model_name, time.monotonic(), param)
        finals, error = await pooled_finals(self.engine, streams)
        if error is not None:
            return error, 0
        return [list(final.embedding) for final in finals], sum(len(final.prompt_token_ids) for final in finals)

    async def _cosines(self, pairs: list[tuple[str, str]], model_name: str, truncate: int | None,
                       add_special_tokens: bool) -> tuple[list[float] | Response, int]:
        """Each pair's score and the prompt tokens run: the cosine similarity of its texts' embeddings (each
        distinct text embedded once), or a cross-encoder's probability for the pair."""
        labels = self.engine.class_labels
        if labels is not None:
            if len(labels) != 1:
                raise bad_request(f"scoring needs an embedding model or a one-label classifier (a cross-encoder); "
                                  f"this classifier has {len(labels)} labels: use /classify", "model")
            encode = self.engine.tokenizer.encode_pair
            ids = await self.engine.run_in_tokenizer_thread(
                lambda: [encode(a, b, add_special_tokens=add_special_tokens) for a, b in pairs])
            probs, tokens = await self._classified([(None, i) for i in ids], model_name, truncate, "text_1")
            return (probs if isinstance(probs, Response) else [p[0] for p in probs]), tokens
        texts = list(dict.fromkeys(text for pair in pairs for text in pair))
        prompts = await tokenize_prompts(self.engine, texts, "text_1", add_special_tokens)
        if truncate is not None:
            prompts = [(text if len(ids) <= truncate else None, ids[-truncate:]) for text, ids in prompts]
        streams = await submit_pooling(self.engine, prompts, PoolingParams(normalize=True), f"score-{uuid.uuid4().hex}",
                                       model_name, time.monotonic(), "text_1")
        finals, error = await pooled_finals(self.engine, streams)
        if error is not None:
            return error, 0
        vectors = {text: np.asarray(final.embedding, dtype=np.float64) for text, final in zip(texts, finals,
                                                                                              strict=True)}
        scores = [float(vectors[a] @ vectors[b]) for a, b in pairs]
        return scores, sum(len(final.prompt_token_ids) for final in finals)


__all__ = ["ClassifyRequest", "OpenAIServingScore", "RerankRequest", "ScoreRequest"]
