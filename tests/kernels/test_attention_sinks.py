"""Attention sinks (gpt-oss) in the decode and prefill kernels against a plain-torch float64 reference.

A sink is one learned logit per query head, appended to each token's scaled (and capped, and masked) scores: it
takes probability mass in the softmax and brings no value. The reference here does exactly that (Transformers'
gpt-oss eager attention): gather each sequence's paged K/V, scores in float64, concatenate the sink column,
softmax, drop the column.

Without CUDA the kernels run in the interpreter (conftest.py) with fp32/fp16 inputs at small shapes; with CUDA the
same cases run compiled (fp16/bf16) plus a larger gpt-oss-like case. Fresh random inputs every case, NaN-poisoned
outputs and unused cache slots (test_kernels.make_batch). Sinks are drawn from N(0, 2), with some heads at +8 (most
of the mass goes to the sink) and differing within each GQA group, so that a sink indexed by the kv head, taken
per split, or in the wrong units shows. Errors are measured per query head: a head whose output the sink shrinks
must be right too, not only drowned in the other heads' norm.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from pagedserve.executor.kernels.paged_attention_decode import (
    decode_work_list,
    longest_first_order,
    paged_attention_decode,
)
from pagedserve.executor.kernels.paged_attention_prefill import paged_attention_prefill
from tests.kernels.test_kernels import (
    CUDA,
    DEVICE,
    DTYPES,
    TOL,
    make_batch,
    poisoned_like,
    reference_attention,
    with_padded_slots,
)

gpu_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# (block_size, head_dim, num_heads, num_kv_heads): GQA 4 and 1, block sizes of the other kernel tests.
SHAPES = [(16, 64, 8, 2), (8, 128, 4, 4)]
SHAPE_IDS = ["bs{}-d{}-hq{}-hkv{}".format(*s) for s in SHAPES]


def draw_sinks(num_heads: int) -> torch.Tensor:
    """N(0, 2) per head, heads 0 and num_heads // 2 + 1 (when there is one) at +8: they give most of their mass to
    the sink. fp32 on the query's device, as the model keeps them."""
    sinks = torch.randn(num_heads) * 2.0
    sinks[0] = 8.0
    if num_heads > 2:
        sinks[num_heads // 2 + 1] = 8.0
    return sinks.to(DEVICE)


def reference_with_sinks(query, cache, block_tables, seq_lens, query_start_loc, scale: float,
                         sinks: torch.Tensor | None, window: int | None = None,
                         softcap: float | None = None) -> torch.Tensor:
    """test_kernels.reference_attention (float64) on these tensors, with the sink column."""
    meta = types.SimpleNamespace(block_tables=block_tables, seq_lens=seq_lens, query_start_loc=query_start_loc)
    return reference_attention(query, cache, meta, scale, window, softcap, sinks)


def decode_query_start_loc(num_seqs: int) -> torch.Tensor:
    return torch.arange(num_seqs + 1, dtype=torch.int32)


def assert_close_per_head(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Every element written (finite), and each query head's relative error (over all rows) within the dtype's
    tolerance."""
    out = out.double().cpu()
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} unwritten/NaN elements"
    for h in range(ref.shape[1]):
        rel = ((out[:, h] - ref[:, h]).norm() / ref[:, h].norm()).item()
        assert rel < TOL[dtype], f"head {h}: relative error {rel:.2e} >= {TOL[dtype]:.0e}"


def assert_sinks_matter(ref: torch.Tensor, ref_without: torch.Tensor) -> None:
    """The sinks change every +8 head's output by most of its size (a kernel that ignores them fails)."""
    changed = (ref - ref_without).norm(dim=(0, 2)) / ref_without.norm(dim=(0, 2))
    assert changed[0] > 0.5, f"the +8 sink of head 0 changed its output by only {changed[0]:.2f}"


# ----------------------------------------------------------------------------------------------
# Decode: one split, several splits (reduce kernel), the work list (chunk merge), sliding windows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_sinks(shape, dtype, num_splits):
    """Contexts not multiples of the block, a one-token prompt, a shared prefix, a padded CUDA-graph slot (length 0:
    only its sink, so zeros); 3 splits: the sink is taken once, in the reduce, not by each split."""
    block_size, head_dim, num_heads, num_kv_heads = shape
    spec = [(36, 1), (2 * block_size + 5, 1), (0, 1), (2 * block_size + 13, 1)]
    b = make_batch(spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   block_size=block_size, dtype=dtype, share_prefix=(1, 3, 2))
    pad = [2]
    real, query, seq_lens, block_tables = with_padded_slots(b, pad, dtype)
    sinks, scale = draw_sinks(num_heads), head_dim**-0.5
    out = poisoned_like(query)
    paged_attention_decode(query, b.full_cache, block_tables, seq_lens, scale, out=out, num_splits=num_splits,
                           block_n=16, sinks=sinks)
    qsl = decode_query_start_loc(len(seq_lens))
    ref = reference_with_sinks(query, b.full_cache, block_tables, seq_lens, qsl, scale, sinks)
    assert_close_per_head(out[real], ref[real], dtype)
    assert torch.equal(out[pad].cpu(), torch.zeros_like(out[pad]).cpu())
    ref_without = reference_with_sinks(query, b.full_cache, block_tables, seq_lens, qsl, scale, None)
    assert_sinks_matter(ref[real], ref_without[real])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_sinks_work_list(shape, dtype):
    """The work path: unsplit sequences take the sink in their one chunk, split ones in the last chunk's merge; a
    padded slot (zeros), a capacity-padded list, and a second launch (the merge counters were reset)."""
    block_size, head_dim, num_heads, num_kv_heads = shape
    spec = [(100, 1), (3 * block_size + 5, 1), (2 * block_size + 13, 1), (9, 1)]
    b = make_batch(spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   block_size=block_size, dtype=dtype, share_prefix=(1, 2, 2))
    pad = [3]
    real, query, seq_lens, block_tables = with_padded_slots(b, pad, dtype)
    sinks, scale = draw_sinks(num_heads), head_dim**-0.5
    ref = reference_with_sinks(query, b.full_cache, block_tables, seq_lens, decode_query_start_loc(len(seq_lens)),
                               scale, sinks)
    lens = seq_lens.cpu().numpy()
    exact = decode_work_list(lens, num_kv_heads, 64, 16, min_chunk=32)  # 101 tokens: 4 chunks of <= 32
    assert (exact[5] > 1).any() and (exact[5] == 1).any()
    padded = decode_work_list(lens, num_kv_heads, 64, 16, capacity=exact.shape[1] + 3, min_chunk=32)
    for work in (exact, padded):
        out = poisoned_like(query)
        paged_attention_decode(query, b.full_cache, block_tables, seq_lens, scale, out=out, block_n=16,
                               work=torch.from_numpy(work).to(DEVICE), sinks=sinks)
        assert_close_per_head(out[real], ref[real], dtype)
        assert torch.equal(out[pad].cpu(), torch.zeros_like(out[pad]).cpu())


@pytest.mark.parametrize("window", [5, 16, 33, 128])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_sinks_window(window, num_splits):
    """Sliding windows with sinks (gpt-oss: 128 keys on every other layer): shorter than a tile, one tile, across
    tiles, and 128 with contexts past it; 3 splits of the window's keys (empty ones for short windows)."""
    dtype = DTYPES[-1]
    spec = [(36, 1), (2 * 16 + 5, 1), (0, 1), (150, 1), (15, 1)]
    b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=8, dtype=dtype,
                   share_prefix=(1, 3, 2))
    sinks, m = draw_sinks(8), b.meta
    out = poisoned_like(b.query)
    paged_attention_decode(b.query, b.full_cache, m.block_tables, m.seq_lens, 0.125, out=out, num_splits=num_splits,
                           block_n=16, window=window, sinks=sinks)
    ref = reference_with_sinks(b.query, b.full_cache, m.block_tables, m.seq_lens, m.query_start_loc, 0.125, sinks,
                               window)
    assert_close_per_head(out, ref, dtype)


# ----------------------------------------------------------------------------------------------
# Prefill / extend: mixed batches, the decodes in either kernel
# ----------------------------------------------------------------------------------------------

MIXED_MODES = ["unified", "decode-kernel", "decode-kernel-split-ordered"]


def run_mixed(b, scale: float, sinks, mode: str, *, window: int | None = None, softcap: float | None = None,
              block_m: int = 16) -> torch.Tensor:
    """unified: the prefill kernel does every sequence; decode-kernel: the decode kernel (mixed mode, one split)
    does the one-token sequences and the prefill kernel skips them; decode-kernel-split-ordered: the same with 3
    splits launched longest first."""
    m = b.meta
    out = poisoned_like(b.query)
    if mode != "unified":
        split = mode == "decode-kernel-split-ordered"
        seq_order = torch.from_numpy(longest_first_order(m.seq_lens_cpu)).to(DEVICE) if split else None
        paged_attention_decode(b.query, b.full_cache, m.block_tables, m.seq_lens, scale, out=out,
                               num_splits=3 if split else 1, block_n=16, query_start_loc=m.query_start_loc,
                               seq_order=seq_order, window=window, softcap=softcap, sinks=sinks)
    paged_attention_prefill(b.query, b.full_cache, m.query_start_loc, m.seq_lens, m.block_tables, scale,
                            m.max_query_len, out=out, block_m=block_m, block_n=16, skip_decodes=mode != "unified",
                            window=window, softcap=softcap, sinks=sinks)
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MIXED_MODES)
def test_prefill_sinks_mixed(shape, dtype, mode):
    """A fresh prompt, a prefix-cache hit (query shorter than the sequence), a chunk after a prefix that ends
    mid-block, decodes and a one-token prompt, padding tokens (left alone)."""
    block_size, head_dim, num_heads, num_kv_heads = shape
    spec = [(0, 37), (2 * block_size, 11), (21, 19), (40, 1), (3 * block_size + 3, 1), (0, 1)]
    b = make_batch(spec, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   block_size=block_size, dtype=dtype, share_prefix=(4, 1, 2), num_pad_tokens=2)
    sinks, scale, m = draw_sinks(num_heads), head_dim**-0.5, b.meta
    out = run_mixed(b, scale, sinks, mode, block_m=32 if num_heads == num_kv_heads else 16)
    num_real = m.query_start_loc[-1].item()
    ref = reference_with_sinks(b.query, b.full_cache, m.block_tables, m.seq_lens, m.query_start_loc, scale, sinks)
    assert_close_per_head(out[:num_real], ref, dtype)
    assert torch.isnan(out[num_real:]).all(), "padding rows must be left alone"
    ref_without = reference_with_sinks(b.query, b.full_cache, m.block_tables, m.seq_lens, m.query_start_loc, scale,
                                       None)
    assert_sinks_matter(ref, ref_without)


@pytest.mark.parametrize("window", [3, 16, 128])
@pytest.mark.parametrize("mode", ["unified", "decode-kernel-split-ordered"])
def test_prefill_sinks_window(window, mode):
    """Windows with sinks over a mixed batch: rows whose window starts inside a tile, at a tile boundary, before the
    cached prefix ends; 128 (gpt-oss) with a prompt and a chunk longer than it."""
    dtype = DTYPES[-1]
    spec = [(0, 37), (16, 11), (21, 19), (40, 1), (27, 1)]
    if window == 128:
        spec = [(0, 150), (120, 20), (140, 1), (30, 1)]
    b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=8, dtype=dtype,
                   share_prefix=(4, 1, 2) if window != 128 else None, num_pad_tokens=2)
    sinks, m = draw_sinks(8), b.meta
    out = run_mixed(b, 0.125, sinks, mode, window=window, block_m=32 if window == 128 else 16)
    num_real = m.query_start_loc[-1].item()
    ref = reference_with_sinks(b.query, b.full_cache, m.block_tables, m.seq_lens, m.query_start_loc, 0.125, sinks,
                               window)
    assert_close_per_head(out[:num_real], ref, dtype)
    assert torch.isnan(out[num_real:]).all(), "padding rows must be left alone"


def test_sinks_with_softcap():
    """Soft-capping and sinks together, in both kernels: the sink is appended after the cap (it is not capped)."""
    dtype = DTYPES[-1]
    spec = [(0, 37), (21, 19), (40, 1), (27, 1)]
    b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=8, dtype=dtype)
    sinks, m = draw_sinks(8), b.meta
    out = run_mixed(b, 0.5, sinks, "decode-kernel-split-ordered", window=16, softcap=2.0)
    ref = reference_with_sinks(b.query, b.full_cache, m.block_tables, m.seq_lens, m.query_start_loc, 0.5, sinks, 16,
                               softcap=2.0)
    assert_close_per_head(out, ref, dtype)


# ----------------------------------------------------------------------------------------------
# Without sinks nothing changes; sinks that take no mass; dtypes; refusals
# ----------------------------------------------------------------------------------------------


def test_sinks_none_is_the_call_without_them():
    """sinks=None is the call without the argument, bit for bit, in every decode mode and the prefill kernel; a
    sink of -inf (no mass) gives the no-sink result, and fp16 sinks are widened as their fp32 values."""
    dtype = DTYPES[0]
    spec = [(0, 37), (21, 19), (40, 1), (90, 1)]
    b = make_batch(spec, num_heads=8, num_kv_heads=2, head_dim=64, block_size=16, dtype=dtype)
    m = b.meta
    decodes = make_batch([(90, 1), (40, 1), (0, 1), (13, 1)], num_heads=8, num_kv_heads=2, head_dim=64,
                         block_size=16, dtype=dtype)
    work = torch.from_numpy(decode_work_list(decodes.meta.seq_lens.cpu().numpy(), 2, 64, 16, min_chunk=32))

    def calls(**kw):
        yield paged_attention_prefill(b.query, b.full_cache, m.query_start_loc, m.seq_lens, m.block_tables, 0.125,
                                      m.max_query_len, out=poisoned_like(b.query), block_m=16, block_n=16, **kw)
        d = decodes.meta
        for extra in (dict(num_splits=1), dict(num_splits=3), dict(work=work.to(DEVICE)),
                      dict(num_splits=2, window=20)):
            yield paged_attention_decode(decodes.query, decodes.full_cache, d.block_tables, d.seq_lens, 0.125,
                                         out=poisoned_like(decodes.query), block_n=16, **extra, **kw)

    plain = list(calls())
    for got, expected in zip(calls(sinks=None), plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    no_mass = torch.full((8,), float("-inf"), device=DEVICE)
    for got, expected in zip(calls(sinks=no_mass), plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    sinks16 = draw_sinks(8).half()
    for got, expected in zip(calls(sinks=sinks16), calls(sinks=sinks16.float()), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_bad_sinks_are_refused():
    b = make_batch([(5, 1), (0, 3)], num_heads=4, num_kv_heads=2, head_dim=64, block_size=8, dtype=DTYPES[0])
    m = b.meta
    decode = [b.query[:1], b.full_cache, m.block_tables[:1], m.seq_lens[:1], 0.1]
    prefill = [b.query, b.full_cache, m.query_start_loc, m.seq_lens, m.block_tables, 0.1, 3]
    bad = [torch.zeros(2, device=DEVICE), torch.zeros(4, 1, device=DEVICE), torch.zeros(4, dtype=torch.int32,
                                                                                        device=DEVICE)]
    if CUDA:
        bad.append(torch.zeros(4))  # on the host, the query on the GPU
    for sinks in bad:
        with pytest.raises(ValueError, match="sinks"):
            paged_attention_decode(*decode, sinks=sinks)
        with pytest.raises(ValueError, match="sinks"):
            paged_attention_prefill(*prefill, sinks=sinks)
    strided = torch.zeros(4, 2, device=DEVICE)[:, 0]  # not contiguous: taken (copied)
    assert torch.isfinite(paged_attention_decode(*decode, sinks=strided)).all()


# ----------------------------------------------------------------------------------------------
# GPU only: a gpt-oss-like shape (64 query heads, 8 kv heads, head dim 64), bf16, the launchers' default configs
# ----------------------------------------------------------------------------------------------


@gpu_only
@pytest.mark.parametrize("window", [None, 128], ids=["full", "window128"])
def test_gpu_gpt_oss_shapes(window):
    dtype, scale = torch.bfloat16, 64**-0.5
    kw = dict(num_heads=64, num_kv_heads=8, head_dim=64, block_size=16, dtype=dtype)
    sinks = draw_sinks(64)
    decode_spec = [(c, 1) for c in (1, 15, 517, 2049, 4000, 33, 1200, 3)]
    b = make_batch(decode_spec, **kw)
    m = b.meta
    ref = reference_with_sinks(b.query, b.full_cache, m.block_tables, m.seq_lens, m.query_start_loc, scale, sinks,
                               window)
    for extra in (dict(), dict(num_splits=8)):  # the chosen split count, and many
        out = paged_attention_decode(b.query, b.full_cache, m.block_tables, m.seq_lens, scale,
                                     out=poisoned_like(b.query), window=window, sinks=sinks, **extra)
        assert_close_per_head(out, ref, dtype)
    if window is None:
        work = decode_work_list(np.array(m.seq_lens_cpu), 8, 132, 64)
        out = paged_attention_decode(b.query, b.full_cache, m.block_tables, m.seq_lens, scale,
                                     out=poisoned_like(b.query), work=torch.from_numpy(work).to(DEVICE), sinks=sinks)
        assert_close_per_head(out, ref, dtype)
    mixed_spec = [(0, 700), (512, 300), (1000, 1), (333, 129), (64, 64), (2000, 1), (0, 1)]
    b = make_batch(mixed_spec, num_pad_tokens=3, **kw)
    m = b.meta
    out = poisoned_like(b.query)
    paged_attention_decode(b.query, b.full_cache, m.block_tables, m.seq_lens, scale, out=out,
                           query_start_loc=m.query_start_loc, window=window, sinks=sinks)
    paged_attention_prefill(b.query, b.full_cache, m.query_start_loc, m.seq_lens, m.block_tables, scale,
                            m.max_query_len, out=out, skip_decodes=True, max_seq_len=m.max_seq_len, window=window,
                            sinks=sinks)
    num_real = m.query_start_loc[-1].item()
    ref = reference_with_sinks(b.query, b.full_cache, m.block_tables, m.seq_lens, m.query_start_loc, scale, sinks,
                               window)
    assert_close_per_head(out[:num_real], ref, dtype)
    assert torch.isnan(out[num_real:]).all(), "padding rows must be left alone"
