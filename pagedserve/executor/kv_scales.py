"""An fp8 checkpoint's KV-cache scales, folded into the weights for kv_cache_dtype="fp8".

A calibrated checkpoint (llm-compressor's kv_cache_scheme, AutoFP8) stores per layer k_scale and v_scale, the
amax of the keys and values over 448, so that K / k_scale and V / v_scale fill e4m3's range: small values keep
e4m3's 3 mantissa bits instead of falling into its subnormals (below 2^-6), and large ones are not clamped. (On the
embedded Qwen2.5-0.5B, whose values reach 0.2-150, scales calibrated on a few lines of text did not change the
fp8 cache's logprob error: session 21, docs/gpu-notes.md.)

The cache kernels hold no scale. Each scale is rounded up to a power of two p (values still land at most at 448;
a binade of range at most is given up at the bottom) and folded into the weights, which a power of two changes
exactly in any dtype:
- keys: the rows of K in qkv_proj (weight and bias) divided by p_k, or, with per-head k norms (Qwen3), the k norm's
  weight, since the norm undoes any scale before it. Rotary is linear, so the cache holds K / p_k; the attention's
  softmax scale is multiplied by p_k.
- values: V's rows in qkv_proj divided by p_v; attention is linear in V, so o_proj's weight is multiplied by p_v.
An fp8-stored projection (its weight_scale rows) is scaled instead of its weight. The model's outputs are the same
up to the cache's rounding, which now happens at the calibrated range. Without scales the cache uses scale 1, as
vLLM does (logged).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)


def power_of_two_at_least(scale: float, name: str) -> float:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name}: a KV-cache scale must be a positive finite number, got {scale}")
    return 2.0 ** math.ceil(math.log2(scale))


def fold_kv_scales(model: nn.Module, kv_cache_dtype: str) -> int:
    """Folds every attention layer's checkpoint KV scales into its weights when the cache is fp8; returns how many
    layers were changed. Call once, after loading and before online quantization."""
    from pagedserve.executor.models.decoder import DecoderAttention

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DecoderAttention)]
    with_scales = [(name, m) for name, m in layers if m.checkpoint_kv_scales]
    if not kv_cache_dtype.startswith("fp8"):
        if with_scales:
            logger.info("the checkpoint's KV-cache scales are not used: the KV cache is not fp8")
        return 0
    if not with_scales:
        logger.warning("kv_cache_dtype fp8 without KV-cache scales in the checkpoint: keys and values are stored "
                       "at scale 1 (clamped to +-448), which may cost accuracy")
        return 0
    for name, attn in with_scales:
        scales = attn.checkpoint_kv_scales
        p_k = power_of_two_at_least(scales.get("k", 1.0), f"{name}.k_scale")
        p_v = power_of_two_at_least(scales.get("v", 1.0), f"{name}.v_scale")
        k_start, k_end = attn.qkv_proj.shard_rows(1)
        v_start, v_end = attn.qkv_proj.shard_rows(2)
        if p_k != 1.0:
            if attn.k_norm is not None:
                with torch.no_grad():
                    attn.k_norm.weight.data /= p_k
            else:
                attn.qkv_proj.scale_rows(k_start, k_end, 1.0 / p_k)
            attn.scale *= p_k
        if p_v != 1.0:
            attn.qkv_proj.scale_rows(v_start, v_end, 1.0 / p_v)
            # the whole of o_proj (its bias adds after the product: unchanged)
            attn.o_proj.scale_rows(0, attn.o_proj.out_features, p_v, bias=False)
    logger.info("KV-cache scales of %d of %d layers folded into the weights (fp8 KV cache)", len(with_scales),
                len(layers))
    return len(with_scales)


__all__ = ["fold_kv_scales", "power_of_two_at_least"]
