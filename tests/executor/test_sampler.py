"""Sampler: exact logits processing and filtered distributions, seeded reproducibility, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from pagedserve.core.outputs import ScheduledRequest
from pagedserve.executor.sampler import Sampler, apply_sampling_filters, position_seed
from pagedserve.sampling_params import SamplingParams

EOS = 5
FIXED = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.25, -0.5]  # distinct values: no ties at filter edges
V = len(FIXED)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


def req(
    params: SamplingParams,
    output: list[int] | None = None,
    prompt: list[int] | None = None,
    rid: str = "r",
) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=rid,
        token_ids=[0],
        num_computed_tokens=0,
        block_ids=[0],
        needs_sample=True,
        sampling_params=params,
        prompt_token_ids=list(prompt or [0]),
        output_token_ids=list(output or []),
        output_index=len(output or []),
    )


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) if x != -math.inf else 0.0 for x in xs]
    s = sum(e)
    return [x / s for x in e]


def filtered(probs_in: list[float], keep: set[int]) -> list[float]:
    kept = [p if i in keep else 0.0 for i, p in enumerate(probs_in)]
    s = sum(kept)
    return [p / s for p in kept]


def run_filters(rows: list[dict]) -> torch.Tensor:
    logits = torch.tensor([FIXED] * len(rows))
    return apply_sampling_filters(
        logits,
        torch.tensor([r.get("t", 1.0) for r in rows]),
        torch.tensor([r.get("k", 0) for r in rows]),
        torch.tensor([r.get("p", 1.0) for r in rows]),
        torch.tensor([r.get("min_p", 0.0) for r in rows]),
    )


def expected_probs(t: float = 1.0, k: int = 0, p: float = 1.0, min_p: float = 0.0) -> list[float]:
    """Hand computation in float64, filter by filter, in the documented order."""
    base = softmax([x / t for x in FIXED])
    order = sorted(range(V), key=lambda i: -base[i])
    keep = set(order[:k]) if k > 0 else set(range(V))
    cur = filtered(base, keep)
    if p < 1.0:
        mass, top_p_keep = 0.0, set()
        for i in sorted(keep, key=lambda i: -cur[i]):
            if mass >= p:
                break
            top_p_keep.add(i)
            mass += cur[i]
        keep = top_p_keep
        cur = filtered(cur, keep)
    if min_p > 0.0:
        pmax = max(cur)
        keep = {i for i in keep if cur[i] >= min_p * pmax}
        cur = filtered(cur, keep)
    return cur


FILTER_CASES = [
    {"t": 1.0},
    {"t": 0.7},
    {"t": 1.8},
    {"k": 3},
    {"p": 0.8},
    {"t": 0.5, "p": 0.9},
    {"min_p": 0.2},
    {"t": 1.5, "min_p": 0.3},
    {"k": 5, "p": 0.7},
    {"t": 1.3, "k": 6, "p": 0.95, "min_p": 0.05},
]


def test_filters_match_hand_computed_probs_exactly() -> None:
    # All cases in one batch: also checks rows don't leak their filters into each other.
    probs = run_filters(FILTER_CASES)
    for row, case in enumerate(FILTER_CASES):
        got = probs[row].tolist()
        want = expected_probs(**case)
        assert got == pytest.approx(want, abs=1e-6), case
        # Filtered tokens are exactly zero, not just small.
        assert [g == 0.0 for g in got] == [w == 0.0 for w in want], case


def test_filters_actually_filter() -> None:
    top_p = expected_probs(p=0.8)
    assert 0 < sum(x > 0 for x in top_p) < V
    min_p = expected_probs(min_p=0.2)
    assert 0 < sum(x > 0 for x in min_p) < V


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [{"t": 0.7}, {"t": 1.2, "p": 0.8}, {"min_p": 0.2}, {"k": 3, "t": 2.0}])
def test_empirical_frequencies_match(case: dict, device: str) -> None:
    torch.manual_seed(1234)
    torch.cuda.manual_seed_all(1234)
    num = 20_000
    params = SamplingParams(
        temperature=case.get("t", 1.0), top_k=case.get("k", 0), top_p=case.get("p", 1.0),
        min_p=case.get("min_p", 0.0),
    )
    logits = torch.tensor([FIXED] * num, device=device)
    ids, _ = Sampler(V, {EOS})(logits, [req(params)] * num)
    counts = torch.bincount(torch.tensor(ids), minlength=V).tolist()
    for tok, want in enumerate(expected_probs(**case)):
        freq = counts[tok] / num
        if want == 0.0:
            assert counts[tok] == 0, (case, tok)
        else:
            sigma = math.sqrt(want * (1 - want) / num)
            assert abs(freq - want) < 5 * sigma + 1e-9, (case, tok, freq, want)


def test_seeded_rows_sample_the_right_distribution() -> None:
    # Every row has its own seed: the per-row generator path must also be an unbiased draw.
    num = 4000
    params = [SamplingParams(temperature=0.9, seed=s) for s in range(num)]
    ids, _ = Sampler(V, {EOS})(torch.tensor([FIXED] * num), [req(p) for p in params])
    counts = torch.bincount(torch.tensor(ids), minlength=V).tolist()
    for tok, want in enumerate(expected_probs(t=0.9)):
        sigma = math.sqrt(want * (1 - want) / num)
        assert abs(counts[tok] / num - want) < 5 * sigma + 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens_alone_and_in_batch_of_8(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 1000 if device == "cpu" else 151936  # a real vocabulary size where it is cheap
    steps = 12
    logits_per_step = [(torch.randn(8, vocab, generator=gen) * 3).to(device) for _ in range(steps)]
    batch_params = [
        SamplingParams(temperature=0.8, seed=42, top_p=0.95),  # the row under test
        SamplingParams(temperature=1.0, top_k=50),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, seed=7, min_p=0.05),
        SamplingParams(temperature=0.6, top_p=0.5, presence_penalty=0.5),
        SamplingParams(temperature=1.0, seed=42, logprobs=3),  # same seed, other params
        SamplingParams(temperature=0.9, repetition_penalty=1.2, top_k=20, top_p=0.9),
        SamplingParams(temperature=2.0, logit_bias={3: 5.0}),
    ]
    sampler = Sampler(vocab, {EOS})
    alone: list[int] = []
    batched: list[int] = []
    outputs: list[list[int]] = [[] for _ in batch_params]
    for step in range(steps):
        a, _ = sampler(logits_per_step[step][:1].clone(), [req(batch_params[0], list(alone))])
        alone.extend(a)
        reqs = [req(p, list(outputs[i]), rid=str(i)) for i, p in enumerate(batch_params)]
        b, _ = sampler(logits_per_step[step].clone(), reqs)
        for i, t in enumerate(b):
            outputs[i].append(t)
        batched.append(b[0])
    assert alone == batched
    assert len(set(alone)) > 1  # it really sampled
    # Stateless per position: re-running a position (preemption recompute) gives the same token.
    again, _ = sampler(logits_per_step[5][:1].clone(), [req(batch_params[0], alone[:5])])
    assert again == [alone[5]]


def test_different_seeds_differ_and_position_seed_mixes() -> None:
    logits = torch.zeros(1, 5000)
    sampler = Sampler(5000, {EOS})
    a = [sampler(logits, [req(SamplingParams(seed=s))])[0][0] for s in range(6)]
    assert len(set(a)) > 1
    assert position_seed(1, 0) != position_seed(0, 1)
    assert 0 <= position_seed(-(2**63), 3) < 2**63 and 0 <= position_seed(2**64 - 1, 0) < 2**63


def test_top_k_1_equals_greedy() -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(3))
    sampler = Sampler(300, {EOS})
    greedy, _ = sampler(logits, [req(SamplingParams(temperature=0.0))] * 16)
    top1, _ = sampler(logits, [req(SamplingParams(temperature=1.5, top_k=1))] * 16)
    assert greedy == top1 == logits.argmax(-1).tolist()
    probs = apply_sampling_filters(
        logits, torch.full((16,), 1.5), torch.ones(16, dtype=torch.long), torch.ones(16), torch.zeros(16)
    )
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 300).float())


def test_logit_bias_and_penalties_exact() -> None:
    sampler = Sampler(V, {EOS})
    logits = torch.tensor([FIXED, FIXED, FIXED])
    prompt, output = [1, 4], [0, 0, 3, 6]
    reqs = [
        req(SamplingParams(logit_bias={2: 3.0, 7: -1.5})),
        req(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), output, prompt),
        req(SamplingParams(repetition_penalty=2.0, presence_penalty=1.0), output, prompt),
    ]
    got = sampler.process_logits(logits, reqs).tolist()
    bias = list(FIXED)
    bias[2] += 3.0
    bias[7] -= 1.5
    counts = {0: 2, 3: 1, 6: 1}
    pf = [x - 0.25 * counts.get(i, 0) - 0.5 * (i in counts) for i, x in enumerate(FIXED)]
    seen = set(prompt) | set(output)
    rep = [(x / 2.0 if x > 0 else x * 2.0) if i in seen else x for i, x in enumerate(FIXED)]
    rep = [x - 1.0 * (i in counts) for i, x in enumerate(rep)]
    assert got[0] == pytest.approx(bias, abs=1e-6)
    assert got[1] == pytest.approx(pf, abs=1e-6)
    assert got[2] == pytest.approx(rep, abs=1e-6)
    assert logits.tolist() == [FIXED] * 3  # the input is not modified


def test_allowed_token_ids_keep_only_those_logits() -> None:
    """allowed_token_ids: the other columns become -inf (with logit_bias applied after, on what is left); a row
    without it is untouched; sampling at any temperature stays inside the set."""
    sampler = Sampler(V, {EOS})
    logits = torch.tensor([FIXED, FIXED])
    reqs = [req(SamplingParams(allowed_token_ids=[6, 2, 2], logit_bias={2: 1.0, 3: 5.0})), req(SamplingParams())]
    got = sampler.process_logits(logits, reqs).tolist()
    want = [float("-inf")] * V
    want[6], want[2] = FIXED[6], FIXED[2] + 1.0
    want[3] = float("-inf")  # a bias on a token outside the set leaves it out
    assert got[0] == want and got[1] == FIXED
    hot = [req(SamplingParams(allowed_token_ids=[1, 4], temperature=2.0, seed=s)) for s in range(40)]
    picked = sampler.sample(torch.tensor([FIXED] * 40), hot).token_ids.tolist()
    assert set(picked) == {1, 4}  # both drawn, nothing else


def test_allowed_token_ids_validation() -> None:
    for bad, match in (([], "must not be empty"), ([1, -2], "non-negative"), ([1.5], "non-negative integers"),
                       ("12", "list of token ids"), (7, "list of token ids")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(allowed_token_ids=bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplingParams(allowed_token_ids=[1, V]).validate_for_model(V)
    assert SamplingParams(allowed_token_ids=(3, 1)).allowed_token_ids == [3, 1]


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    sampler = Sampler(V, {EOS})
    logits = torch.tensor([FIXED] * 4)
    logits[:, EOS] = 50.0
    logits[:, 6] = 40.0
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[6])
    ignore = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[6], ignore_eos=True)
    ids, _ = sampler(logits, [req(p, [1, 2]), req(p, [1, 2, 3]), req(ignore, [1]), req(ignore, [1, 2, 3])])
    # Row 0: both EOS and stop id masked -> next best (index 0, logit 2.0).
    # Row 1: min_tokens reached. Row 2: ignore_eos -> EOS is not a stop, only 6 is masked.
    assert ids == [0, EOS, EOS, EOS]
    masked = sampler.process_logits(logits, [req(p, [1])] * 4)
    assert masked[0, EOS] == -math.inf and masked[0, 6] == -math.inf


def test_logprobs_raw_distribution_sorted_topn_and_rank() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(9))
    params = [
        SamplingParams(temperature=0.0, logprobs=5, logit_bias={7: 100.0}),  # bias forces token 7
        SamplingParams(temperature=0.8, logprobs=0, seed=1),
        SamplingParams(temperature=0.0),  # no logprobs requested
    ]
    ids, lps = Sampler(50, {EOS})(logits, [req(p) for p in params])
    raw = torch.log_softmax(logits, dim=-1)
    assert ids[0] == 7
    lp0 = lps[0]
    assert lp0 is not None and lp0.token_id == 7
    assert lp0.logprob == pytest.approx(raw[0, 7].item(), abs=1e-6)  # raw, not biased
    assert lp0.rank == int((raw[0] > raw[0, 7]).sum()) + 1
    want_lp, want_ids = raw[0].topk(5)
    assert [t for t, _ in lp0.top] == want_ids.tolist()
    assert [lp for _, lp in lp0.top] == pytest.approx(want_lp.tolist(), abs=1e-6)
    assert all(a[1] >= b[1] for a, b in zip(lp0.top, lp0.top[1:]))
    lp1 = lps[1]
    assert lp1 is not None and lp1.top == [] and lp1.token_id == ids[1]
    assert lp1.logprob == pytest.approx(raw[1, ids[1]].item(), abs=1e-6)
    assert lps[2] is None and ids[2] == logits[2].argmax().item()


def test_fast_path_and_empty_batch() -> None:
    sampler = Sampler(10, {EOS})
    logits = torch.randn(4, 10)
    ids, lps = sampler(logits, [req(SamplingParams(temperature=0.0))] * 4)
    assert ids == logits.argmax(-1).tolist() and lps == [None] * 4
    assert sampler(torch.empty(0, 10), []) == ([], [])
    with pytest.raises(ValueError):
        sampler(logits, [req(SamplingParams())])


def test_no_nan_when_filters_zero_most_tokens() -> None:
    logits = torch.full((64, 1000), -30.0)
    logits[:, 17] = 10.0
    ids, _ = Sampler(1000, {EOS})(logits, [req(SamplingParams(top_p=0.1, min_p=0.5))] * 64)
    assert ids == [17] * 64


def test_bf16_logits_sample_as_their_fp32_values() -> None:
    """Without logits processing the sampler no longer copies the batch to fp32 up front: the torch
    path widens only the rows it filters, so bf16 input gives what its fp32 values give."""
    logits = (torch.randn(6, 300, generator=torch.Generator().manual_seed(5)) * 3).bfloat16()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=1), SamplingParams(top_k=7),
              SamplingParams(temperature=1.2, top_p=0.9), SamplingParams(temperature=0.0, logprobs=2),
              SamplingParams(min_p=0.1, seed=3)]  # fmt: skip
    results = []
    for x in (logits, logits.float()):
        torch.manual_seed(77)
        results.append(Sampler(300, {EOS})(x, [req(p, rid=str(i)) for i, p in enumerate(params)]))
    assert results[0][0] == results[1][0]
    assert results[0][1][4] == results[1][1][4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_mixed_batch_greedy_fused_and_filtered_rows(dtype: torch.dtype) -> None:
    """Greedy rows, fused-kernel rows (temperature only) and filtered rows (top-k/top-p/min-p: the threshold
    kernel, or the torch path with fused_filters=False) in one batch, at a real vocabulary size."""
    from pagedserve.executor.kernels.sample import sample_gumbel

    vocab = 152064
    logits = (torch.randn(9, vocab, generator=torch.Generator().manual_seed(8)) * 3).to(dtype).cuda()
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, seed=11),  # fused
        SamplingParams(temperature=1.0, top_k=20, seed=5),  # torch path, seeded
        SamplingParams(temperature=0.7),  # fused, unseeded
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=1.1, top_p=0.9),  # torch path
        SamplingParams(temperature=1.0, min_p=0.2, seed=6),  # torch path, seeded
        SamplingParams(temperature=1.0, top_k=1),  # greedy
        SamplingParams(temperature=1.3, seed=12),  # fused
    ]
    reqs = [req(p, [1] * 3, rid=str(i)) for i, p in enumerate(params)]
    ids, lps = Sampler(vocab, {EOS}, use_fused_kernel=True)(logits, reqs)
    argmax = logits.argmax(-1).tolist()
    assert all(0 <= t < vocab for t in ids)
    assert [ids[i] for i in (0, 4, 7)] == [argmax[i] for i in (0, 4, 7)]
    assert lps[4] is not None and lps[4].token_id == ids[4]
    assert ids[2] in logits[2].float().topk(20).indices.tolist()
    # Fused rows are the kernel's draws for (position_seed(seed, 3), offset 3), alone or batched.
    for row in (1, 8):
        p = params[row]
        want = sample_gumbel(logits[row:row + 1], torch.tensor([p.temperature], device="cuda"),
                             torch.tensor([position_seed(p.seed, 3)], device="cuda"),
                             torch.tensor([3], device="cuda"))  # fmt: skip
        alone, _ = Sampler(vocab, {EOS}, use_fused_kernel=True)(logits[row:row + 1], [reqs[row]])
        assert ids[row] == want.item() == alone[0]
    x6 = logits[6].float()  # min-p 0.2 (threshold kernel): a token with p >= 0.2 p_max
    assert x6[ids[6]] >= x6.max() + math.log(0.2) - 1e-5
    # Seeded filtered rows on the torch path (fused_filters=False) draw from their own generators: the same
    # tokens with the kernel off entirely.
    torch_filtered, _ = Sampler(vocab, {EOS}, use_fused_kernel=True, fused_filters=False)(logits, reqs)
    torch_ids, _ = Sampler(vocab, {EOS}, use_fused_kernel=False)(logits, reqs)
    assert [torch_ids[i] for i in (0, 2, 4, 6, 7)] == [torch_filtered[i] for i in (0, 2, 4, 6, 7)]


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_history_matches_host_lists_across_steps(device: str) -> None:
    """PenaltyHistory (device rows kept across steps, newest token read from the last step's samples) gives
    the same counts and prompt sets as the host lists, through async-style lags, evictions, finished
    requests, a reused request id and ids outside the vocabulary."""
    from pagedserve.executor.sampler import PenaltyHistory, StepHistory, _host_history

    width = 40
    rng = torch.Generator().manual_seed(5)
    hist = PenaltyHistory(width, torch.device(device))
    live: dict[str, tuple[list[int], list[int]]] = {}  # rid -> (prompt, outputs on the host)
    last_sampled, last_rows = None, {}
    made, reused, rebuilt = 0, None, False
    for step_no in range(40):
        while len(live) < 6:  # new requests, one of them reusing a finished one's id
            rid = "r0" if made == 7 else f"r{made}"
            made += 1
            prompt = torch.randint(-2, width + 3, (int(torch.randint(1, 30, (1,), generator=rng)),),
                                   generator=rng).tolist()
            live[rid] = (prompt, [])
        # This step samples a random subset; each request's newest output is still "on the device".
        rids = [rid for rid in live if torch.rand(1, generator=rng).item() < 0.7]
        pending = {rid for rid in rids if rid in last_rows}
        reqs = []
        for rid in rids:
            prompt, outputs = live[rid]
            index = len(outputs) + (1 if rid in pending else 0)
            reqs.append(ScheduledRequest(rid, [0], 0, [0], True, SamplingParams(repetition_penalty=1.1),
                                         prompt, outputs, index))
        if not reqs:
            continue
        finished = []
        got_counts, got_prompt = hist.gather(reqs, StepHistory(last_sampled, last_rows, finished))
        # The reference: the host lists with the pending token appended.
        full = [ScheduledRequest(r.request_id, [0], 0, [0], True, r.sampling_params, r.prompt_token_ids,
                                 r.output_token_ids + ([int(last_sampled[last_rows[r.request_id]])]
                                                       if r.request_id in pending else []), r.output_index)
                for r in reqs]
        want_counts, want_prompt = _host_history(full, width, torch.device(device), True)
        assert torch.equal(got_counts, want_counts), step_no
        assert torch.equal(got_prompt, want_prompt), step_no
        if reused in rids:
            rebuilt = rebuilt or hist.entries[reused].outputs is live[reused][1]
        # The engine's side: the pending tokens reach the host now, new ones are sampled.
        for r in full:
            live[r.request_id][1][:] = r.output_token_ids
        sampled = torch.randint(-1, width + 2, (len(reqs),), generator=rng).to(device)
        last_sampled, last_rows = sampled, {r.request_id: i for i, r in enumerate(reqs)}
        if step_no % 5 == 4:  # two requests end; one is reported, the other's row must be evicted or reused
            for rid in list(live)[:2]:
                live.pop(rid)
                last_rows.pop(rid, None)
            hist.release([rid for rid in list(hist.entries)[:1] if rid not in live])
        if step_no == 21:  # a request ends unreported and its id returns at once for another request
            rid = next(rid for rid in live if rid in hist.entries and hist.entries[rid].folded > 0)
            live[rid] = (torch.randint(0, width, (len(live.pop(rid)[0]),), generator=rng).tolist(), [])
            last_rows.pop(rid, None)
            reused = rid
    assert rebuilt  # the reused id was sampled again, with its own new history
    assert hist.capacity <= 16  # rows are reused: at most a step's worth (6), doubled


def test_penalty_history_growth_stops_at_max_rows() -> None:
    """Doubling stops at max_rows (the engine's max_num_seqs): 5 rows at most a step keep 5 rows, not 8;
    a step that needs more than max_rows still gets them."""
    from pagedserve.executor.sampler import PenaltyHistory, StepHistory

    def step(hist: PenaltyHistory, rids: list[str]) -> None:
        reqs = [ScheduledRequest(rid, [0], 0, [0], True, SamplingParams(repetition_penalty=1.1), [1, 2], [], 0)
                for rid in rids]
        hist.gather(reqs, StepHistory(None, {}, []))

    capped, free = PenaltyHistory(10, torch.device("cpu"), max_rows=5), PenaltyHistory(10, torch.device("cpu"))
    for hist in (capped, free):
        for n in range(1, 6):
            step(hist, [f"a{i}" for i in range(n)])
    assert capped.capacity == 5 and free.capacity == 8
    step(capped, [f"b{i}" for i in range(7)])
    assert capped.capacity == 7
