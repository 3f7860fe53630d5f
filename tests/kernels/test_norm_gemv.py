"""RMSNorm folded into the batch-1 projections (skinny_gemm.skinny_linear_rmsnorm, gate_up_silu with a
residual) against a float64 reference of the unfused sublayer: total = x + residual, y = W @ (w * total /
rms(total)) (+ bias; for gate_up, silu(gate) * up with the GEMM outputs rounded to x's dtype first). The
interpreter on CPU (fp32/fp16), compiled on CUDA (fp16/bf16, plus the 7B shapes). Fresh random inputs
per case; the new residual is checked exactly (x + residual in fp32)."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels.gate_up_silu import gate_up_silu
from pagedserve.executor.kernels.skinny_gemm import SkinnyConfig, skinny_linear_rmsnorm

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
EPS = 1e-6


def inputs(k: int, n_rows: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, k, generator=g) * 2).to(dtype).to(DEVICE)
    residual = (torch.randn(1, k, generator=g) * 3).to(DEVICE)  # fp32: the residual stream
    norm_w = (1 + 0.3 * torch.randn(k, generator=g)).to(dtype).to(DEVICE)
    weight = (torch.randn(n_rows, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    return x, residual, norm_w, weight


def normed64(x, residual, norm_w):
    total = x.cpu().double() + residual.cpu().double()
    return total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + EPS) * norm_w.cpu().double()


def rel_err(actual, expected) -> float:
    actual, expected = actual.cpu().double(), expected.cpu().double()
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n,block_n,block_k,bias", [
    (256, 40, 4, 64, True),    # K a multiple of the K tile, with bias (qkv)
    (200, 37, 2, 64, False),   # ragged K, N not a multiple of the row tile
    (96, 9, 8, 128, True),     # one K step, larger than K
    (512, 64, 1, 512, False),
])
def test_linear_rmsnorm_matches_unfused(k, n, block_n, block_k, bias, dtype):
    x, residual, norm_w, weight = inputs(k, n, dtype, seed=k + n)
    b = (torch.randn(n) * 0.1).to(dtype).to(DEVICE) if bias else None
    config = SkinnyConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=2, use_dot=False)
    y, new_residual = skinny_linear_rmsnorm(x, residual, norm_w, EPS, weight, b, config=config)
    ref = normed64(x, residual, norm_w) @ weight.cpu().double().T
    if bias:
        ref = ref + b.cpu().double()
    assert y.shape == (1, n) and y.dtype == dtype and new_residual.dtype == torch.float32
    assert not torch.isnan(y).any()
    assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)
    torch.testing.assert_close(new_residual, x.float() + residual, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,inter,block_n,block_k", [(256, 48, 2, 64), (200, 37, 4, 64), (96, 5, 8, 128)])
def test_gate_up_silu_rmsnorm_matches_unfused(k, inter, block_n, block_k, dtype):
    x, residual, norm_w, weight = inputs(k, 2 * inter, dtype, seed=3 * k + inter)
    out, new_residual = gate_up_silu(x, weight, block_n=block_n, block_k=block_k, residual=residual,
                                     norm_weight=norm_w, eps=EPS)
    prod = normed64(x, residual, norm_w) @ weight.cpu().double().T
    gate, up = prod[:, :inter].to(dtype).double(), prod[:, inter:].to(dtype).double()
    ref = gate / (1.0 + torch.exp(-gate)) * up
    assert out.shape == (1, inter) and not torch.isnan(out).any()
    assert rel_err(out, ref) < TOL[dtype] * 2, rel_err(out, ref)
    torch.testing.assert_close(new_residual, x.float() + residual, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="7B shapes at full size: GPU only")
@pytest.mark.parametrize("n,k", [(4608, 3584), (37888, 3584)])
def test_7b_shapes(n, k):
    x, residual, norm_w, weight = inputs(k, n, torch.bfloat16, seed=n)
    if n == 37888:
        out, new_residual = gate_up_silu(x, weight, residual=residual, norm_weight=norm_w, eps=EPS)
        prod = normed64(x, residual, norm_w) @ weight.cpu().double().T
        gate, up = prod[:, : n // 2].to(torch.bfloat16).double(), prod[:, n // 2 :].to(torch.bfloat16).double()
        ref = gate / (1.0 + torch.exp(-gate)) * up
    else:
        out, new_residual = skinny_linear_rmsnorm(x, residual, norm_w, EPS, weight)
        ref = normed64(x, residual, norm_w) @ weight.cpu().double().T
    assert rel_err(out, ref) < 2e-2
    torch.testing.assert_close(new_residual, x.float() + residual, rtol=0, atol=0)


def test_rejects_bad_operands():
    x, residual, norm_w, weight = inputs(64, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="one token"):
        skinny_linear_rmsnorm(x.repeat(2, 1), residual, norm_w, EPS, weight)
    with pytest.raises(ValueError, match="float32"):
        skinny_linear_rmsnorm(x, residual.half(), norm_w, EPS, weight)
    with pytest.raises(ValueError, match="norm_weight"):
        skinny_linear_rmsnorm(x, residual, norm_w[:10], EPS, weight)
    with pytest.raises(ValueError, match="go together"):
        gate_up_silu(x, weight, residual=residual)


def test_decoder_folds_norms_at_one_token(tmp_path, monkeypatch):
    """A batch-1 decode step with both norms folded into the projections (forced on for CPU tensors, which
    run the kernels in the interpreter) gives Hugging Face's logits; the norm kernels are not called."""
    import numpy as np

    from pagedserve.executor import layers
    from pagedserve.executor.models import decoder
    from tests.executor.helpers import hf_logits, make_runner, max_rel_err, save_tiny_model, scheduled, step

    hf = save_tiny_model("qwen2", tmp_path, num_hidden_layers=2)
    runner, sampler = make_runner(tmp_path, block_size=4, num_blocks=32, device=str(DEVICE), dtype=torch.float32)
    folded = []
    monkeypatch.setattr(decoder, "_FUSED_NORM", True)
    monkeypatch.setattr(decoder, "_folds_norm", lambda h, r: folded.append(1) or (r is not None and h.shape[0] == 1))
    monkeypatch.setattr(decoder.DecoderMLP, "fuses_gate_up", lambda self, x: x.shape[0] == 1)
    norm_calls = []
    original_norm = layers.RMSNorm.forward
    monkeypatch.setattr(layers.RMSNorm, "forward", lambda self, *a: norm_calls.append(1) or original_norm(self, *a))
    tokens = np.random.default_rng(0).integers(1, 250, 9).tolist()
    out = runner.execute(step(scheduled("a", tokens, 0, [1, 2, 3], True)))
    tokens.append(out.sampled_token_ids[0])
    norm_calls.clear()
    runner.execute(step(scheduled("a", tokens[-1:], len(tokens) - 1, [1, 2, 3], True)))
    # One token: layer 0's input norm (no residual yet) and the final norm run as kernels; the other
    # three of the two layers are folded.
    assert len(norm_calls) == 2 and folded
    assert max_rel_err(sampler.logits[-1]["a"], hf_logits(hf, tokens)[-1]) < (5e-3 if CUDA else 1e-4)
