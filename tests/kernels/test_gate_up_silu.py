"""The batch-1 gate_up + SiLU·mul kernel vs the two-step torch reference (fp32 products rounded to the
input dtype, then silu(g) * u in fp32, rounded once): interpreter on CPU (fp32/fp16), compiled on CUDA
(fp16/bf16, plus the 7B shape). Fresh random inputs per case; `out` poisoned with NaN."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels.gate_up_silu import gate_up_silu

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference(x, weight):
    """In float64 on the CPU (no TF32 or other reduced-precision matmul), rounded where the kernels round."""
    inter = weight.shape[0] // 2
    prod = x.cpu().double() @ weight.cpu().double().T
    gate = prod[:, :inter].to(x.dtype).double()
    up = prod[:, inter:].to(x.dtype).double()
    return (gate / (1.0 + torch.exp(-gate)) * up).to(x.dtype).to(x.device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,inter,block_n,block_k", [
    (256, 48, 2, 64),   # K a multiple of the K tile
    (200, 37, 4, 64),   # ragged K and an odd I (padding rows)
    (96, 5, 8, 128),    # one K step, larger than K
    (512, 300, 2, 512),
])
def test_matches_gemm_then_silu_mul(k, inter, block_n, block_k, dtype):
    torch.manual_seed(k + inter)
    x = torch.randn(1, k).to(dtype).to(DEVICE)
    weight = (torch.randn(2 * inter, k) / k**0.5).to(dtype).to(DEVICE)
    out = torch.full((1, inter), float("nan"), dtype=dtype, device=DEVICE)
    gate_up_silu(x, weight, out, block_n=block_n, block_k=block_k)
    ref = reference(x, weight)
    assert torch.isfinite(out).all(), "an output element was left unwritten"
    scale = ref.float().abs().max().item() or 1.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_7b_shape_matches_the_unfused_kernels():
    from pagedserve.executor.kernels.silu_mul import silu_and_mul
    from pagedserve.executor.kernels.skinny_gemm import skinny_linear

    torch.manual_seed(0)
    x = torch.randn(1, 3584, dtype=torch.bfloat16, device=DEVICE)
    weight = (torch.randn(2 * 18944, 3584, device=DEVICE) / 60).to(torch.bfloat16)
    fused = gate_up_silu(x, weight)
    unfused = silu_and_mul(skinny_linear(x, weight))
    # Same roundings; the K sums may differ in order only (different tile shapes): <= 1 bf16 step.
    scale = unfused.float().abs().max().item()
    torch.testing.assert_close(fused.float(), unfused.float(), rtol=8e-3, atol=8e-3 * scale)


def test_bad_inputs_raise():
    x = torch.zeros(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[1, K\]"):
        gate_up_silu(x, torch.zeros(8, 64, device=DEVICE))
    with pytest.raises(ValueError, match=r"\[2I, K\]"):
        gate_up_silu(x[:1], torch.zeros(7, 64, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        gate_up_silu(x[:1], torch.zeros(8, 64, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="power of 2"):
        gate_up_silu(x[:1], torch.zeros(8, 64, device=DEVICE), block_n=3)
