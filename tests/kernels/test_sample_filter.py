"""Top-k / top-p / min-p thresholds without a sort (kernels/sample_filter.py), and sampling under them.

The reference is the torch path the Sampler uses off CUDA (sampler.apply_sampling_filters: a stable
descending sort, softmax, cumsum): the kernel's kept set {x >= thr} must be the same set, row by row,
for fresh random logits of several widths (below, at and past one tile; not multiples of it), flat
and peaked rows, ties (fp16/bf16 and quantized logits), -inf and NaN entries, and every combination
of the filters. Interpreter on CPU (fp32/fp16/bf16 loads, small shapes), compiled on CUDA (plus the
152064-token vocabulary); see conftest.py.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels.sample import sample_gumbel
from pagedserve.executor.kernels.sample_filter import TILE, filter_thresholds, programs_an_sm, programs_per_row
from pagedserve.executor.sampler import Sampler, apply_sampling_filters, position_seed
from pagedserve.sampling_params import SamplingParams

from .test_sample import assert_frequencies, req, softmax64

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")
NEG_INF = float("-inf")


def params_tensors(rows: list[tuple[float, int, float, float]]):
    """(temperature, top_k, top_p, min_p) per row -> the kernel's four device tensors."""
    temps = torch.tensor([r[0] for r in rows], dtype=torch.float64, device=DEVICE)
    top_k = torch.tensor([r[1] for r in rows], dtype=torch.int64, device=DEVICE)
    top_p = torch.tensor([r[2] for r in rows], dtype=torch.float64, device=DEVICE)
    min_p = torch.tensor([r[3] for r in rows], dtype=torch.float64, device=DEVICE)
    return temps, top_k, top_p, min_p


def kept_sets(logits: torch.Tensor, rows: list[tuple[float, int, float, float]]):
    """(kernel's kept mask, reference kept mask, thresholds), both masks [S, V] bool on the CPU."""
    temps, top_k, top_p, min_p = params_tensors(rows)
    out = torch.full((logits.shape[0],), float("nan"), device=DEVICE)  # poisoned: every row must be written
    thr = filter_thresholds(logits, temps, top_k, top_p, min_p, out=out)
    assert thr is out and not thr.isnan().any()
    x = logits.float() * (1.0 / temps.float())[:, None]
    x = torch.where(x.isnan(), torch.full_like(x, NEG_INF), x)
    kept = x >= thr[:, None]
    vocab = logits.shape[1]
    # The reference divides by T; the kernel multiplies by 1 / T, as the fused sampler does: use the
    # kernel's x (at T = 1) so both see the same numbers.
    ones = torch.ones_like(temps, dtype=torch.float32)
    ref = apply_sampling_filters(x.clone(), ones, top_k, top_p.float(), min_p.float()) > 0
    # A row the reference keeps entirely (filters off or keeping all) keeps -inf tokens at probability 0.
    ref |= (thr[:, None] == NEG_INF).expand(-1, vocab) & (x == NEG_INF)
    kept, ref, x = kept.cpu(), ref.cpu(), x.cpu()
    for r, (_, k, p, _) in enumerate(rows):
        for col in (kept[r] != ref[r]).nonzero().flatten().tolist():
            # Only a token at the top-p boundary may differ: its cumulative mass before it within fp32
            # rounding of p (masses summed in tile order vs the reference's sorted cumsum), or a token
            # tied with the boundary one, which the kernel keeps and the reference's stable sort may
            # drop (it keeps the lower ids of a tie).
            row = x[r].double()
            if 0 < k < vocab:
                row = torch.where(row >= row.topk(k).values[-1], row, torch.full_like(row, NEG_INF))
            probs = torch.softmax(row, 0)
            before = probs[probs > probs[col]].sum().item()
            tied = probs[probs == probs[col]].sum().item()
            at_boundary = before < p + 1e-5 and before + tied > p - 1e-5
            assert p < 1.0 and at_boundary and (kept[r, col] or tied == probs[col].item()), (r, col, before, tied, p)
            ref[r, col] = kept[r, col]
    return kept, ref, thr.cpu()


ROWS = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0),  # no filter: thr = -inf
    (0.7, 1, 1.0, 0.0),
    (1.0, 5, 1.0, 0.0),
    (1.3, 50, 1.0, 0.0),
    (1.0, 0, 0.9, 0.0),
    (0.5, 0, 0.5, 0.0),
    (1.0, 0, 0.01, 0.0),  # only the top token
    (1.0, 0, 0.999, 0.0),
    (0.8, 20, 0.9, 0.0),  # top-p over what top-k kept
    (1.0, 0, 1.0, 0.05),
    (0.9, 40, 0.95, 0.1),  # all three
    (1.0, 3, 0.3, 0.5),
]


@pytest.mark.parametrize("vocab", [7, 300, TILE, 1500, 5000])
@pytest.mark.parametrize("scale", [1.0, 4.0])  # flat (random weights) and peaked (a trained model)
def test_kept_set_matches_the_torch_filters(vocab, scale):
    gen = torch.Generator().manual_seed(vocab * 10 + int(scale))
    rows = [r for r in ROWS if r[1] < vocab]
    logits = (torch.randn(len(rows), vocab, generator=gen) * scale).to(DEVICE)
    kept, ref, thr = kept_sets(logits, rows)
    assert torch.equal(kept, ref), [(i, int(kept[i].sum()), int(ref[i].sum())) for i in range(len(rows))]
    assert thr[0] == NEG_INF  # no filter
    assert kept[1].sum() == 1 and kept[2].sum() == 5


@pytest.mark.parametrize("vocab", [300, 1500])
def test_the_pivot_top_k_search_keeps_the_same_sets(vocab, monkeypatch):
    """PAGEDSERVE_FILTER_RADIX=0 (the kernel variant without radix selection): top-k by the pivot search, with
    the same kept sets as the torch filters and as the radix search."""
    from pagedserve.executor.kernels import sample_filter

    gen = torch.Generator().manual_seed(vocab + 1)
    rows = [r for r in ROWS if r[1] < vocab]
    logits = (torch.randn(len(rows), vocab, generator=gen) * 2).to(DEVICE)
    radix_kept = kept_sets(logits, rows)[0]
    monkeypatch.setattr(sample_filter, "RADIX_TOP_K", False)
    kept, ref, _ = kept_sets(logits, rows)
    assert torch.equal(kept, ref)
    assert torch.equal(kept, radix_kept)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_with_many_ties(dtype):
    """bf16 / fp16 logits repeat values often: ties at the k-th value all stay, as in the reference."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(len(ROWS), 3000, generator=gen) * 2).to(dtype).to(DEVICE)
    kept, ref, _ = kept_sets(logits, ROWS)
    assert torch.equal(kept, ref)


def test_quantized_logits_ties_at_the_boundary():
    """Logits on a grid of 0.5: top-k's k-th value is shared by many tokens; all of them survive."""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randint(-8, 8, (4, 777), generator=gen).float() / 2).to(DEVICE)
    rows = [(1.0, 10, 1.0, 0.0), (1.0, 100, 1.0, 0.0), (1.0, 0, 0.6, 0.0), (1.0, 30, 0.7, 0.2)]
    kept, ref, _ = kept_sets(logits, rows)
    assert torch.equal(kept, ref)
    assert kept[0].sum() > 10  # the tie at the 10th value kept more than 10


def test_masked_and_nan_entries():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 2100, generator=gen) * 2
    logits[:, ::3] = NEG_INF  # 700 masked tokens a row
    logits[1, 5] = float("nan")
    logits[4, :] = NEG_INF  # nothing finite
    logits[5, :] = NEG_INF
    logits[5, 17] = 0.25  # one finite token
    rows = [(1.0, 10, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.0, 1500, 1.0, 0.0),  # k >= finite count: keep all
            (0.7, 30, 0.8, 0.05), (1.0, 5, 0.5, 0.1), (1.0, 3, 0.5, 0.1)]  # fmt: skip
    kept, ref, thr = kept_sets(logits.to(DEVICE), rows)
    assert torch.equal(kept[:4], ref[:4])
    assert not kept[0, ::3].any() and kept[0].sum() == 10
    assert thr[2] == NEG_INF and thr[4] == NEG_INF  # top-k keeps all finite; a row with nothing finite
    assert kept[5].nonzero().flatten().tolist() == [17]


def test_top_k_radix_selection_paths():
    """Top-k selects by the keys' bits, 8 a pass (the top 8 in pass 0, then up to three passes more). Rows
    built to stop at each depth, and to hand each kind of start to a top-p search after it:
      0: the k-th value alone in its top-8-bit bucket (k = 1 of a row with one far outlier): no pass after
         pass 0, so the top-p search reads the row itself;
      1: values of both signs, the k-th negative;
      2: values that share their top 24 bits (1 + small multiples of 2^-23): only the last pass tells them
         apart;
      3: the k-th value tied 40 times at the bottom of the finite range (-3.4e38, the lowest bucket), with
         -inf and NaN below and among them;
      4: every value equal (a tie of the whole row, k inside it)."""
    gen = torch.Generator().manual_seed(13)
    vocab = 1000
    logits = torch.randn(5, vocab, generator=gen)
    logits[0, 123] = 100.0  # exponent far above the rest: alone in its bucket
    logits[1] = torch.randn(vocab, generator=gen) * 4 - 2
    logits[2] = 1.0 + torch.randint(0, 64, (vocab,), generator=gen).float() * 2.0**-23
    logits[3] = torch.randn(vocab, generator=gen)
    low = torch.randperm(vocab, generator=gen)
    logits[3, low[:40]] = -3.4e38
    logits[3, low[40:60]] = NEG_INF
    logits[3, low[60]] = float("nan")
    logits[4] = 0.75
    rows = [(1.0, 1, 0.9, 0.0), (1.0, 700, 1.0, 0.0), (1.0, 17, 0.95, 0.0), (1.0, 950, 1.0, 0.0),
            (1.0, 500, 0.5, 0.0)]  # fmt: skip
    # Row 3's kept tokens at -3.4e38 have probability 0 (exp underflows), which the reference's mask drops:
    # its set is checked against torch.topk instead.
    others = [0, 1, 2, 4]
    kept, ref, thr = kept_sets(logits[others].to(DEVICE), [rows[i] for i in others])
    assert torch.equal(kept, ref), [(i, int(kept[i].sum()), int(ref[i].sum())) for i in range(len(others))]
    assert kept[0].nonzero().flatten().tolist() == [123]
    assert kept[1].sum() == 700 and thr[1] < 0
    assert kept[2].sum() >= 17 and thr[2] > 1.0
    assert kept[3].all()
    thr3 = filter_thresholds(logits[3:4].to(DEVICE), *params_tensors(rows[3:4])).item()
    row3 = torch.nan_to_num(logits[3], nan=NEG_INF)
    assert thr3 == torch.tensor(-3.4e38).item()
    assert torch.equal(row3 >= thr3, row3 >= row3.topk(950).values[-1])  # all 979 finite: the tie kept whole


def test_programs_an_sm_counts_each_schedulers_quarter_of_the_registers():
    """The row barrier needs every program of a grid resident: the count must never be above what the SM holds.
    Figures seen on the H200 (sessions 13-14): 168 registers, 1 warp: 12; 2 warps: 6; 105 registers, 4 warps: 4;
    216 registers, 1 warp: 8 (not 9: a warp takes its registers from one scheduler's quarter of the file)."""
    assert programs_an_sm(168, 3072, 1) == 12
    assert programs_an_sm(168, 3072, 2) == 6
    assert programs_an_sm(105, 3072, 4) == 4
    assert programs_an_sm(216, 4096, 1) == 8
    assert programs_an_sm(32, 3072, 1) == 32  # the blocks-an-SM cap
    assert programs_an_sm(32, 100_000, 1) == 2  # shared memory bound


def test_strided_rows_and_fp32_params():
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(3, 2000, generator=gen).to(DEVICE) * 3
    logits = base[:, 100:1900]  # row stride 2000, 1800 columns
    temps, top_k, top_p, min_p = params_tensors([(0.8, 0, 0.9, 0.0), (1.0, 25, 1.0, 0.0), (1.0, 0, 1.0, 0.2)])
    thr = filter_thresholds(logits, temps.float(), top_k, top_p.float(), min_p.float())
    want = filter_thresholds(logits.contiguous(), temps, top_k, top_p, min_p)
    assert torch.equal(thr, want)
    assert (logits[1] >= thr[1]).sum() == 25


def test_the_same_row_gives_the_same_threshold_in_any_batch():
    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(5, 4000, generator=gen) * 2).to(DEVICE)
    rows = [(0.7, 40, 0.9, 0.02)] * 5
    together = filter_thresholds(logits, *params_tensors(rows))
    for r in range(5):
        alone = filter_thresholds(logits[r:r + 1], *params_tensors(rows[:1]))
        assert alone.item() == together[r].item()


def test_sampling_under_thresholds_follows_the_renormalized_softmax():
    """4000 draws of one row with top-k 4 then top-p 0.8: the kept tokens, at their renormalized
    probabilities (chi-square), and never a filtered one."""
    values = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.25, NEG_INF, 1.5, -0.5]
    temperature = 0.8
    row = torch.tensor([values], device=DEVICE)
    temps, top_k, top_p, min_p = params_tensors([(temperature, 4, 0.8, 0.0)])
    thr = filter_thresholds(row, temps, top_k, top_p, min_p)
    probs = softmax64(values, temperature)
    order = sorted(range(len(values)), key=lambda i: -values[i])[:4]  # top-4: 2.0, 1.5, 1.0, 0.5
    mass, keep = 0.0, []
    total = sum(probs[i] for i in order)
    for i in order:  # top-p over the top-4's renormalized mass
        keep.append(i)
        mass += probs[i] / total
        if mass >= 0.8:
            break
    want = [probs[i] / sum(probs[j] for j in keep) if i in keep else 0.0 for i in range(len(values))]
    num = 4000
    ids = sample_gumbel(row.expand(num, -1), temps.expand(num), torch.arange(num, device=DEVICE) * 7919 + 1,
                        torch.zeros(num, dtype=torch.long, device=DEVICE), thresholds=thr.expand(num))  # fmt: skip
    assert set(ids.cpu().tolist()) <= set(keep)
    assert_frequencies(ids, want)


def test_thresholds_of_minus_inf_change_no_draw():
    gen = torch.Generator().manual_seed(13)
    logits = (torch.randn(9, 700, generator=gen) * 2).to(DEVICE)
    temps = torch.full((9,), 0.9, device=DEVICE)
    seeds = torch.arange(9, device=DEVICE) * 31 + 5
    offsets = torch.arange(9, device=DEVICE)
    plain = sample_gumbel(logits, temps, seeds, offsets)
    same = sample_gumbel(logits, temps, seeds, offsets, thresholds=torch.full((9,), NEG_INF, device=DEVICE))
    assert torch.equal(plain, same)


@pytest.fixture
def fused_sampler(monkeypatch):
    monkeypatch.setattr(Sampler, "_fused_kernel_on", lambda self, logits: True)
    return Sampler(600, {5}, seed=123)


def test_sampler_sends_filtered_rows_through_the_kernels(fused_sampler, monkeypatch):
    gen = torch.Generator().manual_seed(17)
    logits = (torch.randn(5, 600, generator=gen) * 3).to(DEVICE)
    params = [SamplingParams(temperature=0.9, top_k=3, seed=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.7, top_p=0.5), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.8, min_p=0.3, seed=9)]  # fmt: skip
    reqs = [req(p, output_index=3, rid=str(i)) for i, p in enumerate(params)]
    monkeypatch.setattr(Sampler, "_sample_filtered", lambda *a: pytest.fail("torch path used on the fused path"))
    for _ in range(4):
        ids, _ = fused_sampler(logits, reqs)
        assert ids[0] in logits[0].topk(3).indices.tolist()
        assert ids[1] == logits[1].argmax().item()
        x2 = logits[2] / 0.7
        p2 = torch.softmax(x2.double(), 0)
        order = p2.argsort(descending=True)
        nucleus = order[: int((p2[order].cumsum(0) < 0.5).sum()) + 1].tolist()
        assert ids[2] in nucleus
        assert logits[4, ids[4]] / 0.8 >= logits[4].max() / 0.8 + torch.log(torch.tensor(0.3))
    # A seeded filtered row is a function of (seed, position): the same alone as in the batch.
    alone, _ = fused_sampler(logits[0:1], [reqs[0]])
    want = sample_gumbel(logits[0:1], torch.tensor([0.9], device=DEVICE),
                         torch.tensor([position_seed(1, 3)], device=DEVICE), torch.tensor([3], device=DEVICE),
                         thresholds=filter_thresholds(logits[0:1], *params_tensors([(0.9, 3, 1.0, 0.0)])))  # fmt: skip
    assert alone[0] == ids[0] == want.item()


def test_sampler_torch_path_when_fused_filters_are_off(monkeypatch):
    monkeypatch.setattr(Sampler, "_fused_kernel_on", lambda self, logits: True)
    sampler = Sampler(600, {5}, seed=1, fused_filters=False)
    called = []
    original = Sampler._sample_filtered
    monkeypatch.setattr(Sampler, "_sample_filtered", lambda self, *a: called.append(1) or original(self, *a))
    logits = torch.randn(2, 600).to(DEVICE)
    ids, _ = sampler(logits, [req(SamplingParams(temperature=1.0, top_k=2)), req(SamplingParams(temperature=1.0))])
    assert called and ids[0] in logits[0].topk(2).indices.tolist()


def test_rejects_bad_inputs():
    logits = torch.zeros(2, 10, device=DEVICE)
    good = params_tensors([(1.0, 0, 1.0, 0.0)] * 2)
    with pytest.raises(ValueError, match="logits must be"):
        filter_thresholds(logits[0], *good)
    with pytest.raises(ValueError, match="top_k"):
        filter_thresholds(logits, good[0], good[1].int(), good[2], good[3])
    with pytest.raises(ValueError, match="temperatures"):
        filter_thresholds(logits, good[0][:1], *good[1:])
    with pytest.raises(ValueError, match="dtype"):
        filter_thresholds(logits.long(), *good)
    with pytest.raises(ValueError, match="thresholds must be"):
        sample_gumbel(logits, good[0], torch.zeros(2, dtype=torch.long, device=DEVICE),
                      torch.zeros(2, dtype=torch.long, device=DEVICE), thresholds=torch.zeros(3, device=DEVICE))
    assert filter_thresholds(logits[:0], *(t[:0] for t in good)).shape == (0,)
    if not CUDA:  # the interpreter runs a row's programs one after another: they could never meet
        assert programs_per_row(2, 10, logits.device) == 1
        with pytest.raises(ValueError, match="num_programs"):
            filter_thresholds(logits, *good, num_programs=2)


# ---- GPU only ----


@gpu_only
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_full_vocabulary_kept_sets(scale):
    """V = 152064 (Qwen2), 16 rows of every filter mix, fp32 as the LM head gives them."""
    gen = torch.Generator(device="cuda").manual_seed(int(scale * 10))
    rows = (ROWS + ROWS)[:16]
    logits = torch.randn(len(rows), 152064, device="cuda", generator=gen) * scale
    kept, ref, _ = kept_sets(logits, rows)
    assert torch.equal(kept, ref), [(i, int(kept[i].sum()), int(ref[i].sum())) for i in range(len(rows))]


@gpu_only
@pytest.mark.parametrize("num_programs", [1, 2, 7, 64, 128])
def test_programs_per_row_agree(num_programs):
    """A row split over several cooperating programs (each pass's partial records, a barrier per row)
    keeps the same sets as the torch filters, whatever the split; the default choice too."""
    gen = torch.Generator(device="cuda").manual_seed(num_programs)
    rows = ROWS[:4] + ROWS[8:11]  # 7 rows x 128 programs: resident at once on a GPU of >= 112 SMs
    logits = torch.randn(len(rows), 152064, device="cuda", generator=gen) * 2
    if len(rows) * num_programs > 8 * torch.cuda.get_device_properties(0).multi_processor_count:
        with pytest.raises(ValueError, match="exceed"):
            filter_thresholds(logits, *params_tensors(rows), num_programs=num_programs)
        return
    temps, top_k, top_p, min_p = params_tensors(rows)
    thr = filter_thresholds(logits, temps, top_k, top_p, min_p, num_programs=num_programs)
    default = filter_thresholds(logits, temps, top_k, top_p, min_p)
    x = logits * (1.0 / temps.float())[:, None]
    ref = apply_sampling_filters(x.clone(), torch.ones_like(temps, dtype=torch.float32), top_k, top_p.float(),
                                 min_p.float()) > 0  # fmt: skip
    for got in (thr, default):
        kept = x >= got[:, None]
        diff = (kept != ref).sum(1)
        # Only top-p rows may differ, by a boundary token or two (fp32 mass sums in another order).
        assert all(d == 0 or (rows[i][2] < 1.0 and d <= 2) for i, d in enumerate(diff.tolist())), diff


@gpu_only
def test_capturable_in_cuda_graph():
    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(8, 152064, device="cuda", generator=gen)
    args = params_tensors([(0.7, 0, 0.9, 0.0)] * 8)
    out = torch.empty(8, device="cuda")
    filter_thresholds(logits, *args, out=out)
    want = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        filter_thresholds(logits, *args, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@gpu_only
def test_compiled_kernel_keeps_to_the_register_cap():
    """The threshold kernel compiles at or under MAXNREG registers a thread (168 by default: 12 one-warp programs
    an SM where the uncapped 201 gave 8 on the H200), and the residency the launcher plans with is the one those
    registers give."""
    from pagedserve.executor.kernels import sample_filter

    if sample_filter.MAXNREG is None:
        pytest.skip("PAGEDSERVE_FILTER_MAXNREG=0: no cap")
    logits = torch.randn(2, 152064, device="cuda")
    filter_thresholds(logits, *params_tensors([(0.7, 20, 0.8, 0.0)] * 2))
    caps = {key: regs for key, regs in sample_filter.REGISTERS.items() if key[-1] == sample_filter.MAXNREG}
    assert caps and all(regs <= sample_filter.MAXNREG for regs in caps.values()), sample_filter.REGISTERS
    props = torch.cuda.get_device_properties(0)
    if getattr(props, "regs_per_multiprocessor", 65536) == 65536 and sample_filter.WARPS == 1:
        assert all(sample_filter._RESIDENT[key] >= 12 for key in caps), sample_filter._RESIDENT
