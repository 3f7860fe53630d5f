"""The physical floor of a workload on one GPU (as ../shared/tools/roofline.py computes it).

Every decode step reads the dense weights once and the live KV cache once; prefill is bound by
matrix FLOPs. A step's time is max(FLOPs / matrix rate, bytes / bandwidth); the floor of a workload
is the sum over its steps when all requests start together and each leaves when its output is done.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelShape:
    dense_params: int  # parameters read per step (the embedding lookup excluded, the LM head included)
    kv_bytes_per_token: int
    num_layers: int
    hidden_size: int
    weight_bytes_per_param: int = 2
    # quantization="fp8": the decoder projections' parameters (a part of dense_params) at one byte each, their
    # products on the fp8 tensor cores (workload_floor's fp8_flops); the LM head stays 16-bit.
    fp8_params: int = 0

    @classmethod
    def from_hf_config(cls, cfg, dtype_bytes: int = 2, quantization: str | None = None,
                       kv_dtype_bytes: int | None = None) -> ModelShape:
        """kv_dtype_bytes: the KV cache's element size (1 for kv_cache_dtype fp8); default dtype_bytes."""
        h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or h // heads
        per_layer = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h + 3 * h * inter
        dense = layers * per_layer + cfg.vocab_size * h
        kv = layers * 2 * kv_heads * head_dim * (kv_dtype_bytes or dtype_bytes)
        return cls(dense, kv, layers, h, dtype_bytes, layers * per_layer if quantization == "fp8" else 0)

    @property
    def weight_bytes(self) -> int:
        return (self.dense_params - self.fp8_params) * self.weight_bytes_per_param + self.fp8_params


def workload_floor(shape: ModelShape, input_lens: list[int], output_lens: list[int],
                   bandwidth: float, flops: float, fp8_flops: float | None = None) -> tuple[float, float]:
    """Returns (floor seconds, of which prefill seconds). fp8_flops: the fp8 matrix rate, for shape.fp8_params'
    products (required when the shape has any)."""
    if shape.fp8_params and not fp8_flops:
        raise ValueError("an fp8 model's floor needs the card's fp8 matrix rate (fp8_flops)")
    # seconds of matrix work per token through the weights: 16-bit parameters at `flops`, fp8 ones at fp8_flops
    per_token = 2 * (shape.dense_params - shape.fp8_params) / flops
    if shape.fp8_params:
        per_token += 2 * shape.fp8_params / fp8_flops
    prefill = sum(input_lens) * per_token
    total = prefill
    step = 0
    live = sorted(zip(output_lens, input_lens))
    while live:
        batch = len(live)
        context = sum(i + step for _, i in live)
        f_time = per_token * batch + 4 * shape.hidden_size * shape.num_layers * context / flops
        b = shape.weight_bytes + context * shape.kv_bytes_per_token
        total += max(f_time, b / bandwidth)
        step += 1
        live = [(o, i) for o, i in live if o > step]
    return total, prefill


def decode_step_floor(shape: ModelShape, context_len: int, bandwidth: float) -> float:
    """Seconds for one single-stream decode step: weights plus the stream's KV over bandwidth."""
    return (shape.weight_bytes + context_len * shape.kv_bytes_per_token) / bandwidth
