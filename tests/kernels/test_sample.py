"""Fused Gumbel/exponential-race sampling kernel: distribution, the documented noise stream,
determinism per (seed, offset), -inf handling, launch-config invariance, and the Sampler's mixed
batches through it.

Interpreter on CPU (fp32/fp16/bf16 loads, small shapes; several rows per program keep the 4000-row
distribution checks fast), compiled on CUDA (plus bf16 at V = 152064); see conftest.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.core.outputs import ScheduledRequest
from pagedserve.executor.kernels.sample import choose_num_splits, choose_tile, sample_gumbel
from pagedserve.executor.sampler import Sampler, position_seed
from pagedserve.sampling_params import SamplingParams

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # the kernel only loads and widens them
gpu_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")
NEG_INF = float("-inf")
# Exact in fp16 and bf16; one masked token.
FIXED = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.25, NEG_INF]
M32 = 0xFFFFFFFF


def draw(logits, temperature=1.0, seeds=None, offsets=None, **kwargs):
    num_rows = logits.shape[0]
    temps = torch.full((num_rows,), temperature, dtype=torch.float32, device=DEVICE)
    seeds = torch.arange(num_rows, dtype=torch.long) * 1_000_003 + 17 if seeds is None else torch.as_tensor(seeds)
    offsets = torch.zeros(num_rows, dtype=torch.long) if offsets is None else torch.as_tensor(offsets)
    return sample_gumbel(logits, temps, seeds.to(DEVICE), offsets.to(DEVICE), **kwargs)


def chi2_critical(dof: int, alpha: float = 1e-4) -> float:
    """x with P(chi2_dof > x) = alpha, by bisection on the regularized upper incomplete gamma."""
    lo, hi = 0.0, 1000.0
    for _ in range(100):
        mid = (lo + hi) / 2
        tail = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(mid / 2.0)).item()
        lo, hi = (mid, hi) if tail > alpha else (lo, mid)
    return lo


def assert_frequencies(ids: torch.Tensor, probs: list[float]) -> None:
    """Chi-square goodness of fit (alpha 1e-4) and exact zeros where probs are 0. The noise is a
    fixed function of the seeds, so this is deterministic, not flaky."""
    num = ids.numel()
    counts = torch.bincount(ids.cpu(), minlength=len(probs)).tolist()
    assert len(counts) == len(probs)
    stat, cells = 0.0, 0
    for count, p in zip(counts, probs):
        if p == 0.0:
            assert count == 0
        elif p * num >= 5:  # the chi-square approximation's usual rule
            stat += (count - p * num) ** 2 / (p * num)
            cells += 1
    assert stat < chi2_critical(cells - 1), (counts, [round(p * num, 1) for p in probs], stat)


def softmax64(values: list[float], temperature: float) -> list[float]:
    finite = [v for v in values if v != NEG_INF]
    top = max(finite)
    e = [math.exp((v - top) / temperature) if v != NEG_INF else 0.0 for v in values]
    total = sum(e)  # once: summing inside the comprehension was quadratic (hours at V = 152064)
    return [x / total for x in e]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_distribution_matches_softmax(dtype, temperature):
    """4000 rows of the same logits, each with its own seed: frequencies follow softmax(l / T)."""
    num = 4000
    logits = torch.tensor([FIXED], dtype=dtype, device=DEVICE).expand(num, -1)  # row stride 0
    ids = draw(logits, temperature)
    assert_frequencies(ids, softmax64(FIXED, temperature))


def test_distribution_across_splits():
    """Wider rows, split over several programs, with the probable tokens in different chunks."""
    num, vocab = 4000, 300
    row = torch.full((vocab,), -8.0)
    hot = {3: 1.0, 77: 0.5, 150: 2.0, 299: 1.5}
    for col, value in hot.items():
        row[col] = value
    ids = draw(row[None].to(DEVICE).expand(num, -1), 1.0, tile=64, num_splits=5)
    probs = softmax64(row.tolist(), 1.0)
    other = 1.0 - sum(probs[c] for c in hot)
    hist = torch.bincount(ids.cpu(), minlength=vocab)
    grouped = torch.tensor([hist[c].item() for c in hot] + [num - sum(hist[c].item() for c in hot)])
    expanded = torch.repeat_interleave(torch.arange(len(grouped)), grouped)
    assert_frequencies(expanded, [probs[c] for c in hot] + [other])


def philox4x32_10(counter: tuple[int, int, int, int], key: int) -> list[int]:
    """Philox4x32-10 (Salmon et al. 2011) in plain Python: the reference for the stream."""
    c0, c1, c2, c3 = counter
    k0, k1 = key & M32, (key >> 32) & M32
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return [c0, c1, c2, c3]


def reference_scores(row: list[float], temperature: float, seed: int, offset: int) -> list[float]:
    """The module docstring's definition, in float64: l / T - log(-log(1 - w)), w from word i % 4
    of counter (i // 4, offset_lo, offset_hi, 0) under key seed."""
    scores = []
    for i, logit in enumerate(row):
        word = philox4x32_10((i // 4, offset & M32, (offset >> 32) & M32, 0), seed)[i % 4]
        w = min((word + 0.5) * 2.0**-32, 1 - 2.0**-24)
        scores.append(logit / temperature - math.log(-math.log1p(-w)))
    return scores


@pytest.mark.parametrize("offset", [0, 5, 2**32 + 3])
def test_matches_the_documented_noise_stream(offset):
    """Token for token against a pure-Python Philox + float64 scores (rows with a clear winner)."""
    vocab, temperature = 37, 0.8
    gen = torch.Generator().manual_seed(offset % 1000)
    logits = torch.randn(7, vocab, generator=gen)
    seeds = [position_seed(s, offset) for s in range(7)]
    ids = draw(logits.to(DEVICE), temperature, seeds=seeds, offsets=[offset] * 7, tile=16)
    checked = 0
    for r in range(7):
        scores = reference_scores(logits[r].tolist(), temperature, seeds[r], offset)
        best, second = sorted(scores, reverse=True)[:2]
        if best - second > 1e-4:  # fp32 vs float64: only near-ties may differ
            assert ids[r].item() == scores.index(best), r
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("vocab", [1, 5, 300, 5000])
@pytest.mark.parametrize("num_rows", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_same_seed_and_offset_same_token_alone_and_in_a_bigger_batch(num_rows, vocab, dtype):
    gen = torch.Generator().manual_seed(num_rows * 7 + vocab)
    logits = (torch.randn(num_rows, vocab, generator=gen) * 2).to(dtype).to(DEVICE)
    temps = torch.rand(num_rows, generator=gen) + 0.5
    seeds = torch.randint(0, 2**62, (num_rows,), generator=gen)
    offsets = torch.randint(0, 2**40, (num_rows,), generator=gen)
    args = (temps.to(DEVICE), seeds.to(DEVICE), offsets.to(DEVICE))
    out = torch.full((num_rows,), -1, dtype=torch.long, device=DEVICE)  # poisoned
    got = sample_gumbel(logits, *args, out=out)
    assert got is out
    assert ((out >= 0) & (out < vocab)).all()
    for r in range(num_rows):  # alone
        one = sample_gumbel(logits[r:r + 1], temps[r:r + 1].to(DEVICE), seeds[r:r + 1].to(DEVICE),
                            offsets[r:r + 1].to(DEVICE))  # fmt: skip
        assert one.item() == out[r].item()
    # Inside a bigger batch: other rows around it, in reversed order.
    perm = torch.arange(num_rows - 1, -1, -1)
    big_logits = torch.cat([logits[perm], torch.randn(5, vocab, generator=gen).to(dtype).to(DEVICE)])
    big_args = [torch.cat([a[perm.to(a.device)], b.to(DEVICE)]) for a, b in zip(
        args, (torch.ones(5), torch.arange(5), torch.arange(5)))]  # fmt: skip
    assert torch.equal(sample_gumbel(big_logits, *big_args)[:num_rows], out[perm.to(DEVICE)])


@pytest.mark.parametrize("vocab", [5, 300, 5000])
def test_ids_do_not_depend_on_the_launch_layout(vocab):
    """Tiles, splits (one, several, one per tile: partials + reduce) and rows per program, including
    the GPU's default choices, all give the same ids."""
    num_rows = 7
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(num_rows, vocab, generator=gen) * 2).to(DEVICE)
    args = (torch.rand(num_rows, generator=gen) + 0.5, torch.randint(0, 2**62, (num_rows,), generator=gen),
            torch.randint(0, 2**40, (num_rows,), generator=gen))  # fmt: skip
    args = tuple(a.to(DEVICE) for a in args)
    want = sample_gumbel(logits, *args)  # on CPU: one program for all rows; on CUDA: the default
    small = 16 if vocab <= 300 else 512  # the interpreter pays ~10 ms per program and loop step
    gpu_tile = choose_tile(vocab)
    for kwargs in (
        {"tile": gpu_tile, "num_splits": choose_num_splits(num_rows, vocab, gpu_tile), "rows_per_program": 1},
        {"tile": small, "rows_per_program": 8},
        {"tile": 2 * small, "num_splits": 3, "rows_per_program": 2},
        {"tile": small, "num_splits": 1000, "rows_per_program": 8},
        {"tile": 8192, "num_splits": 1, "rows_per_program": 1},
    ):
        assert torch.equal(sample_gumbel(logits, *args, **kwargs), want), kwargs


def test_different_offsets_and_seeds_give_different_draws():
    logits = torch.zeros(1, 5000, device=DEVICE)  # uniform: a different stream ~ a different token
    by_offset = {draw(logits, seeds=[9], offsets=[o]).item() for o in range(8)}
    by_seed = {draw(logits, seeds=[s], offsets=[0]).item() for s in range(8)}
    assert len(by_offset) >= 6 and len(by_seed) >= 6
    # Offsets differing only in their high 32 bits are different streams too.
    assert draw(logits, seeds=[9], offsets=[1]).item() != draw(logits, seeds=[9], offsets=[1 + 2**32]).item()


@pytest.mark.parametrize("vocab", [5, 300, 5000])
def test_masked_tokens_never_sampled(vocab):
    num = 64
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(num, vocab, generator=gen) * 3
    logits[torch.rand(num, vocab, generator=gen) < 0.5] = NEG_INF
    logits[:, 0] = torch.where(torch.isinf(logits[:, 1:]).all(1), 0.0, logits[:, 0])  # >= 1 finite a row
    ids = draw(logits.to(DEVICE), 2.0).cpu()
    assert torch.isfinite(logits[torch.arange(num), ids]).all()


@pytest.mark.parametrize("vocab", [1, 5, 300, 5000])
def test_single_finite_logit_always_wins(vocab):
    num = 7
    logits = torch.full((num, vocab), NEG_INF)
    cols = torch.arange(num) * 131 % vocab
    logits[torch.arange(num), cols] = torch.tensor([-1e30, -50.0, 0.0, 3.0, 80.0, -7.0, 1e4])  # any value
    for temperature in (1e-5, 1.0, 100.0):
        assert torch.equal(draw(logits.to(DEVICE), temperature).cpu(), cols)


def test_all_masked_row_and_nan_stay_in_range():
    logits = torch.full((3, 300), NEG_INF)
    logits[1, 5] = float("nan")
    logits[2, :] = float("nan")
    logits[2, 250] = 1.0  # NaN counts as -inf: the one real logit wins
    ids = draw(logits.to(DEVICE), 1.0, tile=64, num_splits=3).tolist()
    assert ids[0] == 0 and 0 <= ids[1] < 300 and ids[2] == 250


def test_strided_rows_and_fp64_temperatures():
    wide = torch.randn(5, 300 + 11, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    logits = wide[:, 3:303]
    temps = torch.full((5,), 0.7, dtype=torch.float64, device=DEVICE)
    seeds, offsets = torch.arange(5, device=DEVICE), torch.zeros(5, dtype=torch.long, device=DEVICE)
    got = sample_gumbel(logits, temps, seeds, offsets)
    assert torch.equal(got, sample_gumbel(logits.contiguous(), temps.float(), seeds, offsets))


def test_empty_batch_and_split_choice():
    out = draw(torch.empty(0, 10, device=DEVICE))
    assert out.shape == (0,) and out.dtype == torch.long
    assert choose_num_splits(1, 152064, 1024) == 149  # one tile a program: spread over the SMs
    assert choose_num_splits(139, 152064, 1024) == 10  # chunks of at most 16k columns
    assert choose_num_splits(256, 152064, 1024) == 10
    assert choose_num_splits(7, 5, 16) == 1


def test_rejects_bad_inputs():
    x = torch.randn(3, 8, device=DEVICE)
    t, s = torch.ones(3, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE)
    cases = [
        ((torch.randn(8, device=DEVICE), t, s, s), {}, "num_rows, vocab"),
        ((x.int(), t, s, s), {}, "not supported"),
        ((torch.empty(3, 0, device=DEVICE), t, s, s), {}, "no columns"),
        ((torch.randn(8, 3, device=DEVICE).t(), t, s, s), {}, "contiguous last"),
        ((x, t[:2], s, s), {}, "temperatures shape"),
        ((x, t, s.int(), s), {}, "seeds dtype"),
        ((x, t, s, s.float()), {}, "offsets dtype"),
        ((x, t, s, s, torch.empty(3, dtype=torch.int32, device=DEVICE)), {}, "out must be int64"),
        ((x, t, s, s), {"tile": 100}, "power of two"),
        ((x, t, s, s), {"num_splits": 0}, "num_splits"),
        ((x, t, s, s), {"rows_per_program": 3}, "rows_per_program"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            sample_gumbel(*args, **kwargs)


# ---- the Sampler's use of the kernel (forced on here: the interpreter on CPU; the worker turns it on on CUDA) ----


def req(params: SamplingParams, output_index: int = 0, rid: str = "r") -> ScheduledRequest:
    outputs = [1] * output_index
    return ScheduledRequest(request_id=rid, token_ids=[0], num_computed_tokens=0, block_ids=[0], needs_sample=True,
                            sampling_params=params, prompt_token_ids=[0], output_token_ids=outputs,
                            output_index=output_index)  # fmt: skip


@pytest.fixture
def fused_sampler(monkeypatch):
    monkeypatch.setattr(Sampler, "_fused_kernel_on", lambda self, logits: True)
    return Sampler(len(FIXED), {5}, seed=123)


def test_sampler_fast_rows_follow_softmax(fused_sampler):
    num = 4000
    logits = torch.tensor([FIXED] * num, device=DEVICE)
    ids, _ = fused_sampler(logits, [req(SamplingParams(temperature=0.7))] * num)
    assert_frequencies(torch.tensor(ids), softmax64(FIXED, 0.7))


def test_sampler_mixed_batch_greedy_fast_and_filtered_rows(fused_sampler):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, len(FIXED), generator=gen) * 2).to(DEVICE)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=42),  # fast
        SamplingParams(temperature=0.9, top_k=2, seed=3),  # filtered (torch path)
        SamplingParams(temperature=1.2),  # fast, unseeded
        SamplingParams(temperature=0.0, top_k=5),
        SamplingParams(temperature=0.8, top_p=0.5),  # filtered
    ]
    reqs = [req(p, output_index=4, rid=str(i)) for i, p in enumerate(params)]
    for _ in range(5):
        ids, _ = fused_sampler(logits, reqs)
        assert all(0 <= t < len(FIXED) for t in ids)
        assert ids[0] == logits[0].argmax().item() and ids[4] == logits[4].argmax().item()
        assert ids[2] in logits[2].topk(2).indices.tolist()
        # The seeded fast row is the kernel's draw for (position_seed(42, 4), offset 4), alone too.
        want = draw(logits[1:2], 1.0, seeds=[position_seed(42, 4)], offsets=[4]).item()
        alone, _ = fused_sampler(logits[1:2], [reqs[1]])
        assert ids[1] == want == alone[0]


def test_sampler_unseeded_fast_rows_vary_between_steps(fused_sampler):
    logits = torch.zeros(1, len(FIXED), device=DEVICE)
    seen = {fused_sampler(logits, [req(SamplingParams())])[0][0] for _ in range(20)}
    assert len(seen) >= 3


# ---- GPU only ----


@gpu_only
def test_bf16_distribution_at_full_vocabulary():
    """V = 152064 in bf16, hot tokens spread over the row and a real tail, 20000 draws."""
    num, vocab = 20_000, 152_064
    gen = torch.Generator().manual_seed(11)
    row = torch.rand(vocab, generator=gen) * 4 - 12  # the tail's mass: ~55% at T = 1, ~2% at 0.7
    hot = {0: 1.0, 4097: 0.0, 77777: 0.5, 100003: -1.0, vocab - 1: 1.5}
    for col, value in hot.items():
        row[col] = value
    row = row.bfloat16()
    for temperature in (0.7, 1.0):
        ids = draw(row[None].cuda().expand(num, -1), temperature)
        probs = softmax64(row.double().tolist(), temperature)
        hist = torch.bincount(ids.cpu(), minlength=vocab)
        counts = [hist[c].item() for c in hot]
        grouped = torch.repeat_interleave(torch.arange(len(hot) + 1), torch.tensor(counts + [num - sum(counts)]))
        assert_frequencies(grouped, [probs[c] for c in hot] + [1.0 - sum(probs[c] for c in hot)])


@gpu_only
def test_capturable_in_cuda_graph():
    logits = torch.randn(139, 152_064, device="cuda", dtype=torch.bfloat16)
    temps = torch.ones(139, device="cuda")
    seeds = torch.arange(139, device="cuda")
    offsets = torch.zeros(139, dtype=torch.long, device="cuda")
    out = torch.empty(139, dtype=torch.long, device="cuda")
    sample_gumbel(logits, temps, seeds, offsets, out=out)
    want = out.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sample_gumbel(logits, temps, seeds, offsets, out=out)
    out.fill_(-1)
    graph.replay()
    assert torch.equal(out, want)
    seeds += 1
    graph.replay()
    assert not torch.equal(out, want)
