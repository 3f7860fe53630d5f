"""Batch-1 weight prefetch into L2 from the small kernels between the GEMVs (experimental, off by default).

A batch-1 decode step is the four GEMVs of each layer streaming their weights at the copy ceiling, with three
small dependent kernels between them where the memory bus idles (~12 us a layer on the H200):

    norm | qkv GEMV | attention, its split reduce | o GEMV | norm | gate_up GEMV | down GEMV | norm | ...

Here those small kernels ask the memory system for the next GEMV's first bytes (`cp.async.bulk.prefetch.L2`,
sm_90: one instruction asks for a whole byte range, issued by one thread, nothing held or waited for), so the
bus works through the gap and the GEMV finds the start of its weight in L2 (~50 MB on an H100/H200):

* the decode attention (batch 1 runs 256 programs, most with no tile of the context) prefetches the o
  projection, all of it (PAGEDSERVE_B1_PF_OPROJ=1; 25.7 MB on the 7B);
* each RMSNorm before a GEMV (qkv, gate_up, the LM head) runs extra programs that prefetch the first
  PAGEDSERVE_B1_PF_NORM_MB megabytes of its weight, in memory order: the GEMVs' programs own rows in launch
  order, so the first rows in memory are the first ones read.

Session 10 prefetched from the GEMVs' own programs before their PDL wait (each its next K steps): slower at every
depth, since those programs held their SM slots longer and issued the prefetch while the GEMV before was still
streaming. Here the issuers are programs with nothing else to do, after their wait (PAGEDSERVE_B1_PF_EARLY=1
lets the norms' prefetch programs issue before it, over the previous GEMV's tail).

A prefetch is a hint: results are bit-identical with it on and off. Only on CUDA with PDL (sm_90+) and 16-byte
aligned, contiguous weights; elsewhere the launchers pass nothing and the kernels compile without it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels import pdl


def _int_from_env(name: str, default: str = "0") -> int:
    value = os.environ.get(name, default).strip() or default
    if not value.isdigit():
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


OPROJ = _int_from_env("PAGEDSERVE_B1_PF_OPROJ") == 1
NORM_MB = _int_from_env("PAGEDSERVE_B1_PF_NORM_MB")
EARLY = _int_from_env("PAGEDSERVE_B1_PF_EARLY") == 1
NORM_PROGRAMS = 128  # extra norm programs, each asking for 1/128 of the range (one instruction at <= 1 MB)
CHUNK_BYTES = 1 << 20  # the most one instruction asks for


def prefetch_bytes(weight: torch.Tensor | None, limit: int | None = None) -> int:
    """How many bytes of `weight` (from its start) a launch may prefetch: min(its size, limit) rounded down to
    16 bytes, or 0 where the prefetch cannot run (no weight, not CUDA with PDL, not contiguous or aligned)."""
    if weight is None or not pdl.enabled(weight.device) or not weight.is_contiguous() or weight.data_ptr() % 16:
        return 0
    size = weight.numel() * weight.element_size()
    if limit is not None:
        size = min(size, limit)
    return size // 16 * 16


def oproj_bytes(weight: torch.Tensor | None) -> int:
    """The attention's prefetch of the o projection (PAGEDSERVE_B1_PF_OPROJ): all of it, or 0 when off."""
    return prefetch_bytes(weight) if OPROJ else 0


def norm_bytes(weight: torch.Tensor | None) -> int:
    """A norm's prefetch of the next GEMV's weight (PAGEDSERVE_B1_PF_NORM_MB): its first megabytes, or 0."""
    return prefetch_bytes(weight, NORM_MB << 20) if NORM_MB > 0 else 0


@triton.jit
def _prefetch_l2(addr, nbytes):
    """Thread 0 of the program asks for nbytes (a multiple of 16, > 0) at addr (16-byte aligned) in L2: a hint,
    asynchronous, nothing waits for it."""
    tl.inline_asm_elementwise(
        asm="{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        constraints="=r,l,r", args=[addr, nbytes.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_share(base_ptr, nbytes, part, parts, CHUNK: tl.constexpr):
    """Part `part` of `parts` (equal 16-byte multiples) of the first nbytes at base_ptr, asked for in L2 in
    pieces of at most CHUNK bytes."""
    addr = base_ptr.to(tl.int64, bitcast=True)
    share = tl.cdiv(tl.cdiv(nbytes, parts), 16) * 16
    lo = part.to(tl.int64) * share
    hi = tl.minimum(lo + share, nbytes)
    for off in range(lo, hi, CHUNK):
        _prefetch_l2(addr + off, tl.minimum(hi - off, CHUNK))


__all__ = ["CHUNK_BYTES", "EARLY", "NORM_MB", "NORM_PROGRAMS", "OPROJ", "norm_bytes", "oproj_bytes",
           "prefetch_bytes", "prefetch_share"]
