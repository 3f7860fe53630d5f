"""Fused random sampling for rows without top-k/top-p/min-p: one pass over each row of logits.

    sample_gumbel(logits [S, V], temperatures [S], seeds [S] int64, offsets [S] int64) -> ids [S] int64
    ids[r] = argmax_i ( logits[r, i] / T[r] - log(q[r, i]) ),   q ~ Exp(1) drawn in-kernel

argmax(l_i / T - log q_i) = argmax(p_i / q_i) with p = softmax(l / T): the exponential race of
sampler.py (equivalently the Gumbel-max trick, -log q being Gumbel noise), a categorical draw from
softmax(logits / T) that needs no softmax, no normalisation and no [S, V] temporaries: each logit is
read once, and nothing but the S ids (and S * num_splits partials) is written.

Noise stream. q[r, i] comes from Philox-4x32-10 (tl.philox) with key = seeds[r] (64 bits) and
counter = (i // 4, offsets[r] low 32 bits, offsets[r] high 32 bits, 0); of the four 32-bit words one
counter gives, word i % 4 is column i's. So a row's draws depend only on (seed, offset, column):
never on the batch around it, the row's position in it, the tile size or the split count (the result
of the kernel is the same for any launch configuration; the tests check it).

Numerics (fp32 throughout; bf16/fp16 logits are widened on load):
  w = (r + 1/2) * 2^-32 for the 32-bit word r (rounded to fp32, clamped to <= 1 - 2^-24), so
  u = 1 - w is strictly inside (0, 1) and log never sees 0. q = -log(1 - w) is evaluated as the series
  w + w^2/2 + w^3/3 + w^4/4 for w < 2^-6: the winning tokens have small q, and there the series keeps
  full fp32 relative precision (down to q = 2^-33) where -log(u) of a rounded u near 1 would not.
  logits of -inf (masked tokens) give score -inf and are never drawn while a finite logit remains;
  NaN scores count as -inf. Ties (equal scores) go to the smallest column. Every returned id is in
  [0, V), also for a row whose logits are all -inf (then: the first column).
  Temperatures must be > 0 (greedy rows belong to an argmax, not here); T is applied as l * (1 / T).

Launch layout. Grid (S, num_splits) (one row a program at the vocabularies of real models):
program (r, s) scans columns [s * chunk, (s + 1) * chunk) of row r in tiles of TILE columns (a
multiple of 4, so the Philox counters of a tile are TILE / 4 consecutive integers), keeping a
per-lane running best (strict '>' keeps the smallest column among equal scores, as later tiles have
larger columns), and reduces it once at the end.
    row r: | chunk 0: tile tile tile | chunk 1: tile tile tile | ... | chunk n-1: tile . |   V columns
             program (r, 0)            program (r, 1)                  program (r, n-1)
With num_splits == 1 the program writes the id; otherwise it writes (best score, its column) to fp32
/ int32 partials [S, num_splits] and a second kernel takes, per row, the max score and the smallest
column among the equal ones: deterministic, no atomics. choose_num_splits spreads a row over more
programs when rows are few (at S = 1 and V = 152064 one program per row would leave all but one of
the H100's 132 SMs idle: there it gives 149 programs of one 1024-column tile) and caps a chunk at
MAX_CHUNK columns so large batches get several programs per SM (S = 139 or 256: 10 a row).
Rows shorter than MAX_TILE share a program (ROWS rows of one tile each: grid (cdiv(S, ROWS), 1)),
and on CPU tensors (the Triton interpreter, i.e. tests) one program takes many whole rows, since the
interpreter pays ~10 ms a program. The grid depends on shapes only: no host sync, capturable in a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter
from pagedserve.executor.precompile import dry_run

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TILE = 1024  # columns per loop step (256 Philox counters, 4 words each)
MIN_TILE = 16
MAX_CHUNK = 16384  # columns per program at most: 10 programs a row at V = 152064
TARGET_PROGRAMS = 1024  # spread small batches over at least this many programs (where V allows)


@triton.jit
def _tile_scores(row_ptrs, row_mask, col_start, col_end, inv_t, thr, seed, off_lo, off_hi,
                 ROWS: tl.constexpr, TILE: tl.constexpr):
    """(scores, cols), both [ROWS, TILE], of columns [col_start, col_start + TILE); col_start % 4 == 0.
    row_ptrs, row_mask, inv_t, thr, seed, off_lo, off_hi are [ROWS, 1]. Masked columns/rows, and
    columns with logit * inv_t < thr (filtered out), score -inf."""
    QUADS: tl.constexpr = TILE // 4
    zero = tl.zeros([ROWS, QUADS], dtype=tl.uint32)
    quad = zero + (col_start // 4 + tl.arange(0, QUADS)).to(tl.uint32)[None, :]
    r0, r1, r2, r3 = tl.philox(seed, quad, zero + off_lo, zero + off_hi, zero)
    # Column 4k + j takes word j of counter k: interleave(interleave(r0, r2), interleave(r1, r3)).
    bits = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))
    w = bits.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # (r + 1/2) * 2^-32
    w = tl.minimum(w, 0.99999994039535522)  # 1 - 2^-24: uint32 -> fp32 may round r up to 2^32
    series = w * (1.0 + w * (0.5 + w * (0.3333333333333333 + w * 0.25)))
    q = tl.where(w < 0.015625, series, -tl.log(1.0 - w))  # q = -log(1 - w) ~ Exp(1), q > 0

    cols = col_start + tl.arange(0, TILE)[None, :]
    mask = row_mask & (cols < col_end)
    x = tl.load(row_ptrs + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
    score = x - tl.log(q)
    score = tl.where(mask & (score == score) & (x >= thr), score, float("-inf"))  # NaN -> -inf
    return score, cols


# The row count changes every step: without this, batch sizes of 1 or a multiple of 16 would each
# compile another variant in the middle of serving. The others are fixed per model but cost nothing.
@triton.jit(do_not_specialize=["num_rows", "stride_row", "vocab", "chunk", "num_splits"])
def _sample_gumbel_kernel(
    logits_ptr,
    temps_ptr,
    thr_ptr,
    seeds_ptr,
    offsets_ptr,
    out_ptr,
    part_val_ptr,
    part_idx_ptr,
    num_rows,
    stride_row,
    vocab,
    chunk,
    num_splits,
    ROWS: tl.constexpr,
    TILE: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_THR: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    pdl_enter(USE_PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    split = tl.program_id(1)
    row_ok = rows < num_rows
    inv_t = (1.0 / tl.load(temps_ptr + rows, mask=row_ok, other=1.0).to(tl.float32))[:, None]
    if HAS_THR:
        thr = tl.load(thr_ptr + rows, mask=row_ok, other=float("-inf"))[:, None]
    else:
        thr = tl.full([ROWS, 1], float("-inf"), dtype=tl.float32)
    seed = tl.load(seeds_ptr + rows, mask=row_ok, other=0)[:, None]
    offset = tl.load(offsets_ptr + rows, mask=row_ok, other=0)[:, None]
    off_lo = offset.to(tl.uint32)
    off_hi = (offset >> 32).to(tl.uint32)
    row_ptrs = logits_ptr + rows[:, None] * stride_row
    row_mask = row_ok[:, None]
    col_begin = split * chunk
    col_end = tl.minimum(col_begin + chunk, vocab)

    # First tile outside the loop: its valid columns seed the per-lane best, so a chunk whose scores
    # are all -inf still reports a real column (lanes past col_end keep 2**31 - 1).
    best_val, cols = _tile_scores(row_ptrs, row_mask, col_begin, col_end, inv_t, thr, seed, off_lo, off_hi,
                                  ROWS, TILE)
    # [ROWS, TILE] from the start: a loop-carried value must keep its shape (cols is [1, TILE]).
    best_idx = tl.where(cols < col_end, cols, 2147483647) + tl.zeros([ROWS, TILE], dtype=tl.int32)
    for col_start in range(col_begin + TILE, col_end, TILE):
        score, cols = _tile_scores(row_ptrs, row_mask, col_start, col_end, inv_t, thr, seed, off_lo, off_hi,
                                   ROWS, TILE)
        take = score > best_val  # strict: equal scores keep the earlier (smaller) column
        best_val = tl.where(take, score, best_val)
        best_idx = tl.where(take, cols, best_idx)

    top = tl.max(best_val, axis=1)
    top_idx = tl.min(tl.where(best_val == top[:, None], best_idx, 2147483647), axis=1)
    if SPLIT:
        tl.store(part_val_ptr + rows * num_splits + split, top, mask=row_ok)
        tl.store(part_idx_ptr + rows * num_splits + split, top_idx, mask=row_ok)
    else:
        tl.store(out_ptr + rows, top_idx.to(tl.int64), mask=row_ok)


@triton.jit(do_not_specialize=["num_rows", "num_splits"])
def _reduce_splits_kernel(
    part_val_ptr, part_idx_ptr, out_ptr, num_rows, num_splits, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    """Per row: the max of the num_splits partial scores, and the smallest column among equal ones."""
    pdl_enter(USE_PDL)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * num_splits + tl.arange(0, BLOCK)[None, :]
    mask = (rows < num_rows)[:, None] & (tl.arange(0, BLOCK) < num_splits)[None, :]
    vals = tl.load(part_val_ptr + offs, mask=mask, other=float("-inf"))
    idxs = tl.load(part_idx_ptr + offs, mask=mask, other=2147483647)
    top = tl.max(vals, axis=1)
    top_idx = tl.min(tl.where(vals == top[:, None], idxs, 2147483647), axis=1)
    tl.store(out_ptr + rows, top_idx.to(tl.int64), mask=rows < num_rows)


def choose_tile(vocab: int) -> int:
    return min(MAX_TILE, max(MIN_TILE, triton.next_power_of_2(vocab)))


def split_layout(vocab: int, tile: int, num_splits: int) -> tuple[int, int]:
    """(splits, chunk) that a requested split count launches: chunks of whole tiles (so they start at
    a multiple of 4), at most one program per tile, no empty trailing chunk."""
    splits = min(max(num_splits, 1), triton.cdiv(vocab, tile))
    chunk = triton.cdiv(triton.cdiv(vocab, splits), tile) * tile
    return triton.cdiv(vocab, chunk), chunk


def choose_num_splits(num_rows: int, vocab: int, tile: int) -> int:
    """Programs per row: enough for TARGET_PROGRAMS in all, chunks of at most MAX_CHUNK columns,
    never more than one per tile (see the module docstring)."""
    want = max(triton.cdiv(vocab, MAX_CHUNK), triton.cdiv(TARGET_PROGRAMS, max(num_rows, 1)))
    return split_layout(vocab, tile, want)[0]


def sample_gumbel(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    thresholds: torch.Tensor | None = None,
    tile: int | None = None,
    num_splits: int | None = None,
    rows_per_program: int | None = None,
) -> torch.Tensor:
    """Token ids [S] int64 drawn from softmax(logits / temperatures) (see the module docstring).

    logits [S, V] fp32/bf16/fp16 with a contiguous last dimension (any row stride); temperatures [S]
    fp32 or fp64 (> 0, not checked: that would read the device); seeds, offsets [S] int64. All on one
    device; `out` (int64 [S], contiguous) is written if given. thresholds (fp32 [S], optional: from
    kernels/sample_filter.py) restrict row r to the columns with logits * (1 / T) >= thresholds[r]
    (top-k / top-p / min-p); -inf keeps every column. tile (a power of two in [16, 8192]),
    num_splits and rows_per_program (a power of two) are for tuning and tests: the ids do not
    depend on them.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [num_rows, vocab], got shape {tuple(logits.shape)}")
    num_rows, vocab = logits.shape
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"logits dtype {logits.dtype} is not supported; supported: float32, bfloat16, float16")
    if vocab == 0:
        raise ValueError("logits have no columns: there is no token to sample")
    if logits.stride(1) != 1 and vocab > 1:
        raise ValueError("logits must have a contiguous last dimension")
    for name, t, dtypes in (
        ("temperatures", temperatures, (torch.float32, torch.float64)),
        ("seeds", seeds, (torch.int64,)),
        ("offsets", offsets, (torch.int64,)),
    ):
        if t.shape != (num_rows,):
            raise ValueError(f"{name} shape {tuple(t.shape)} != ({num_rows},) (one per row)")
        if t.dtype not in dtypes:
            raise ValueError(f"{name} dtype {t.dtype} is not one of {dtypes}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device}, logits on {logits.device}")
    if thresholds is not None and (thresholds.shape != (num_rows,) or thresholds.dtype != torch.float32
                                   or thresholds.device != logits.device):
        raise ValueError(f"thresholds must be fp32 [{num_rows}] on {logits.device}, got {thresholds.dtype} "
                         f"{tuple(thresholds.shape)} on {thresholds.device}")  # fmt: skip
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    elif out.shape != (num_rows,) or out.dtype != torch.int64 or out.device != logits.device:
        raise ValueError(f"out must be int64 [{num_rows}] on {logits.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")  # fmt: skip
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if tile is not None and (tile < MIN_TILE or tile > 8192 or tile & (tile - 1)):
        raise ValueError(f"tile must be a power of two in [{MIN_TILE}, 8192], got {tile}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if rows_per_program is not None and (rows_per_program < 1 or rows_per_program & (rows_per_program - 1)):
        raise ValueError(f"rows_per_program must be a power of two, got {rows_per_program}")
    if num_rows == 0:
        return out
    if dry_run():  # the launch below only compiles: ids must still be in range for what reads them
        out.zero_()
    # Contiguous 1-D parameters (a strided view would be read with the wrong stride).
    temperatures, seeds, offsets = (t.contiguous() for t in (temperatures, seeds, offsets))
    has_thr = thresholds is not None
    thresholds = thresholds.contiguous() if has_thr else temperatures  # (unused without HAS_THR)

    if logits.device.type == "cpu":
        # Only the Triton interpreter runs kernels on CPU tensors (tests); it pays ~10 ms a program
        # and little per element, so by default one program takes many whole rows.
        tile = tile or min(8192, max(MIN_TILE, triton.next_power_of_2(vocab)))
        rows_per_program = rows_per_program or min(triton.next_power_of_2(num_rows), max(1, 2**18 // tile))
        num_splits = num_splits or 1
    tile = tile or choose_tile(vocab)
    # Short rows (V < MAX_TILE) share a program: MAX_TILE elements per program at most.
    if rows_per_program is None:  # (from the tile alone: one variant for every batch size)
        rows_per_program = max(1, MAX_TILE // tile)
    splits, chunk = split_layout(vocab, tile, num_splits or choose_num_splits(num_rows, vocab, tile))
    grid = (triton.cdiv(num_rows, rows_per_program), splits)
    num_warps = max(1, min(8, rows_per_program * tile // 256))
    if splits == 1:
        part_val = part_idx = out  # unused (SPLIT=False)
    else:
        part_val = torch.empty(num_rows, splits, dtype=torch.float32, device=logits.device)
        part_idx = torch.empty(num_rows, splits, dtype=torch.int32, device=logits.device)
    _sample_gumbel_kernel[grid](
        logits, temperatures, thresholds, seeds, offsets, out, part_val, part_idx,
        num_rows, logits.stride(0), vocab, chunk, splits,
        ROWS=rows_per_program, TILE=tile, SPLIT=splits > 1, HAS_THR=has_thr, num_warps=num_warps,
        **pdl_launch_kwargs(logits.device),
    )  # fmt: skip
    if splits > 1:
        # BLOCK and ROWS follow the vocabulary and tile only, not this call's row or split count: every
        # batch size then shares one compiled reduce variant (a new one mid-run cost ~150 ms each).
        block = triton.next_power_of_2(triton.cdiv(vocab, tile))
        reduce_rows = max(1, 2048 // block)
        _reduce_splits_kernel[(triton.cdiv(num_rows, reduce_rows),)](
            part_val, part_idx, out, num_rows, splits, ROWS=reduce_rows, BLOCK=block, num_warps=4,
            **pdl_launch_kwargs(out.device),
        )
    return out


__all__ = ["sample_gumbel", "choose_num_splits", "choose_tile", "split_layout"]
