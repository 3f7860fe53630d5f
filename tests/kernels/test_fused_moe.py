"""The MoE experts' grouped GEMMs (kernels/fused_moe.py) against the torch reference (models/moe.py's
experts_torch) in Triton's interpreter on CPU (compiled on a GPU): fresh random inputs, outputs poisoned with NaN,
several shapes (one token, blocks shared by many entries of an expert, idle experts, a column count no tile
divides, top-1 / top-3), fp32 and fp16; and the engine with the kernels against Transformers."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels import fused_moe
from pagedserve.executor.models.moe import experts_torch, route

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def poisoned(monkeypatch) -> None:
    """The kernels' h and y buffers start as NaN: a row or column a kernel fails to write shows."""
    monkeypatch.setattr(fused_moe, "_empty", lambda *shape, **kw: torch.full(shape, float("nan"), **kw))


@pytest.mark.parametrize("tokens,experts,hidden,inter,top_k,dtype", [
    (1, 8, 64, 32, 2, torch.float32),     # batch-1 decode: two blocks of one entry each, six idle experts
    (7, 6, 64, 48, 2, torch.float32),     # 48 columns: a partial 64-column tile
    (40, 4, 96, 40, 3, torch.float16),    # 120 entries over 4 experts: blocks of 16 full and partial
    (300, 4, 64, 32, 2, torch.float32),   # 600 entries: the 64-entry blocks
    (9, 16, 32, 16, 1, torch.float16),    # top-1 of 16 experts
])
def test_fused_experts_match_the_torch_reference(poisoned, tokens, experts, hidden, inter, top_k, dtype) -> None:
    g = torch.Generator().manual_seed(tokens * 31 + experts)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.2
    weights, ids = route(torch.randn(tokens, experts, generator=g) * 2, top_k, renormalize=top_k > 1)
    expected = experts_torch(x, w13, w2, ids, weights)
    args = [t.to(DEVICE) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), ids, weights)]
    out = fused_moe.fused_experts(*args)
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), expected, atol=tol * expected.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("tokens,experts,hidden,inter,top_k,dtype", [
    (1, 8, 64, 32, 4, torch.float32),     # batch-1 decode
    (7, 6, 64, 48, 2, torch.float16),     # a partial column tile
    (300, 4, 64, 32, 2, torch.float32),   # the 64-entry blocks
])
def test_gpt_oss_experts_match_the_torch_reference(poisoned, tokens, experts, hidden, inter, top_k, dtype) -> None:
    """gpt-oss's experts: biases on both GEMMs, its clamped gate (limit small enough that the clamps bite)."""
    from pagedserve.executor.models.moe import gated

    g = torch.Generator().manual_seed(tokens * 7 + experts)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.3
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.2
    b13, b2 = torch.randn(experts, 2 * inter, generator=g), torch.randn(experts, hidden, generator=g)
    weights, ids = route(torch.randn(tokens, experts, generator=g) * 2, top_k, renormalize=True)
    limit, alpha = 1.5, 1.702
    expected = experts_torch(x, w13, w2, ids, weights, b13, b2, "gpt_oss", alpha, limit)
    # the reference itself, by hand for one entry: (clamp(up) + 1) * g * sigmoid(alpha g), g = min(gate, limit)
    e, t = ids[0, 0].item(), 0
    gate_up = x[t] @ w13[e].t() + b13[e]
    h = gated(gate_up[:inter], gate_up[inter:], "gpt_oss", alpha, limit)
    assert torch.allclose(h, (gate_up[inter:].clamp(-limit, limit) + 1) * gate_up[:inter].clamp(max=limit)
                          * torch.sigmoid(alpha * gate_up[:inter].clamp(max=limit)))
    assert (gate_up.abs() > limit).any()  # the clamps matter in this case
    args = [t.to(DEVICE) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), ids, weights)]
    out = fused_moe.fused_experts(*args, b13=b13.to(dtype).to(DEVICE), b2=b2.to(dtype).to(DEVICE), act="gpt_oss",
                                  alpha=alpha, limit=limit)
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), expected, atol=tol * expected.abs().max().item(), rtol=tol)
    plain = fused_moe.fused_experts(*args)  # the SwiGLU without biases differs: the flags reach the kernels
    assert not torch.allclose(plain.float().cpu(), expected, atol=1e-2)


def test_one_expert_takes_every_token(poisoned) -> None:
    """All 50 tokens' first choice is expert 2 (four 16-entry blocks of one expert), the second expert 0."""
    g = torch.Generator().manual_seed(5)
    x, w13, w2 = torch.randn(50, 32, generator=g), torch.randn(3, 32, 32, generator=g), torch.randn(3, 32, 16,
                                                                                                 generator=g)
    ids = torch.tensor([[2, 0]] * 50)
    weights = torch.rand(50, 2, generator=g)
    expected = experts_torch(x, w13, w2, ids, weights)
    out = fused_moe.fused_experts(*(t.to(DEVICE) for t in (x, w13, w2, ids, weights)))
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-5)


def test_moe_align_sorts_entries_by_expert() -> None:
    ids = torch.tensor([[3, 0], [0, 1], [3, 1], [0, 3]])
    order, starts = fused_moe.moe_align(ids, 5)
    assert starts.tolist() == [0, 3, 5, 5, 8, 8]  # expert 2 and 4 idle
    flat = ids.flatten()
    assert flat[order].tolist() == [0, 0, 0, 1, 1, 3, 3, 3]
    assert order.tolist() == [1, 2, 6, 3, 5, 0, 4, 7]  # stable: each expert's entries in token order


def test_bad_shapes_are_refused() -> None:
    x, w13, w2 = torch.randn(2, 16), torch.randn(4, 32, 16), torch.randn(4, 16, 8)  # w2 has 8 columns, not 16
    ids, weights = torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2)
    with pytest.raises(ValueError, match="w13 \\(4, 32, 16\\), w2 \\(4, 16, 8\\)"):
        fused_moe.fused_experts(x, w13, w2, ids, weights)
    with pytest.raises(ValueError, match="ids \\(2, 2\\), weights \\(2, 1\\)"):
        fused_moe.fused_experts(x, w13, torch.randn(4, 16, 16), ids, weights[:, :1])


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_engine_with_the_kernels_matches_transformers(arch, tmp_path, real_model_dir, monkeypatch) -> None:
    """PAGEDSERVE_MOE_KERNELS=1: the engine's experts through the kernels (the interpreter on CPU): chunked
    prefills, a prefix hit and batched decodes, as tests/executor/test_moe.py checks the torch path."""
    from tests.executor import test_moe

    monkeypatch.setenv("PAGEDSERVE_MOE_KERNELS", "1")
    calls: list[int] = []
    kernel = fused_moe.fused_experts

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return kernel(x, *args, **kwargs)

    monkeypatch.setattr(fused_moe, "fused_experts", counted)
    test_moe.test_llm_generates_as_transformers(arch, tmp_path, real_model_dir)
    assert calls and max(calls) > 1 and min(calls) < max(calls)
