"""Online weight quantization: `quantization="fp8"` (CLI `--quantization fp8`).

After the weights are loaded (any format, dummy included), every projection of the decoder layers
(q|k|v, o, gate|up, down) is quantized to float8_e4m3fn with one fp32 scale per output row (max |w_row|
/ 448); the embedding, the norms and the LM head stay in the model's dtype, as in vLLM's fp8 mode. The
weights then take half the memory of bf16, which the KV cache sizing gives to more blocks.

How a quantized projection runs on CUDA (`fp8_linear`), by the step's token count M:
* "w8a16", the skinny GEMM reading the fp8 weight (one byte an element, the row scale applied to the fp32
  sums) against the 16-bit activations, which are not quantized: decode streams half the weight bytes.
* "w8a8", the activations quantized per token (kernels/fp8_quant.py, one pass), then the skinny GEMM's
  fp8 x fp8 tensor-core dot, both scales applied to the sums: for decode batches where the tensor work
  of the W8A16 conversion would cost more than the bytes saved.
* "scaled_mm": the same quantization, then torch._scaled_mm (row-wise scales; CUTLASS): prefill, M > 256.
M <= 256 takes the way FP8_LINEAR_MODES holds for the shape and M's bucket, else "w8a16" at one token
and "w8a8" above: on the H200 at the 7B shapes W8A16 won at M = 1 only (a layer's four projections
75 us against cuBLAS bf16's 134), W8A8 at M = 2-256 (81-95 us at M = 2-64 against 132-133, parity at
M = 139), `_scaled_mm` nowhere below 256 by more than 5% (docs/gpu-notes.md, session 20). W8A8 needs fp8
tensor cores (compute capability >= 8.9) and `_scaled_mm` bf16 activations, so fp32 engines and older
GPUs keep W8A16 and, past 256 tokens, the dequantized weight. Elsewhere (CPU) the weight is kept
dequantized once at load: the fp8 model's numerics for tests and laptops, not its memory saving.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.config import QUANTIZATION_METHODS

logger = logging.getLogger(__name__)

# e4m3's largest finite value. Kept here, not imported from kernels/fp8_quant.py: this module must not import
# Triton (CPU runs and test collection import it; the kernel tests need Triton imported after TRITON_INTERPRET).
FP8_MAX = 448.0
FP8_MIN_SCALE = 1e-12 / FP8_MAX  # an all-zero row's scale (its fp8 values are zeros)
FP8_DTYPE = torch.float8_e4m3fn
SKINNY_MAX_M = 256
FP8_MODES = ("w8a16", "w8a8", "scaled_mm")
# Measured exceptions to the rule below: (N, K, m_bucket) -> one of FP8_MODES at M <= 256 (scripts/bench_skinny_gemm.py
# --fp8 prints the fastest per bucket). None so far: the 7B shapes on the H200 follow the rule (session 20, run 3).
FP8_LINEAR_MODES: dict[tuple[int, int, int], str] = {}
# PAGEDSERVE_FP8_MODE=w8a16|w8a8|scaled_mm: one way for every M <= 256 where the device and dtype allow it (A/B).
_FORCED_MODE = os.environ.get("PAGEDSERVE_FP8_MODE") or None
if _FORCED_MODE is not None and _FORCED_MODE not in FP8_MODES:
    raise ValueError(f"PAGEDSERVE_FP8_MODE must be one of {FP8_MODES}, got {_FORCED_MODE!r}")


def checkpoint_quantization(hf_config: Any) -> str | None:
    """The quantization a checkpoint's config.json declares, as one of QUANTIZATION_METHODS, or None.

    Supported: fp8 (e4m3) weights with one scale per tensor or per output row, as AutoFP8 / vLLM write them
    (quant_method "fp8") and as llm-compressor writes FP8 / FP8_DYNAMIC (quant_method "compressed-tensors",
    float 8-bit weights, strategy "tensor" or "channel"). Activation scales in the file (static schemes) are
    not used: activations are quantized per token at run time. "awq" / "gptq" / "compressed-tensors" (llm-compressor's
    integer schemes, W4A16 / W8A16): integer weights (executor/int_quant.py), dequantized at load or kept 4-bit.
    Anything else is a ValueError naming it."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(vars(qc))
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("weight_block_size"):
            fp8_block_size(qc)  # a ValueError for a malformed one
            return "fp8-block"
        return "fp8"
    if method == "compressed-tensors":
        from pagedserve.executor.int_quant import int_quant_config, is_compressed_int

        if is_compressed_int(qc):
            int_quant_config(qc)  # a ValueError for a variant not supported
            return "compressed-tensors"
        groups = qc.get("config_groups") or {}
        if groups and all(((g or {}).get("weights") or {}).get("strategy") == "block" for g in groups.values()):
            fp8_block_size(qc)
            return "fp8-block"
        for name, group in groups.items():
            weights = (group or {}).get("weights") or {}
            if not (weights.get("type") == "float" and weights.get("num_bits") == 8
                    and weights.get("strategy") in ("tensor", "channel")):
                raise ValueError(f"compressed-tensors scheme {name!r} ({weights}) is not supported; fp8 weights "
                                 "with per-tensor or per-channel scales and integer (4 / 8-bit) weights are")
        if not groups:
            raise ValueError("a compressed-tensors checkpoint without config_groups is not supported")
        return "fp8"
    if method == "mxfp4":  # gpt-oss's releases: the experts in MXFP4, dequantized at load (dequantize_mxfp4)
        return "mxfp4"
    if method in ("awq", "gptq"):
        from pagedserve.executor.int_quant import int_quant_config

        int_quant_config(qc)  # a ValueError for a variant not supported
        return method
    raise ValueError(f"checkpoint quantization {method!r} is not supported; supported: fp8 checkpoints (per-tensor, "
                     "per-channel or block-wise scales), AWQ (4-bit gemm), GPTQ (4 / 8-bit), compressed-tensors "
                     "(fp8, int 4 / 8-bit) and gpt-oss's MXFP4 checkpoints, or --quantization fp8 on a 16-bit "
                     "checkpoint")


def fp8_block_size(qc: dict) -> tuple[int, int]:
    """(rows, columns) of a block-wise fp8 checkpoint's scale blocks: `weight_block_size` (quant_method fp8: Qwen3's
    and DeepSeek's FP8 releases) or a compressed-tensors block scheme's `block_structure`; ValueError otherwise."""
    if qc.get("quant_method") == "fp8":
        block = qc.get("weight_block_size")
    else:
        blocks = set()
        for name, group in (qc.get("config_groups") or {}).items():
            weights = (group or {}).get("weights") or {}
            if weights.get("type") != "float" or weights.get("num_bits") != 8:
                raise ValueError(f"compressed-tensors scheme {name!r} ({weights}) is not supported; block-wise "
                                 "scales are for fp8 weights")
            blocks.add(tuple(weights.get("block_structure") or ()))
        block = blocks.pop() if len(blocks) == 1 else None
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(f"block-wise fp8 checkpoint: the block size must be two positive integers, got {block!r}")
    return int(block[0]), int(block[1])


def dequantize_fp8_blocks(weights: Iterable[tuple[str, torch.Tensor]], block: tuple[int, int]
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """A block-wise fp8 checkpoint's tensors with each fp8 `weight` [out, in] and its scales [ceil(out / rows),
    ceil(in / cols)] (`weight_scale_inv`, or compressed-tensors' `weight_scale`) replaced by the fp32 weight
    q * scale of its block; held until both parts have come. Other tensors pass through (16-bit ones as they are)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    rows, cols = block
    for name, tensor in weights:
        if name.endswith(".weight") and tensor.dtype == FP8_DTYPE:
            prefix, part = name[: -len(".weight")], "q"
        elif name.endswith((".weight_scale_inv", ".weight_scale")) and tensor.dim() == 2:
            prefix, part = name.rsplit(".", 1)[0], "s"
        else:
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if len(parts) == 2:
            del pending[prefix]
            q, scale = parts["q"], parts["s"].float()
            out_f, in_f = q.shape
            if scale.shape != (-(-out_f // rows), -(-in_f // cols)):
                raise ValueError(f"block-wise fp8 checkpoint: {prefix}'s scales {tuple(scale.shape)} do not fit its "
                                 f"weight {tuple(q.shape)} in blocks of {rows} x {cols}")
            full = scale.repeat_interleave(rows, 0)[:out_f].repeat_interleave(cols, 1)[:, :in_f]
            yield prefix + ".weight", q.float() * full
    for prefix, parts in pending.items():
        raise ValueError(f"block-wise fp8 checkpoint: {prefix} lacks its "
                         f"{'scales' if 'q' in parts else 'fp8 weight'}")


def dequantize_mxfp4(weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """gpt-oss's MXFP4 experts: each `X_blocks` [E, N, K / 32, 16] (two 4-bit e2m1 values a byte, low nibble first)
    and its `X_scales` [E, N, K / 32] (a power-of-two exponent, biased by 127, for each 32 values) become X [E, K, N]
    in `dtype`, as Transformers holds gpt-oss's experts (its convert_moe_packed_tensors); held until both parts
    have come. Other tensors pass through."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        if not name.endswith(("_blocks", "_scales")):
            yield name, tensor
            continue
        prefix, part = name.rsplit("_", 1)
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if len(parts) == 2:
            del pending[prefix]
            blocks, scales = parts["blocks"], parts["scales"]
            if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.dim() != 4 \
                    or tuple(blocks.shape[:-1]) != tuple(scales.shape):
                raise ValueError(f"MXFP4 checkpoint: {prefix}'s blocks {tuple(blocks.shape)} {blocks.dtype} and scales "
                                 f"{tuple(scales.shape)} {scales.dtype} do not pair (uint8 [E, N, K / 32, 16] and "
                                 "[E, N, K / 32])")
            yield prefix, convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    for prefix, parts in pending.items():
        raise ValueError(f"MXFP4 checkpoint: {prefix} lacks its {'scales' if 'blocks' in parts else 'blocks'}")


def quantize_rows_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] float8_e4m3fn, scale [N] fp32) with q * scale[:, None] ~ weight.

    Each row is scaled so its largest magnitude lands on 448; an all-zero row keeps a tiny scale."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got {tuple(weight.shape)}")
    w32 = weight.float()
    # Every step is one IEEE-rounded operation, so every device gives the same bits (the per-token Triton kernel
    # does the same steps). amax is divided by a tensor on w's device, not by the Python number: CUDA turns a
    # division by a host scalar into a product with its reciprocal, one ulp off for ~60% of rows, which moved
    # values on an fp8 rounding tie (~0.1% of a bf16 checkpoint's weights) one fp8 step (session 21). The rows are
    # multiplied by the scale's reciprocal: one division a row, not one an element, in the kernel.
    scale = (w32.abs().amax(dim=1) / w32.new_tensor(FP8_MAX)).clamp_min(FP8_MIN_SCALE)
    q = (w32 * scale.reciprocal()[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rows_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q * scale[:, None], computed in fp32, in `dtype`."""
    return (q.float() * scale[:, None]).to(dtype)


@functools.lru_cache(maxsize=16)
def fp8_matmul_supported(device: torch.device) -> bool:
    """fp8 tensor cores (torch._scaled_mm): CUDA compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_mode(m: int, n: int, k: int, x: torch.Tensor) -> str:
    """The way fp8_linear computes M rows of x against an [N, K] fp8 weight: one of FP8_MODES or "dequant"."""
    fp8_dot = x.is_cuda and fp8_matmul_supported(x.device)
    if m > SKINNY_MAX_M or not x.is_cuda:
        return "scaled_mm" if fp8_dot and x.dtype == torch.bfloat16 else "dequant"
    if _FORCED_MODE is not None:
        mode = _FORCED_MODE
    elif x.dtype == torch.float32:
        mode = "w8a16"  # an fp32 engine keeps its activations unrounded unless a way is forced
    else:
        mode = FP8_LINEAR_MODES.get((n, k, 1 << (m - 1).bit_length())) or ("w8a16" if m == 1 else "w8a8")
    if mode == "scaled_mm" and x.dtype != torch.bfloat16:
        mode = "w8a8"  # _scaled_mm's row-wise scales give bf16 only; the skinny GEMM writes any float
    return mode if mode == "w8a16" or fp8_dot else "w8a16"


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """y = x (weight * weight_scale)^T + bias for an fp8 weight [N, K]; x [..., K] on weight's device."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    (m, k), n = x2.shape, weight.shape[0]
    mode = fp8_mode(m, n, k, x2) if m else "empty"
    if mode == "empty":
        y = x2.new_empty((0, n))
    elif mode == "dequant":
        y = F.linear(x2, dequantize_rows_fp8(weight, weight_scale, x2.dtype), bias)
    elif mode == "w8a16":
        from pagedserve.executor.kernels.skinny_gemm import skinny_linear

        y = skinny_linear(x2, weight, bias, weight_scale=weight_scale)
    else:
        from pagedserve.executor.kernels.fp8_quant import per_token_quant_fp8

        xq, xs = per_token_quant_fp8(x2)
        if mode == "w8a8":
            from pagedserve.executor.kernels.skinny_gemm import skinny_linear

            y = skinny_linear(xq, weight, bias, out_dtype=x2.dtype, weight_scale=weight_scale, x_scale=xs)
        else:
            y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.view(1, -1), bias=bias,
                                 out_dtype=x2.dtype)
    return y.reshape(*shape[:-1], n)


def quantize_model(model: nn.Module, quantization: str) -> int:
    """Quantizes every decoder projection of `model` in place; returns how many. Call once, after loading."""
    from pagedserve.executor.layers import Linear

    if quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {quantization!r}")
    count = 0
    saved = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, Linear) or name.endswith(("lm_head", "score")) \
                    or module.weight_scale is not None or module.holds_fp8_values:
                continue  # (a projection an fp8 checkpoint already holds in fp8 stays as loaded, on every device)
            before = module.weight.numel() * module.weight.element_size()
            module.quantize_fp8()
            saved += before - module.weight.numel() * module.weight.element_size()
            count += 1
    if count == 0 and not any(isinstance(m, Linear) and (m.weight_scale is not None or m.holds_fp8_values)
                              for m in model.modules()):
        raise ValueError("quantization='fp8' found no projections to quantize in this model")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the 16-bit weights' memory back to the device, where the KV sizing sees it
    logger.info("quantization fp8: %d projections, weights %.2f GiB smaller", count, saved / 2**30)
    return count


__all__ = [
    "FP8_MAX",
    "FP8_MIN_SCALE",
    "checkpoint_quantization",
    "dequantize_rows_fp8",
    "fp8_linear",
    "fp8_mode",
    "fp8_matmul_supported",
    "quantize_model",
    "quantize_rows_fp8",
]
