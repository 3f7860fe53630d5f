"""Blocks of a segmented batch, found on the device: the shared preamble of kernels that take one block of BM rows
of one segment a program (LoRA's per-adapter tokens, kernels/lora_sgmv.py; MoE's per-expert entries,
kernels/fused_moe.py).

The rows come sorted by segment in `order`; `starts` gives each segment's first index there (segment s's rows are
order[starts[FIRST + s] : starts[FIRST + s + 1]], FIRST skipping leading entries a caller does not process, e.g.
LoRA's tokens without an adapter). Program b finds its segment from the per-segment block counts (cdiv(count, BM)),
so a launch of cdiv(rows, BM) + segments programs covers any split of the rows and a CUDA graph captures it once.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def segment_block(starts_ptr, order_ptr, b, NUM: tl.constexpr, NUM_POW2: tl.constexpr, BM: tl.constexpr,
                  FIRST: tl.constexpr):
    """Block b's segment index (NUM past the last block), its BM rows' values from `order` (int64) and which of
    them hold one."""
    j = tl.arange(0, NUM_POW2)
    valid = j < NUM
    lo = tl.load(starts_ptr + FIRST + j, mask=valid, other=0)
    hi = tl.load(starts_ptr + FIRST + 1 + j, mask=valid, other=0)
    blocks = (hi - lo + BM - 1) // BM
    ends = tl.cumsum(blocks, axis=0)  # block index one past each segment's last block
    idx = tl.sum((ends <= b).to(tl.int32), axis=0)
    pick = j == idx
    seg_lo = tl.sum(tl.where(pick, lo, 0), axis=0)
    seg_hi = tl.sum(tl.where(pick, hi, 0), axis=0)
    first = tl.sum(tl.where(pick, ends - blocks, 0), axis=0)
    rows = seg_lo + (b - first) * BM + tl.arange(0, BM)
    row_ok = rows < seg_hi
    values = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    return idx, values, row_ok


__all__ = ["segment_block"]
