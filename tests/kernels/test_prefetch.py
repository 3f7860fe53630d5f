"""The one-token GEMVs with a wider first K step loaded before the PDL wait (prefetch 2, 4, 8; PAGEDSERVE_B1_PREFETCH):
skinny_gemm's M=1 path (unsplit and split-K, even and ragged K), gate_up_silu and qkv_rope_kv_write, each
against the float64 reference of its own test file, and prefetch_for's clamping. Interpreter on CPU
(fp32/fp16), compiled on CUDA (fp16/bf16). Fresh random inputs per case; outputs poisoned with NaN."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels.gate_up_silu import gate_up_silu
from pagedserve.executor.kernels.pdl import prefetch_for
from pagedserve.executor.kernels.qkv_rope_kv import qkv_rope_kv_write
from pagedserve.executor.kernels.skinny_gemm import SkinnyConfig, skinny_linear
from tests.kernels import test_gate_up_silu as gus
from tests.kernels import test_qkv_rope_kv as qkv
from tests.kernels import test_skinny_gemm as sk

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]


def test_prefetch_for_fits_the_span():
    assert prefetch_for(3584, 512, 4) == 4  # 2,048 columns of 3,584
    assert prefetch_for(3584, 512, 8) == 4  # 4,096 would pass the end of K
    assert prefetch_for(300, 512, 8) == 1
    assert prefetch_for(1024, 256, 2) == 2
    with pytest.raises(ValueError, match="power of 2"):
        prefetch_for(1024, 256, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefetch", [2, 4, 8])
@pytest.mark.parametrize("k,n,bias,config", [
    (512, 37, True, SkinnyConfig(4, 64, 2, 2, 1, False)),    # even K, 8 steps: prefetch up to 8
    (200, 17, False, SkinnyConfig(2, 32, 1, 2, 1, False)),   # ragged K: masked first step
    (640, 9, True, SkinnyConfig(1, 64, 2, 3, 3, False)),     # split-K: 10 steps in splits of 4, 4, 2
    (256, 300, False, SkinnyConfig(16, 64, 4, 2, 1, False)),
])
def test_skinny_m1(k, n, bias, config, prefetch, dtype):
    torch.manual_seed(k + n + prefetch)
    x, weight, b = sk.make_inputs(1, k, n, bias, dtype)
    out = torch.full((1, n), float("nan"), dtype=dtype, device=DEVICE)
    skinny_linear(x, weight, b, out=out, config=config, prefetch=prefetch)
    sk.assert_matches(out, sk.reference(x, weight, b), dtype, x, weight)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefetch", [2, 4])
@pytest.mark.parametrize("k,inter,block_n,block_k", [(256, 48, 2, 64), (200, 37, 4, 32), (512, 5, 2, 128)])
def test_gate_up_silu(k, inter, block_n, block_k, prefetch, dtype):
    torch.manual_seed(k * 3 + inter + prefetch)
    x = torch.randn(1, k).to(dtype).to(DEVICE)
    weight = (torch.randn(2 * inter, k) / k**0.5).to(dtype).to(DEVICE)
    out = torch.full((1, inter), float("nan"), dtype=dtype, device=DEVICE)
    gate_up_silu(x, weight, out, block_n=block_n, block_k=block_k, prefetch=prefetch)
    ref = gus.reference(x, weight)
    assert torch.isfinite(out).all()
    scale = ref.float().abs().max().item() or 1.0
    torch.testing.assert_close(out.float(), ref.float(), rtol=gus.TOL[dtype], atol=gus.TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefetch", [2, 4])
@pytest.mark.parametrize("hq,hkv,d,k,block_k,slot", [(4, 2, 64, 256, 64, 5), (2, 1, 32, 200, 32, 0)])
def test_qkv_rope_kv(hq, hkv, d, k, block_k, slot, prefetch, dtype):
    g = torch.Generator().manual_seed(hq * 100 + d + k + prefetch)
    rows = (hq + 2 * hkv) * d
    x = torch.randn(1, k, generator=g).to(dtype).to(DEVICE)
    weight = (torch.randn(rows, k, generator=g) / k**0.5).to(dtype).to(DEVICE)
    b = (torch.randn(rows, generator=g) * 0.1).to(dtype).to(DEVICE)
    cos_sin = qkv.rope_cache(64, d).to(DEVICE)
    kv_cache = torch.full((2, 8, 4, hkv, d), float("nan"), dtype=dtype, device=DEVICE)
    query = qkv_rope_kv_write(x, weight, b, torch.tensor([37], device=DEVICE), cos_sin, kv_cache,
                              torch.tensor([slot], device=DEVICE), hq, block_k=block_k, prefetch=prefetch)
    q_ref, k_ref, v_ref = qkv.reference(x, weight, b, 37, cos_sin.cpu(), hq, hkv, d)
    flat = kv_cache.view(2, -1, hkv, d)
    assert qkv.rel_err(query[0], q_ref) < qkv.TOL[dtype]
    assert qkv.rel_err(flat[0, slot], k_ref) < qkv.TOL[dtype] and qkv.rel_err(flat[1, slot], v_ref) < qkv.TOL[dtype]
