"""Online weight quantization: `quantization="fp8"` (CLI `--quantization fp8`).

After the weights are loaded (any format, dummy included), every projection of the decoder layers
(q|k|v, o, gate|up, down) is quantized to float8_e4m3fn with one fp32 scale per output row (max |w_row|
/ 448); the embedding, the norms and the LM head stay in the model's dtype, as in vLLM's fp8 mode. The
weights then take half the memory of bf16, which the KV cache sizing gives to more blocks.

How a quantized projection runs (`fp8_linear`):
* CUDA, 1-256 tokens (decode, small mixed steps): the skinny GEMM reads the fp8 weight (one byte an
  element, the row scale applied to the fp32 sums) against the 16-bit activations, so decode streams
  half the weight bytes; the activations are not quantized (W8A16).
* CUDA with fp8 tensor cores (compute capability >= 8.9), more tokens, bf16: activations quantized per
  token (kernels/fp8_quant.py), then torch._scaled_mm with row-wise scales: fp8 x fp8 at twice bf16's
  matrix rate, for prefill (W8A8).
* Elsewhere (CPU, older GPUs for large batches): the fp8 weight times its scale in the model's dtype.
  On the CPU the weight is kept dequantized once at load: the fp8 model's numerics for tests and
  laptops, not its memory saving.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.executor.kernels.fp8_quant import FP8_MAX

logger = logging.getLogger(__name__)

SUPPORTED_QUANTIZATION = ("fp8",)
FP8_DTYPE = torch.float8_e4m3fn
SKINNY_MAX_M = 256
# PAGEDSERVE_FP8_SKINNY_MAX_M: the largest token count sent to the skinny W8A16 GEMM (A/B runs; 0: none).
_SKINNY_MAX_M = int(os.environ.get("PAGEDSERVE_FP8_SKINNY_MAX_M", str(SKINNY_MAX_M)))


def check_quantization(quantization: str | None) -> None:
    if quantization is not None and quantization not in SUPPORTED_QUANTIZATION:
        raise ValueError(f"quantization must be one of {SUPPORTED_QUANTIZATION} or None, got {quantization!r}")


def quantize_rows_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] float8_e4m3fn, scale [N] fp32) with q * scale[:, None] ~ weight.

    Each row is scaled so its largest magnitude lands on 448; an all-zero row keeps a tiny scale."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got {tuple(weight.shape)}")
    w32 = weight.float()
    scale = (w32.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12 / FP8_MAX)
    q = (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rows_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale[:, None], computed in fp32, in `dtype`."""
    return (q.float() * scale[:, None]).to(dtype)


@functools.lru_cache(maxsize=16)
def fp8_matmul_supported(device: torch.device) -> bool:
    """fp8 tensor cores (torch._scaled_mm): CUDA compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """y = x (weight * weight_scale)^T + bias for an fp8 weight [N, K]; x [..., K] on weight's device."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    if m == 0:
        y = x2.new_empty((0, weight.shape[0]))
    elif m <= _SKINNY_MAX_M and x2.is_cuda:
        from pagedserve.executor.kernels.skinny_gemm import skinny_linear

        y = skinny_linear(x2 if x2.stride(1) == 1 else x2.contiguous(), weight, bias, weight_scale=weight_scale)
    elif x2.dtype == torch.bfloat16 and fp8_matmul_supported(x2.device):
        from pagedserve.executor.kernels.fp8_quant import per_token_quant_fp8

        xq, xs = per_token_quant_fp8(x2 if x2.stride(1) == 1 else x2.contiguous())
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.view(1, -1), bias=bias,
                             out_dtype=x2.dtype)
    else:
        y = F.linear(x2, dequantize_rows_fp8(weight, weight_scale, x2.dtype), bias)
    return y.reshape(*shape[:-1], weight.shape[0])


def quantize_model(model: nn.Module, quantization: str) -> int:
    """Quantizes every decoder projection of `model` in place; returns how many. Call once, after loading."""
    from pagedserve.executor.layers import Linear

    check_quantization(quantization)
    count = 0
    saved = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, Linear) or name.endswith("lm_head"):
                continue
            before = module.weight.numel() * module.weight.element_size()
            module.quantize_fp8()
            saved += before - module.weight.numel() * module.weight.element_size()
            count += 1
    if count == 0:
        raise ValueError("quantization='fp8' found no projections to quantize in this model")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the 16-bit weights' memory back to the device, where the KV sizing sees it
    logger.info("quantization fp8: %d projections, weights %.2f GiB smaller", count, saved / 2**30)
    return count


__all__ = [
    "SUPPORTED_QUANTIZATION",
    "check_quantization",
    "dequantize_rows_fp8",
    "fp8_linear",
    "fp8_matmul_supported",
    "quantize_model",
    "quantize_rows_fp8",
]
