"""Fused logprob statistics (kernels/logprob_stats.py) vs log_softmax in float64: the token's logprob, its rank
(ties in its favour), the max logprob and its first column; fresh random rows, poisoned outputs, vocabularies
that are not multiples of the tile, pinned split counts, -inf logits. Interpreter on CPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels.logprob_stats import BLOCK, choose_splits, logprob_stats

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32, torch.float16]


def reference(logits: torch.Tensor, tokens: torch.Tensor):
    x = logits.double().cpu()
    lp = x.log_softmax(dim=-1)
    tok = tokens.cpu()
    tok_x = x.gather(1, tok[:, None])
    rank = (x > tok_x).sum(dim=-1) + 1
    max_lp, argmax = lp.max(dim=-1)
    first = torch.stack([torch.nonzero(x[r] == x[r].max())[0, 0] for r in range(x.shape[0])]) if len(x) else argmax
    return lp.gather(1, tok[:, None]).squeeze(1), rank, max_lp, first


def poisoned(rows: int, want_max: bool):
    out = [torch.full((rows,), float("nan"), device=DEVICE), torch.full((rows,), -7, dtype=torch.int64, device=DEVICE)]
    if want_max:
        out += [torch.full((rows,), float("nan"), device=DEVICE),
                torch.full((rows,), -7, dtype=torch.int64, device=DEVICE)]
    return tuple(out)


def check(logits: torch.Tensor, tokens: torch.Tensor, want_max: bool, splits: int | None = None) -> None:
    out = poisoned(logits.shape[0], want_max)
    got = logprob_stats(logits, tokens, want_max, splits=splits, out=out)
    assert all(g is o for g, o in zip(got, out))
    ref = reference(logits, tokens)
    tol = 2e-5 if logits.dtype == torch.float32 else 1e-4  # the inputs are exact in fp32 either way
    torch.testing.assert_close(got[0].cpu().double(), ref[0], rtol=tol, atol=tol)
    assert torch.equal(got[1].cpu(), ref[1])
    if want_max:
        torch.testing.assert_close(got[2].cpu().double(), ref[2], rtol=tol, atol=tol)
        assert torch.equal(got[3].cpu(), ref[3])
    else:
        assert got[2] is None and got[3] is None


@pytest.mark.parametrize("rows, vocab", [(1, 1), (3, 5), (2, BLOCK), (5, 3 * BLOCK + 17), (4, 2500)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("want_max", [False, True])
def test_matches_float64_log_softmax(rows: int, vocab: int, dtype: torch.dtype, want_max: bool) -> None:
    g = torch.Generator().manual_seed(rows * 7919 + vocab)
    logits = (torch.randn((rows, vocab), generator=g) * 4).to(dtype).to(DEVICE)
    tokens = torch.randint(0, vocab, (rows,), generator=g).to(DEVICE)
    check(logits, tokens, want_max)


@pytest.mark.parametrize("splits", [1, 2, 3, 4])
def test_every_split_count_gives_the_same_answer(splits: int) -> None:
    g = torch.Generator().manual_seed(splits)
    logits = (torch.randn((3, 4 * BLOCK - 5), generator=g) * 3).to(DEVICE)
    tokens = torch.tensor([0, 4 * BLOCK - 6, 1234]).to(DEVICE)
    check(logits, tokens, True, splits=splits)


def test_ties_and_minus_infinity() -> None:
    """The rank counts only strictly larger logits; the max's column is the first; -inf logits (a masked
    vocabulary) count for nothing, even a whole split of them."""
    vocab = 3 * BLOCK
    logits = torch.randn((4, vocab), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logits[0, 10] = logits[0, 2000] = logits[0, 2999] = 9.0  # three-way tie for the max
    logits[1, BLOCK:] = float("-inf")  # the last two splits see nothing else
    logits[2, :] = 0.0  # all equal: rank 1, logprob -log(vocab)
    logits[3, :5] = float("-inf")
    tokens = torch.tensor([2000, 7, 100, 2]).to(DEVICE)  # row 3: its token is -inf
    out = logprob_stats(logits, tokens, True, splits=3)
    ref = reference(logits, tokens)
    assert out[1].tolist() == ref[1].tolist() and out[1][0].item() == 1 and out[1][2].item() == 1
    assert out[3].tolist()[:3] == [10, ref[3][1].item(), 0]
    torch.testing.assert_close(out[0][:3].cpu().double(), ref[0][:3], rtol=2e-5, atol=2e-5)
    assert out[0][3].item() == float("-inf")
    torch.testing.assert_close(out[2].cpu().double(), ref[2], rtol=2e-5, atol=2e-5)


def test_empty_and_bad_shapes() -> None:
    out = logprob_stats(torch.empty((0, 10), device=DEVICE), torch.empty(0, dtype=torch.int64, device=DEVICE), True)
    assert [t.shape for t in out] == [(0,)] * 4
    with pytest.raises(ValueError):
        logprob_stats(torch.zeros((2, 10), device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE), False)
    with pytest.raises(ValueError):
        logprob_stats(torch.zeros((10, 2), device=DEVICE).t(), torch.zeros(2, dtype=torch.int64, device=DEVICE), False)


def test_choose_splits_fills_the_gpu_without_empty_programs() -> None:
    assert choose_splits(256, 152064) == 4
    assert choose_splits(1, 152064) == 64
    assert choose_splits(4, 100) == 1
