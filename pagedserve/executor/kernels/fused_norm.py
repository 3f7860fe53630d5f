"""RMSNorm with the residual add folded in, one pass over each row.

    rms_norm(x, weight, eps)               -> weight * normalize(x)
    rms_norm(x, weight, eps, residual)     -> (weight * normalize(x + residual), x + residual)

Numerics follow HF Llama/Qwen2 (and layers.RMSNorm): the residual sum is rounded to the residual's
dtype (x's in HF; the decoder keeps an fp32 residual stream for 16-bit models, see models/decoder.py),
the mean of squares and the scaling are fp32, the normalized row is rounded to x's dtype before the
weight multiply (itself rounded). gemma=True: Gemma's norm, (1 + weight) applied to the fp32 row, rounded once
(Gemma's RMSNorm in Transformers). One program per row of `hidden` elements: the row is read once
(twice with the residual) and written once (twice), instead of an add, a norm and a multiply each
making their own pass. With inplace=True the results overwrite x (normed) and residual (sum), as
vLLM's fused_add_rms_norm does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    GEMMA: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)  # as torch's x + r
        tl.store(residual_out_ptr + row * stride_ro + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / hidden + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    if GEMMA:
        y = x32 * rstd * (1.0 + w.to(tl.float32))
    else:
        normed = (x32 * rstd).to(x_ptr.dtype.element_ty)
        y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    inplace: bool = False,
    gemma: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., hidden] (last dim contiguous); weight: [hidden]. See the module docstring.

    The output dtype is the promotion of x's and weight's dtypes (as `weight * normed` in torch); x's with gemma.
    """
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if residual is not None and residual.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"residual dtype {residual.dtype} must be x's ({x.dtype}) or float32")
    x2 = x.reshape(-1, hidden)
    if x2.stride(-1) != 1:
        raise ValueError("x must have a contiguous last dimension")
    res2 = residual.reshape(-1, hidden) if residual is not None else x2
    out_dtype = x.dtype if gemma else torch.promote_types(x.dtype, weight.dtype)
    if inplace:
        if out_dtype != x.dtype:
            raise ValueError("inplace rms_norm needs weight's dtype to promote to x's dtype")
        if x2.data_ptr() != x.data_ptr() or (residual is not None and res2.data_ptr() != residual.data_ptr()):
            raise ValueError("inplace rms_norm needs reshape-able (view) inputs")
        out2, res_out2 = x2, res2
    else:
        out2 = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
        res_out2 = torch.empty_like(res2) if residual is not None else out2
    num_rows = x2.shape[0]
    if num_rows > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_rows,)](
            x2, res2, weight, out2, res_out2,
            x2.stride(0), res2.stride(0), out2.stride(0), res_out2.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            GEMMA=gemma,
            num_warps=min(16, max(1, block // 512)),
            **pdl_launch_kwargs(x2.device),
        )  # fmt: skip
    out = out2.view(x.shape)
    if residual is None:
        return out
    return out, res_out2.view(x.shape)


__all__ = ["rms_norm"]
