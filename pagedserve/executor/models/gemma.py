"""Gemma 3 (text): Gemma3ForCausalLM (gemma-3-1b) and the language model of Gemma3ForConditionalGeneration
(gemma-3-4b / 12b / 27b, served as text: the vision tower's tensors are skipped); and Gemma 2 (Gemma2ForCausalLM:
no q / k norms, attention logit soft-capping in the attention kernels, one rope base, every other layer sliding).

Its differences from the Llama-family decoder (models/decoder.py), whose attention, MLP and loading it reuses:

    embedding       scaled by sqrt(hidden_size) (the scale rounded to the weights' dtype, as Transformers does)
    norms           Gemma's RMSNorm, (1 + w) on the fp32 row (layers.GemmaRMSNorm); four a layer: input and
                    post-attention around the attention, pre- and post-feedforward around the MLP (sandwich)
    q / k norms     per head, Gemma's RMSNorm
    attention       scale query_pre_attn_scalar ** -0.5; layers marked "sliding_attention" in layer_types see the
                    last sliding_window keys (5 of every 6 layers), the others everything
    rotary          per layer type: the sliding layers their own base (rope_local_base_freq, 10,000), the full
                    ones rope_theta with its scaling (linear x8 on the 4B+ models)
    MLP             GeGLU: gelu_pytorch_tanh(gate) * up

The residual stream is carried as in the decoder (each norm folds the add in): a layer returns its MLP output
after the post-feedforward norm and the stream before adding it. Bidirectional variants are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedserve.executor.attention.base import ForwardContext
from pagedserve.executor.layers import (
    GemmaRMSNorm,
    RopeStep,
    RotaryEmbedding,
    VocabEmbedding,
    rope_max_positions,
    rope_parameters,
)
from pagedserve.executor.models.decoder import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderMLP,
    head_dim_of,
)

_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


class GemmaDecoderLayer(nn.Module):
    """Gemma 2 / 3's layer: qk_norm (Gemma 3's per-head q / k norms); Gemma 2's attention soft-capping from the
    config."""

    def __init__(self, hf_config: Any, layer_idx: int, context: int, qk_norm: bool = True) -> None:
        super().__init__()
        hidden, eps = hf_config.hidden_size, hf_config.rms_norm_eps
        bias = bool(getattr(hf_config, "attention_bias", False))
        self.sliding = hf_config.layer_types[layer_idx] == "sliding_attention"
        self.self_attn = DecoderAttention(hf_config, layer_idx, bias, bias, qk_norm=qk_norm, context=context,
                                          norm_cls=GemmaRMSNorm, scale=float(hf_config.query_pre_attn_scalar) ** -0.5,
                                          softcap=getattr(hf_config, "attn_logit_softcapping", None))
        self.mlp = DecoderMLP(hidden, hf_config.intermediate_size, bias=False, act="gelu_tanh")
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RopeStep,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden.float() if hidden.element_size() < 4 else hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, rope, ctx))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, hf_config: Any, max_position: int, context: int, qk_norm: bool = True) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.embed_scale = float(hf_config.hidden_size) ** 0.5
        self.layers = nn.ModuleList(GemmaDecoderLayer(hf_config, i, context, qk_norm)
                                    for i in range(hf_config.num_hidden_layers))
        self.norm = GemmaRMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        head_dim = head_dim_of(hf_config)
        theta, scaling = rope_parameters(hf_config, "full_attention")
        self.rotary_emb = RotaryEmbedding(head_dim, max_position, theta, scaling)
        theta, scaling = rope_parameters(hf_config, "sliding_attention")
        self.rotary_emb_local = RotaryEmbedding(head_dim, max_position, theta, scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        # Transformers rounds the scale to the model's dtype first; a Python float of that value keeps it so with no
        # host-to-device copy (none may run while a CUDA graph is captured).
        hidden = hidden * float(torch.tensor(self.embed_scale, dtype=hidden.dtype))
        rope_full, rope_local = self.rotary_emb.prepare(positions), self.rotary_emb_local.prepare(positions)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope_local if layer.sliding else rope_full, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma3ForCausalLM(DecoderForCausalLM):
    """Gemma 3's text model (see the module docstring); logits, loading and the rest as the decoder's."""

    QK_NORM = True

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        nn.Module.__init__(self)
        hf_config = text_config_of(hf_config)
        activation = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Gemma with hidden_activation {activation!r} is not supported; only gelu_pytorch_tanh")
        if getattr(hf_config, "attn_logit_softcapping", None) and self.QK_NORM:
            raise ValueError("attention logit soft-capping in a Gemma 3 config is not supported (Gemma 2's is)")
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise ValueError("bidirectional attention (an embedding variant of Gemma) is not supported")
        if getattr(hf_config, "layer_types", None) is None:
            pattern = int(getattr(hf_config, "sliding_window_pattern", 6) or 6)
            hf_config.layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                     for i in range(hf_config.num_hidden_layers)]
        self.config = hf_config
        self.max_position = max(max_position or 0, rope_max_positions(hf_config))
        self.model = GemmaModel(hf_config, self.max_position, max_position or rope_max_positions(hf_config),
                                self.QK_NORM)
        self._init_lm_head(hf_config)

    def load_weights(self, weights):
        """Gemma3ForConditionalGeneration's checkpoints hold the language model under `language_model`
        (model.language_model.* in Transformers 5, language_model.model.* before): served as text, the vision
        tower and the projector are skipped."""
        return super().load_weights(_text_weights(weights))


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """Gemma 2: Gemma 3's layout without the q / k norms, with attention logit soft-capping (50) in the attention
    kernels and final logit soft-capping (30), every other layer sliding (its config's layer_types), one rope base
    for every layer (rope_parameters' plain form: both rotary tables the same)."""

    QK_NORM = False


def text_config_of(hf_config: Any) -> Any:
    """The text model's config of a Gemma 3 multimodal config (its text_config), else the config itself."""
    text = getattr(hf_config, "text_config", None)
    if text is None:
        return hf_config
    if getattr(text, "architectures", None) is None:
        text.architectures = ["Gemma3ForCausalLM"]
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(text, name, None) is None and getattr(hf_config, name, None) is not None:
            setattr(text, name, getattr(hf_config, name))
    return text


_SKIPPED_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _text_weights(weights):
    for name, tensor in weights:
        if name.startswith(_SKIPPED_PREFIXES):
            continue
        if name.startswith("model.language_model."):  # Transformers 5's multimodal layout
            name = "model." + name[len("model.language_model."):]
        elif name.startswith("language_model."):  # Transformers 4's: language_model.model.*, language_model.lm_head
            name = name[len("language_model."):]
        yield name, tensor


__all__ = ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "GemmaDecoderLayer", "GemmaModel", "text_config_of"]
