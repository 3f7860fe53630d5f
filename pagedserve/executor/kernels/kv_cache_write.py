"""Store the step's new K and V rows into the paged KV cache.

    key/value:     [num_tokens, num_kv_heads, head_dim]   (any strides, last dim contiguous)
    kv_cache:      [2, num_blocks, block_size, num_kv_heads, head_dim]   (K then V)
    slot_mapping:  [num_tokens] int64, slot = block_id * block_size + offset; slot < 0 = padding token

One program per token copies its num_kv_heads * head_dim K and V elements. The grid depends only on
num_tokens (a shape), so the launch is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.kv_store import to_cache
from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter


@triton.jit
def _kv_cache_write_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    pdl_enter(USE_PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token (e.g. CUDA-graph batch padding): nothing to store
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)

    tok = token.to(tl.int64)
    k = tl.load(key_ptr + tok * stride_k_tok + offs_h[:, None] * stride_k_head + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :], mask=mask)

    dst = block * stride_c_block + offset * stride_c_slot + offs_h[:, None] * stride_c_head + offs_d[None, :]
    tl.store(k_cache_ptr + dst, to_cache(k, k_cache_ptr), mask=mask)
    tl.store(v_cache_ptr + dst, to_cache(v, v_cache_ptr), mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key[i] / value[i] into kv_cache at slot_mapping[i]; tokens with slot < 0 are skipped.

    Only the first len(slot_mapping) rows of key/value are written (extra rows are ignored).
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("kv_cache must have a contiguous head_dim and identical K/V layouts")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if key.shape[1:] != (num_kv_heads, head_dim) or value.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"key/value rows {tuple(key.shape[1:])}/{tuple(value.shape[1:])} do not match the cache's "
            f"(num_kv_heads, head_dim) = {(num_kv_heads, head_dim)}"
        )
    block_h = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    _kv_cache_write_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=1 if block_h * block_d <= 256 else 4,
        **pdl_launch_kwargs(key.device),
    )
