"""Decode attention that rotates q and the new key and writes the new K/V itself (paged_attention_decode's
new_kv, PAGEDSERVE_DECODE_ROPE_KV) against the two-kernel path it replaces: rotary_and_write_kv_cache, then
paged_attention_decode. Interpreter on CPU (fp32/fp16), compiled on CUDA (fp16/bf16). Fresh random inputs;
the cache is NaN everywhere but the cached prefixes (so a missing write or a read of an unwritten slot
shows), outputs poisoned. Every launch mode: one program per sequence, splits, a launch order, the work
list; padded CUDA-graph slots (seq_len 0, slot -1) must write nothing and output zeros; and the float64
reference on the rotated inputs."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.attention.triton_backend import TritonAttentionBackend
from pagedserve.executor.kernels.paged_attention_decode import decode_work_list, paged_attention_decode
from pagedserve.executor.kernels.rotary_kv_write import rotary_and_write_kv_cache
from pagedserve.executor.layers import RopeStep
from tests.kernels.test_kernels import (
    CUDA,
    DEVICE,
    DTYPES,
    assert_close,
    make_batch,
    make_order,
    poisoned_like,
    reference_attention,
    with_padded_slots,
)

# Exact in the interpreter (the same arithmetic in the same order); on the GPU the compiler may contract the
# rotation's multiply-adds differently in the two kernels: one bf16 rounding step.
CACHE_TOL = {"rtol": 0, "atol": 1e-2 if CUDA else 0.0, "equal_nan": True}
OUT_TOL = {"rtol": 2e-2, "atol": 2e-3} if CUDA else {"rtol": 0, "atol": 0}


def rope_cache(max_pos: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)


def padded_step(b, pad: list[int], dtype):
    """The decode step with padded graph slots at rows `pad`: query, key, value, positions, slot_mapping,
    seq_lens, block_tables, and the real rows."""
    real, query, seq_lens, block_tables = with_padded_slots(b, pad, dtype)
    n = query.shape[0]
    key = torch.randn(n, *b.key.shape[1:]).to(dtype).to(DEVICE)
    value = torch.randn(n, *b.value.shape[1:]).to(dtype).to(DEVICE)
    key[real], value[real] = b.key, b.value
    positions = torch.zeros(n, dtype=torch.long, device=DEVICE)
    positions[real] = (b.meta.seq_lens - 1).long()
    slots = torch.full((n,), -1, dtype=torch.long, device=DEVICE)
    slots[real] = b.meta.slot_mapping
    return query, key, value, positions, slots, seq_lens, block_tables, real


def launch_kwargs(mode: str, seq_lens: torch.Tensor, num_kv_heads: int) -> dict:
    if mode == "work":
        work = decode_work_list(seq_lens.cpu().numpy(), num_kv_heads, 64, 16, min_chunk=16)
        return {"work": torch.from_numpy(work).to(DEVICE)}
    if mode == "ordered":
        return {"num_splits": 3, "seq_order": make_order("longest", seq_lens.tolist())}
    return {"num_splits": 3 if mode == "split" else 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["plain", "split", "ordered", "work"])
@pytest.mark.parametrize("shape", [(16, 64, 14, 2), (8, 128, 4, 4)], ids=lambda s: "bs{}-d{}-hq{}-hkv{}".format(*s))
def test_matches_rotary_kv_write_then_decode(shape, mode, dtype):
    block_size, head_dim, num_heads, num_kv_heads = shape
    # Ragged contexts; 0 = a one-token prompt; one sequence long enough for several chunks or splits.
    spec = [(150, 1), (3 * block_size + 5, 1), (0, 1), (2 * block_size + 13, 1), (block_size - 1, 1)]
    b = make_batch(spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   block_size=block_size, dtype=dtype, share_prefix=(1, 3, 2))  # fmt: skip
    query, key, value, positions, slots, seq_lens, block_tables, real = padded_step(b, [2, len(spec) + 1], dtype)
    pad = [i for i in range(query.shape[0]) if i not in real]
    cos_sin = rope_cache(512, head_dim)
    scale = head_dim**-0.5
    kwargs = launch_kwargs(mode, seq_lens, num_kv_heads)

    # The two-kernel path: rotate q/k in place and write, then attend.
    q_ref, k_ref, cache_ref = query.clone(), key.clone(), b.kv_cache.clone()
    rotary_and_write_kv_cache(q_ref, k_ref, value, positions, cos_sin, cache_ref, slots)
    out_ref = paged_attention_decode(q_ref, cache_ref, block_tables, seq_lens, scale, out=poisoned_like(query),
                                     block_n=16, **kwargs)  # fmt: skip

    for _ in range(2):  # the work list's merge counters must be back at zero for the second run
        cache, q_in = b.kv_cache.clone(), query.clone()
        out = paged_attention_decode(q_in, cache, block_tables, seq_lens, scale, out=poisoned_like(query), block_n=16,
                                     new_kv=(key, value, positions, cos_sin, slots), **kwargs)  # fmt: skip
        assert torch.equal(q_in.cpu(), query.cpu())  # the query is read, not rotated in place
        # The same K/V written (padded slots: nothing), every other slot untouched.
        torch.testing.assert_close(cache.cpu(), cache_ref.cpu(), **CACHE_TOL)
        torch.testing.assert_close(out[real].cpu(), out_ref[real].cpu(), **OUT_TOL)
        assert torch.equal(out[pad].cpu(), torch.zeros_like(out[pad]).cpu())
        # And against float64 attention over the rotated inputs (the reference path's q and cache).
        assert_close(out[real], reference_attention(q_ref[real], cache_ref, b.meta, scale), dtype)


def test_backend_uses_it_for_decode_only_steps(monkeypatch):
    """TritonAttentionBackend with decode_rope_kv: a decode-only step with rope runs no separate rotary/KV
    write (and gives the two-kernel path's output and cache); a mixed step still does."""
    from pagedserve.executor.attention import triton_backend

    dtype = DTYPES[0]
    calls = []
    original = triton_backend.rotary_and_write_kv_cache
    monkeypatch.setattr(triton_backend, "rotary_and_write_kv_cache",
                        lambda *a: calls.append(a[0].shape[0]) or original(*a))
    for spec, expect_calls in (([(37, 1), (5, 1), (16, 1)], 0), ([(37, 1), (0, 6)], 1)):
        b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
        positions = torch.cat([torch.arange(c, c + q) for c, q in spec]).to(DEVICE)
        rope = RopeStep(positions, rope_cache(128, 64), None, None)
        outs, caches = [], []
        for fused in (False, True):
            backend = TritonAttentionBackend()
            backend.decode_rope_kv = fused
            calls.clear()
            cache = b.kv_cache.clone()
            outs.append(backend.forward(b.query.clone(), b.key.clone(), b.value, cache, b.meta, 0.125, rope=rope))
            caches.append(cache)
            assert len(calls) == (expect_calls if fused else 1)
        torch.testing.assert_close(caches[1].cpu(), caches[0].cpu(), **CACHE_TOL)
        torch.testing.assert_close(outs[1].cpu(), outs[0].cpu(), **OUT_TOL)


def test_rejects_bad_new_kv():
    b = make_batch([(5, 1), (9, 1)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=DTYPES[0])
    cos_sin = rope_cache(64, 64)
    args = (b.query, b.kv_cache, b.meta.block_tables, b.meta.seq_lens, 0.125)
    positions = (b.meta.seq_lens - 1).long()
    with pytest.raises(ValueError, match="decode-only"):
        paged_attention_decode(*args, query_start_loc=b.meta.query_start_loc,
                               new_kv=(b.key, b.value, positions, cos_sin, b.meta.slot_mapping))
    with pytest.raises(ValueError, match="key must be"):
        paged_attention_decode(*args, new_kv=(b.key[:, :1], b.value, positions, cos_sin, b.meta.slot_mapping))
    with pytest.raises(ValueError, match="positions / slot_mapping"):
        paged_attention_decode(*args, new_kv=(b.key, b.value, positions[:1], cos_sin, b.meta.slot_mapping))
    with pytest.raises(ValueError, match="cos_sin_cache"):
        paged_attention_decode(*args, new_kv=(b.key, b.value, positions, cos_sin[:, :32], b.meta.slot_mapping))
