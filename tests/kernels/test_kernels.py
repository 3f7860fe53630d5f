"""Triton paged-attention kernels vs a plain-torch float64 reference.

Without CUDA the kernels run under TRITON_INTERPRET=1 (see conftest.py) on CPU tensors, fp32/fp16,
small shapes. With CUDA the same cases run compiled, plus bf16 and larger (Qwen2-7B-like) shapes.

Every case draws fresh random inputs; outputs are poisoned (NaN) before the launch, and every cache
slot that holds no token of any sequence is NaN too, including block 0 (the block-table padding): a
kernel that reads past a sequence, or leaves an output element unwritten, produces NaN and fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import pytest
import torch

from pagedserve.executor.attention.base import AttentionMetadata
from pagedserve.executor.attention.triton_backend import TritonAttentionBackend
from pagedserve.executor.kernels.kv_cache_write import write_kv_cache
from pagedserve.executor.kernels.paged_attention_decode import (
    decode_work_list,
    longest_first_order,
    paged_attention_decode,
    uses_work_list,
    work_capacity,
)
from pagedserve.executor.kernels.paged_attention_prefill import paged_attention_prefill

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# bf16 tl.dot is wrong in the interpreter (a bf16 load + cast is fine): bf16 only on the GPU.
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
TOL = {torch.float32: 2e-3 if CUDA else 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
gpu_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")


# ----------------------------------------------------------------------------------------------
# Batch construction and the reference
# ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [T, Hkv, D] new tokens' K (not yet in the cache)
    value: torch.Tensor
    kv_cache: torch.Tensor  # cached prefixes written, everything else NaN
    full_cache: torch.Tensor  # what the cache must hold after the step's write (reference input)
    meta: AttentionMetadata


def make_batch(
    spec: list[tuple[int, int]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    share_prefix: tuple[int, int, int] | None = None,
    num_pad_tokens: int = 0,
    extra_blocks: int = 3,
) -> Batch:
    """spec: (ctx_len, q_len) per sequence: ctx_len cached tokens, then q_len new ones.

    share_prefix=(src, dst, num_blocks): sequence dst's first num_blocks blocks are sequence src's
    physical blocks (a prefix-cache hit; both must cache at least that many full blocks).
    Physical blocks are a random permutation (block 0 stays unused: it is the table padding).
    num_pad_tokens adds trailing padding tokens (slot -1) after the real ones.
    """
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    seq_lens = [c + q for c, q in spec]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + extra_blocks
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables: list[list[int]] = []
    for nb in blocks_per_seq:
        tables.append(perm[:nb])
        perm = perm[nb:]
    if share_prefix is not None:
        src, dst, n = share_prefix
        assert spec[src][0] >= n * block_size and spec[dst][0] >= n * block_size
        tables[dst][:n] = tables[src][:n]
    max_blocks = max(blocks_per_seq) + 1  # one column of padding (0) beyond every sequence
    block_tables = torch.zeros(len(spec), max_blocks, dtype=torch.int32)
    for s, t in enumerate(tables):
        block_tables[s, : len(t)] = torch.tensor(t, dtype=torch.int32)

    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    kv_cache = torch.full(shape, float("nan"), dtype=dtype)
    full_cache = kv_cache.clone()
    # Per-sequence K/V of every position; shared blocks get the source sequence's values.
    kv_seq = [torch.randn(2, s, num_kv_heads, head_dim, generator=g).to(dtype) for s in seq_lens]
    if share_prefix is not None:
        src, dst, n = share_prefix
        kv_seq[dst][:, : n * block_size] = kv_seq[src][:, : n * block_size]

    num_tokens = sum(q for _, q in spec)
    keys, values, slots, query_start_loc = [], [], [], [0]
    for s, ((ctx, q), kv) in enumerate(zip(spec, kv_seq)):
        pos = torch.arange(seq_lens[s])
        slot = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        flat = full_cache.view(2, -1, num_kv_heads, head_dim)
        flat[:, slot] = kv
        kv_cache.view(2, -1, num_kv_heads, head_dim)[:, slot[:ctx]] = kv[:, :ctx]
        keys.append(kv[0, ctx:])
        values.append(kv[1, ctx:])
        slots.append(slot[ctx:])
        query_start_loc.append(query_start_loc[-1] + q)
    pad = num_pad_tokens
    key = torch.cat(keys + [torch.randn(pad, num_kv_heads, head_dim, generator=g).to(dtype)])
    value = torch.cat(values + [torch.randn(pad, num_kv_heads, head_dim, generator=g).to(dtype)])
    slot_mapping = torch.cat(slots + [torch.full((pad,), -1, dtype=torch.long)])
    query = torch.randn(num_tokens + pad, num_heads, head_dim, generator=g).to(dtype)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        slot_mapping=slot_mapping.to(DEVICE),
        max_query_len=max(q for _, q in spec),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_lens_cpu=[q for _, q in spec],
        seq_lens_cpu=seq_lens,
        is_decode_only=all(q == 1 for _, q in spec),
    )
    to = {"device": DEVICE}
    return Batch(query.to(**to), key.to(**to), value.to(**to), kv_cache.to(**to), full_cache.to(**to), meta)


def reference_attention(query, cache, meta: AttentionMetadata, scale: float, window: int | None = None,
                        softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch, float64: gather blocks, GQA by repeat, causal offset mask (and a sliding window: the last
    `window` positions, itself included), softmax. sinks [num_heads] (gpt-oss): a column of each head's sink logit
    appended before the softmax, its probability dropped after (a sequence of length 0 then gives zeros)."""
    num_heads = query.shape[1]
    _, _, block_size, num_kv_heads, head_dim = cache.shape
    qsl = meta.query_start_loc.tolist()
    out = torch.zeros(qsl[-1], num_heads, head_dim, dtype=torch.float64)
    for s, seq_len in enumerate(meta.seq_lens.tolist()):
        q = query[qsl[s] : qsl[s + 1]].double().cpu()
        q_len = q.shape[0]
        blocks = meta.block_tables[s, : math.ceil(seq_len / block_size)].long().cpu()
        kv = cache[:, blocks].double().cpu().reshape(2, -1, num_kv_heads, head_dim)[:, :seq_len]
        k, v = (t.repeat_interleave(num_heads // num_kv_heads, dim=1) for t in kv)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        pos = seq_len - q_len + torch.arange(q_len)
        visible = torch.arange(seq_len)[None, :] <= pos[:, None]
        if window is not None:
            visible &= torch.arange(seq_len)[None, :] > pos[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink_column = sinks.double().cpu()[:, None, None].expand(num_heads, q_len, 1)
            probs = torch.cat([scores, sink_column], dim=-1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        out[qsl[s] : qsl[s + 1]] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out = out.double().cpu()
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} unwritten/NaN elements"
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < TOL[dtype], f"relative error {rel:.2e} >= {TOL[dtype]:.0e}"


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


# ----------------------------------------------------------------------------------------------
# KV cache write
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_size,num_kv_heads,head_dim", [(8, 2, 64), (16, 4, 128), (32, 1, 64)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_cache_write(block_size, num_kv_heads, head_dim, dtype):
    num_blocks, num_tokens, num_heads = 6, 23, 2 * num_kv_heads
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[torch.randperm(num_tokens)[:4]] = -1  # padding tokens
    # key/value as strided views of a fused qkv projection, as the model produces them.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype).to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    key = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    cache = cache.to(DEVICE)
    expected = cache.clone()
    real = slots >= 0
    expected[0].view(-1, num_kv_heads, head_dim)[slots[real].to(DEVICE)] = key[real.to(DEVICE)]
    expected[1].view(-1, num_kv_heads, head_dim)[slots[real].to(DEVICE)] = value[real.to(DEVICE)]

    write_kv_cache(key, value, cache, slots.to(DEVICE))
    torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------

# (block_size, head_dim, num_heads, num_kv_heads): GQA ratios 7, 4, 2, 1.
DECODE_SHAPES = [(16, 64, 14, 2), (32, 128, 8, 2), (16, 128, 4, 2), (8, 64, 4, 4)]


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "bs{}-d{}-hq{}-hkv{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode(shape, dtype, num_splits):
    block_size, head_dim, num_heads, num_kv_heads = shape
    # Context lengths not multiples of the block size; 1 = a fresh one-token prompt. Sequences 1 and
    # 3 share their first two physical blocks (prefix cache); the block table order is random.
    spec = [(36, 1), (2 * block_size + 5, 1), (0, 1), (2 * block_size + 13, 1)]
    b = make_batch(
        spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, share_prefix=(1, 3, 2),
    )  # fmt: skip
    scale = head_dim**-0.5
    out = poisoned_like(b.query)
    paged_attention_decode(
        b.query, b.full_cache, b.meta.block_tables, b.meta.seq_lens, scale,
        out=out, num_splits=num_splits, block_n=16,
    )  # fmt: skip
    assert_close(out, reference_attention(b.query, b.full_cache, b.meta, scale), dtype)


@gpu_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_gpu_fp32_attention_is_full_precision(num_splits):
    """fp32 caches get fp32 dots on the GPU, not TF32 (Triton's default for fp32 operands, 10-bit
    mantissas: ~1e-4-1e-3 off here): decode and prefill within 2e-5 of the float64 reference."""
    spec = [(36, 1), (2 * 16 + 5, 1), (0, 1), (2 * 16 + 13, 1)]
    b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=128, block_size=16, dtype=torch.float32)
    out = poisoned_like(b.query)
    paged_attention_decode(b.query, b.full_cache, b.meta.block_tables, b.meta.seq_lens, 0.09, out=out,
                           num_splits=num_splits, block_n=16)  # fmt: skip
    ref = reference_attention(b.query, b.full_cache, b.meta, 0.09)
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < 2e-5
    p = make_batch([(0, 37), (21, 19)], num_heads=8, num_kv_heads=2, head_dim=128, block_size=16, dtype=torch.float32)
    out = poisoned_like(p.query)
    paged_attention_prefill(p.query, p.full_cache, p.meta.query_start_loc, p.meta.seq_lens, p.meta.block_tables, 0.09,
                            p.meta.max_query_len, out=out)  # fmt: skip
    ref = reference_attention(p.query, p.full_cache, p.meta, 0.09)
    assert ((out.double().cpu() - ref).norm() / ref.norm()).item() < 2e-5


@pytest.mark.parametrize("num_splits", [2, 5])
def test_decode_splits_with_empty_and_zero_length(num_splits):
    """More splits than tiles (empty splits), a padded CUDA-graph slot (seq_len 0 -> zeros)."""
    dtype = DTYPES[0]
    b = make_batch([(4, 1), (40, 1), (70, 1)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                   dtype=dtype)  # fmt: skip
    seq_lens = torch.cat([b.meta.seq_lens, torch.zeros(1, dtype=torch.int32, device=DEVICE)])
    block_tables = torch.cat([b.meta.block_tables, torch.zeros_like(b.meta.block_tables[:1])])
    query = torch.cat([b.query, torch.randn_like(b.query[:1])])
    out = poisoned_like(query)
    paged_attention_decode(
        query, b.full_cache, block_tables, seq_lens, 0.125, out=out, num_splits=num_splits, block_n=16
    )
    assert_close(out[:3], reference_attention(b.query, b.full_cache, b.meta, 0.125), dtype)
    assert torch.equal(out[3].cpu(), torch.zeros_like(out[3]).cpu())


def make_order(kind: str, seq_lens: list[int]) -> torch.Tensor:
    if kind == "longest":
        order = torch.from_numpy(longest_first_order(seq_lens))
    else:
        order = torch.randperm(len(seq_lens)).to(torch.int32)
    return order.to(DEVICE)


def assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    """The order changes only which program runs when: the interpreter gives the same bits. Compiled,
    the ordered variant is a separate kernel binary: allow rounding-level differences."""
    if CUDA:
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3, equal_nan=True)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def with_padded_slots(b, pad: list[int], dtype):
    """The batch's decode inputs with padded CUDA-graph slots (seq_len 0, random query) at rows `pad`:
    returns (the real rows, query, seq_lens, block_tables)."""
    n = b.query.shape[0] + len(pad)
    real = [i for i in range(n) if i not in pad]
    seq_lens = torch.zeros(n, dtype=torch.int32, device=DEVICE)
    seq_lens[real] = b.meta.seq_lens
    block_tables = torch.zeros(n, b.meta.block_tables.shape[1], dtype=torch.int32, device=DEVICE)
    block_tables[real] = b.meta.block_tables
    query = torch.randn(n, *b.query.shape[1:]).to(dtype).to(DEVICE)
    query[real] = b.query
    return real, query, seq_lens, block_tables


@pytest.mark.parametrize("shape", [DECODE_SHAPES[0], DECODE_SHAPES[3]], ids=lambda s: "bs{}-d{}-hq{}-hkv{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_seq_order(shape, dtype, num_splits):
    """seq_order (random, longest-first) permutes only the launch order: the same output as the unordered
    call, including the padded CUDA-graph slots (seq_len 0, in the middle and at the end) that must be 0."""
    block_size, head_dim, num_heads, num_kv_heads = shape
    spec = [(36, 1), (3 * block_size + 5, 1), (0, 1), (2 * block_size + 13, 1), (36, 1), (9, 1)]
    b = make_batch(
        spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, share_prefix=(1, 3, 2),
    )  # fmt: skip
    pad = [1, len(spec) + 1]  # rows of the padded slots in the launch's batch
    real, query, seq_lens, block_tables = with_padded_slots(b, pad, dtype)
    lens = seq_lens.tolist()
    longest = make_order("longest", lens)
    # descending, ties in index order (Python's sort is stable), padded slots last
    assert longest.tolist() == sorted(range(len(lens)), key=lambda i: -lens[i])
    assert longest.tolist()[-2:] == pad
    scale = head_dim**-0.5
    ref = reference_attention(b.query, b.full_cache, b.meta, scale)
    outs = []
    for seq_order in (None, make_order("random", lens), longest):
        out = poisoned_like(query)
        paged_attention_decode(
            query, b.full_cache, block_tables, seq_lens, scale, out=out, num_splits=num_splits, block_n=16,
            seq_order=seq_order,
        )  # fmt: skip
        assert_close(out[real], ref, dtype)
        assert torch.equal(out[pad].cpu(), torch.zeros_like(out[pad]).cpu())
        outs.append(out)
    assert_same(outs[1], outs[0])
    assert_same(outs[2], outs[0])


def test_decode_work_list_covers_each_sequence():
    """Host side: chunks tile each sequence exactly, split sequences own consecutive part rows, longest
    chunks first, padding to a capacity with seq -1; the item count stays within work_capacity."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        lens = rng.integers(1, 3000, size=rng.integers(1, 300))
        num_sms, kv = int(rng.choice([8, 132])), int(rng.choice([1, 2, 4, 8]))
        cap = work_capacity(len(lens), kv, num_sms)
        work = decode_work_list(lens, kv, num_sms, 64, capacity=cap)
        assert work.shape == (6, cap) and work.dtype == np.int32
        seq, lo, hi, part, base, nparts = work[:, work[0] >= 0]
        assert (work[:, work[0] < 0] == -1).all()
        sizes = hi - lo
        assert (sizes > 0).all() and (np.diff(sizes) <= 0).all()  # longest first
        full = sizes[(nparts > 1) & (hi < lens[seq])]  # chunks of split sequences but their last
        if len(full):
            assert (full == full[0]).all() and full[0] % 64 == 0
            assert full[0] >= (256 if len(lens) * kv >= num_sms else 64)  # small batches: one-tile chunks
        for s, length in enumerate(lens):
            mine = np.flatnonzero(seq == s)
            spans = sorted(zip(lo[mine], hi[mine]))
            assert spans[0][0] == 0 and spans[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert (nparts[mine] == len(mine)).all()
            if len(mine) == 1:
                assert part[mine][0] == -1 and base[mine][0] == -1
            else:
                assert sorted(part[mine].tolist()) == list(range(base[mine][0], base[mine][0] + len(mine)))
        used = part[part >= 0]
        assert len(set(used.tolist())) == len(used) and len(used) <= 2 * (int((work[0] >= 0).sum()) - len(lens))
    with pytest.raises(ValueError, match="capacity"):
        decode_work_list([5000, 5000], 4, 132, 64, capacity=2)
    assert uses_work_list(33, 4, 132) and not uses_work_list(32, 4, 132)


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "bs{}-d{}-hq{}-hkv{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_work_list_matches_reference(shape, dtype):
    """The work path (sequences cut into chunks, the last chunk to finish merges) against the float64
    reference: split and unsplit sequences, ragged lengths, a shared prefix, a padded slot (seq_len 0,
    zeros), a capacity-padded list (a CUDA graph's grid), and twice in a row (the counters reset)."""
    block_size, head_dim, num_heads, num_kv_heads = shape
    spec = [(150, 1), (3 * block_size + 5, 1), (0, 1), (2 * block_size + 13, 1), (97, 1), (9, 1)]
    b = make_batch(
        spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, share_prefix=(1, 3, 2),
    )  # fmt: skip
    pad = [2]  # a padded slot in the middle of the launch's batch
    real, query, seq_lens, block_tables = with_padded_slots(b, pad, dtype)
    ref = reference_attention(b.query, b.full_cache, b.meta, head_dim**-0.5)
    lens = seq_lens.cpu().numpy()
    # 64 "SMs": chunks of 16 tokens here, so the 150-token sequence runs as 10 chunks.
    exact = decode_work_list(lens, num_kv_heads, 64, 16, min_chunk=16)
    assert (exact[5] > 1).any() and (exact[5] == 1).any()
    padded = decode_work_list(lens, num_kv_heads, 64, 16, capacity=exact.shape[1] + 5, min_chunk=16)
    for work in (exact, padded, exact):
        out = poisoned_like(query)
        paged_attention_decode(query, b.full_cache, block_tables, seq_lens, head_dim**-0.5, out=out, block_n=16,
                               work=torch.from_numpy(work).to(DEVICE))  # fmt: skip
        assert_close(out[real], ref, dtype)
        assert torch.equal(out[pad].cpu(), torch.zeros_like(out[pad]).cpu())


def test_decode_work_list_small_batch_one_tile_chunks():
    """A batch short of the SMs: chunks of one tile (block_n), a single long sequence merged from all."""
    dtype = DTYPES[0]
    b = make_batch([(300, 1)], num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    work = decode_work_list(b.meta.seq_lens.cpu().numpy(), 2, 64, 16)
    assert work.shape[1] == 19 and (work[2] - work[1]).max() == 16  # 301 tokens: 19 chunks of <= 16
    out = poisoned_like(b.query)
    paged_attention_decode(b.query, b.full_cache, b.meta.block_tables, b.meta.seq_lens, 0.125, out=out, block_n=16,
                           work=torch.from_numpy(work).to(DEVICE))  # fmt: skip
    assert_close(out, reference_attention(b.query, b.full_cache, b.meta, 0.125), dtype)


def test_merge_counters_grow_and_keep_the_old_buffer():
    from pagedserve.executor.kernels import paged_attention_decode as pad

    device = torch.device(DEVICE)
    first = pad.merge_counters(device, 10)
    assert pad.merge_counters(device, 10) is first and first.numel() >= 10 and not first.any()
    bigger = pad.merge_counters(device, first.numel() + 1)
    assert bigger.numel() > first.numel() and not bigger.any()
    assert any(t is first for t in pad._RETIRED)  # a graph captured with it may still replay it


def test_decode_work_invalid():
    b = make_batch([(20, 1), (30, 1)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=DTYPES[0])
    work = torch.from_numpy(decode_work_list(b.meta.seq_lens.cpu().numpy(), 2, 8, 16, min_chunk=16)).to(DEVICE)
    call = partial(paged_attention_decode, b.query, b.full_cache, b.meta.block_tables, b.meta.seq_lens, 0.1)
    with pytest.raises(ValueError, match="work must be int32"):
        call(work=work.long())
    with pytest.raises(ValueError, match="work must be int32"):
        call(work=work[:5])
    with pytest.raises(ValueError, match="work takes"):
        call(work=work, num_splits=2)
    with pytest.raises(ValueError, match="work takes"):
        call(work=work, seq_order=torch.arange(2, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_seq_order_mixed(num_splits):
    """Mixed batch: the ordered decode kernel (query_start_loc) does the one-token sequences at their
    own rows and leaves every other row (prefill tokens, padding) alone, as the unordered one does."""
    dtype = DTYPES[0]
    block_size, head_dim, num_heads, num_kv_heads = 16, 64, 14, 2
    spec = [(0, 37), (40, 1), (2 * block_size, 11), (3 * block_size + 3, 1), (0, 1), (21, 19), (70, 1)]
    b = make_batch(
        spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, share_prefix=(3, 2, 2), num_pad_tokens=2,
    )  # fmt: skip
    m, scale = b.meta, head_dim**-0.5
    outs = []
    for seq_order in (None, make_order("random", m.seq_lens_cpu), make_order("longest", m.seq_lens_cpu)):
        out = poisoned_like(b.query)
        paged_attention_decode(
            b.query, b.full_cache, m.block_tables, m.seq_lens, scale, out=out, num_splits=num_splits,
            block_n=16, query_start_loc=m.query_start_loc, seq_order=seq_order,
        )  # fmt: skip
        outs.append(out)
    for out in outs[1:]:
        assert_same(out, outs[0])  # decode rows equal; every other row still NaN in both
    out = outs[2]  # longest-first: the prefill kernel fills the rest, then the whole batch is checked
    paged_attention_prefill(
        b.query, b.full_cache, m.query_start_loc, m.seq_lens, m.block_tables, scale, m.max_query_len,
        out=out, block_m=16, block_n=16, skip_decodes=True,
    )  # fmt: skip
    num_real = m.query_start_loc[-1].item()
    assert_close(out[:num_real], reference_attention(b.query, b.full_cache, m, scale), dtype)
    assert torch.isnan(out[num_real:]).all(), "padding rows must be left alone"


def test_decode_seq_order_non_contiguous():
    dtype = DTYPES[0]
    b = make_batch([(30, 1), (5, 1), (50, 1)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    order = torch.tensor([[2, 9], [0, 9], [1, 9]], dtype=torch.int32, device=DEVICE)[:, 0]
    assert not order.is_contiguous()
    out = poisoned_like(b.query)
    paged_attention_decode(
        b.query, b.full_cache, b.meta.block_tables, b.meta.seq_lens, 0.125, out=out, num_splits=2, block_n=16,
        seq_order=order,
    )  # fmt: skip
    assert_close(out, reference_attention(b.query, b.full_cache, b.meta, 0.125), DTYPES[0])


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_seq_order_is_used(num_splits):
    """The kernel really looks the sequence up: an order that misses sequence 1 (values are not checked
    on the host, as that would sync) leaves its row unwritten, or with splits reduced from scratch that
    no program wrote."""
    dtype = DTYPES[0]
    b = make_batch([(30, 1), (5, 1), (50, 1)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    out = poisoned_like(b.query)
    paged_attention_decode(
        b.query, b.full_cache, b.meta.block_tables, b.meta.seq_lens, 0.125, out=out, num_splits=num_splits,
        block_n=16, seq_order=torch.tensor([2, 0, 2], dtype=torch.int32, device=DEVICE),
    )  # fmt: skip
    ref = reference_attention(b.query, b.full_cache, b.meta, 0.125)
    assert_close(out[[0, 2]], ref[[0, 2]], dtype)
    if num_splits == 1:
        assert torch.isnan(out[1]).all()
    else:
        assert not torch.allclose(out[1].double().cpu(), ref[1], atol=1e-3)


@pytest.mark.parametrize(
    "bad",
    [
        torch.tensor([2, 1, 0], dtype=torch.int64),  # dtype
        torch.tensor([1, 0], dtype=torch.int32),  # too short
        torch.tensor([1, 0, 2, 3], dtype=torch.int32),  # too long
        torch.tensor([[2, 1, 0]], dtype=torch.int32),  # 2-D
        torch.tensor([2.0, 1.0, 0.0]),  # float
    ],
    ids=["int64", "short", "long", "2d", "float"],
)
def test_decode_seq_order_invalid(bad):
    b = make_batch([(3, 1), (20, 1), (7, 1)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                   dtype=DTYPES[0])  # fmt: skip
    with pytest.raises(ValueError, match="seq_order"):
        paged_attention_decode(b.query, b.full_cache, b.meta.block_tables, b.meta.seq_lens, 0.125,
                               seq_order=bad.to(DEVICE))  # fmt: skip


def test_longest_first_order():
    lens = [5, 17, 0, 17, 3, 0, 5, 40]
    expected = [7, 1, 3, 0, 6, 4, 2, 5]  # descending; equal lengths keep their index order
    got = longest_first_order(lens)
    assert got.dtype == np.int32 and got.tolist() == expected
    assert longest_first_order(np.array(lens, dtype=np.int32)).tolist() == expected
    assert longest_first_order(np.array(lens, dtype=np.uint32)).tolist() == expected  # no unsigned wrap
    out = np.full(len(lens), -1, dtype=np.int32)
    assert longest_first_order(lens, out=out) is out and out.tolist() == expected
    pinned_view = torch.full((len(lens),), -1, dtype=torch.int32).numpy()  # as the runner's pinned buffer
    longest_first_order(np.array(lens), out=pinned_view)
    assert pinned_view.tolist() == expected
    assert longest_first_order([]).shape == (0,)
    with pytest.raises(ValueError):
        longest_first_order(lens, out=np.zeros(len(lens), dtype=np.int64))
    with pytest.raises(ValueError):
        longest_first_order([[1, 2]])


# ----------------------------------------------------------------------------------------------
# Prefill / extend (mixed batches)
# ----------------------------------------------------------------------------------------------

PREFILL_SHAPES = [(16, 64, 14, 2), (32, 128, 8, 2), (16, 64, 4, 4), (8, 128, 4, 2)]


@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "bs{}-d{}-hq{}-hkv{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_decodes", [False, True], ids=["unified", "split"])
def test_prefill_mixed(shape, dtype, split_decodes):
    """unified: the prefill kernel does every sequence; split: the decode kernel (mixed mode, 2 splits)
    does the one-token sequences and the prefill kernel skips them."""
    block_size, head_dim, num_heads, num_kv_heads = shape
    spec = [
        (0, 37),  # fresh prompt
        (2 * block_size, 11),  # prefix-cache hit: shares sequence 4's first two blocks
        (21, 19),  # chunked prefill: earlier chunk ends mid-block
        (40, 1),  # decode
        (3 * block_size + 3, 1),  # decode
        (0, 1),  # one-token prompt
    ]
    b = make_batch(
        spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, share_prefix=(4, 1, 2), num_pad_tokens=2,
    )  # fmt: skip
    scale = head_dim**-0.5
    out = poisoned_like(b.query)
    m = b.meta
    if split_decodes:
        paged_attention_decode(
            b.query, b.full_cache, m.block_tables, m.seq_lens, scale, out=out, num_splits=2, block_n=16,
            query_start_loc=m.query_start_loc,
        )  # fmt: skip
    paged_attention_prefill(
        b.query, b.full_cache, m.query_start_loc, m.seq_lens, m.block_tables, scale, m.max_query_len,
        out=out, block_m=32 if num_heads // num_kv_heads < 8 else 16, block_n=16, skip_decodes=split_decodes,
    )  # fmt: skip
    num_real = b.meta.query_start_loc[-1].item()
    assert_close(out[:num_real], reference_attention(b.query, b.full_cache, b.meta, scale), dtype)
    assert torch.isnan(out[num_real:]).all(), "padding rows must be left alone"


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (64, 16)])
def test_prefill_tile_shapes(block_m, block_n):
    """Tiles larger/smaller than a cache block, GQA 7 (BLOCK_Q = block_m // 7 leaves padding rows)."""
    dtype = DTYPES[-1]
    spec = [(0, 29), (13, 6), (48, 17)]
    b = make_batch(spec, num_heads=14, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    out = poisoned_like(b.query)
    paged_attention_prefill(
        b.query, b.full_cache, b.meta.query_start_loc, b.meta.seq_lens, b.meta.block_tables, 0.1,
        b.meta.max_query_len, out=out, block_m=block_m, block_n=block_n,
    )  # fmt: skip
    assert_close(out, reference_attention(b.query, b.full_cache, b.meta, 0.1), dtype)


# ----------------------------------------------------------------------------------------------
# Sliding windows (Mistral, Gemma's local layers): each token sees its last `window` keys
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [1, 5, 16, 33, 500])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_window(window, num_splits):
    """Windows shorter than a tile, one tile exactly, across tiles, past every context; contexts not multiples of
    the tile or the block, a one-token prompt; 3 splits (empty ones among them for short windows)."""
    dtype = DTYPES[-1]
    spec = [(36, 1), (2 * 16 + 5, 1), (0, 1), (80, 1), (15, 1)]
    b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=8, dtype=dtype,
                   share_prefix=(1, 3, 2))
    out = poisoned_like(b.query)
    paged_attention_decode(b.query, b.full_cache, b.meta.block_tables, b.meta.seq_lens, 0.125, out=out,
                           num_splits=num_splits, block_n=16, window=window)
    assert_close(out, reference_attention(b.query, b.full_cache, b.meta, 0.125, window), dtype)


@pytest.mark.parametrize("window", [3, 16, 29])
@pytest.mark.parametrize("split_decodes", [False, True], ids=["unified", "split"])
def test_prefill_window(window, split_decodes):
    """A fresh prompt, a chunk after a cached prefix, a prefix-cache hit and decodes, with rows whose window
    starts inside a tile, at a tile boundary, or before the cached prefix ends; padding rows left alone."""
    dtype = DTYPES[-1]
    block_size = 8
    spec = [(0, 37), (2 * block_size, 11), (21, 19), (40, 1), (3 * block_size + 3, 1)]
    b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=block_size, dtype=dtype,
                   share_prefix=(4, 1, 2), num_pad_tokens=2)
    out = poisoned_like(b.query)
    m = b.meta
    if split_decodes:
        paged_attention_decode(b.query, b.full_cache, m.block_tables, m.seq_lens, 0.125, out=out, num_splits=2,
                               block_n=16, query_start_loc=m.query_start_loc, window=window)
    paged_attention_prefill(b.query, b.full_cache, m.query_start_loc, m.seq_lens, m.block_tables, 0.125,
                            m.max_query_len, out=out, block_m=16, block_n=16, skip_decodes=split_decodes,
                            window=window)
    num_real = m.query_start_loc[-1].item()
    assert_close(out[:num_real], reference_attention(b.query, b.full_cache, m, 0.125, window), dtype)
    assert torch.isnan(out[num_real:]).all(), "padding rows must be left alone"


@pytest.mark.parametrize("decode_only", [True, False], ids=["decode", "mixed"])
def test_backends_with_a_window(decode_only):
    """Both backends' forward (cache write, then attention) with a window, against the reference; the Triton
    decode step leaves the step's work list aside (it covers whole contexts)."""
    from pagedserve.executor.attention.torch_ref import TorchAttentionBackend

    dtype = DTYPES[0]
    spec = [(20, 1), (40, 1), (2 * 16 + 9, 1), (0, 1)] if decode_only else [(0, 21), (32, 5), (20, 1), (17, 14)]
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
        if decode_only and isinstance(backend, TritonAttentionBackend):
            work = decode_work_list(b.meta.seq_lens_cpu, 2, 4, 16, work_capacity(len(spec), 2, 4))
            b.meta.decode_work = torch.from_numpy(work).to(DEVICE)
        out = backend.forward(b.query, b.key, b.value, b.kv_cache, b.meta, 0.125, window=9)
        assert_close(out, reference_attention(b.query, b.full_cache, b.meta, 0.125, 9), dtype)


@pytest.mark.parametrize("decode_only", [True, False], ids=["decode", "mixed"])
def test_window_never_reads_the_keys_behind_it(decode_only):
    """Keys behind the window of every query of a sequence are never read: their blocks go back to the pool (a
    windowed model's, a hybrid model's window pool) and may hold another request's keys, or NaN, which a probability
    of 0 would still spread. NaN there changes nothing, through both kernels (decode split, prefill with and without
    the decodes split off) and both backends (batched decodes, SDPA and the plain path)."""
    from pagedserve.executor.attention.torch_ref import TorchAttentionBackend

    dtype, window, block_size = DTYPES[-1], 9, 8
    spec = [(40, 1), (2 * 16 + 9, 1), (21, 1), (5, 1)] if decode_only else [(0, 37), (32, 5), (40, 1), (17, 14)]
    b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=block_size, dtype=dtype)
    m = b.meta
    ref = reference_attention(b.query, b.full_cache, m, 0.125, window)
    poisoned = b.full_cache.clone()
    for s, (ctx, _) in enumerate(spec):
        pos = torch.arange(max(0, ctx - window + 1))  # behind the window of the sequence's first query
        slot = m.block_tables[s].cpu()[pos // block_size].long() * block_size + pos % block_size
        poisoned.view(2, -1, 2, 64)[:, slot.to(poisoned.device)] = float("nan")
    assert torch.isnan(poisoned).sum() > torch.isnan(b.full_cache).sum()
    outs = []
    if decode_only:
        out = poisoned_like(b.query)
        paged_attention_decode(b.query, poisoned, m.block_tables, m.seq_lens, 0.125, out=out, num_splits=2,
                               block_n=16, window=window)
        outs.append(out)
    else:
        for split in (False, True):
            out = poisoned_like(b.query)
            if split:
                paged_attention_decode(b.query, poisoned, m.block_tables, m.seq_lens, 0.125, out=out, num_splits=2,
                                       block_n=16, query_start_loc=m.query_start_loc, window=window)
            paged_attention_prefill(b.query, poisoned, m.query_start_loc, m.seq_lens, m.block_tables, 0.125,
                                    m.max_query_len, out=out, block_m=16, block_n=16, skip_decodes=split,
                                    window=window)
            outs.append(out)
    for backend in (TorchAttentionBackend(), TorchAttentionBackend(batch_decodes=False, fused_prefill=False)):
        outs.append(backend.forward(b.query, b.key, b.value, poisoned.clone(), m, 0.125, window=window))
    for out in outs:
        assert_close(out, ref, dtype)


@pytest.mark.parametrize("window", [None, 16], ids=["full", "window"])
def test_softcap_in_decode_and_prefill(window):
    """Gemma 2's attention soft-capping (cap tanh(score / cap)) in both kernels, with and without a window, decode
    splits and a mixed batch; a small cap (2) so that it changes the result, scores of both signs."""
    dtype = DTYPES[-1]
    spec = [(0, 37), (21, 19), (40, 1), (27, 1)]
    b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=8, dtype=dtype)
    m, scale = b.meta, 0.5
    out = poisoned_like(b.query)
    paged_attention_decode(b.query, b.full_cache, m.block_tables, m.seq_lens, scale, out=out, num_splits=2,
                           block_n=16, query_start_loc=m.query_start_loc, window=window, softcap=2.0)
    paged_attention_prefill(b.query, b.full_cache, m.query_start_loc, m.seq_lens, m.block_tables, scale,
                            m.max_query_len, out=out, block_m=16, block_n=16, skip_decodes=True, window=window,
                            softcap=2.0)
    ref = reference_attention(b.query, b.full_cache, m, scale, window, softcap=2.0)
    assert_close(out, ref, dtype)
    uncapped = reference_attention(b.query, b.full_cache, m, scale, window)
    assert (ref - uncapped).norm() > 0.05 * ref.norm()  # the cap matters at this scale


def test_bad_windows_are_refused():
    b = make_batch([(5, 1)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=8, dtype=DTYPES[0])
    with pytest.raises(ValueError, match="window must be a positive key count"):
        paged_attention_decode(b.query, b.full_cache, b.meta.block_tables, b.meta.seq_lens, 0.1, window=0)
    with pytest.raises(ValueError, match="window must be a positive key count"):
        paged_attention_prefill(b.query, b.full_cache, b.meta.query_start_loc, b.meta.seq_lens, b.meta.block_tables,
                                0.1, 1, window=-3)


# ----------------------------------------------------------------------------------------------
# Backend: write + attention, decode-only and mixed
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decode_only,split_mixed,host_lens",
    [(True, True, True), (False, True, True), (False, True, False), (False, False, True)],
    ids=["decode", "mixed-split", "mixed-split-no-host-lens", "mixed-unified"],
)
def test_backend_forward(decode_only, split_mixed, host_lens):
    dtype = DTYPES[0]
    block_size, head_dim, num_heads, num_kv_heads = 16, 64, 8, 2
    if decode_only:
        spec = [(20, 1), (2 * block_size, 1), (2 * block_size + 9, 1), (0, 1)]
    else:
        spec = [(0, 21), (2 * block_size, 5), (20, 1), (17, 14)]
    b = make_batch(
        spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, share_prefix=(1, 2, 2) if decode_only else None,
    )  # fmt: skip
    assert b.meta.is_decode_only == decode_only
    if not host_lens:
        b.meta.query_lens_cpu = b.meta.seq_lens_cpu = None
    backend = TritonAttentionBackend(decode_num_splits=2 if decode_only else None, split_mixed_decodes=split_mixed)
    out = backend.forward(b.query, b.key, b.value, b.kv_cache, b.meta, 0.125, out=poisoned_like(b.query))
    torch.testing.assert_close(b.kv_cache, b.full_cache, rtol=0, atol=0, equal_nan=True)
    assert_close(out, reference_attention(b.query, b.full_cache, b.meta, 0.125), dtype)


def test_backend_decode_with_seq_order():
    """A backend that wants a sequence order reads it from the metadata (as the runner builds it:
    longest first) and gives the reference result; the padded slot (length 0) stays zero."""
    dtype = DTYPES[0]
    spec = [(20, 1), (70, 1), (5, 1), (0, 0), (41, 1)]
    spec = [(c, q) for c, q in spec if q]  # decodes only
    b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    backend = TritonAttentionBackend(decode_seq_order=True)
    assert backend.wants_seq_order
    order = longest_first_order(b.meta.seq_lens.tolist())
    assert order.tolist() == [1, 3, 0, 2]
    b.meta.seq_order = torch.from_numpy(order).to(b.meta.seq_lens.device)
    out = backend.forward(b.query, b.key, b.value, b.kv_cache, b.meta, 0.125, out=poisoned_like(b.query))
    assert_close(out, reference_attention(b.query, b.full_cache, b.meta, 0.125), dtype)
    assert not TritonAttentionBackend(decode_seq_order=False).wants_seq_order


# ----------------------------------------------------------------------------------------------
# GPU only: larger shapes, bf16, default configs (chosen by the launchers)
# ----------------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 128, 28, 4), (16, 64, 14, 2), (32, 128, 32, 8), (16, 128, 16, 16)])
def test_gpu_large_decode_and_prefill(shape, dtype):
    block_size, head_dim, num_heads, num_kv_heads = shape
    scale = head_dim**-0.5
    decode_spec = [(c, 1) for c in (1, 15, 517, 2049, 4000, 33, 1200, 3)]
    b = make_batch(decode_spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   block_size=block_size, dtype=dtype, share_prefix=(3, 4, 30))  # fmt: skip
    out = TritonAttentionBackend().forward(
        b.query, b.key, b.value, b.kv_cache, b.meta, scale, out=poisoned_like(b.query)
    )
    assert_close(out, reference_attention(b.query, b.full_cache, b.meta, scale), dtype)

    mixed_spec = [(0, 700), (512, 300), (1000, 1), (333, 129), (64, 64), (2000, 1), (0, 1)]
    for split_mixed in (True, False):
        b = make_batch(mixed_spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, dtype=dtype, share_prefix=(1, 4, 64 // block_size),
                       num_pad_tokens=3)  # fmt: skip
        out = TritonAttentionBackend(split_mixed_decodes=split_mixed).forward(
            b.query, b.key, b.value, b.kv_cache, b.meta, scale, out=poisoned_like(b.query)
        )
        num_real = b.meta.query_start_loc[-1].item()
        assert_close(out[:num_real], reference_attention(b.query, b.full_cache, b.meta, scale), dtype)


@gpu_only
def test_gpu_decode_cuda_graph():
    """Capture a decode step, then replay with different seq_lens/tables/queries in the same buffers."""
    dtype, scale = torch.bfloat16, 128**-0.5
    kw = dict(num_heads=28, num_kv_heads=4, head_dim=128, block_size=16, dtype=dtype)
    b = make_batch([(c, 1) for c in (100, 900, 3000, 5)], extra_blocks=200, **kw)
    backend = TritonAttentionBackend()
    static = [b.query.clone(), b.key.clone(), b.value.clone(), b.kv_cache.clone()]
    meta = b.meta
    meta.max_seq_len = 4096  # capture for the largest context the graph will see
    backend.forward(*static, meta, scale)  # warm-up compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(*static, meta, scale)
    for _ in range(2):
        b2 = make_batch([(c, 1) for c in (3000, 7, 1500, 60)], **kw)
        # same tensor shapes: block tables may be narrower; copy into the captured buffers
        assert b2.kv_cache.shape[1] <= static[3].shape[1]
        static[0].copy_(b2.query)
        static[1].copy_(b2.key)
        static[2].copy_(b2.value)
        static[3].fill_(float("nan"))
        static[3][:, : b2.kv_cache.shape[1]].copy_(b2.kv_cache)
        meta.seq_lens.copy_(b2.meta.seq_lens)
        meta.slot_mapping.copy_(b2.meta.slot_mapping)
        meta.block_tables.zero_()
        meta.block_tables[:, : b2.meta.block_tables.shape[1]].copy_(b2.meta.block_tables)
        graph.replay()
        torch.cuda.synchronize()
        full = static[3].clone()
        full[:, : b2.full_cache.shape[1]].copy_(b2.full_cache)
        assert_close(out, reference_attention(static[0], full, meta, scale), dtype)
