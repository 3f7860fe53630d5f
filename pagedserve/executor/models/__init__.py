"""Model registry: HF `architectures` names -> model classes."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pagedserve.executor.models.decoder import (
    GraniteForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    MixtralForCausalLM,
    Olmo2ForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen3ForCausalLM,
    Qwen3MoeForCausalLM,
)
from pagedserve.executor.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from pagedserve.executor.models.gpt_oss import GptOssForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    # Gemma 3's multimodal checkpoints (4B and up), served as text: their language model alone
    "Gemma3ForConditionalGeneration": Gemma3ForCausalLM,
}
# The bare decoders (Transformers' AutoModel classes), as embedding checkpoints such as Qwen3-Embedding or
# gte-Qwen2 are saved: no LM head, tensors named without the "model." prefix. They serve embeddings only.
BARE_ARCHITECTURES: dict[str, str] = {
    "Qwen2Model": "Qwen2ForCausalLM",
    "Qwen3Model": "Qwen3ForCausalLM",
    "LlamaModel": "LlamaForCausalLM",
    "MistralModel": "MistralForCausalLM",
}


# Sequence-classification checkpoints (Transformers' *ForSequenceClassification: a reward model, a classifier, a
# cross-encoder reranker): the decoder and a `score` head [num_labels, hidden] on the last token's final hidden
# state, no LM head. They serve classification and pair scoring only (loader.py adds the head).
CLASSIFIER_ARCHITECTURES: dict[str, str] = {
    "Qwen2ForSequenceClassification": "Qwen2ForCausalLM",
    "Qwen3ForSequenceClassification": "Qwen3ForCausalLM",
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
}


def get_model_class(architectures: Sequence[str] | None) -> type[nn.Module]:
    """The first supported class among a config's `architectures`; ValueError naming the supported ones."""
    for arch in architectures or []:
        arch = BARE_ARCHITECTURES.get(arch, CLASSIFIER_ARCHITECTURES.get(arch, arch))
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"model architecture {list(architectures or [])} is not supported; "
        f"supported architectures: {', '.join([*MODEL_REGISTRY, *BARE_ARCHITECTURES, *CLASSIFIER_ARCHITECTURES])}"
    )


def is_bare(architectures: Sequence[str] | None) -> bool:
    """Whether the first supported architecture is a bare decoder (an embedding checkpoint)."""
    for arch in architectures or []:
        if arch in BARE_ARCHITECTURES:
            return True
        if arch in MODEL_REGISTRY or arch in CLASSIFIER_ARCHITECTURES:
            return False
    return False


def is_classifier(architectures: Sequence[str] | None) -> bool:
    """Whether the first supported architecture is a sequence classifier (CLASSIFIER_ARCHITECTURES)."""
    for arch in architectures or []:
        if arch in CLASSIFIER_ARCHITECTURES:
            return True
        if arch in MODEL_REGISTRY or arch in BARE_ARCHITECTURES:
            return False
    return False


__all__ = ["BARE_ARCHITECTURES", "CLASSIFIER_ARCHITECTURES", "MODEL_REGISTRY", "Gemma2ForCausalLM",
           "Gemma3ForCausalLM", "GptOssForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
           "Phi3ForCausalLM",
           "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "get_model_class",
           "is_bare", "is_classifier"]
