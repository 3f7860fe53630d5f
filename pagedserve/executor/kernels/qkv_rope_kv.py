"""Batch-1 qkv projection with rotary and the KV-cache write in its epilogue: one kernel instead of two.

    x [1, K];  weight [(Hq + 2 Hkv) * D, K] = q heads | k heads | v heads (the merged qkv_proj), contiguous
    -> query [1, Hq, D] rotated; the rotated key and the value stored at slot_mapping[0] (< 0: not stored)

At one token the qkv projection is a matrix-vector product (the fma path of skinny_gemm) and the rotary +
KV write after it is a ~2-3 us kernel of pure latency, 28 times a step. Here each program owns BLOCK_R
dims of one head's first half and the same BLOCK_R dims of its second half (the rotary pairs d, d + D/2),
accumulates the 2 x BLOCK_R dot products over K, and then, for its own outputs only: adds the bias, rounds
to x's dtype (the GEMM's rounding), rotates q and k heads in fp32 (rounded once, as rotary_kv_write does),
and stores q heads to the query and k / v heads into the paged cache. The weight loop is unchanged from
the skinny GEMM's (4 W rows a program at BLOCK_R = 2); the epilogue runs once per program.

Status: tested against the two-kernel path (interpreter on CPU, and on the H200); the model uses it for every
one-token step (PAGEDSERVE_FUSED_QKV_ROPE=0 turns it off): the batch-1 graph replay went 3.833 -> 3.784 ms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.gate_up_silu import paired_rows_dot
from pagedserve.executor.kernels.kv_store import to_cache
from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs

DEFAULT_BLOCK_R = 2  # 2 + 2 rows a program: the 4-row tiles of qkv's measured M=1 config
DEFAULT_BLOCK_K = 512


@triton.jit
def _qkv_rope_kv_kernel(
    x_ptr,  # [K]
    w_ptr,  # [(Hq + 2 Hkv) * D, K], contiguous
    bias_ptr,  # [(Hq + 2 Hkv) * D] (HAS_BIAS only)
    q_ptr,  # [Hq * D] out: rotated query
    positions_ptr,  # [1]
    cos_sin_ptr,  # [max_position, D] fp32: cos | sin halves
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,  # [1] int64, < 0: nothing stored
    K,
    stride_wn,
    stride_cs,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    num_q_heads,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,  # D / 2
    BLOCK_SIZE: tl.constexpr,  # KV-cache block size
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks
    BLOCK_R: tl.constexpr,  # dims of each half a program owns (divides HALF)
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    pid = tl.program_id(0)
    head = pid // (HALF // BLOCK_R)
    offs_d = (pid % (HALF // BLOCK_R)) * BLOCK_R + tl.arange(0, BLOCK_R)  # dims in the first half
    rows_a = (head * 2 * HALF + offs_d).to(tl.int64)
    rows_b = rows_a + HALF
    a, b = paired_rows_dot(w_ptr, rows_a, rows_b, stride_wn, x_ptr, K, EVEN_K, BLOCK_K, USE_PDL)
    if HAS_BIAS:
        a += tl.load(bias_ptr + rows_a).to(tl.float32)
        b += tl.load(bias_ptr + rows_b).to(tl.float32)
    # The two-kernel path's roundings: the GEMM's output in x's dtype, then the rotation in fp32, rounded.
    a = a.to(q_ptr.dtype.element_ty).to(tl.float32)
    b = b.to(q_ptr.dtype.element_ty).to(tl.float32)
    if head < num_q_heads + NUM_KV_HEADS:  # q and k heads rotate
        pos = tl.load(positions_ptr).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d).to(tl.float32)
        sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_d).to(tl.float32)
        a, b = a * cos - b * sin, b * cos + a * sin
    if head < num_q_heads:
        q_offs = head * 2 * HALF + offs_d
        tl.store(q_ptr + q_offs, a.to(q_ptr.dtype.element_ty))
        tl.store(q_ptr + q_offs + HALF, b.to(q_ptr.dtype.element_ty))
    else:
        slot = tl.load(slot_mapping_ptr).to(tl.int64)
        if slot >= 0:
            is_v = head >= num_q_heads + NUM_KV_HEADS
            kv_head = head - num_q_heads - tl.where(is_v, NUM_KV_HEADS, 0)
            dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot \
                + kv_head * stride_c_head + offs_d
            # The fp32 values (v: the GEMM's outputs already rounded to the activations' dtype; k: rotated from
            # them in fp32) rounded once to the cache's dtype, as the two-kernel path (rotary_kv_write) stores
            # them: equal to a 16-bit cache's earlier rounding, and one rounding, not two, into an fp8 cache.
            if is_v:
                tl.store(v_cache_ptr + dst, to_cache(a, v_cache_ptr))
                tl.store(v_cache_ptr + dst + HALF, to_cache(b, v_cache_ptr))
            else:
                tl.store(k_cache_ptr + dst, to_cache(a, k_cache_ptr))
                tl.store(k_cache_ptr + dst + HALF, to_cache(b, k_cache_ptr))


def qkv_rope_kv_write(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    *,
    block_r: int = DEFAULT_BLOCK_R,
    block_k: int = DEFAULT_BLOCK_K,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """One token: q, k, v = x @ weight.T (+ bias) split by heads; q and k rotated by positions[0]; k and v
    stored at slot_mapping[0] in kv_cache [2, blocks, block_size, Hkv, D] (skipped when < 0). Returns the
    rotated query [1, Hq, D] in x's dtype (the cache holds k and v; nothing else is returned)."""
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    k = x.shape[-1]
    rows = (num_q_heads + 2 * num_kv_heads) * head_dim
    if x.dim() != 2 or x.shape[0] != 1 or weight.shape != (rows, k) or not weight.is_contiguous():
        raise ValueError(f"x must be [1, K] and weight a contiguous [{rows}, K] (q | k | v heads of {head_dim}), "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(1) != 1:
        raise ValueError(f"x (contiguous rows) and weight must share a float16/bfloat16/float32 dtype, got "
                         f"{x.dtype}, {weight.dtype}")
    if bias is not None and (bias.shape != (rows,) or bias.dtype != x.dtype or bias.stride(0) != 1):
        raise ValueError(f"bias must be a contiguous [{rows}] tensor of {x.dtype}")
    half = head_dim // 2
    if head_dim % 2 or half % block_r or block_r & (block_r - 1) or block_k & (block_k - 1):
        raise ValueError(f"block_r ({block_r}, a power of 2) must divide head_dim / 2 ({head_dim} / 2) and block_k "
                         f"({block_k}) be a power of 2")
    if positions.shape != (1,) or slot_mapping.shape != (1,) or cos_sin_cache.shape[-1] != head_dim \
            or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"positions and slot_mapping must hold one token, cos_sin_cache rows {head_dim} wide")
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("kv_cache must have a contiguous head_dim and identical K/V layouts")
    query = torch.empty((1, num_q_heads, head_dim), dtype=x.dtype, device=x.device)
    block_k = max(16, min(block_k, triton.next_power_of_2(k)))
    heads = num_q_heads + 2 * num_kv_heads
    _qkv_rope_kv_kernel[(heads * (half // block_r),)](
        x, weight, bias if bias is not None else x, query, positions, cos_sin_cache, k_cache, v_cache,
        slot_mapping, k, weight.stride(0), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_SIZE=block_size,
        HAS_BIAS=bias is not None,
        EVEN_K=k % block_k == 0,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch_kwargs(x.device),
    )  # fmt: skip
    return query


__all__ = ["qkv_rope_kv_write"]
