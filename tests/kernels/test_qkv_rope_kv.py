"""The batch-1 qkv GEMV with rotary and the KV-cache write in its epilogue (kernels/qkv_rope_kv.py) against
a float64 reference of the two-kernel path (GEMM rounded to the input dtype; q and k rotated in fp32 and
rounded; k and v stored at the slot): interpreter on CPU (fp32/fp16), compiled on CUDA (fp16/bf16, plus
the 7B shape). Fresh random inputs per case; the cache is poisoned with NaN and every slot but the
token's must stay so. Also the decoder end to end with the fused path forced on (vs Hugging Face)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.executor.kernels.qkv_rope_kv import qkv_rope_kv_write

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rope_cache(max_pos: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def reference(x, weight, bias, pos, cos_sin, hq, hkv, d):
    """(q [Hq, D], k [Hkv, D], v [Hkv, D]) as the GEMM + rotary_kv_write path computes them."""
    qkv = x.cpu().double() @ weight.cpu().double().T
    if bias is not None:
        qkv = qkv + bias.cpu().double()
    qkv = qkv.to(x.dtype).float()[0]
    q, k, v = qkv[: hq * d].view(hq, d), qkv[hq * d : (hq + hkv) * d].view(hkv, d), qkv[(hq + hkv) * d :].view(hkv, d)
    cos, sin = cos_sin[pos, : d // 2].float(), cos_sin[pos, d // 2 :].float()

    def rotate(t):
        t1, t2 = t[:, : d // 2], t[:, d // 2 :]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k), v.to(x.dtype)


def rel_err(actual, expected) -> float:
    actual, expected = actual.cpu().double(), expected.cpu().double()
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,k,block_r,block_k,bias,slot", [
    (4, 2, 64, 96, 2, 64, True, 5),      # ragged K, GQA 2
    (8, 2, 128, 256, 4, 128, False, 17),  # GQA 4, K a multiple of the K tile
    (2, 1, 32, 200, 1, 512, True, 0),    # one K step wider than K, one row a half per program
    (4, 4, 64, 128, 2, 64, True, -1),    # no GQA; a padding slot: nothing stored
])
def test_matches_gemm_then_rotary_kv_write(hq, hkv, d, k, block_r, block_k, bias, slot, dtype):
    g = torch.Generator().manual_seed(hq * 100 + d + k)
    rows = (hq + 2 * hkv) * d
    x = torch.randn(1, k, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(rows, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    b = (torch.randn(rows, generator=g) * 0.1).to(dtype).to(DEVICE) if bias else None
    cos_sin = rope_cache(64, d).to(DEVICE)
    pos = 37
    block_size, num_blocks = 4, 8
    kv_cache = torch.full((2, num_blocks, block_size, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    query = qkv_rope_kv_write(x, weight, b, torch.tensor([pos], device=DEVICE), cos_sin, kv_cache,
                              torch.tensor([slot], device=DEVICE), hq, block_r=block_r, block_k=block_k)
    q_ref, k_ref, v_ref = reference(x, weight, b, pos, cos_sin.cpu(), hq, hkv, d)
    assert query.shape == (1, hq, d) and query.dtype == dtype and not torch.isnan(query).any()
    assert rel_err(query[0], q_ref) < TOL[dtype]
    flat = kv_cache.view(2, num_blocks * block_size, hkv, d)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    if slot >= 0:
        written[slot] = True
        assert rel_err(flat[0, slot], k_ref) < TOL[dtype] and rel_err(flat[1, slot], v_ref) < TOL[dtype]
    assert torch.isnan(flat[:, ~written.to(flat.device)]).all()  # no other slot touched


@pytest.mark.skipif(not CUDA, reason="the 7B shape at full size: GPU only")
def test_7b_shape():
    hq, hkv, d, k = 28, 4, 128, 3584
    x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn((hq + 2 * hkv) * d, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
    bias = torch.randn((hq + 2 * hkv) * d, device=DEVICE, dtype=torch.bfloat16) * 0.1
    cos_sin = rope_cache(4096, d).to(DEVICE)
    kv_cache = torch.zeros((2, 16, 16, hkv, d), dtype=torch.bfloat16, device=DEVICE)
    query = qkv_rope_kv_write(x, weight, bias, torch.tensor([3000], device=DEVICE), cos_sin, kv_cache,
                              torch.tensor([100], device=DEVICE), hq)
    q_ref, k_ref, v_ref = reference(x, weight, bias, 3000, cos_sin.cpu(), hq, hkv, d)
    flat = kv_cache.view(2, -1, hkv, d)
    assert rel_err(query[0], q_ref) < 1.6e-2 and rel_err(flat[0, 100], k_ref) < 1.6e-2
    assert rel_err(flat[1, 100], v_ref) < 1.6e-2


def test_rejects_bad_operands():
    x = torch.randn(1, 64)
    weight = torch.randn((4 + 2 * 2) * 16, 64)
    kv_cache = torch.zeros(2, 4, 4, 2, 16)
    args = (torch.tensor([0]), rope_cache(8, 16), kv_cache, torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="weight"):
        qkv_rope_kv_write(x, weight[:-16], None, *args)
    with pytest.raises(ValueError, match="block_r"):
        qkv_rope_kv_write(x, weight, None, *args, block_r=16)
    with pytest.raises(ValueError, match="one token"):
        qkv_rope_kv_write(x, weight, None, torch.tensor([0, 1]), *args[1:])


def test_decoder_uses_it_at_one_token(tmp_path, monkeypatch):
    """A decode step of one token through the fused qkv path (forced on for CPU tensors; the Triton backend
    in the interpreter) gives Hugging Face's logits, and the rotary + KV-write kernel is not called."""
    from pagedserve.executor.attention import triton_backend
    from pagedserve.executor.models import decoder
    from tests.executor.helpers import hf_logits, make_runner, max_rel_err, save_tiny_model, scheduled, step

    hf = save_tiny_model("qwen2", tmp_path, num_hidden_layers=2)
    runner, sampler = make_runner(tmp_path, block_size=4, num_blocks=32, device=str(DEVICE), dtype=torch.float32,
                                  attention_backend="triton")
    monkeypatch.setattr(decoder, "_fuses_qkv_rope", lambda hidden, rope, backend: hidden.shape[0] == 1)
    separate = []  # token counts of the separate K/V writes (rotary fused into them on CUDA, not on CPU)
    for name in ("rotary_and_write_kv_cache", "write_kv_cache"):
        original = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name, lambda *a, f=original: separate.append(a[0].shape[0]) or f(*a))
    tokens = np.random.default_rng(3).integers(1, 250, 10).tolist()
    out = runner.execute(step(scheduled("a", tokens, 0, [1, 2, 3], True)))
    # The prefill (10 tokens; padded to a ladder size on CUDA) takes the two-kernel path in both layers.
    assert len(separate) == 2 and min(separate) >= 10
    prefill_writes = list(separate)
    for _ in range(2):
        tokens.append(out.sampled_token_ids[0])
        out = runner.execute(step(scheduled("a", tokens[-1:], len(tokens) - 1, [1, 2, 3], True)))
        assert max_rel_err(sampler.logits[-1]["a"], hf_logits(hf, tokens)[-1]) < (5e-3 if CUDA else 1e-4)
    assert separate == prefill_writes  # the one-token steps wrote their K/V in the qkv kernel
