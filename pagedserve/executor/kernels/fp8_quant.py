"""Dynamic per-token fp8 quantization: x [M, K] (16/32-bit) -> q [M, K] float8_e4m3fn, scale [M, 1] fp32.

Each row gets its own scale, max|x_row| / 448 (e4m3's largest finite value), floored so that an all-zero
row divides by a tiny number, not zero; q = clamp(x / scale, -448, 448) rounded to nearest even, so
q * scale approximates x with ~2^-4 relative error per element. This feeds fp8 GEMMs (torch._scaled_mm with
row-wise scales): the scale pair (row of x, column of W) is applied to the fp32 sums. The steps are those of the
torch reference (quantize_rows_fp8), each IEEE-rounded, so the bits agree: scale = div_rn(amax, 448) (Triton's `/`
is an approximate fp32 division on the GPU), then x times div_rn(1, scale), one division a row. Dividing every
element (div_rn) made the kernel ~2 us slower a call at decode sizes (session 21).

One program per row. Rows up to ONE_PASS_MAX elements are read once (held in registers between the
max and the store); longer rows (e.g. the MLP's down input, 18,944 wide in Qwen2-7B) are read twice,
the second read mostly from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.quantization import FP8_MAX, FP8_MIN_SCALE, quantize_rows_fp8

ONE_PASS_MAX = 8192
_CHUNK = 4096


@triton.jit
def _round_to_e4m3(v):
    """v (fp32, |v| <= 448) rounded to nearest even on e4m3's grid, still in fp32, so the conversion after is
    exact: normals keep 3 mantissa bits (round the 20 dropped bits into the rest; a carry moves the exponent),
    subnormals (|v| < 2^-6) are multiples of 2^-9 (1.5 * 2^23 added and taken away rounds v * 512 to an
    integer). Done here rather than left to the conversion because Triton's interpreter rounds a mantissa
    carry wrongly (126.8 -> 64); the GPU's conversion gives the same bits either way."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
    normal = bits.to(tl.float32, bitcast=True)
    sub = ((v * 512.0 + 12582912.0) - 12582912.0) / 512.0
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def _per_token_quant_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_qm,
    FMAX: tl.constexpr,
    MIN_S: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=0), FMAX), MIN_S)
        q = _round_to_e4m3(tl.clamp(x * tl.math.div_rn(1.0, scale), -FMAX, FMAX))
        tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, K, BLOCK):
            mask = k + offs < K
            x = tl.load(x_row + k + offs, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FMAX), MIN_S)
        inv = tl.math.div_rn(1.0, scale)
        for k in range(0, K, BLOCK):
            mask = k + offs < K
            x = tl.load(x_row + k + offs, mask=mask, other=0.0).to(tl.float32)
            q = _round_to_e4m3(tl.clamp(x * inv, -FMAX, FMAX))
            tl.store(q_row + k + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float16/bfloat16/float32 with a contiguous last dim -> (q [M, K] float8_e4m3fn, scale [M, 1] fp32)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [M, K] with a contiguous last dimension, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, scale.fill_(FP8_MIN_SCALE)
    one_pass = k <= ONE_PASS_MAX
    block = triton.next_power_of_2(k) if one_pass else _CHUNK
    _per_token_quant_kernel[(m,)](
        x, q, scale, k, x.stride(0), q.stride(0),
        FMAX=FP8_MAX, MIN_S=FP8_MIN_SCALE, BLOCK=block, ONE_PASS=one_pass, num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip
    return q, scale


def per_token_quant_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in torch ops (the rows of x quantized as weight rows are): the kernel's test reference."""
    q, scale = quantize_rows_fp8(x)
    return q, scale[:, None]


__all__ = ["FP8_MAX", "per_token_quant_fp8", "per_token_quant_fp8_reference"]
