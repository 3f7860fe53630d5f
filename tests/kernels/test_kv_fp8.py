"""fp8 KV caches (kv_cache_dtype="fp8"): the three cache writers store e4m3 values clamped to +-448 and rounded to
nearest even, as torch's conversion does (the torch backend's write is the reference); the decode and prefill
kernels read them widened to the query's dtype and match a float64 reference on the dequantized cache.
Interpreter on CPU (fp32/fp16 queries), compiled on CUDA (fp16/bf16). Fresh random inputs, NaN-poisoned outputs
and cache slots (e4m3fn has a NaN)."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.attention.torch_ref import write_kv_cache as torch_write_kv_cache
from pagedserve.executor.kernels.kv_cache_write import write_kv_cache
from pagedserve.executor.kernels.paged_attention_decode import paged_attention_decode
from pagedserve.executor.kernels.paged_attention_prefill import paged_attention_prefill
from tests.kernels.test_fused_ops import make_cos_sin
from tests.kernels.test_kernels import (
    CUDA,
    DECODE_SHAPES,
    DEVICE,
    DTYPES,
    PREFILL_SHAPES,
    assert_close,
    make_batch,
    poisoned_like,
    reference_attention,
)

FP8 = torch.float8_e4m3fn
# Queries for the attention tests: with an fp8 cache a bf16 query's dots run in fp16 (kv_store.query_for_cache), so
# bf16 works in the interpreter too (its bf16 dots do not)
Q_DTYPES = list(dict.fromkeys([*DTYPES, torch.bfloat16]))


def to_fp8(t: torch.Tensor) -> torch.Tensor:
    """What an fp8 cache holds for t: clamped to e4m3's range, rounded to nearest even."""
    return t.float().clamp(-448.0, 448.0).to(FP8)


def fp8_cache_like(cache: torch.Tensor) -> torch.Tensor:
    """cache's values in fp8; its NaN slots (never written) stay NaN (clamp and conversion keep NaN)."""
    out = to_fp8(cache)
    assert torch.equal(torch.isnan(out.float()), torch.isnan(cache.float()))
    return out


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal fp8 values bit for bit, except the sign of zero: a small negative value that rounds to zero is +0 in
    the kernels' cache where torch's conversion keeps -0 (a kernel that kept the sign still wrote +0 on the H200);
    no product changes. On a miss, how many and the first few (kernel, torch) value pairs."""
    a, b = got.view(torch.uint8), expected.view(torch.uint8)
    zeros = (a & 0x7F == 0) & (b & 0x7F == 0)
    bad = (a != b) & ~zeros
    if bad.any():
        pairs = list(zip(got.float()[bad][:6].tolist(), expected.float()[bad][:6].tolist(), strict=True))
        raise AssertionError(f"{bad.sum().item()} of {bad.numel()} bytes differ; (kernel, torch): {pairs}")


def spread(shape, g, dtype) -> torch.Tensor:
    """Values across e4m3's range: normals, subnormals (< 2^-6), ties, and some past 448 (clamped)."""
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2.9, shape[-1])
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(8, 2, 64), (16, 4, 128)])
def test_kv_cache_write_fp8(block_size, num_kv_heads, head_dim, dtype):
    g = torch.Generator().manual_seed(block_size * 31 + head_dim)
    num_blocks, num_tokens = 6, 21
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[:3] = -1  # padding tokens
    key, value = (spread((num_tokens, num_kv_heads, head_dim), g, dtype) for _ in range(2))
    assert key.float().abs().max() > 448  # some clamped
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=FP8, device=DEVICE)
    expected = cache.clone()
    torch_write_kv_cache(expected, key, value, slots.to(DEVICE))
    write_kv_cache(key, value, cache, slots.to(DEVICE))
    assert_same_bits(cache, expected)  # NaN slots untouched
    assert expected.float()[~torch.isnan(expected.float())].abs().max() == 448


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_kv_write_fp8(dtype):
    """The fused rotary + write stores round(clamp(fp32 rotated k)) and v: against the same kernel writing an fp32
    cache, converted by torch (one rounding of the same fp32 values)."""
    from pagedserve.executor.kernels.rotary_kv_write import rotary_and_write_kv_cache

    g = torch.Generator().manual_seed(7)
    num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_blocks = 11, 8, 2, 64, 16, 5
    positions = torch.randint(0, 2000, (num_tokens,), generator=g).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens].to(DEVICE)
    cos_sin = make_cos_sin(2048, head_dim).to(DEVICE)
    q, k, v = (spread((num_tokens, h, head_dim), g, dtype) for h in (num_heads, num_kv_heads, num_kv_heads))
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    wide = torch.full(shape, float("nan"), dtype=torch.float32, device=DEVICE)
    rotary_and_write_kv_cache(q.clone(), k.clone(), v.clone(), positions, cos_sin, wide, slots)
    cache = torch.full(shape, float("nan"), dtype=FP8, device=DEVICE)
    rotary_and_write_kv_cache(q.clone(), k.clone(), v.clone(), positions, cos_sin, cache, slots)
    assert_same_bits(cache, fp8_cache_like(wide))


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rope_kv_write_fp8(dtype):
    """The batch-1 qkv GEMV + rotary + write with an fp8 cache: against the same kernel writing an fp32 cache."""
    from pagedserve.executor.kernels.qkv_rope_kv import qkv_rope_kv_write

    g = torch.Generator().manual_seed(11)
    hq, hkv, d, k = 4, 2, 64, 96
    x = torch.randn(1, k, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn((hq + 2 * hkv) * d, k, generator=g) * 3).to(dtype).to(DEVICE)
    cos_sin = make_cos_sin(64, d).to(DEVICE)
    pos, slot = torch.tensor([37], device=DEVICE), torch.tensor([5], device=DEVICE)
    shape = (2, 8, 4, hkv, d)
    wide = torch.full(shape, float("nan"), dtype=torch.float32, device=DEVICE)
    query = qkv_rope_kv_write(x, weight, None, pos, cos_sin, wide, slot, hq)
    cache = torch.full(shape, float("nan"), dtype=FP8, device=DEVICE)
    query8 = qkv_rope_kv_write(x, weight, None, pos, cos_sin, cache, slot, hq)
    assert torch.equal(query8, query)  # the query is not stored in the cache: unchanged
    assert_same_bits(cache, fp8_cache_like(wide))


@pytest.mark.parametrize("shape", DECODE_SHAPES[:3], ids=lambda s: "bs{}-d{}-hq{}-hkv{}".format(*s))
@pytest.mark.parametrize("dtype", Q_DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_fp8_cache(shape, dtype, num_splits):
    block_size, head_dim, num_heads, num_kv_heads = shape
    spec = [(36, 1), (2 * block_size + 5, 1), (0, 1), (2 * block_size + 13, 1)]  # ragged, a prefix hit
    b = make_batch(spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                   dtype=dtype, share_prefix=(1, 3, 2))
    cache = fp8_cache_like(b.full_cache)
    scale = head_dim**-0.5
    out = poisoned_like(b.query)
    paged_attention_decode(b.query, cache, b.meta.block_tables, b.meta.seq_lens, scale, out=out,
                           num_splits=num_splits, block_n=16)
    assert out.dtype == dtype
    assert_close(out, reference_attention(b.query, cache.float(), b.meta, scale), dtype)


@pytest.mark.parametrize("shape", PREFILL_SHAPES[:3], ids=lambda s: "bs{}-d{}-hq{}-hkv{}".format(*s))
@pytest.mark.parametrize("dtype", Q_DTYPES)
def test_prefill_fp8_cache(shape, dtype):
    """A mixed batch (fresh prompt, prefix hit, chunked prefill, decodes) through the prefill kernel."""
    block_size, head_dim, num_heads, num_kv_heads = shape
    spec = [(0, 37), (2 * block_size, 11), (21, 19), (40, 1), (3 * block_size + 3, 1)]
    b = make_batch(spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                   dtype=dtype, share_prefix=(4, 1, 2), num_pad_tokens=2)
    cache = fp8_cache_like(b.full_cache)
    scale = head_dim**-0.5
    out = poisoned_like(b.query)
    m = b.meta
    paged_attention_prefill(b.query, cache, m.query_start_loc, m.seq_lens, m.block_tables, scale, m.max_query_len,
                            out=out, block_m=32 if num_heads // num_kv_heads < 8 else 16, block_n=16)
    num_real = m.query_start_loc[-1].item()
    assert_close(out[:num_real], reference_attention(b.query, cache.float(), m, scale), dtype)
    assert torch.isnan(out[num_real:]).all()


def test_fp8_cache_is_not_the_16_bit_one():
    """The reference above is not trivially close: attention on the fp8 cache differs from the unrounded one by
    the e4m3 rounding (~2^-5 relative), far above the tolerance the kernels meet."""
    b = make_batch([(40, 1), (23, 1)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=DTYPES[0])
    exact = reference_attention(b.query, b.full_cache, b.meta, 0.125)
    rounded = reference_attention(b.query, fp8_cache_like(b.full_cache).float(), b.meta, 0.125)
    assert ((exact - rounded).norm() / exact.norm()).item() > 5e-3


@pytest.mark.skipif(CUDA, reason="the CPU runner (Triton's interpreter); test_runner_with_fp8_cache_on_cuda on a GPU")
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_runner_with_fp8_cache_matches_transformers_rounding_kv(arch, backend, tmp_path):
    """The model runner's mixed batch (chunked prefill, prefix hit, decodes) with an fp8 cache, through the torch
    backend and the Triton kernels (interpreter), against Transformers rounding its keys and values the same way
    (tests.executor.helpers.kv_rounded_to_fp8)."""
    from tests.executor.test_model_runner import run_mixed_batch_against_hf

    run_mixed_batch_against_hf(arch, tmp_path, "cpu", backend, tolerance=1e-4, kv_cache_dtype="fp8")


def test_runner_with_fp8_cache_is_checked_against_the_rounding(tmp_path, monkeypatch):
    """Without the reference's rounding the same run misses the tolerance: the check above sees the fp8 cache."""
    import contextlib

    from tests.executor import test_model_runner

    monkeypatch.setattr(test_model_runner, "kv_rounded_to_fp8", lambda hf, scales=None: contextlib.nullcontext())
    with pytest.raises(AssertionError):
        test_model_runner.run_mixed_batch_against_hf("qwen2", tmp_path, "cpu", "torch", tolerance=1e-4,
                                                     kv_cache_dtype="fp8")


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_runner_with_fp8_cache_on_cuda(backend, tmp_path):
    """The same on the GPU, compiled kernels (the Triton path's fp32 dots are ieee; 5e-3 as the 16-bit cache's
    CUDA test allows for the kernels' other fp32 orderings)."""
    from tests.executor.test_model_runner import run_mixed_batch_against_hf

    run_mixed_batch_against_hf("qwen2", tmp_path, "cuda", backend, tolerance=5e-3 if backend == "triton" else 1e-4,
                               kv_cache_dtype="fp8")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_runner_fp8_cache_with_checkpoint_kv_scales(arch, tmp_path):
    """A checkpoint's KV-cache scales folded into the weights (executor/kv_scales.py), through the Triton kernels
    (interpreter on CPU, compiled on CUDA), against Transformers rounding K / p and V / p."""
    from tests.executor.test_kv_cache_dtype import SCALES
    from tests.executor.test_model_runner import run_mixed_batch_against_hf

    run_mixed_batch_against_hf(arch, tmp_path, DEVICE.type, "triton", tolerance=5e-3 if CUDA else 1e-4,
                               kv_cache_dtype="fp8", kv_scales=SCALES)
