"""gpt-oss (GptOssForCausalLM: gpt-oss-20b / gpt-oss-120b), as Transformers computes it.

Its differences from the Llama-family decoder (models/decoder.py), whose attention, norms and loading it reuses:

    attention       q / k / v and o biases; one learned sink logit a head in the softmax (it takes probability and
                    gives no value: attention backends' `sinks`); "sliding_attention" layers (every other one) see
                    the last sliding_window (128) keys
    rotary          YaRN (factor 32 over 4,096 positions, truncate false)
    MLP             a sparse block on every layer: a router with a bias, the top k (4) of its logits softmaxed; 32 or
                    128 experts with biases and gpt-oss's gate, (clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g),
                    g = min(gate, 7) (models/moe.py MoEExperts(gpt_oss=True): the torch loop, or the fused kernels)

Checkpoints store the experts stacked ([E, H, 2I] with gate and up interleaved, [E, I, H]); the released ones in
MXFP4 (`*_blocks` / `*_scales`, quant_method "mxfp4"), dequantized to the model's dtype as they stream in
(quantization.dequantize_mxfp4).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.distributed import all_reduce
from pagedserve.executor.layers import RMSNorm
from pagedserve.executor.models.decoder import DecoderAttention, DecoderForCausalLM, DecoderLayer
from pagedserve.executor.models.moe import MoEExperts, num_experts_of, route


class _Router(nn.Module):
    def __init__(self, num_experts: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(num_experts), requires_grad=False)


class GptOssMoeBlock(nn.Module):
    """Router (with a bias) + experts; forward [T, H] -> [T, H], summed over the ranks."""

    def __init__(self, hf_config: Any) -> None:
        super().__init__()
        num_experts = num_experts_of(hf_config)
        self.top_k = int(hf_config.num_experts_per_tok)
        if not 0 < self.top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {self.top_k} for {num_experts} experts")
        self.router = _Router(num_experts, hf_config.hidden_size)
        self.experts = MoEExperts(num_experts, hf_config.hidden_size, hf_config.intermediate_size, gpt_oss=True,
                                  alpha=float(getattr(hf_config, "swiglu_alpha", 1.702)),
                                  limit=float(getattr(hf_config, "swiglu_limit", 7.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Transformers softmaxes the top k logits: the same as the top k of the softmax, renormalized.
        weights, ids = route(F.linear(x, self.router.weight, self.router.bias), self.top_k, renormalize=True)
        return all_reduce(self.experts(x, ids, weights))


class GptOssDecoderLayer(DecoderLayer):
    """DecoderLayer's forward around gpt-oss's attention (biases, sinks) and sparse block."""

    def __init__(self, hf_config: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                 qk_norm: bool = False, moe_renormalize: bool | None = None, context: int | None = None) -> None:
        nn.Module.__init__(self)
        self.self_attn = DecoderAttention(hf_config, layer_idx, True, True, context=context, sinks=True)
        self.mlp = GptOssMoeBlock(hf_config)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.residual_multiplier = None


class GptOssForCausalLM(DecoderForCausalLM):
    layer_cls = GptOssDecoderLayer

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        if num_experts_of(hf_config) == 0:
            raise ValueError("a gpt-oss config without num_local_experts")
        if getattr(hf_config, "layer_types", None) is None:  # as Transformers: sliding first, then full, in turn
            hf_config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                     for i in range(hf_config.num_hidden_layers)]
        super().__init__(hf_config, max_position, qkv_bias=True, o_bias=True)


__all__ = ["GptOssForCausalLM"]
