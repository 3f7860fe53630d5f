"""The Gluon decode GEMM (kernels/ws_gemm.py) against torch: Hopper only (Gluon has no interpreter; CI's CPU skips).

Fresh random inputs, the output poisoned with NaN before each launch, shapes whose tiles are each one program's,
spread over several programs, or both; token counts with and without the tail tile; a bias; launches in a row and
CUDA-graph replays (the tile counters must come back to zero for the next launch)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper GPU (sm_90)"
)


def _check(op, x, w, bias, out):
    ref = x.float() @ w.float().t() + (0 if bias is None else bias.float())
    assert not torch.isnan(out).any(), "an output left unwritten"
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-2, err  # bf16 output rounding is 2^-9 of the largest value
    assert int(op.cnt.abs().sum()) == 0, "tile counters not reset"


@pytest.mark.parametrize("k,n", [(256, 384), (640, 1280), (3584, 4608), (18944, 3584)])
@pytest.mark.parametrize("m", [1, 16, 33, 96, 128, 136, 144, 200, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ws_gemm_matches_torch(k, n, m, dtype):
    from pagedserve.executor.kernels.ws_gemm import WsGemm

    g = torch.Generator(device="cuda").manual_seed(k * 1000 + n + m)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.05).to(dtype)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype) if k == 3584 else None
    op = WsGemm(w)
    for _ in range(3):
        x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        op(x, out, bias)
        torch.cuda.synchronize()
        _check(op, x, w, bias, out)


def test_ws_gemm_in_a_cuda_graph():
    from pagedserve.executor.kernels.ws_gemm import WsGemm

    g = torch.Generator(device="cuda").manual_seed(7)
    w = (torch.randn(1280, 640, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
    op = WsGemm(w)
    x = torch.randn(144, 640, device="cuda", generator=g).to(torch.bfloat16)
    out = torch.empty(144, 1280, device="cuda", dtype=torch.bfloat16)
    op(x, out)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(x, out)
    for _ in range(3):
        x.copy_(torch.randn(144, 640, device="cuda", generator=g).to(torch.bfloat16))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(op, x, w, None, out)


def test_linear_routes_its_batch_range_through_ws_gemm(monkeypatch):
    from pagedserve.executor import layers

    lin = layers.Linear(3584, 4608, bias=True).cuda().to(torch.bfloat16)
    torch.nn.init.normal_(lin.weight, std=0.02)
    torch.nn.init.normal_(lin.bias, std=0.02)
    x = torch.randn(144, 3584, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(layers, "_WS_GEMM_M", (65, 256))
    y = lin(x)
    assert lin._ws_op is not None, "144 tokens did not take the Gluon GEMM"
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2
