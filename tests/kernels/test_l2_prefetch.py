"""The one-token GEMVs' L2 prefetch before the PDL wait (kernels/l2_prefetch.py, PAGEDSERVE_B1_L2_PREFETCH).

A prefetch is a hint: it must change no result. On the GPU the skinny M=1 GEMV (unsplit and split-K), gate_up_silu
and qkv_rope_kv_write at the Qwen2-7B shapes give bit-identical outputs with it on and off. Everywhere: when a
launch takes it (CUDA with PDL, aligned rows, K a multiple of the K step), and that it stays out of the
interpreter (inline PTX cannot run there)."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels import l2_prefetch, pdl
from pagedserve.executor.kernels.gate_up_silu import gate_up_silu
from pagedserve.executor.kernels.qkv_rope_kv import qkv_rope_kv_write
from pagedserve.executor.kernels.skinny_gemm import SkinnyConfig, skinny_linear

CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not (CUDA and pdl.enabled(torch.device("cuda"))), reason="needs CUDA with PDL (sm_90+)")


def test_when_a_launch_takes_it(monkeypatch):
    weight = torch.zeros(8, 1024, dtype=torch.bfloat16)
    assert l2_prefetch.prefetch_steps(weight, 1024, 512, steps=4) == 0  # CPU: no PDL, no prefetch
    monkeypatch.setattr(l2_prefetch.pdl, "enabled", lambda device: True)
    assert l2_prefetch.prefetch_steps(weight, 1024, 512, steps=4) == 4
    assert l2_prefetch.prefetch_steps(weight, 1024, 512, steps=0) == 0
    assert l2_prefetch.prefetch_steps(weight, 1000, 512, steps=4) == 0  # ragged K: masked steps, no prefetch
    assert l2_prefetch.prefetch_steps(weight[:, 1:], 1023, 1, steps=4) == 0  # rows not 16-byte aligned
    monkeypatch.setattr(l2_prefetch, "L2_PREFETCH_STEPS", 3)
    assert l2_prefetch.prefetch_steps(weight, 1024, 512) == 3  # the environment's default


def test_bad_environment_value(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_B1_L2_PREFETCH", "two")
    with pytest.raises(ValueError, match="PAGEDSERVE_B1_L2_PREFETCH"):
        l2_prefetch._steps_from_env()


def _with_and_without(monkeypatch, steps, fn):
    monkeypatch.setattr(l2_prefetch, "L2_PREFETCH_STEPS", 0)
    off = fn()
    monkeypatch.setattr(l2_prefetch, "L2_PREFETCH_STEPS", steps)
    on = fn()
    torch.cuda.synchronize()
    return off, on


@gpu_only
@pytest.mark.parametrize("steps", [2, 6, 64])
@pytest.mark.parametrize("n,k,config", [
    (3584, 3584, None),                                        # o_proj's M=1 tiles
    (3584, 18944, None),                                       # down_proj's
    (152064, 3584, None),                                      # the LM head's
    (3584, 18944, SkinnyConfig(2, 512, 4, 2, 4, False)),       # split-K
])
def test_gpu_skinny_m1_unchanged(monkeypatch, steps, n, k, config):
    torch.manual_seed(n + k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    off, on = _with_and_without(monkeypatch, steps, lambda: skinny_linear(x, weight, config=config))
    assert torch.equal(off, on)


@gpu_only
@pytest.mark.parametrize("steps", [2, 64])
def test_gpu_gate_up_and_qkv_unchanged(monkeypatch, steps):
    torch.manual_seed(steps)
    x = torch.randn(1, 3584, device="cuda", dtype=torch.bfloat16)
    w_gu = torch.randn(2 * 18944, 3584, device="cuda", dtype=torch.bfloat16) / 60
    off, on = _with_and_without(monkeypatch, steps, lambda: gate_up_silu(x, w_gu))
    assert torch.equal(off, on)
    hq, hkv, d = 28, 4, 128
    w_qkv = torch.randn((hq + 2 * hkv) * d, 3584, device="cuda", dtype=torch.bfloat16) / 60
    bias = torch.randn((hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16) * 0.1
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(4096, dtype=torch.float32)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).cuda()
    caches = [torch.zeros((2, 16, 16, hkv, d), dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    calls = iter(caches)
    pos, slot = torch.tensor([3000], device="cuda"), torch.tensor([100], device="cuda")
    off, on = _with_and_without(monkeypatch, steps,
                                lambda: qkv_rope_kv_write(x, w_qkv, bias, pos, cos_sin, next(calls), slot, hq))
    assert torch.equal(off, on) and torch.equal(caches[0], caches[1])
