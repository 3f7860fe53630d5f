"""The physical floor of a workload on one GPU (as ../shared/tools/roofline.py computes it).

Every decode step reads the dense weights once and the live KV cache once (a mixture-of-experts model: the
experts its tokens use, expected under uniform routing; a layer with a sliding window: the window's keys only);
prefill is bound by matrix FLOPs. A step's time is
max(FLOPs / matrix rate, bytes / bandwidth); the floor of a workload is the sum over its steps when all requests
start together and each leaves when its output is done.
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
    # Mixture of experts: the routed experts' parameters (not in dense_params) of one expert index summed over the
    # MoE layers, held in the model's dtype; each token runs top_k of the num_experts in each of those layers.
    expert_params: int = 0
    num_experts: int = 0
    top_k: int = 0
    # A 4-bit checkpoint held packed (quantization "int4"): the projections' parameters at half a byte each (their
    # group scales left out), multiplied at the 16-bit matrix rate (the kernel widens them).
    int4_params: int = 0
    # Layers with a sliding window (gpt-oss, Gemma, Mistral v0.1): how many, and the window; a step reads at most
    # the window's keys of a sequence in them.
    windowed_layers: int = 0
    window: int = 0

    def kv_tokens(self, contexts: list[int]) -> float:
        """The keys a step over sequences of `contexts` tokens reads, per layer on average (kv_bytes_per_token
        counts every layer): all of them in full-attention layers, the window's in windowed ones."""
        total = sum(contexts)
        if not self.windowed_layers:
            return float(total)
        windowed = sum(min(c, self.window) for c in contexts)
        full = self.num_layers - self.windowed_layers
        return (full * total + self.windowed_layers * windowed) / self.num_layers

    @classmethod
    def from_hf_config(cls, cfg, dtype_bytes: int = 2, quantization: str | None = None,
                       kv_dtype_bytes: int | None = None) -> ModelShape:
        """kv_dtype_bytes: the KV cache's element size (1 for kv_cache_dtype fp8); default dtype_bytes."""
        from pagedserve.executor.models.moe import is_moe_layer, num_experts_of

        h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or h // heads
        attention = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h
        experts, moe_layers = num_experts_of(cfg), sum(is_moe_layer(cfg, i) for i in range(layers))
        shared = 3 * h * int(getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
        projections = layers * attention + (layers - moe_layers) * 3 * h * inter + moe_layers * shared
        # (the router and the shared expert's gate: read every step, not projections fp8 quantizes)
        dense = projections + moe_layers * (experts + 1 if shared else experts) * h + cfg.vocab_size * h
        expert = moe_layers * 3 * h * (getattr(cfg, "moe_intermediate_size", None) or inter) if moe_layers else 0
        kv = layers * 2 * kv_heads * head_dim * (kv_dtype_bytes or dtype_bytes)
        top_k = int(getattr(cfg, "num_experts_per_tok", 0) or 0) if moe_layers else 0
        from pagedserve.executor.models.decoder import sliding_window_of

        windows = [w for w in (sliding_window_of(cfg, i) for i in range(layers)) if w is not None]
        return cls(dense, kv, layers, h, dtype_bytes, projections if quantization == "fp8" else 0,
                   expert, experts if moe_layers else 0, top_k, projections if quantization == "int4" else 0,
                   len(windows), min(windows, default=0))

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights every step reads whole (an MoE model's routed experts apart: step_weight_bytes)."""
        return int((self.dense_params - self.fp8_params - self.int4_params) * self.weight_bytes_per_param
                   + self.fp8_params + self.int4_params / 2)

    @property
    def active_params(self) -> int:
        """Parameters one token's forward multiplies by (its top_k experts of each MoE layer)."""
        return self.dense_params + self.top_k * self.expert_params

    def experts_read(self, batch: int) -> float:
        """Expected distinct experts of one MoE layer a step of `batch` tokens reads, with tokens routed
        independently and uniformly: E (1 - (1 - k / E) ** batch). (Skewed routing reads fewer.)"""
        if not self.num_experts:
            return 0.0
        return self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** batch)

    def step_weight_bytes(self, batch: int) -> float:
        """Weight bytes a step of `batch` tokens reads: the dense weights and the experts its tokens use."""
        return self.weight_bytes + self.experts_read(batch) * self.expert_params * self.weight_bytes_per_param


def workload_floor(shape: ModelShape, input_lens: list[int], output_lens: list[int],
                   bandwidth: float, flops: float, fp8_flops: float | None = None) -> tuple[float, float]:
    """Returns (floor seconds, of which prefill seconds). fp8_flops: the fp8 matrix rate, for shape.fp8_params'
    products (required when the shape has any)."""
    if shape.fp8_params and not fp8_flops:
        raise ValueError("an fp8 model's floor needs the card's fp8 matrix rate (fp8_flops)")
    # seconds of matrix work per token through the weights: 16-bit parameters at `flops`, fp8 ones at fp8_flops
    per_token = 2 * (shape.active_params - shape.fp8_params) / flops
    if shape.fp8_params:
        per_token += 2 * shape.fp8_params / fp8_flops
    prefill = sum(input_lens) * per_token
    total = prefill
    step = 0
    live = sorted(zip(output_lens, input_lens))
    while live:
        batch = len(live)
        context = shape.kv_tokens([i + step for _, i in live])
        f_time = per_token * batch + 4 * shape.hidden_size * shape.num_layers * context / flops
        b = shape.step_weight_bytes(batch) + context * shape.kv_bytes_per_token
        total += max(f_time, b / bandwidth)
        step += 1
        live = [(o, i) for o, i in live if o > step]
    return total, prefill


def decode_step_floor(shape: ModelShape, context_len: int, bandwidth: float) -> float:
    """Seconds for one single-stream decode step: weights plus the stream's KV over bandwidth."""
    return (shape.step_weight_bytes(1) + shape.kv_tokens([context_len]) * shape.kv_bytes_per_token) / bandwidth
