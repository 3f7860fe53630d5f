"""K/V values into and out of the KV cache's dtype, for the kernels that write or read it.

16/32-bit caches hold the model's values (a plain conversion). fp8 caches (`kv_cache_dtype="fp8"`, e4m3, scale 1 as
vLLM's default without calibrated scales) clamp to +-448 first, since e4m3 has no infinity, and round to nearest
even on e4m3's grid (fp8_quant's rounding: exact in Triton's interpreter too); readers widen the loaded fp8 tiles to
fp16 (or fp32 for an fp32 model) before the dots (query_for_cache says why not bf16).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from pagedserve.executor.kernels.fp8_quant import _round_to_e4m3


@triton.jit
def to_cache(x, cache_ptr):
    """x (any float) as cache_ptr's element type."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        y = _round_to_e4m3(tl.clamp(x.to(tl.float32), -448.0, 448.0)).to(tl.float8e4nv)
    else:
        y = x.to(cache_ptr.dtype.element_ty)
    return y


# Triton's interpreter (CI's CPU runs) cannot execute inline PTX: there the plain conversion stands in.
_INLINE_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def from_cache(x, q):
    """A loaded K or V tile (x) in the dtype of the query q the dots run in (query_for_cache).

    An fp8 tile for fp16 dots converts through inline PTX (four values a call: two cvt.rn.f16x2.e4m3x2) marked
    impure, which Triton's passes do not move (a pure one they hoist like .to()). Triton then converts it in the
    layout it was loaded in and moves the fp16 tile to the dot's layout through shared memory (ldmatrix, .trans
    for V). A plain .to() is moved by Triton into the dot operand's layout, and V's operand wants pairs of
    consecutive tokens, which lie a cache slot apart: without a byte-wide ldmatrix.trans on sm_90, that is one
    ld.shared.b8 per value (the PTX of the default tiles: 256 a loop body, from scripts/compile_sm90.py). Same
    values either way; on the H200 the decode kernel got 2-9% faster at the default workload's batches."""
    if x.dtype == tl.float8e4nv and q.dtype == tl.float16 and _INLINE_PTX:
        y = tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4,
        )  # fmt: skip
    else:
        y = x.to(q.dtype)
    return y


@triton.jit
def query_for_cache(q, cache_ptr):
    """The query in the dtype the attention dots run in (the loaded K/V tiles are converted to it): a 16/32-bit
    cache's own dtype; for an fp8 cache fp16 when the query is 16-bit, else the query's dtype.

    fp16, not bf16, for a bf16 model's fp8 cache: Hopper converts e4m3 pairs to f16 in one instruction
    (cvt.rn.f16x2.e4m3x2) but has no e4m3 -> bf16 one, so a bf16 tile costs a second, scalar cvt.bf16.f16 per
    element (PTX from scripts/compile_sm90.py): ~1.5 conversions an element at the conversion units' 16 a clock
    per SM, ~1.6 ms a decode step of the default workload, more than the halved bytes save (session 21: the fp8
    cache ran 3.3% slower than bf16). fp16 holds every e4m3 value and bf16 query exactly (more mantissa bits) up
    to 65,504; the query is clamped there, far beyond attention's values. The probabilities go to fp16 for the PV
    dot, likewise finer than bf16."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        if q.dtype == tl.float32:
            r = q
        else:
            r = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    else:
        r = q.to(cache_ptr.dtype.element_ty)
    return r


__all__ = ["from_cache", "query_for_cache", "to_cache"]
