"""K/V values into and out of the KV cache's dtype, for the kernels that write or read it.

16/32-bit caches hold the model's values (a plain conversion). fp8 caches (`kv_cache_dtype="fp8"`, e4m3, scale 1 as
vLLM's default without calibrated scales) clamp to +-448 first, since e4m3 has no infinity, and round to nearest
even on e4m3's grid (fp8_quant's rounding: exact in Triton's interpreter too); readers widen the loaded fp8 tiles to
the query's dtype before the dots, so attention runs at the model's precision on fp8-stored values.
"""

from __future__ import annotations

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


@triton.jit
def query_for_cache(q, cache_ptr):
    """The query in the dtype the dots run in: the cache's (as before fp8 caches), or its own for an fp8 cache."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        r = q
    else:
        r = q.to(cache_ptr.dtype.element_ty)
    return r


__all__ = ["query_for_cache", "to_cache"]
