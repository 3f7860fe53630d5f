"""What an embedding request asks for (vLLM's `PoolingParams`, the fields its embedding API uses).

The engine returns the final hidden state (after the model's last norm) of the prompt's last token: last-token
pooling, what decoder-only embedding models such as Qwen3-Embedding, gte-Qwen2 and e5-mistral are trained for, and
vLLM's default for a causal model run as an embedding model. Invalid values raise `ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PoolingParams:
    normalize: bool = True  # divide by the L2 norm (after any truncation to `dimensions`)
    # Keep the first `dimensions` values (Matryoshka-trained models: text-embedding-3's parameter); None: all.
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true or false, got {self.normalize!r}")
        if self.dimensions is not None and (not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")

    def validate_for_model(self, hidden_size: int) -> None:
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise ValueError(f"dimensions must be at most the model's hidden size {hidden_size}, "
                             f"got {self.dimensions}")


__all__ = ["PoolingParams"]
