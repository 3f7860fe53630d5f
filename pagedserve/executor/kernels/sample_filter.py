"""Per-row thresholds for top-k, top-p and min-p, found without sorting the vocabulary.

    filter_thresholds(logits [S, V], temperatures [S], top_k [S], top_p [S], min_p [S]) -> thr [S] fp32

With x = logits[r] * (1 / T[r]) (fp32, as kernels/sample.py computes it; NaN counts as -inf), the
tokens the three filters of sampler.apply_sampling_filters keep are exactly {i : x_i >= thr[r]}:
    top_k  (0 < k < number of finite x): thr >= the k-th largest x (tokens tied with it stay);
    top_p  (p < 1): of the tokens top-k kept, the smallest most-likely-first set whose probability
           mass reaches p, i.e. thr >= the largest t with sum_{x_i >= t} e^(x_i - max) >= p * total;
    min_p  (> 0): thr >= max(x) + log(min_p);
and thr = -inf for a row that asks for none. kernels/sample.py's sample_gumbel(..., thresholds=thr)
then draws from the kept tokens in its one pass: the filtered rows sample like the plain ones.

Why no sort: a descending sort of [S, 152064] fp32 with its int64 permutation, then softmax, cumsum
and a scatter back, is ~10 passes over 1.2 GB at S = 256; the threshold is one number a row.

Top-k: radix selection. The int32 keys below, as unsigned (key + 2^31), order the floats; pass 0
histograms the row's finite values by their top 8 key bits (256 buckets; tl.histogram, ~0.8k
instructions a 256-value tile against ~3.3k for 16 pivots' comparisons), the programs of a row add
their histograms with integer atomics (the same sums in any order), and the highest bucket whose count
at or above it reaches k holds the k-th value. Each later pass histograms that bucket's values by the
next 8 bits: at most three more passes, fewer when the chosen bucket holds one value (then its bottom
is the threshold: nothing lies between). The first of them reads the row and writes every value at or
above the chosen bucket (fewer than k above it, plus the bucket's own) to the scratch row; later ones
read and rewrite that, and a top-p search after top-k starts from it without reading the row again.

Top-p: search. A pass over the row's candidates, the values in [lo, hi) (in the order of the int32 keys
below: total, exact, one key per float), measures for P pivots inside the interval how much mass lies at
or above each pivot (and how many candidates); with what lies at or above hi, carried from the passes
before, that gives F(pivot), the mass of the row at or above it. F falls as the pivot rises; the new
interval is [last pivot with F >= target, next pivot), so F(lo) >= target > F(hi) always holds and the
answer (the largest t with F(t) >= target) stays inside. It ends when one candidate is left (then {x >=
lo} is exactly the kept set) or lo and hi are adjacent keys (every candidate equals lo: ties). Pivots
are evenly spaced in value while the interval is wide (P = 16: a flat 152k-token row is down to one
candidate in ~5 passes) and in key space once it is narrow, where floats are too few to split evenly;
each pass narrows [lo, hi) by at least one key, so it always ends (MAX_PASSES is a guard: past it lo is
kept, a superset of the answer).

    pass 0: max, min and count of finite x          (the row; for top-k also its 8-bit histogram)
    search pass 1: masses over [lo, hi)             (the row)
    search pass 2: masses, and the candidates of its interval written to a scratch row
    search pass 3+: read and rewrite the scratch row in place (compacted: ~V / P^(pass - 1) values)
    (a top-p search after a top-k one reads only the few values at or above the top-k threshold that the
    radix passes left in the scratch row; when top-k needed no radix pass, its pass 1 collects them)
Each program keeps STAGES tiles of loads in flight (tl.range's software pipelining: cp.async into
shared memory), since one tile at a time left a program latency-bound (session 12).

Programs. One program reading a 152k-token row alone is latency-bound (session 12 run 1: 34 us for
pass 0, 0.85 ms for a top-p search), so a row is split over C one-warp programs (grid (S, C)), each
with a chunk of columns and its own part of the scratch row. After each pass every program writes a
record (its counts and masses) to one of two slots, waits at a barrier of the row (an atomic counter
that only grows, polled with acquire loads), and sums all C records in the same order: every program
of the row takes the same decisions and leaves the loop together. The barrier needs every program of
the row resident at once: programs_per_row keeps S * C <= the programs an SM holds x the SM count, and
gives C = 1 on CPUs, where the interpreter runs programs one after another. The programs an SM holds
come from the compiled kernel's registers and shared memory (resident_per_sm, by programs_an_sm: a warp's
registers come from one scheduler's quarter of the register file, so 8 an SM on the H200 with ~200 registers
a thread, 12 with 168; RESIDENT_PER_SM = 8, the bound for <= 255 registers, when Triton cannot say). The
kernel is compiled with its registers capped at MAXNREG = 168 (ptxas spills ~100 bytes) for the 12. A
forced count beyond that is refused (session 12 run 2: 9 rows x 128 programs on 132 SMs waited at the
barrier until the test's timeout).

Differences from the torch path, at its boundaries only: tokens tied with the top-p boundary token
all stay (the torch path's stable sort keeps the lower ids of such a tie: a threshold cannot split
a tie, and keeping it whole leaves the row's draw independent of token order); masses are fp32 sums
in tile order, not a sorted cumsum, so a boundary token whose cumulative mass is within float
rounding of p may be kept by one and not the other; min-p compares x = l * (1 / T) where torch
divides.
Logits must be finite or -inf (+inf breaks the torch path's softmax as well).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.paged_attention_decode import num_sms
from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter
from pagedserve.executor.precompile import dry_run

PIVOTS = 16  # P: pivots a pass (the interval shrinks ~P-fold a pass)
TILE = int(os.environ.get("PAGEDSERVE_FILTER_TILE", "256"))  # elements a loop step ([TILE, P] comparisons)
WARPS = int(os.environ.get("PAGEDSERVE_FILTER_WARPS", "1"))  # warps a program (tuning knob; see resident_per_sm)
MAX_PASSES = 48  # guard only: a pass always narrows the interval (~5 passes a search on 152k values)
NARROW_KEYS = tl.constexpr(4096)  # below this many keys between lo and hi, pivots are spaced in key space
MAX_PROGRAMS_PER_ROW = 128  # C: every program reads all C partial records of its row each pass
SCHEDULERS_PER_SM = 4  # warp schedulers an SM (Volta to Hopper), each with a quarter of the register file
RESIDENT_PER_SM = 8  # one-warp programs: at most S * C = 8 x SMs, so every program of a row is resident
STAGES = tl.constexpr(int(os.environ.get("PAGEDSERVE_FILTER_STAGES", "4")))  # tiles of loads in flight a program
REC = 2 * PIVOTS + 2  # a partial record: P counts, P masses, total count, total mass (fp32)
HIST_LEVELS = 4  # top-k: radix passes over the 32 key bits (pass 0 buckets the top 8, each later pass the next 8)
HIST_BINS = 1 << (32 // HIST_LEVELS)  # buckets of a histogram pass
# PAGEDSERVE_FILTER_RADIX=0: top-k by the pivot search (counts instead of masses), as before session 14.
RADIX_TOP_K = os.environ.get("PAGEDSERVE_FILTER_RADIX", "1") == "1"
# PAGEDSERVE_FILTER_MAXNREG=N [168; 0: no cap]: the kernel's registers a thread capped at N (ptxas spills the
# rest: ~100 bytes at 168). 168 gives 12 one-warp programs an SM where the uncapped kernel's 201 (H200) gives 8:
# at 256 rows top-k -12%, top-k + top-p -10%, top-p -4%, min-p +6 us; at 1 row within 3% (session 15, run 12).
MAXNREG = int(os.environ.get("PAGEDSERVE_FILTER_MAXNREG", "168")) or None


@triton.jit
def _to_key(x):
    """int32 with the order of the floats (-0.0 just below +0.0; NaN was mapped to -inf before)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _from_key(key):
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pivots(lo, hi, P: tl.constexpr):
    """P int32 keys, non-decreasing, in [lo + 1, hi]; the last is hi (hi - lo >= 2)."""
    j = tl.arange(0, P) + 1
    lo_v = _from_key(lo)
    hi_v = _from_key(hi)
    by_value = _to_key(lo_v + (hi_v - lo_v) * (j.to(tl.float32) / P))
    span = hi.to(tl.int64) - lo.to(tl.int64)
    by_key = (lo.to(tl.int64) + span * j.to(tl.int64) // P).to(tl.int32)
    pk = tl.where(span > NARROW_KEYS, by_value, by_key)
    pk = tl.minimum(tl.maximum(pk, lo + 1), hi)
    return tl.where(j == P, hi, pk)


@triton.jit
def _row_barrier(count_ptr, target):
    """Waits until the row's C programs have all arrived (the counter only grows: target = C x the
    barriers so far). Writes before it are visible to every program of the row after it."""
    tl.debug_barrier()
    tl.atomic_add(count_ptr, 1, sem="acq_rel")
    seen = tl.atomic_add(count_ptr, 0, sem="acquire")
    while seen < target:
        seen = tl.atomic_add(count_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _count_pass(logits_ptr, scratch_ptr, n, from_logits, write, inv_t, m, lo, hi, floor, pk,
                MASS: tl.constexpr, TILE: tl.constexpr, P: tl.constexpr):
    """Over the first n values of this program's chunk (logits, or its scratch chunk): candidates are
    the keys in [lo, hi) and >= floor. Per pivot: how many candidates (and how much mass e^(x - m)) lie
    at or above it; the candidates' total count and mass. With `write`, the candidates are also stored,
    compacted in order, at the start of the scratch chunk (in place when reading it: a value is written
    at or before the position it was read from, after the tile holding it was loaded)."""
    acc_c = tl.zeros([P], dtype=tl.int32)
    acc_m = tl.zeros([P], dtype=tl.float32)
    tot_c = tl.zeros([], dtype=tl.int32)
    tot_m = tl.zeros([], dtype=tl.float32)
    for start in tl.range(0, n, TILE, num_stages=STAGES):
        offs = start + tl.arange(0, TILE)
        inb = offs < n
        if from_logits:
            x = tl.load(logits_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
        else:
            x = tl.load(scratch_ptr + offs, mask=inb, other=float("-inf"))
        x = tl.where(x == x, x, float("-inf"))
        key = _to_key(x)
        cand = inb & (key >= lo) & (key < hi) & (key >= floor)
        above = cand[:, None] & (key[:, None] >= pk[None, :])
        acc_c += tl.sum(above.to(tl.int32), axis=0)
        if MASS:
            w = tl.where(cand, tl.exp(x - m), 0.0)
            acc_m += tl.sum(tl.where(above, w[:, None], 0.0), axis=0)
            tot_m += tl.sum(w, axis=0)
        cand_i = cand.to(tl.int32)
        if write:
            pos = tot_c + tl.cumsum(cand_i, axis=0) - 1
            tl.store(scratch_ptr + pos, x, mask=cand)
        tot_c += tl.sum(cand_i, axis=0)
    return acc_c, acc_m, tot_c, tot_m


@triton.jit
def _gather(part_ptr, count_ptr, slot, nbar, num_programs, prog, acc_c, acc_m, tot_c, tot_m,
            P: tl.constexpr, C: tl.constexpr):
    """Publishes this program's partial record in `slot`, waits for the row's other programs, and
    returns the row's sums (every program sums the same records in the same order: same result)."""
    rec = part_ptr + (slot * num_programs + prog) * (2 * P + 2)
    lanes = tl.arange(0, P)
    tl.store(rec + lanes, acc_c.to(tl.float32))  # counts <= 2^24: exact in fp32
    tl.store(rec + P + lanes, acc_m)
    tl.store(rec + 2 * P, tot_c.to(tl.float32))
    tl.store(rec + 2 * P + 1, tot_m)
    _row_barrier(count_ptr, nbar * num_programs)
    progs = tl.arange(0, C)
    ok = progs < num_programs
    recs = part_ptr + (slot * num_programs + progs) * (2 * P + 2)
    # .cg: from L2, past this SM's L1, which may hold the slot's records of two passes ago.
    all_c = tl.load(recs[:, None] + lanes[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
    all_m = tl.load(recs[:, None] + P + lanes[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
    row_c = tl.sum(all_c, axis=0).to(tl.int32)
    row_m = tl.sum(all_m, axis=0)
    row_tot_c = tl.sum(tl.load(recs + 2 * P, mask=ok, other=0.0, cache_modifier=".cg"), axis=0).to(tl.int32)
    row_tot_m = tl.sum(tl.load(recs + 2 * P + 1, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
    return row_c, row_m, row_tot_c, row_tot_m


@triton.jit
def _search(logits_ptr, scratch_ptr, part_ptr, count_ptr, nbar, num_programs, prog, chunk_len, inv_t, m,
            lo, hi, floor, goal, nlog, scratch_n,
            MASS: tl.constexpr, TILE: tl.constexpr, P: tl.constexpr, C: tl.constexpr, MAX_PASSES: tl.constexpr):
    """Top-p (MASS): the largest key t with F(t) >= target (as a key at or below it with nothing in between),
    where F(t) is the mass e^(x - m) of the row's values >= max(t, floor) and target = goal * the mass of
    every value >= floor; without MASS (top-k when RADIX is off), F counts them and target = goal. Needs
    F(lo) >= target > F(hi) = 0. Returns (t, the barriers passed so far). nlog: the passes that read the row
    (2: the second writes its candidates to the scratch row, later ones read those; 1: the candidates are few
    (a top-k floor), so the first pass already writes them; 0: this program's scratch chunk already holds its
    scratch_n values, every value >= floor among them, and every pass reads and rewrites that)."""
    above_c = tl.zeros([], dtype=tl.int32)  # count and mass at or above hi, from the passes before
    above_m = tl.zeros([], dtype=tl.float32)
    target = goal
    n = tl.where(nlog > 0, chunk_len, scratch_n)
    passes = 0
    done = ((hi.to(tl.int64) - lo) <= 1).to(tl.int32)  # (int32 keys: the span needs 64 bits)
    while (done == 0) & (passes < MAX_PASSES):
        pk = _pivots(lo, hi, P)
        acc_c, acc_m, tot_c, tot_m = _count_pass(
            logits_ptr, scratch_ptr, n, passes < nlog, passes >= nlog - 1, inv_t, m, lo, hi, floor, pk,
            MASS, TILE, P)
        own_c = tot_c  # this program's candidates (what it wrote, in a writing pass)
        nbar += 1  # the pass's records go to slot nbar % 2: a slower program may still read the other
        acc_c, acc_m, tot_c, tot_m = _gather(part_ptr, count_ptr, nbar % 2, nbar, num_programs, prog,
                                             acc_c, acc_m, tot_c, tot_m, P, C)
        if MASS:
            if passes == 0:
                target = goal * tot_m
            f = above_m + acc_m
        else:
            f = (above_c + acc_c).to(tl.float32)
        ok = f >= target  # true for a prefix of the pivots (the last, hi, never: F(hi) < target)
        new_lo = tl.max(tl.where(ok, pk, lo), axis=0)
        new_hi = tl.min(tl.where(ok, hi, pk), axis=0)
        cnt_lo = tl.min(tl.where(ok, acc_c, tot_c), axis=0)  # candidates at or above new_lo
        cnt_hi = tl.max(tl.where(ok, -1, acc_c), axis=0)  # ... at or above new_hi
        above_m += tl.max(tl.where(ok, float("-inf"), acc_m), axis=0)
        above_c += cnt_hi
        # Pass nlog - 1 (from the row, or the scratch chunk) wrote the candidates of its own interval: the next
        # pass reads those.
        n = tl.where(passes >= nlog - 1, own_c, chunk_len)
        lo = new_lo
        hi = new_hi
        done = (((cnt_lo - cnt_hi) <= 1) | ((hi.to(tl.int64) - lo) <= 1)).to(tl.int32)
        passes += 1
    return lo, nbar


@triton.jit
def _publish_hist(hist_ptr, hist, NB: tl.constexpr):
    """Adds this program's histogram to the row's (integer atomics: the sum is the same in any order).
    The row barrier that follows (acq_rel) makes every program's adds visible to every other."""
    bins = tl.arange(0, NB)
    tl.atomic_add(hist_ptr + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _choose_bucket(hist_ptr, above, k, NB: tl.constexpr):
    """From the row's histogram of the current interval (NB buckets, ascending) and the count at or above
    the interval's top: the highest bucket b with count(at or above b) >= k, its count, and the count
    above it."""
    bins = tl.arange(0, NB)
    h = tl.load(hist_ptr + bins, cache_modifier=".cg")  # .cg: written by atomics at L2
    at_or_above = above + tl.cumsum(h, axis=0, reverse=True)
    b = tl.max(tl.where(at_or_above >= k, bins, 0), axis=0)
    in_b = tl.sum(tl.where(bins == b, h, 0), axis=0)
    above_b = tl.sum(tl.where(bins == b, at_or_above, 0), axis=0) - in_b
    return b, in_b, above_b


@triton.jit
def _ukey(x):
    """The key as unsigned 32 bits (key + 2^31): the floats' order, -inf lowest (NaN mapped to -inf before)."""
    return (_to_key(x) ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def _topk_search(logits_ptr, scratch_ptr, hist_row, count_ptr, nbar, num_programs, chunk_len, inv_t, k, lo_fin,
                 TILE: tl.constexpr, NB: tl.constexpr, LEVELS: tl.constexpr):
    """The top-k threshold by radix selection on the unsigned keys (_ukey): pass 0 already put the row's finite
    values in NB buckets by their top 8 bits (histogram slot 0); each later pass buckets the values of the
    chosen bucket by the next 8 bits, at most LEVELS - 1 more passes, and ends early once the chosen bucket
    holds one value. Pass 1 reads the row and writes every value at or above the chosen bucket's bottom
    (<= k - 1 above it, plus the bucket's own) to this program's scratch chunk; later passes read and rewrite
    that in place. Returns (threshold key, barriers passed, the scratch values this program holds, all of
    them >= the threshold; -1 when no pass wrote any)."""
    BITS: tl.constexpr = 32 // LEVELS  # key bits a pass (NB = 2^BITS buckets)
    b, in_b, above = _choose_bucket(hist_row, 0, k, NB)
    shift = tl.full([], 32 - BITS, tl.uint32)
    lo = b.to(tl.uint32) << shift  # the chosen bucket: ukeys in [lo, lo + 2^shift)
    own = tl.full([], -1, tl.int32)
    level = tl.full([], 1, tl.int32)
    while (in_b > 1) & (level < LEVELS):
        span = tl.full([], 1, tl.uint32) << shift  # (ukey - lo < span: no lo + span, which may be 2^32)
        shift -= BITS
        hist = tl.zeros([NB], dtype=tl.int32)
        n = tl.where(level == 1, chunk_len, own)
        kept = tl.zeros([], dtype=tl.int32)
        for start in tl.range(0, n, TILE, num_stages=STAGES):
            offs = start + tl.arange(0, TILE)
            inb = offs < n
            if level == 1:
                x = tl.load(logits_ptr + offs, mask=inb, other=float("-inf")).to(tl.float32) * inv_t
            else:
                x = tl.load(scratch_ptr + offs, mask=inb, other=float("-inf"))
            x = tl.where(x == x, x, float("-inf"))
            ukey = _ukey(x)
            rel = ukey - lo  # (unsigned: wraps to a large value below lo)
            keep = inb & (ukey >= lo)
            hist += tl.histogram((rel >> shift).to(tl.int32), NB, mask=keep & (rel < span))
            keep_i = keep.to(tl.int32)
            # compacted in place: a value is written at or before where it was read from
            tl.store(scratch_ptr + kept + tl.cumsum(keep_i, axis=0) - 1, x, mask=keep)
            kept += tl.sum(keep_i, axis=0)
        own = kept
        _publish_hist(hist_row + level * NB, hist, NB)
        nbar += 1
        _row_barrier(count_ptr, nbar * num_programs)
        b, in_b, above = _choose_bucket(hist_row + level * NB, above, k, NB)
        lo += b.to(tl.uint32) << shift
        level += 1
    # lo may be a bucket's bottom below every value (nothing lies between it and the answer); keep it at or
    # above the row's smallest finite value so that its float is never a NaN bit pattern.
    t = tl.maximum(lo.to(tl.int32, bitcast=True) ^ -2147483648, _to_key(lo_fin))
    return t, nbar, own


# One variant for every batch and vocabulary: strides, sizes and the program count change nothing.
@triton.jit(do_not_specialize=["stride_row", "vocab", "chunk", "num_programs"])
def _filter_threshold_kernel(
    logits_ptr, temps_ptr, top_k_ptr, top_p_ptr, min_p_ptr, out_ptr, scratch_ptr, part_ptr, count_ptr, hist_ptr,
    stride_row, vocab, chunk, num_programs,
    TILE: tl.constexpr, P: tl.constexpr, C: tl.constexpr, MAX_PASSES: tl.constexpr, NB: tl.constexpr,
    LEVELS: tl.constexpr, RADIX: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    """Grid (S, num_programs): program (r, c) takes columns [c * chunk, (c + 1) * chunk) of row r; the
    row's programs agree on every pass through _gather (C >= num_programs: a fixed bound, one variant)."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    prog = tl.program_id(1)
    inv_t = 1.0 / tl.load(temps_ptr + row).to(tl.float32)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    min_p = tl.load(min_p_ptr + row).to(tl.float32)
    col0 = prog.to(tl.int64) * chunk
    chunk_len = tl.minimum(vocab - col0, chunk).to(tl.int32)
    logits_chunk = logits_ptr + row * stride_row + col0
    scratch_chunk = scratch_ptr + row * vocab + col0
    part_row = part_ptr + row * (2 * num_programs * (2 * P + 2))
    count_row = count_ptr + row
    hist_row = hist_ptr + row * (LEVELS * NB)  # top-k: the row's histogram of each radix pass (zeroed)
    want_k = (top_k > 0) & (top_k < vocab)

    # Pass 0: the row's max, min and number of finite values (a record of three, in slot 0); for top-k also
    # the histogram of the finite values' keys by their top 8 bits.
    hi_run = tl.full([TILE], float("-inf"), dtype=tl.float32)
    lo_run = tl.full([TILE], float("inf"), dtype=tl.float32)
    fin_run = tl.zeros([TILE], dtype=tl.int32)
    hist = tl.zeros([NB], dtype=tl.int32)
    for start in tl.range(0, chunk_len, TILE, num_stages=STAGES):
        offs = start + tl.arange(0, TILE)
        x = tl.load(logits_chunk + offs, mask=offs < chunk_len, other=float("-inf")).to(tl.float32) * inv_t
        finite = x > float("-inf")  # (False for NaN too)
        hi_run = tl.maximum(hi_run, tl.where(finite, x, float("-inf")))
        lo_run = tl.minimum(lo_run, tl.where(finite, x, float("inf")))
        fin_run += finite.to(tl.int32)
        if RADIX:
            if want_k:
                hist += tl.histogram((_ukey(x) >> (32 - 32 // LEVELS)).to(tl.int32), NB, mask=finite)
    if RADIX:
        if want_k:
            _publish_hist(hist_row, hist, NB)
    rec = part_row + prog * (2 * P + 2)
    tl.store(rec, tl.max(hi_run, axis=0))
    tl.store(rec + 1, tl.min(lo_run, axis=0))
    tl.store(rec + 2, tl.sum(fin_run, axis=0).to(tl.float32))
    nbar = 1
    _row_barrier(count_row, num_programs)
    progs = tl.arange(0, C)
    recs = part_row + progs * (2 * P + 2)
    ok = progs < num_programs
    m = tl.max(tl.load(recs, mask=ok, other=float("-inf"), cache_modifier=".cg"), axis=0)
    lo_fin = tl.min(tl.load(recs + 1, mask=ok, other=float("inf"), cache_modifier=".cg"), axis=0)
    num_finite = tl.sum(tl.load(recs + 2, mask=ok, other=0.0, cache_modifier=".cg"), axis=0).to(tl.int32)

    thr = tl.full([], float("-inf"), dtype=tl.float32)
    if num_finite > 0:
        neg_inf_key = _to_key(tl.full([], float("-inf"), dtype=tl.float32))
        lo = _to_key(lo_fin)
        hi = _to_key(m) + 1  # just above the max: F(hi) = 0
        t = neg_inf_key
        own = tl.full([], -1, tl.int32)
        if want_k & (top_k < num_finite):
            if RADIX:
                t, nbar, own = _topk_search(logits_chunk, scratch_chunk, hist_row, count_row, nbar, num_programs,
                                            chunk_len, inv_t, top_k, lo_fin, TILE, NB, LEVELS)
            else:
                t, nbar = _search(logits_chunk, scratch_chunk, part_row, count_row, nbar, num_programs, prog, chunk_len,
                                  inv_t, m, lo, hi, neg_inf_key, top_k.to(tl.float32), 2, own, False, TILE, P,
                                  C, MAX_PASSES)  # fmt: skip
        if top_p < 1.0:
            # After a top-k search only ~k values are left at or above its threshold: the scratch chunk holds
            # them (nlog 0), or, when that search needed no pass over the row, one pass collects them (nlog 1).
            nlog = tl.where(own >= 0, 0, tl.where(t > neg_inf_key, 1, 2))
            t, nbar = _search(logits_chunk, scratch_chunk, part_row, count_row, nbar, num_programs, prog, chunk_len,
                              inv_t, m, tl.maximum(lo, t), hi, t, top_p, nlog, own, True, TILE, P, C, MAX_PASSES)
        thr = _from_key(t)
        if min_p > 0.0:
            thr = tl.maximum(thr, m + tl.log(min_p))
    if prog == 0:
        tl.store(out_ptr + row, thr)


def programs_per_row(num_rows: int, vocab: int, device: torch.device, resident: int = RESIDENT_PER_SM) -> int:
    """C: one program a row on CPUs (the interpreter runs programs one after another, so a row's
    programs could never wait for each other); on a GPU as many as keep every program of the grid
    resident at once (`resident` programs an SM), at most MAX_PROGRAMS_PER_ROW and one tile each."""
    if device.type != "cuda":
        return 1
    fit = resident * num_sms(device) // max(num_rows, 1)
    return max(1, min(MAX_PROGRAMS_PER_ROW, fit, triton.cdiv(vocab, TILE)))


def filter_thresholds(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    num_programs: int | None = None,
) -> torch.Tensor:
    """thr [S] fp32 (see the module docstring). logits [S, V] fp32/bf16/fp16 with a contiguous last
    dimension; temperatures [S] fp32/fp64 (> 0); top_k [S] int64 (<= 0 or >= V: off); top_p [S] and
    min_p [S] fp32/fp64 (1 and 0: off). All on one device; nothing here reads the device.
    num_programs (programs a row; default programs_per_row) is for tests and tuning."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [num_rows, vocab], got shape {tuple(logits.shape)}")
    num_rows, vocab = logits.shape
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits dtype {logits.dtype} is not supported; supported: float32, bfloat16, float16")
    if vocab == 0 or (logits.stride(1) != 1 and vocab > 1):
        raise ValueError("logits must have columns, and a contiguous last dimension")
    for name, t, dtypes in (
        ("temperatures", temperatures, (torch.float32, torch.float64)),
        ("top_k", top_k, (torch.int64,)),
        ("top_p", top_p, (torch.float32, torch.float64)),
        ("min_p", min_p, (torch.float32, torch.float64)),
    ):
        if t.shape != (num_rows,) or t.dtype not in dtypes or t.device != logits.device:
            raise ValueError(f"{name} must be [{num_rows}] of {dtypes} on {logits.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")  # fmt: skip
    if out is None:
        out = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    elif out.shape != (num_rows,) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 [{num_rows}]")
    if num_rows == 0:
        return out
    if dry_run():
        out.fill_(float("-inf"))
    temperatures, top_k, top_p, min_p = (t.contiguous() for t in (temperatures, top_k, top_p, min_p))
    scratch = torch.empty(num_rows, vocab, dtype=torch.float32, device=logits.device)
    radix = RADIX_TOP_K  # (read at each call: tests switch it)
    hist_len = HIST_LEVELS * HIST_BINS if radix else 0
    # Barrier counters, then histograms from a 16-byte boundary (Triton specializes pointers on it: a parity
    # changing with the row count would compile another variant while serving); one memset.
    at = triton.cdiv(num_rows, 4) * 4
    zeroed = torch.zeros(at + num_rows * hist_len, dtype=torch.int32, device=logits.device)
    counts, hists = zeroed[:num_rows], zeroed[at:]

    cap = {"maxnreg": MAXNREG} if MAXNREG and logits.device.type == "cuda" else {}

    def launch(num_programs: int, warmup: bool = False):
        chunk = triton.cdiv(triton.cdiv(vocab, num_programs), 16) * 16  # 64-byte aligned chunk starts
        num_programs = triton.cdiv(vocab, chunk)
        parts = torch.empty(num_rows, 2, num_programs, REC, dtype=torch.float32, device=logits.device)
        fn = _filter_threshold_kernel.warmup if warmup else _filter_threshold_kernel[(num_rows, num_programs)]
        extra = {"grid": (1, 1)} if warmup else {}
        return fn(logits, temperatures, top_k, top_p, min_p, out, scratch, parts, counts, hists, logits.stride(0),
                  vocab, chunk, num_programs, TILE=TILE, P=PIVOTS, C=MAX_PROGRAMS_PER_ROW, MAX_PASSES=MAX_PASSES,
                  NB=HIST_BINS, LEVELS=HIST_LEVELS, RADIX=radix, num_warps=WARPS,
                  **pdl_launch_kwargs(logits.device), **extra, **cap)  # fmt: skip

    resident = RESIDENT_PER_SM
    if logits.device.type == "cuda":
        resident = resident_per_sm(logits.device, lambda: launch(1, warmup=True), radix)
    if num_programs is None:
        num_programs = programs_per_row(num_rows, vocab, logits.device, resident)
    elif not 1 <= num_programs <= MAX_PROGRAMS_PER_ROW or (num_programs > 1 and logits.device.type != "cuda"):
        raise ValueError(f"num_programs must be in [1, {MAX_PROGRAMS_PER_ROW}] (1 off CUDA), got {num_programs}")
    elif num_programs > 1 and num_rows * num_programs > resident * num_sms(logits.device):
        # Not every program could be resident: a row's programs would wait at the barrier forever.
        raise ValueError(f"{num_rows} rows x {num_programs} programs exceed {resident} a SM on this GPU")
    launch(num_programs)
    return out


_RESIDENT: dict[tuple[int, int, int, bool, int | None], int] = {}
# registers a thread of the compiled kernel (for the bench)
REGISTERS: dict[tuple[int, int, int, bool, int | None], int] = {}


# An H100 / H200 SM, for when the device properties do not say (Hopper: 64K registers, 2,048 threads, 228 KB).
_SM_REGS, _SM_THREADS, _SM_SHARED = 65536, 2048, 233472


def programs_an_sm(regs: int, shared: int, warps: int, regs_per_sm: int = _SM_REGS, threads_per_sm: int = _SM_THREADS,
                   shared_per_sm: int = _SM_SHARED) -> int:
    """Programs of `warps` warps, `regs` registers a thread and `shared` bytes of shared memory that an SM holds
    at once. A warp's registers come from one of the SM's 4 schedulers' quarters of the register file, in
    units of 256: 216 registers a thread fit 2 warps a quarter, 8 an SM, not the 9 that 65536 // 6912 says
    (session 14 run 2: 16 rows x 74 programs, sized for 9 an SM, hung at the row barrier; 8 an SM ran)."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SCHEDULERS_PER_SM * (regs_per_sm // SCHEDULERS_PER_SM // regs_per_warp) // warps
    by_warps = threads_per_sm // (32 * warps)
    by_smem = shared_per_sm // (shared + 1024)  # (1 KB a block is kept by the driver)
    return max(1, min(32, by_regs, by_warps, by_smem))


def resident_per_sm(device: torch.device, compile_kernel, radix: bool = True) -> int:
    """How many programs of the kernel (WARPS warps each) an SM holds at once, from the compiled kernel's
    registers and shared memory (compile_kernel() returns it, compiled but not launched): with one warp and
    ~255 registers a thread that is 8 (session 12's hang: 9 rows x 128 programs on 132 SMs). Cached per
    device and configuration; RESIDENT_PER_SM when the kernel cannot say."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, WARPS, TILE, radix, MAXNREG)
    if key not in _RESIDENT:
        kernel = compile_kernel()
        try:
            kernel._init_handles()
            regs, shared = int(kernel.n_regs), int(kernel.metadata.shared)
        except (AttributeError, RuntimeError, TypeError):  # (a Triton without these: the fixed bound)
            _RESIDENT[key] = RESIDENT_PER_SM
            return RESIDENT_PER_SM
        props = torch.cuda.get_device_properties(index)
        _RESIDENT[key] = programs_an_sm(regs, shared, WARPS, getattr(props, "regs_per_multiprocessor", _SM_REGS),
                                        getattr(props, "max_threads_per_multi_processor", _SM_THREADS),
                                        getattr(props, "shared_memory_per_multiprocessor", _SM_SHARED))
        REGISTERS[key] = regs
    return _RESIDENT[key]


__all__ = ["filter_thresholds", "programs_per_row", "programs_an_sm", "resident_per_sm", "PIVOTS", "TILE", "MAX_PASSES"]
