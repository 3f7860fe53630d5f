"""What the engine hands back to callers: vLLM-shaped RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.core.outputs import Logprob, TokenLogprobs

__all__ = ["CompletionOutput", "Logprob", "RequestOutput", "TokenLogprobs"]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str  # cumulative text so far (stop string excluded)
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    extra: dict = field(default_factory=dict)
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (nothing predicts it),
    # then each token's logprob, rank and top alternatives under the model. Complete from the first output on.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # An embedding request (SamplingParams.pooling): the pooled vector, once finished; outputs then hold no tokens.
    embedding: list[float] | None = None


@dataclass(slots=True)
class EmbeddingOutput:
    embedding: list[float]


@dataclass(slots=True)
class ScoringOutput:
    score: float


@dataclass(slots=True)
class ScoringRequestOutput:
    """What LLM.score returns per pair, as vLLM's: `.outputs.score` (the cosine similarity of the two texts'
    embeddings); prompt_token_ids: the two texts' token ids, back to back."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: ScoringOutput
    finished: bool = True


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """What LLM.embed returns per prompt, as vLLM's: `.outputs.embedding`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclass(slots=True)
class ClassificationOutput:
    probs: list[float]  # one per label (a sigmoid's single value for a one-label model)

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass(slots=True)
class ClassificationRequestOutput:
    """What LLM.classify returns per prompt, as vLLM's: `.outputs.probs`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: ClassificationOutput
    finished: bool = True
