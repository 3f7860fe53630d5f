"""The LoRA shrink / expand kernels (executor/kernels/lora_sgmv.py) against plain torch: each token with its slot's
adapter (slot 0: none), tokens of several slots interleaved, merged projections (rank columns not a power of two),
one token (many K splits), partial blocks, empty slots, fresh random inputs and poisoned outputs; in the Triton
interpreter on CPU (fp32, fp16) and compiled on a GPU (bf16 too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.executor.kernels import lora_sgmv

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def order_and_starts(slots: np.ndarray, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model runner sends with a step: token indices sorted by slot, and each slot's first index."""
    order = np.argsort(slots, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(slots, minlength=num_slots + 1))])
    return (torch.from_numpy(order).to(DEVICE), torch.from_numpy(starts).to(DEVICE))


def reference(x, a, b, y, slots, rank_cols):
    out = y.float().clone()
    for t, s in enumerate(slots.tolist()):
        if s:
            rows = slice((s - 1) * rank_cols, s * rank_cols)
            h = (x[t].float() @ a[rows].float().T).to(a.dtype).float()
            out[t] += h @ b[:, rows].float().T
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "k", "n", "num_slots", "rank_cols"), [
    (1, 200, 96, 1, 16),     # one token: many splits of K
    (1, 1000, 40, 3, 48),    # merged q|k|v of rank 16; N not a multiple of the block
    (1, 900, 64, 2, 16),     # 15 splits: the expand's last round of loads partly past them
    (7, 130, 64, 4, 32),     # K not a multiple of BK
    (37, 96, 150, 2, 16),    # several blocks of one slot, partial ones; two column tiles a program
    (100, 64, 700, 3, 16),   # 32-token blocks; a program's last column tile partial
    (600, 64, 48, 3, 24),    # the large-block layout (BM 64), one split
])
def test_shrink_expand_match_torch(dtype, num_tokens, k, n, num_slots, rank_cols) -> None:
    g = torch.Generator().manual_seed(num_tokens * 31 + k)
    x = torch.randn(num_tokens, k, generator=g).to(dtype).to(DEVICE)
    a = (torch.randn(num_slots * rank_cols, k, generator=g) * 0.1).to(dtype).to(DEVICE)
    b = (torch.randn(n, num_slots * rank_cols, generator=g) * 0.1).to(dtype).to(DEVICE)
    y0 = torch.randn(num_tokens, n, generator=g).to(dtype).to(DEVICE)
    rng = np.random.default_rng(num_tokens)
    slots = rng.integers(0, num_slots + 1, num_tokens)
    if num_tokens == 1:
        slots[:] = num_slots  # the last slot: its rows are not the first ones
    order, starts = order_and_starts(slots, num_slots)
    partials = torch.full((lora_sgmv.partials_rows(num_tokens) * rank_cols,), float("nan"), device=DEVICE)
    h = lora_sgmv.lora_shrink(x, a, order, starts, partials, num_slots, rank_cols)
    assert h.shape[1:] == (num_tokens, rank_cols)
    if num_tokens == 1:
        assert h.shape[0] > 1  # split over K
    y = y0.clone()
    lora_sgmv.lora_expand(h, b, order, starts, y, num_slots)
    want = reference(x.cpu(), a.cpu(), b.cpu(), y0.cpu(), slots, rank_cols)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    err = ((y.float().cpu() - want).abs() / (want.abs() + 1)).max().item()
    assert err < tol, err
    none = torch.from_numpy(slots == 0)
    assert torch.equal(y.cpu()[none], y0.cpu()[none])  # tokens without an adapter: y untouched


def test_no_adapter_tokens_touch_nothing() -> None:
    """A step whose tokens hold no adapter (every program past the last block): y is left as it is and the
    partials unwritten (still NaN)."""
    num_slots, rank_cols, k, n = 2, 16, 64, 32
    x = torch.randn(5, k, device=DEVICE)
    a = torch.randn(num_slots * rank_cols, k, device=DEVICE)
    b = torch.randn(n, num_slots * rank_cols, device=DEVICE)
    order, starts = order_and_starts(np.zeros(5, dtype=np.int64), num_slots)
    partials = torch.full((lora_sgmv.partials_rows(5) * rank_cols,), float("nan"), device=DEVICE)
    h = lora_sgmv.lora_shrink(x, a, order, starts, partials, num_slots, rank_cols)
    y = torch.randn(5, n, device=DEVICE)
    y0 = y.clone()
    lora_sgmv.lora_expand(h, b, order, starts, y, num_slots)
    assert torch.equal(y, y0)
    assert torch.isnan(partials).all()


def test_tokens_past_the_step_are_not_read() -> None:
    """A padded launch (a CUDA graph's size): the step's `starts` end at its real tokens; rows past them, whatever
    they hold, are neither read nor written."""
    num_slots, rank_cols, k, n, real, padded = 2, 16, 64, 32, 3, 8
    x = torch.randn(padded, k, device=DEVICE)
    x[real:] = float("nan")
    a = torch.randn(num_slots * rank_cols, k, device=DEVICE) * 0.1
    b = torch.randn(n, num_slots * rank_cols, device=DEVICE) * 0.1
    slots = np.array([2, 0, 1])
    order, starts = order_and_starts(slots, num_slots)
    order = torch.cat([order, torch.full((padded - real,), 7, dtype=order.dtype, device=DEVICE)])
    partials = torch.zeros(lora_sgmv.partials_rows(padded) * rank_cols, device=DEVICE)
    h = lora_sgmv.lora_shrink(x, a, order, starts, partials, num_slots, rank_cols)
    y = torch.zeros(padded, n, device=DEVICE)
    lora_sgmv.lora_expand(h, b, order, starts, y, num_slots)
    want = reference(x[:real].cpu(), a.cpu(), b.cpu(), torch.zeros(real, n), slots, rank_cols)
    assert torch.allclose(y[:real].cpu(), want, atol=1e-4)
    assert torch.equal(y[real:].cpu(), torch.zeros(padded - real, n))


def test_bad_shapes_are_refused() -> None:
    x = torch.randn(2, 64, device=DEVICE)
    order, starts = order_and_starts(np.array([1, 1]), 2)
    partials = torch.zeros(lora_sgmv.partials_rows(2) * 16, device=DEVICE)
    with pytest.raises(ValueError, match="lora_shrink"):
        lora_sgmv.lora_shrink(x, torch.randn(16, 64, device=DEVICE), order, starts, partials, 2, 16)
    with pytest.raises(ValueError, match="partial sums"):
        lora_sgmv.lora_shrink(x, torch.randn(32, 64, device=DEVICE), order, starts, partials[:10], 2, 16)
