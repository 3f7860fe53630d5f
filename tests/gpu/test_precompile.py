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
