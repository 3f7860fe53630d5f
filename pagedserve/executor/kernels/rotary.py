"""Neox-style rotary position embedding applied in place to q and k, one program per token.

    query: [T, num_heads, head_dim], key: [T, num_kv_heads, head_dim]  (views of a fused qkv are fine:
           any token/head strides, contiguous head_dim)
    positions: [T] int;  cos_sin_cache: [max_position, rotary_dim] fp32, cos | sin halves
               (layers.RotaryEmbedding.cos_sin_cache); rotary_dim < head_dim (a partial rotary factor) rotates
               the first rotary_dim dims of each head and leaves the rest

Each head's halves (x1, x2) become (x1*cos - x2*sin, x2*cos + x1*sin), math in fp32, rounded back to
the input dtype (HF's rotate_half convention). The cos/sin row of a token is loaded once for all of
its q and k heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter


@triton.jit
def _rotate_heads(ptr, cos, sin, num_heads, stride_head, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    p1 = ptr + offs_h[:, None] * stride_head + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos[None, :] - x2 * sin[None, :]
    y2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(p1, y1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, y2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cs,
    num_q_heads,
    num_k_heads,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    pdl_enter(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_mask = offs_d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + tok * stride_q_tok, cos, sin, num_q_heads, stride_q_head, HALF, BLOCK_HQ, BLOCK_HALF
    )
    _rotate_heads(
        k_ptr + tok * stride_k_tok, cos, sin, num_k_heads, stride_k_head, HALF, BLOCK_HK, BLOCK_HALF
    )


def apply_rotary_(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    """Rotate query [T, Hq, D] and key [T, Hkv, D] in place by the angles of `positions` (their first
    cos_sin_cache.shape[-1] dims)."""
    num_tokens, num_q_heads, head_dim = query.shape
    if key.shape[0] != num_tokens or key.shape[2] != head_dim or positions.shape != (num_tokens,):
        raise ValueError(
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, positions {tuple(positions.shape)} disagree"
        )
    rotary_dim = cos_sin_cache.shape[-1]
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"cos_sin_cache last dim {rotary_dim} must be even and at most head_dim {head_dim}")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("query, key and cos_sin_cache need a contiguous last dimension (in place)")
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        query, key, positions, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_sin_cache.stride(0),
        num_q_heads, key.shape[1],
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(key.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
        **pdl_launch_kwargs(query.device),
    )  # fmt: skip


__all__ = ["apply_rotary_"]
