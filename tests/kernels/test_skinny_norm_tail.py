"""The one-token GEMV whose last program runs the next RMSNorm (skinny_gemm.skinny_linear_add_norm) against
the two-kernel path it replaces (skinny_linear, then rms_norm with the residual) and against a float64
reference: interpreter on CPU (fp32/fp16), compiled on CUDA (fp16/bf16, plus the 7B shapes). Fresh random
inputs per case; the residual is updated in place and must equal the two-kernel path's; each case runs
twice (the counter must be back at 0 for the second launch to norm at all). Also the decoder end to end
with the tails forced on (vs Hugging Face)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.executor.kernels import skinny_gemm
from pagedserve.executor.kernels.fused_norm import rms_norm
from pagedserve.executor.kernels.skinny_gemm import SkinnyConfig, skinny_linear, skinny_linear_add_norm

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def reference(x, weight, bias, residual, norm_w, eps):
    y = x.cpu().double() @ weight.cpu().double().T
    if bias is not None:
        y = y + bias.cpu().double()
    s = y.to(x.dtype).double() + residual.cpu().double()
    normed = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).double()
    return normed * norm_w.cpu().double(), s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("res_fp32", [True, False])
@pytest.mark.parametrize("k,n,bias,config", [
    (96, 200, False, SkinnyConfig(2, 64, 2, 2, 1, False)),    # ragged K; N not a power of 2
    (256, 64, True, SkinnyConfig(1, 128, 4, 3, 1, False)),    # one row a program (down_proj's M=1 tile)
    (200, 37, False, SkinnyConfig(4, 512, 4, 2, 1, False)),   # one K step wider than K; last tile ragged
    (128, 130, True, None),                                   # the default config
])
def test_matches_gemv_then_norm(k, n, bias, config, res_fp32, dtype):
    g = torch.Generator().manual_seed(k * 7 + n)
    eps = 1e-6
    for _ in range(2):  # the second launch finds the counter the first one left (0)
        x = torch.randn(1, k, generator=g).to(dtype).to(DEVICE)
        weight = (torch.randn(n, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
        b = (torch.randn(n, generator=g) * 0.1).to(dtype).to(DEVICE) if bias else None
        residual = torch.randn(1, n, generator=g).to(torch.float32 if res_fp32 else dtype).to(DEVICE)
        norm_w = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype).to(DEVICE)
        expected_normed, expected_sum = reference(x, weight, b, residual, norm_w, eps)
        two_kernel_normed, two_kernel_res = rms_norm(skinny_linear(x, weight, b, config=config), norm_w, eps, residual)
        normed = skinny_linear_add_norm(x, weight, residual, norm_w, eps, b, config=config)
        assert normed.dtype == dtype and normed.shape == (1, n)
        # The same arithmetic as the two kernels: the GEMV's bits, then the norm kernel's row math.
        torch.testing.assert_close(residual, two_kernel_res, rtol=0, atol=0)
        torch.testing.assert_close(normed, two_kernel_normed, rtol=0, atol=0)
        tol = TOL[dtype]
        assert float((residual.cpu().double() - expected_sum).abs().max()) <= tol * float(expected_sum.abs().max())
        assert float((normed.cpu().double() - expected_normed).abs().max()) <= tol * float(expected_normed.abs().max())
    assert int(skinny_gemm._tail_counter(DEVICE).item()) == 0


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("k,n", [(3584, 3584), (18944, 3584)])
def test_7b_shapes(k, n):
    """o_proj and down_proj at one token with their committed configs, 20 launches in a row."""
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16).to(DEVICE)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16).to(DEVICE)
    norm_w = (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16).to(DEVICE)
    residual = torch.randn(1, n, generator=g).to(DEVICE)
    for _ in range(20):
        expected_normed, expected_res = rms_norm(skinny_linear(x, weight), norm_w, 1e-6, residual)
        normed = skinny_linear_add_norm(x, weight, residual, norm_w, 1e-6)
        torch.testing.assert_close(residual, expected_res, rtol=0, atol=0)
        torch.testing.assert_close(normed, expected_normed, rtol=0, atol=0)


def test_rejects_bad_operands():
    x = torch.randn(1, 64).to(DEVICE)
    weight = torch.randn(32, 64).to(DEVICE)
    residual, norm_w = torch.zeros(1, 32).to(DEVICE), torch.ones(32).to(DEVICE)
    with pytest.raises(ValueError, match="one row"):
        skinny_linear_add_norm(torch.randn(2, 64).to(DEVICE), weight, torch.zeros(2, 32).to(DEVICE), norm_w, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        skinny_linear_add_norm(x, weight, torch.zeros(1, 16).to(DEVICE), norm_w, 1e-6)
    with pytest.raises(ValueError, match="norm_weight"):
        skinny_linear_add_norm(x, weight, residual, torch.ones(16).to(DEVICE), 1e-6)
    with pytest.raises(ValueError, match="unsplit"):
        skinny_linear_add_norm(x, weight, residual, norm_w, 1e-6, config=SkinnyConfig(4, 16, 2, 2, 2, False))
    with pytest.raises(ValueError, match="unsplit"):
        skinny_linear_add_norm(x, weight, residual, norm_w, 1e-6, config=SkinnyConfig(16, 32, 2, 2, 1, True))


def test_decoder_uses_it_at_one_token(tmp_path, monkeypatch):
    """Decode steps of one token with the norm tails forced on (CPU tensors, kernels in the interpreter)
    give Hugging Face's logits, and no norm kernel runs after layer 0's input norm."""
    from pagedserve.executor import layers
    from pagedserve.executor.models import decoder
    from tests.executor.helpers import hf_logits, make_runner, max_rel_err, save_tiny_model, scheduled, step

    hf = save_tiny_model("qwen2", tmp_path, num_hidden_layers=3)
    runner, sampler = make_runner(tmp_path, block_size=4, num_blocks=32, device=str(DEVICE), dtype=torch.float32,
                                  attention_backend="triton")
    monkeypatch.setattr(decoder, "_norm_tail_applies", lambda hidden: hidden.shape[0] == 1)
    norm_calls = []
    original = layers.RMSNorm.forward
    monkeypatch.setattr(layers.RMSNorm, "forward", lambda self, x, r=None: norm_calls.append(x.shape[0]) or original(self, x, r))
    tokens = np.random.default_rng(5).integers(1, 250, 9).tolist()
    out = runner.execute(step(scheduled("a", tokens, 0, [1, 2, 3], True)))
    # The prefill (9 tokens; padded to a ladder size on CUDA): 2 norms a layer and the final one.
    assert len(norm_calls) == 7 and min(norm_calls) >= 9
    for _ in range(3):
        norm_calls.clear()
        tokens.append(out.sampled_token_ids[0])
        out = runner.execute(step(scheduled("a", tokens[-1:], len(tokens) - 1, [1, 2, 3], True)))
        assert norm_calls == [1]  # layer 0's input norm; the other 6 ran in GEMV tails
        assert max_rel_err(sampler.logits[-1]["a"], hf_logits(hf, tokens)[-1]) < (5e-3 if CUDA else 1e-4)
