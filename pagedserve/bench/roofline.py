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

    @classmethod
    def from_hf_config(cls, cfg, dtype_bytes: int = 2) -> ModelShape:
        h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or h // heads
        per_layer = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h + 3 * h * inter
        dense = layers * per_layer + cfg.vocab_size * h
        kv = layers * 2 * kv_heads * head_dim * dtype_bytes
        return cls(dense, kv, layers, h, dtype_bytes)

    @property
    def weight_bytes(self) -> int:
        return self.dense_params * self.weight_bytes_per_param


def workload_floor(shape: ModelShape, input_lens: list[int], output_lens: list[int],
                   bandwidth: float, flops: float) -> tuple[float, float]:
    """Returns (floor seconds, of which prefill seconds)."""
    prefill = sum(input_lens) * 2 * shape.dense_params / flops
    total = prefill
    step = 0
    live = sorted(zip(output_lens, input_lens))
    while live:
        batch = len(live)
        context = sum(i + step for _, i in live)
        f = 2 * shape.dense_params * batch + 4 * shape.hidden_size * shape.num_layers * context
        b = shape.weight_bytes + context * shape.kv_bytes_per_token
        total += max(f / flops, b / bandwidth)
        step += 1
        live = [(o, i) for o, i in live if o > step]
    return total, prefill


def decode_step_floor(shape: ModelShape, context_len: int, bandwidth: float) -> float:
    """Seconds for one single-stream decode step: weights plus the stream's KV over bandwidth."""
    return (shape.weight_bytes + context_len * shape.kv_bytes_per_token) / bandwidth
