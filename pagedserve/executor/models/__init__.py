"""Model registry: HF `architectures` names -> model classes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pagedserve.executor.models.decoder import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
}


def get_model_class(architectures: Sequence[str] | None) -> type[nn.Module]:
    """The first supported class among a config's `architectures`; ValueError naming the supported ones."""
    for arch in architectures or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"model architecture {list(architectures or [])} is not supported; "
        f"supported architectures: {', '.join(MODEL_REGISTRY)}"
    )


__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
           "get_model_class"]
