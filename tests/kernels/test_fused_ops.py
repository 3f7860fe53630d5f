"""Fused RMSNorm(+residual) and in-place rotary kernels vs plain torch with HF numerics.

Interpreter on CPU (fp32/fp16), compiled on CUDA (fp16/bf16); see conftest.py.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels.fused_norm import rms_norm
from pagedserve.executor.kernels.rotary import apply_rotary_

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]


def ref_rms_norm(x, weight, eps, residual=None):
    """As HF Qwen2RMSNorm (and layers.RMSNorm): fp32 statistics, weight applied after the cast."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed, x) if residual is not None else weight * normed


@pytest.mark.parametrize("hidden", [64, 1000])
@pytest.mark.parametrize("dtype", DTYPES[-1:])
def test_rms_norm_with_fp32_residual_stream(hidden, dtype):
    """16-bit activations beside an fp32 residual: the sum stays fp32 (not rounded), the normed
    output is in x's dtype; the torch path of layers.RMSNorm gives the same."""
    from pagedserve.executor.layers import RMSNorm

    x = (torch.randn(7, hidden) * 3).to(dtype).to(DEVICE)
    residual = (torch.randn(7, hidden) * 5).to(DEVICE)  # fp32, not representable in 16 bits
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype).to(DEVICE)
    total = x.float() + residual
    normed = (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    expected = weight * normed
    out, res_out = rms_norm(x, weight, 1e-6, residual)
    assert res_out.dtype == torch.float32 and out.dtype == dtype
    torch.testing.assert_close(res_out, total, rtol=0, atol=0)
    ulp_close(out, expected)
    norm = RMSNorm(hidden, 1e-6).to(DEVICE)
    norm.weight.data = weight.clone()
    torch_out, torch_res = norm._norm(total, dtype), x.to(torch.float32) + residual
    ulp_close(out, torch_out)
    torch.testing.assert_close(res_out, torch_res, rtol=0, atol=0)
    with pytest.raises(ValueError, match="residual dtype"):
        rms_norm(x.float(), weight, 1e-6, residual.to(dtype))


def ulp_close(out, ref):
    """At most one rounding step apart (fp32 sums in another order can flip the last bit)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[ref.dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("hidden", [64, 896, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_rms_norm(hidden, dtype, with_residual, inplace):
    x = (torch.randn(3, 5, hidden) * 3).to(dtype).to(DEVICE)
    residual = torch.randn(3, 5, hidden).to(dtype).to(DEVICE) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype).to(DEVICE)
    expected = ref_rms_norm(x, weight, 1e-6, residual)
    x_in = x.clone()
    res_in = residual.clone() if with_residual else None
    got = rms_norm(x_in, weight, 1e-6, res_in, inplace=inplace)
    if with_residual:
        ulp_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)  # the sum is exact
        if inplace:
            assert got[0].data_ptr() == x_in.data_ptr() and got[1].data_ptr() == res_in.data_ptr()
    else:
        ulp_close(got, expected)
        if inplace:
            assert got.data_ptr() == x_in.data_ptr()
    if not inplace:
        torch.testing.assert_close(x_in, x, rtol=0, atol=0)  # inputs untouched


@pytest.mark.parametrize("hidden", [64, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual_dtype", [None, "same", "fp32"])
def test_gemma_rms_norm(hidden, dtype, residual_dtype):
    """gemma=True: (1 + w) on the fp32 row, rounded once, as Transformers' Gemma3RMSNorm (and layers.GemmaRMSNorm's
    torch path); the residual sum as in the plain norm; the output in x's dtype."""
    from pagedserve.executor.layers import GemmaRMSNorm

    x = (torch.randn(6, hidden) * 3).to(dtype).to(DEVICE)
    weight = (0.3 * torch.randn(hidden)).to(dtype).to(DEVICE)
    residual = None
    if residual_dtype is not None:
        residual = (torch.randn(6, hidden) * 2).to(dtype if residual_dtype == "same" else torch.float32).to(DEVICE)
    total = x if residual is None else (x.float() + residual.float()).to(residual.dtype)
    t32 = total.float()
    expected = (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + weight.float())).to(dtype)
    got = rms_norm(x, weight, 1e-6, residual, gemma=True)
    out = got if residual is None else got[0]
    ulp_close(out, expected)
    if residual is not None:
        torch.testing.assert_close(got[1], total, rtol=0, atol=0)
    norm = GemmaRMSNorm(hidden, 1e-6).to(DEVICE)
    norm.weight.data = weight.clone()
    ulp_close(norm._norm(total, dtype), expected)


def ref_rotary(x, positions, cos_sin_cache):
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def make_cos_sin(max_pos, head_dim, theta=1e6):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(14, 2, 64), (8, 2, 128), (4, 1, 80)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_qkv_views(num_heads, num_kv_heads, head_dim, dtype):
    num_tokens = 11
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype).to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    query = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    key = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    value_before = qkv[:, q_size + kv_size :].clone()
    positions = torch.randint(0, 4000, (num_tokens,)).to(DEVICE)
    cos_sin = make_cos_sin(4096, head_dim).to(DEVICE)
    expected_q, expected_k = ref_rotary(query, positions, cos_sin), ref_rotary(key, positions, cos_sin)

    apply_rotary_(query, key, positions, cos_sin)
    ulp_close(query, expected_q)
    ulp_close(key, expected_k)
    torch.testing.assert_close(qkv[:, q_size + kv_size :], value_before, rtol=0, atol=0)  # v untouched


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,rotary_dim", [(24, 8, 128, 96), (4, 2, 64, 32),
                                                                        (3, 1, 80, 20)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_partial_rotary_width(num_heads, num_kv_heads, head_dim, rotary_dim, dtype):
    """A partial rotary factor (Phi-4-mini: 96 of 128): the cache holds rotary_dim columns; the first rotary_dim
    dims of each head rotate, the rest and v stay bit for bit."""
    torch.manual_seed(rotary_dim)
    num_tokens = 9
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype).to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    query = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    key = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    before = qkv.clone()
    positions = torch.randint(0, 2000, (num_tokens,)).to(DEVICE)
    cos_sin = make_cos_sin(2048, rotary_dim).to(DEVICE)
    expected_q = ref_rotary(query[..., :rotary_dim], positions, cos_sin)
    expected_k = ref_rotary(key[..., :rotary_dim], positions, cos_sin)

    apply_rotary_(query, key, positions, cos_sin)
    ulp_close(query[..., :rotary_dim], expected_q)
    ulp_close(key[..., :rotary_dim], expected_k)
    assert torch.equal(query[..., rotary_dim:], before[:, :q_size].view_as(query)[..., rotary_dim:])
    assert torch.equal(key[..., rotary_dim:], before[:, q_size : q_size + kv_size].view_as(key)[..., rotary_dim:])
    assert torch.equal(qkv[:, q_size + kv_size :], before[:, q_size + kv_size :])
    with pytest.raises(ValueError, match="at most head_dim"):
        apply_rotary_(query, key, positions, make_cos_sin(16, head_dim + 2).to(DEVICE))


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", [(14, 2, 64, 16), (8, 2, 128, 16),
                                                                        (4, 4, 128, 8), (28, 4, 128, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_kv_write_matches_rotary_then_cache_write(num_heads, num_kv_heads, head_dim, block_size,
                                                              dtype):
    from pagedserve.executor.kernels.rotary_kv_write import rotary_and_write_kv_cache

    torch.manual_seed(head_dim + num_heads)
    num_tokens, num_blocks = 13, 9
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype).to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    query = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    key = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 4000, (num_tokens,)).to(DEVICE)
    cos_sin = make_cos_sin(4096, head_dim).to(DEVICE)
    # Distinct slots in shuffled order, the last two tokens padding (-1); one token past the slots.
    slots = torch.randperm(num_blocks * block_size)[: num_tokens - 1]
    slots[-2:] = -1
    slot_mapping = slots.to(DEVICE)
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                          device=DEVICE)  # poisoned: only the written slots may change
    expected_q, expected_k = ref_rotary(query, positions, cos_sin), ref_rotary(key, positions, cos_sin)
    expected_v = value.clone()

    rotary_and_write_kv_cache(query, key, value, positions, cos_sin, kv_cache, slot_mapping)
    ulp_close(query, expected_q)
    ulp_close(key, expected_k)
    torch.testing.assert_close(value, expected_v, rtol=0, atol=0)
    flat_k = kv_cache[0].reshape(-1, num_kv_heads, head_dim)
    flat_v = kv_cache[1].reshape(-1, num_kv_heads, head_dim)
    for tok, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            torch.testing.assert_close(flat_k[slot], key[tok], rtol=0, atol=0)  # the rotated key, bit for bit
            torch.testing.assert_close(flat_v[slot], expected_v[tok], rtol=0, atol=0)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert torch.isnan(flat_k[~written.to(DEVICE)]).all() and torch.isnan(flat_v[~written.to(DEVICE)]).all()


def test_rotary_and_kv_write_checks_shapes():
    from pagedserve.executor.kernels.rotary_kv_write import rotary_and_write_kv_cache

    q = torch.zeros(4, 4, 64, device=DEVICE)
    k = v = torch.zeros(4, 2, 64, device=DEVICE)
    cache = torch.zeros(2, 3, 16, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="disagree"):
        rotary_and_write_kv_cache(q, k, v, torch.zeros(3, dtype=torch.long, device=DEVICE),
                                  make_cos_sin(64, 64).to(DEVICE), cache,
                                  torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="do not match"):
        rotary_and_write_kv_cache(q, k, v, torch.zeros(4, dtype=torch.long, device=DEVICE),
                                  make_cos_sin(64, 64).to(DEVICE), torch.zeros(2, 3, 16, 4, 64, device=DEVICE),
                                  torch.zeros(4, dtype=torch.long, device=DEVICE))
