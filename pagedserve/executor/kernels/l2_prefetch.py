"""L2 prefetch of a one-token GEMV's own weights before its PDL wait (experimental; PAGEDSERVE_B1_L2_PREFETCH).

At batch 1 the step is the four GEMVs at the copy ceiling plus ~0.35 ms of small dependent kernels (norms,
attention, its reduce) in which the memory mostly idles. With PDL the next GEMV's programs are already placed
on the SMs while those run (PAGEDSERVE_PDL_EARLY), waiting in griddepcontrol.wait with their first weight tile
loaded. Here each of them also asks the copy engine for the next PAGEDSERVE_B1_L2_PREFETCH K steps of each of
its rows (`cp.async.bulk.prefetch.L2`, sm_90: one instruction a row, issued by one thread, no registers held),
so the weight stream runs through the small kernels and the loop after the wait finds those bytes in L2.
Session 9 tried the same with registers (2-4 K steps loaded before the wait): slower, from the registers held;
an L2 prefetch holds none. Not measured yet: off by default.

Only on CUDA with PDL (sm_90+), 16-byte aligned weights with 16-byte multiple row strides, and K a multiple
of the K step; elsewhere the launchers pass 0 and the kernels compile without it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels import pdl


def _steps_from_env() -> int:
    value = os.environ.get("PAGEDSERVE_B1_L2_PREFETCH", "0")
    if not value.isdigit():
        raise ValueError(f"PAGEDSERVE_B1_L2_PREFETCH must be a number of K steps (0: off), got {value!r}")
    return int(value)


L2_PREFETCH_STEPS = _steps_from_env()


def prefetch_steps(weight: torch.Tensor, k: int, block_k: int, steps: int | None = None) -> int:
    """The PF_L2 constexpr for a launch: `steps` (None: PAGEDSERVE_B1_L2_PREFETCH) when the weight qualifies
    (CUDA with PDL on, 16-byte aligned rows, K a multiple of block_k), else 0."""
    steps = L2_PREFETCH_STEPS if steps is None else steps
    if steps <= 0 or not pdl.enabled(weight.device) or k % block_k:
        return 0
    if weight.data_ptr() % 16 or (weight.stride(0) * weight.element_size()) % 16 \
            or (block_k * weight.element_size()) % 16:
        return 0
    return steps


@triton.jit
def prefetch_l2(addr, nbytes):
    """Thread 0 of the program asks for nbytes (a multiple of 16, > 0) at addr (16-byte aligned) in L2: a hint,
    asynchronous, nothing waits for it."""
    tl.inline_asm_elementwise(
        asm="{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        constraints="=r,l,r", args=[addr.to(tl.int64, bitcast=True), nbytes.to(tl.int32)], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def prefetch_rows(w_ptr, row0, last_row, stride_wn, k_first, k_end, ROWS: tl.constexpr, PF_L2: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """For rows row0 .. row0 + ROWS - 1 (clamped to last_row) of W, the columns k_first .. min(k_first + PF_L2 *
    BLOCK_K, k_end): one bulk L2 prefetch a row (nothing when that range is empty)."""
    elem = w_ptr.dtype.element_ty.primitive_bitwidth // 8
    span = tl.minimum(PF_L2 * BLOCK_K, k_end - k_first)
    if span > 0:
        for r in tl.static_range(ROWS):
            row = tl.minimum(row0 + r, last_row).to(tl.int64)
            prefetch_l2(w_ptr + row * stride_wn + k_first, span * elem)


__all__ = ["L2_PREFETCH_STEPS", "prefetch_l2", "prefetch_rows", "prefetch_steps"]
