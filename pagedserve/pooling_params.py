"""What an embedding request asks for (vLLM's `PoolingParams`, the fields its embedding API uses).

The engine returns the final hidden state (after the model's last norm) of the prompt's last token: last-token
pooling, what decoder-only embedding models such as Qwen3-Embedding, gte-Qwen2 and e5-mistral are trained for, and
vLLM's default for a causal model run as an embedding model. Invalid values raise `ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass

POOLING_TASKS = ("embed", "classify")


@dataclass(slots=True)
class PoolingParams:
    normalize: bool = True  # divide by the L2 norm (after any truncation to `dimensions`)
    # Keep the first `dimensions` values (Matryoshka-trained models: text-embedding-3's parameter); None: all.
    dimensions: int | None = None
    # "embed": the hidden state as above; "classify": a sequence-classification model's class probabilities (its
    # score head on that hidden state, softmax over the labels; a sigmoid for a single label, as vLLM)
    task: str = "embed"

    def __post_init__(self) -> None:
        if self.task not in POOLING_TASKS:
            raise ValueError(f"task must be one of {POOLING_TASKS}, got {self.task!r}")
        if self.task == "classify" and self.dimensions is not None:
            raise ValueError("dimensions is for embeddings, not classification")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")

    def validate_for_model(self, hidden_size: int) -> None:
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise ValueError(f"dimensions must be at most the model's hidden size {hidden_size}, "
                             f"got {self.dimensions}")


def score_pairs(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[str, str]]:
    """The (text_1, text_2) pairs to score, as vLLM forms them: 1:1, 1:N (one text_1 with each text_2) or N:N;
    ValueError otherwise."""
    first = [text_1] if isinstance(text_1, str) else list(text_1)
    second = [text_2] if isinstance(text_2, str) else list(text_2)
    if not first or not second:
        raise ValueError(f"{'text_1' if not first else 'text_2'} must not be an empty list")
    if not all(isinstance(t, str) for t in first + second):
        raise ValueError("the texts to score must be strings")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise ValueError(f"text_1 has {len(first)} texts and text_2 {len(second)}: the lengths must be 1:1, 1:N or "
                         "N:N")
    return list(zip(first, second, strict=True))


__all__ = ["POOLING_TASKS", "PoolingParams", "score_pairs"]
