"""Building blocks of a Llama-family decoder, for a flat token batch ([num_tokens, ...] tensors).

Parameters are allocated with `torch.empty` (no random init): the loader fills every one of
them, so building a 7B model costs no init time. Build models under `torch.device(...)` and a
default dtype to place them directly where they run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.distributed import all_reduce, tp_size, vocab_shard

if TYPE_CHECKING:
    from pagedserve.executor.lora import LoRALayer


class Linear(nn.Module):
    """y = x W^T (+ b), with uninitialized parameters (the loader fills them)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        # fp8 (executor/quantization.py): weight is float8_e4m3fn and this its [out] fp32 row scale.
        self.weight_scale: torch.Tensor | None = None
        # Off CUDA, an fp8 checkpoint's projection holds its dequantized fp8 values: quantize_model leaves it be.
        self.holds_fp8_values = False
        self.lora: LoRALayer | None = None  # enable_lora: this projection's adapter slots (executor/lora.py)
        # 4-bit weights (an AWQ / GPTQ checkpoint held packed, kernels/w4a16.py): weight is None and these hold
        # qweight [out, in / 8] int32, scales and zero x scale [out, in / group] fp32.
        self.w4_qweight: nn.Parameter | None = None
        self.w4_scales: nn.Parameter | None = None
        self.w4_zs: nn.Parameter | None = None
        self.w4_group = 0

    def use_int4_storage(self, groups: int) -> None:
        """Replaces the weight by (uninitialized) 4-bit storage of `groups` groups a row, for a checkpoint whose
        projection streams in as 4-bit parts (int_quant.int4_stream); the loader fills them."""
        if self.w4_qweight is not None:
            return
        if self.in_features % groups or (self.in_features // groups) % 16 or self.in_features % 8:
            raise ValueError(f"4-bit storage of {self.in_features} inputs in {groups} groups")
        device = self.weight.device

        def param(shape, dtype, fill):
            return nn.Parameter(torch.full(shape, fill, dtype=dtype, device=device), requires_grad=False)

        self.w4_qweight = param((self.out_features, self.in_features // 8), torch.int32, 0)
        self.w4_scales = param((self.out_features, groups), torch.float32, float("nan"))  # NaN: not loaded
        self.w4_zs = param((self.out_features, groups), torch.float32, float("nan"))
        self.w4_group = self.in_features // groups
        self.weight = None

    def scale_rows(self, start: int, end: int, factor: float, bias: bool = True) -> None:
        """Output rows start..end times factor, however the weight is held (and the bias's, unless bias=False)."""
        with torch.no_grad():
            if self.w4_qweight is not None:
                self.w4_scales[start:end] *= factor
                self.w4_zs[start:end] *= factor
            elif self.weight_scale is not None:
                self.weight_scale[start:end] *= factor
            else:
                self.weight.data[start:end] *= factor
            if bias and self.bias is not None:
                self.bias.data[start:end] *= factor

    def quantize_fp8(self) -> None:
        """Replaces the loaded weight by fp8 rows and their scales (on CUDA), or, elsewhere, by the dequantized
        fp8 values in the weight's dtype (the numerics without the memory saving)."""
        from pagedserve.executor.quantization import dequantize_rows_fp8, quantize_rows_fp8

        if self.weight_scale is not None:
            raise ValueError("this projection is already quantized")
        q, scale = quantize_rows_fp8(self.weight.data)
        if self.weight.is_cuda:
            self.weight = nn.Parameter(q, requires_grad=False)
            self.weight_scale = scale
        else:
            self.weight.data.copy_(dequantize_rows_fp8(q, scale, self.weight.dtype))

    def use_fp8_storage(self) -> None:
        """Makes the weight an (uninitialized) float8_e4m3fn [out, in] parameter with an [out] fp32 row scale,
        for a checkpoint that stores this projection in fp8 (the loader fills both)."""
        if self.weight_scale is None:
            device = self.weight.device
            self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=torch.float8_e4m3fn,
                                                   device=device), requires_grad=False)
            self.weight_scale = torch.full((self.out_features,), float("nan"), device=device)  # NaN: not loaded

    def load_weight_scale(self, tensor: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """A checkpoint's fp8 scale for rows start..end (all by default): one value for the tensor, or one per row."""
        start, end = rows or (0, self.out_features)
        if self.weight_scale is None:
            raise ValueError("a weight scale for a projection whose checkpoint weight is not fp8")
        if tensor.numel() == 1:
            self.weight_scale[start:end] = tensor.float().reshape(())
        elif tensor.numel() == end - start:
            self.weight_scale[start:end].copy_(tensor.float().reshape(-1))
        else:
            raise ValueError(f"weight scale of shape {tuple(tensor.shape)} for {end - start} rows: expected one "
                             "value per tensor or per row")

    def finish_fp8_load(self, dtype: torch.dtype) -> None:
        """After loading an fp8 checkpoint: every row has its scale; off CUDA the weight becomes its dequantized
        values in the model's dtype (as quantize_fp8 keeps them there)."""
        if self.weight_scale is None:
            return
        if torch.isnan(self.weight_scale).any():
            raise ValueError("the checkpoint holds this projection in fp8 but not its weight_scale")
        if not self.weight.is_cuda:
            from pagedserve.executor.quantization import dequantize_rows_fp8

            self.weight = nn.Parameter(dequantize_rows_fp8(self.weight.data, self.weight_scale, dtype),
                                       requires_grad=False)
            self.weight_scale = None
            self.holds_fp8_values = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        if self.lora is not None:  # LoRA enabled: each token's adapter, if any (executor/lora.py)
            y = self.lora.apply(x, y)
        return y

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        if self.w4_qweight is not None:
            from pagedserve.executor.kernels.w4a16 import w4a16_linear

            return w4a16_linear(x, self.w4_qweight, self.w4_scales, self.w4_zs, self.w4_group, self.bias)
        if self.weight_scale is not None:
            from pagedserve.executor.quantization import fp8_linear

            return fp8_linear(x, self.weight, self.weight_scale, self.bias)
        # Decode on CUDA: the Triton skinny GEMM streams the weight faster than cuBLAS at one token (~9%)
        # and, for some projections, at 3-32 tokens (docs/gpu-notes.md); it is used where SKINNY_CONFIGS
        # holds a measured win, else cuBLAS.
        if x.is_cuda and x.dim() == 2 and x.dtype != torch.float32 and not _NO_SKINNY_GEMM:
            m, skinny = x.shape[0], _skinny()
            if m == 1 or (_SKINNY_SMALL_BATCH and m <= skinny.MAX_M
                          and skinny.has_measured_config(m, self.out_features, self.in_features)):
                return skinny.skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _skinny():
    from pagedserve.executor.kernels import skinny_gemm  # Triton: imported on the first CUDA call

    return skinny_gemm


_NO_SKINNY_GEMM = os.environ.get("PAGEDSERVE_NO_SKINNY_GEMM") == "1"  # A/B switch for benchmarks
# PAGEDSERVE_SKINNY_SMALL_BATCH=0: batches of 2-256 tokens through cuBLAS even where SKINNY_CONFIGS holds a
# measured win (A/B runs); one token keeps the skinny GEMM.
_SKINNY_SMALL_BATCH = os.environ.get("PAGEDSERVE_SKINNY_SMALL_BATCH", "1") == "1"


# The parameters a merged projection loads shard by shard (rows of the output).
MERGED_PARAMS = ("weight", "bias", "w4_qweight", "w4_scales", "w4_zs")


class MergedLinear(Linear):
    """Several projections of the same input in one matmul: q|k|v or gate|up.

    Checkpoints store the parts separately; `load_shard` copies part `index` into its row range.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)

    def shard_rows(self, index: int) -> tuple[int, int]:
        start = sum(self.output_sizes[:index])
        return start, start + self.output_sizes[index]

    def load_shard(self, param_name: str, index: int, tensor: torch.Tensor) -> None:
        param = getattr(self, param_name) if param_name in MERGED_PARAMS else None
        if param is None:
            raise ValueError(f"checkpoint has a {param_name} for a projection built without one")
        if param.dtype == torch.float8_e4m3fn and tensor.dtype != param.dtype:
            raise ValueError(f"shard {index} of this projection is {tensor.dtype} where another shard is fp8")
        start, end = self.shard_rows(index)
        target = param.data[start:end]
        if target.shape != tensor.shape:
            raise ValueError(f"shard {index} of {param_name}: expected shape {tuple(target.shape)}, "
                             f"got {tuple(tensor.shape)}")
        target.copy_(tensor)


class VocabEmbedding(nn.Module):
    """The token embedding; with tensor parallelism each rank holds its slice of the vocabulary's rows
    (distributed.vocab_shard), embeds the ids that fall in it (zeros for the others) and an all-reduce
    completes every row."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_start, rows = vocab_shard(vocab_size)
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill_(outside[:, None], 0.0))


class RMSNorm(nn.Module):
    """RMSNorm as in Llama/Qwen2, with the residual add folded in.

    `norm(x)` -> normed; `norm(x, residual)` -> (normed(x + residual), x + residual). The fused form
    lets a decoder layer carry the residual stream without a separate add kernel (and gives a fused
    kernel one place to plug in). Numerics follow HF: statistics in fp32, weight applied after the
    cast back to the input dtype.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(variance + self.eps)).to(dtype or x.dtype)

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:  # one Triton pass per row instead of add, cast, mean, rsqrt, multiply kernels
            from pagedserve.executor.kernels.fused_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        return self._torch_forward(x, residual)

    def _torch_forward(self, x: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            return self._norm(x)
        # The residual may be fp32 beside 16-bit activations: the sum keeps its dtype, the normed
        # output takes x's.
        total = x.to(residual.dtype) + residual
        return self._norm(total, x.dtype), total


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint's weight w scales by (1 + w), applied to the fp32 row before one rounding
    (Transformers' Gemma3RMSNorm). Same call forms as RMSNorm (the residual add folded in)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps)
        self.weight.data.zero_()

    def _norm(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)
        return (x32 * torch.rsqrt(variance + self.eps) * (1.0 + self.weight.float())).to(dtype or x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda:
            from pagedserve.executor.kernels.fused_norm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual, gemma=True)
        return self._torch_forward(x, residual)


class SiluAndMul(nn.Module):
    """[..., 2d] (gate | up) -> silu(gate) * up, [..., d].

    On CUDA one Triton pass (kernels/silu_mul.py: fp32 inside, one rounding); elsewhere torch, which
    rounds F.silu's output to x's dtype before the multiply, as HF's `act_fn(gate) * up` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # reads gate|up once, no [.., d] silu temporary
            from pagedserve.executor.kernels.silu_mul import silu_and_mul

            return silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluTanhAndMul(nn.Module):
    """[..., 2d] (gate | up) -> gelu_tanh(gate) * up, [..., d] (Gemma's GeGLU, `gelu_pytorch_tanh`), as Transformers
    computes it: the activation rounded to x's dtype before the multiply."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]


# --- rotary position embedding ------------------------------------------------------------------

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling dict) from a HF config of transformers 4.x (rope_theta + rope_scaling)
    or 5.x (rope_parameters, which holds rope_theta too). YaRN's defaults from the config as transformers
    takes them: original_max_position_embeddings the config's max_position_embeddings, factor their ratio.
    layer_type ("full_attention" / "sliding_attention"): models whose layer types rotate differently (Gemma 3:
    rope_parameters per type in transformers 5; rope_local_base_freq for the sliding layers, without scaling, in
    4.x configs)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    if any(isinstance(value, dict) for value in params.values()):  # per layer type (rope_scaling: the same dict)
        params, scaling = dict(params.get(layer_type or "full_attention") or {}), {}
    if layer_type == "sliding_attention" and getattr(hf_config, "rope_local_base_freq", None) and not params:
        params, scaling = {"rope_theta": hf_config.rope_local_base_freq}, {}
    merged = {**scaling, **params}
    theta = merged.pop("rope_theta", None) or getattr(hf_config, "rope_theta", None) or 10000.0
    if "type" in merged and "rope_type" not in merged:  # older configs spell it "type"
        merged["rope_type"] = merged.pop("type")
    # transformers 4.x keeps the partial rotary factor (Phi-4-mini, StableLM) beside the rope fields
    merged["partial_rotary_factor"] = float(merged.get("partial_rotary_factor")
                                            or getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    if merged.get("rope_type") == "su":  # LongRoPE's first name (early Phi-3 configs)
        merged["rope_type"] = "longrope"
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    if merged.get("rope_type") == "longrope":
        if merged.get("original_max_position_embeddings") is None:
            merged["original_max_position_embeddings"] = getattr(hf_config, "original_max_position_embeddings",
                                                                 None) or max_positions
        if merged.get("factor") is None:  # as transformers: the ratio of the two lengths
            merged["factor"] = (max_positions or merged["original_max_position_embeddings"]) / merged[
                "original_max_position_embeddings"]
    if merged.get("rope_type") == "yarn":
        if merged.get("original_max_position_embeddings") is None:
            merged["original_max_position_embeddings"] = getattr(hf_config, "original_max_position_embeddings",
                                                                 None) or max_positions
        if merged.get("factor") is None and max_positions:
            merged["factor"] = max_positions / merged["original_max_position_embeddings"]
    return float(theta), merged


def rope_max_positions(hf_config: Any) -> int:
    """The longest context the model's positions serve: max_position_embeddings, or for YaRN
    original_max_position_embeddings x factor when that is longer (as vLLM derives it: Qwen's model cards ask for
    the rope_scaling entry and a --max-model-len up to it)."""
    base = int(getattr(hf_config, "max_position_embeddings", 0) or 0) or 4096
    _, scaling = rope_parameters(hf_config)
    if scaling.get("rope_type") == "yarn":
        return max(base, int(float(scaling["factor"]) * int(scaling["original_max_position_embeddings"])))
    return base


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_attention_factor(scaling: dict[str, Any]) -> float:
    """The factor on cos and sin (YaRN's and LongRoPE's attention temperature, as transformers applies it; 1
    otherwise)."""
    rope_type = scaling.get("rope_type") or "default"
    if rope_type not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    if rope_type == "longrope":
        original = int(scaling["original_max_position_embeddings"])
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN (arXiv 2309.00071): frequencies that turn fewer than beta_slow times over the original context are
    interpolated (divided by factor), those that turn more than beta_fast times kept, a linear ramp between."""
    factor = float(scaling["factor"])
    original = int(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(torch.float32) / head_dim)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: the original frequency (extrapolation), 0: divided by factor (interpolation)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def uses_long_rope(scaling: dict[str, Any], context: int) -> bool:
    """LongRoPE: whether an engine serving `context` tokens rotates by the long factors. Decided once for the
    engine, as vLLM does (max_model_len above original_max_position_embeddings), so a prefix's cached keys never
    depend on what else ran; transformers picks per forward by its longest position instead."""
    return (scaling.get("rope_type") == "longrope"
            and context > int(scaling["original_max_position_embeddings"]))


def compute_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any], context: int | None = None
                     ) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, matching transformers' rope init functions. `head_dim` is the
    rotated width (head_dim x partial_rotary_factor); `context` (the tokens served) picks LongRoPE's factors."""
    rope_type = scaling.get("rope_type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    if rope_type == "longrope":
        which = "long_factor" if uses_long_rope(scaling, context or 0) else "short_factor"
        ext = torch.tensor([float(f) for f in scaling[which]], dtype=torch.float32)
        if ext.shape != exponents.shape:
            raise ValueError(f"rope_scaling {which} has {ext.numel()} entries; the rotated width {head_dim} needs "
                             f"{exponents.numel()}")
        return 1.0 / (ext * theta**exponents)
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context_len = float(scaling["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves, as in HF Llama/Qwen2) with a cos|sin cache.

    cos_sin_cache: [max_position, rotary_dim] fp32, cos in the first half, sin in the second. rotary_dim is
    head_dim x partial_rotary_factor (Phi-4-mini: 96 of 128): the dims past it pass through unrotated.
    The model looks positions up once per forward (`lookup`) and every layer reuses the result.
    context: the tokens the engine serves (max_model_len; LongRoPE's short or long factors), max_position if None.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict[str, Any],
                 context: int | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = int(head_dim * float(scaling.get("partial_rotary_factor", 1.0) or 1.0))
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= head_dim:
            raise ValueError(f"partial_rotary_factor {scaling.get('partial_rotary_factor')} gives a rotated width of "
                             f"{self.rotary_dim} of head_dim {head_dim}; it must be even and positive")
        self.long_rope = uses_long_rope(scaling, context or max_position)
        inv_freq = compute_inv_freq(self.rotary_dim, theta, scaling, context or max_position)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # same fp32 product as HF's per-call version
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        factor = rope_attention_factor(scaling)
        if factor != 1.0:  # YaRN: cos and sin scaled (q and k each), as transformers does
            cache = cache * factor
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, 1, rotary_dim // 2] fp32, broadcastable over heads."""
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos, sin

    def prepare(self, positions: torch.Tensor) -> RopeStep:
        """Per-step rotary state, built once per forward and shared by every layer."""
        full = self.rotary_dim == self.head_dim
        if positions.is_cuda:  # the in-place kernel reads the cache itself
            return RopeStep(positions, self.cos_sin_cache, None, None, full)
        cos, sin = self.lookup(positions)
        return RopeStep(positions, self.cos_sin_cache, cos, sin, full)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, head_dim]: rotate each (x1, x2) half pair of the first 2 x cos's width dims (all of them
        but with a partial rotary factor); math in fp32, result in x's dtype."""
        rotary_dim = 2 * cos.shape[-1]
        x1, x2 = x[..., :rotary_dim].float().chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        if rotary_dim == x.shape[-1]:
            return rotated
        return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


@dataclass(slots=True)
class RopeStep:
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    cos: torch.Tensor | None  # [T, 1, rotary_dim // 2] on CPU; None where the kernels run
    sin: torch.Tensor | None
    # every dim of a head rotates: the fused rotary + KV-write kernels apply (they rotate whole heads); a partial
    # rotary factor takes the plain in-place kernel, then the KV write
    full: bool = True

    def rotate(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, Hq, D], key [T, Hkv, D] (views into qkv) -> rotated (in place on CUDA)."""
        if self.cos is None:
            from pagedserve.executor.kernels.rotary import apply_rotary_

            apply_rotary_(query, key, self.positions, self.cos_sin_cache)
            return query, key
        return RotaryEmbedding.apply(query, self.cos, self.sin), RotaryEmbedding.apply(key, self.cos, self.sin)
