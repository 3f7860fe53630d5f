"""compile_ahead: inside, Triton launches only compile (in parallel) and write nothing; afterwards the
same launches run, from the compiled kernels. A no-op without CUDA."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.precompile import compile_ahead


def test_is_a_no_op_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with compile_ahead("test") as dry:
        assert dry is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_launches_compile_without_running_then_run() -> None:
    from pagedserve.executor.kernels.silu_mul import silu_and_mul

    torch.manual_seed(0)
    x = torch.randn(7, 2 * 300, device="cuda", dtype=torch.float16)
    out = torch.full((7, 300), float("nan"), device="cuda", dtype=torch.float16)
    with compile_ahead("test") as dry:
        assert dry is True
        silu_and_mul(x, out, block=128)  # a variant no other test compiles: block=128
        silu_and_mul(x, out, block=128)  # the same variant again: one compile
    torch.cuda.synchronize()
    assert torch.isnan(out).all(), "a dry-run launch wrote its output"
    silu_and_mul(x, out, block=128)
    gate, up = x.float().chunk(2, dim=-1)
    torch.testing.assert_close(out.float(), torch.nn.functional.silu(gate) * up, rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_sampler_ids_stay_in_range_in_a_dry_run() -> None:
    """The fused sampler's ids feed the next step's embedding lookup: a dry run (the kernel only
    compiles) must still return ids in [0, V), not the uninitialised memory of its output."""
    from pagedserve.executor.kernels.sample import sample_gumbel

    torch.manual_seed(0)
    rows, vocab = 5, 3000
    logits = torch.randn(rows, vocab, device="cuda")
    temps = torch.full((rows,), 0.8, device="cuda", dtype=torch.float32)
    seeds = torch.arange(rows, device="cuda", dtype=torch.int64) + 7
    offsets = torch.zeros(rows, device="cuda", dtype=torch.int64)
    out = torch.full((rows,), -123456789, device="cuda", dtype=torch.int64)
    with compile_ahead("test"):
        sample_gumbel(logits, temps, seeds, offsets, out=out, num_splits=3)
    torch.cuda.synchronize()
    assert out.tolist() == [0] * rows
    ids = sample_gumbel(logits, temps, seeds, offsets, num_splits=3)
    assert ((ids >= 0) & (ids < vocab)).all()
    again = sample_gumbel(logits, temps, seeds, offsets, num_splits=1)
    assert ids.tolist() == again.tolist()  # the same draw whatever the layout
