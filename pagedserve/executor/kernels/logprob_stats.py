"""Logprob statistics of logit rows in one read: what prompt logprobs (lm-eval's loglikelihood) need of each row.

    logits [R, V] (fp32 / fp16 / bf16, unit stride along V), token_ids [R] (int64)
    logprob_stats(logits, token_ids, want_max) ->
        token_logprob [R] fp32   log_softmax(row)[token]
        rank          [R] int64  1 + #{v : row[v] > row[token]}  (1 = likeliest; ties count in its favour)
        max_logprob   [R] fp32   max of log_softmax(row)           (want_max; else None)
        argmax        [R] int64  the smallest v holding that max   (want_max; else None)

torch's way (sampler.logprob_stats) writes the fp32 log-softmax and reads it back for the gather, the rank's
compare, its sum and the max: ~6 passes over [R, V] (for a step's 256 rows of a 152k vocabulary, ~150 MB
each). Here each row is read once, by `splits` programs that each keep, per lane of a BLOCK-wide tile, an
online log-sum-exp (running max m, sum of exp(x - m)), the count of logits above the token's, and the largest
logit with its column; a second small kernel merges the splits and writes the four results. The rank compares
logits, not logprobs: subtracting the row's log-sum-exp is monotone, and the logits are the exact values
(torch's fp32 logprobs can round two close logits onto one value).

Splits: enough programs to fill the GPU (`rows * splits >= TARGET_PROGRAMS`), each covering a whole number of
tiles. No host sync: the grid depends on shapes only.

    row r: | split 0: tiles ... | split 1: tiles ... | ... |  -> partials [R, splits] -> merge -> 4 values
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4
TARGET_PROGRAMS = 1024
MAX_SPLITS = 64


@triton.jit
def _logprob_partials_kernel(
    logits_ptr,
    token_ptr,
    part_m_ptr,  # [R, SPLITS] fp32: the split's max logit
    part_s_ptr,  # [R, SPLITS] fp32: sum of exp(logit - that max)
    part_c_ptr,  # [R, SPLITS] int32: logits above the token's
    part_i_ptr,  # [R, SPLITS] int32: smallest column holding the split's max
    stride_row,
    vocab,
    cols_per_split,
    num_splits,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    base = logits_ptr + row * stride_row
    token = tl.load(token_ptr + row)
    x_tok = tl.load(base + token).to(tl.float32)
    lanes = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    count = tl.zeros((BLOCK,), tl.int32)
    best_col = tl.zeros((BLOCK,), tl.int32)
    start = split * cols_per_split
    end = tl.minimum(start + cols_per_split, vocab)
    for off in range(start, end, BLOCK):
        cols = off + lanes
        x = tl.load(base + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        new_m = tl.maximum(m, x)
        live = new_m > float("-inf")  # a lane that has seen only -inf keeps s = 0 (no exp(-inf - -inf))
        s = tl.where(live, s * tl.exp(m - new_m) + tl.exp(x - new_m), 0.0)
        best_col = tl.where(x > m, cols, best_col)  # strict: within a lane the first column of its max wins
        m = new_m
        count += (x > x_tok).to(tl.int32)
    split_m = tl.max(m, axis=0)
    scale = tl.where(m > float("-inf"), tl.exp(m - split_m), 0.0)
    split_s = tl.sum(s * scale, axis=0)
    split_col = tl.min(tl.where(m == split_m, best_col, 2147483647), axis=0)
    out = row * num_splits + split
    tl.store(part_m_ptr + out, split_m)
    tl.store(part_s_ptr + out, split_s)
    tl.store(part_c_ptr + out, tl.sum(count, axis=0))
    tl.store(part_i_ptr + out, split_col)


@triton.jit
def _logprob_merge_kernel(
    logits_ptr,
    token_ptr,
    part_m_ptr,
    part_s_ptr,
    part_c_ptr,
    part_i_ptr,
    token_lp_ptr,
    rank_ptr,
    max_lp_ptr,
    argmax_ptr,
    stride_row,
    num_splits,
    SPLITS_P2: tl.constexpr,
    WANT_MAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, SPLITS_P2)
    valid = idx < num_splits
    offs = row * num_splits + idx
    m = tl.load(part_m_ptr + offs, mask=valid, other=float("-inf"))
    s = tl.load(part_s_ptr + offs, mask=valid, other=0.0)
    c = tl.load(part_c_ptr + offs, mask=valid, other=0)
    row_m = tl.max(m, axis=0)
    lse = row_m + tl.log(tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - row_m), 0.0), axis=0))
    token = tl.load(token_ptr + row)
    x_tok = tl.load(logits_ptr + row * stride_row + token).to(tl.float32)
    tl.store(token_lp_ptr + row, x_tok - lse)
    tl.store(rank_ptr + row, tl.sum(c, axis=0).to(tl.int64) + 1)
    if WANT_MAX:
        cols = tl.load(part_i_ptr + offs, mask=valid, other=2147483647)
        tl.store(max_lp_ptr + row, row_m - lse)
        tl.store(argmax_ptr + row, tl.min(tl.where(m == row_m, cols, 2147483647), axis=0).to(tl.int64))


def choose_splits(num_rows: int, vocab: int, block: int = BLOCK, target_programs: int = TARGET_PROGRAMS) -> int:
    """Programs a row: enough for target_programs in all, no more than the row has tiles (or MAX_SPLITS)."""
    tiles = triton.cdiv(vocab, block)
    return max(1, min(tiles, MAX_SPLITS, triton.cdiv(target_programs, max(num_rows, 1))))


def logprob_stats(logits: torch.Tensor, token_ids: torch.Tensor, want_max: bool, *, splits: int | None = None,
                  out: tuple[torch.Tensor, ...] | None = None, block: int = BLOCK, num_warps: int = NUM_WARPS,
                  target_programs: int = TARGET_PROGRAMS
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """See the module docstring. `splits` pins the programs a row (tests; default choose_splits); `out`: the
    result tensors to write (token_logprob, rank[, max_logprob, argmax]), else new ones; block, num_warps and
    target_programs for tuning (scripts/prompt_logprobs_cost.py --kernel-only)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with unit stride along vocab, got {tuple(logits.shape)}")
    if token_ids.shape != (logits.shape[0],):
        raise ValueError(f"token_ids must be [{logits.shape[0]}], got {tuple(token_ids.shape)}")
    rows, vocab = logits.shape
    device = logits.device
    if out is not None:
        token_lp, rank, max_lp, argmax = (*out, None, None)[:4]
    else:
        token_lp = torch.empty(rows, dtype=torch.float32, device=device)
        rank = torch.empty(rows, dtype=torch.int64, device=device)
        max_lp = torch.empty(rows, dtype=torch.float32, device=device) if want_max else None
        argmax = torch.empty(rows, dtype=torch.int64, device=device) if want_max else None
    if rows == 0:
        return token_lp, rank, max_lp, argmax
    splits = splits or choose_splits(rows, vocab, block, target_programs)
    cols_per_split = triton.cdiv(triton.cdiv(vocab, splits), block) * block
    splits = triton.cdiv(vocab, cols_per_split)  # no empty split
    part_m = torch.empty((rows, splits), dtype=torch.float32, device=device)
    part_s = torch.empty_like(part_m)
    part_c = torch.empty((rows, splits), dtype=torch.int32, device=device)
    part_i = torch.empty_like(part_c)
    token_ids = token_ids.to(device=device, dtype=torch.int64)
    _logprob_partials_kernel[(rows, splits)](
        logits, token_ids, part_m, part_s, part_c, part_i, logits.stride(0), vocab, cols_per_split, splits,
        BLOCK=block, num_warps=num_warps,
    )
    _logprob_merge_kernel[(rows,)](
        logits, token_ids, part_m, part_s, part_c, part_i, token_lp, rank,
        max_lp if want_max else token_lp, argmax if want_max else rank,
        logits.stride(0), splits, SPLITS_P2=triton.next_power_of_2(splits), WANT_MAX=want_max, num_warps=1,
    )
    return token_lp, rank, max_lp, argmax
