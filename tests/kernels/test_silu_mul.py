"""Fused SiLU·mul kernel vs plain torch computed in fp32 (and vs the HF-rounding torch path).

Interpreter on CPU (fp32/fp16), compiled on CUDA (fp32/fp16/bf16); see conftest.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.executor.kernels.silu_mul import choose_block, silu_and_mul
from pagedserve.executor.layers import SiluAndMul

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # about one rounding step


def ref_silu_mul(x: torch.Tensor) -> torch.Tensor:
    """fp32 math, one rounding to x's dtype (the kernel's contract)."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def make_input(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype).to(DEVICE)


def assert_matches(out: torch.Tensor, x: torch.Tensor) -> None:
    ref = ref_silu_mul(x)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert not out.isnan().any(), "unwritten (NaN-poisoned) output elements"
    torch.testing.assert_close(out, ref, rtol=TOL[x.dtype], atol=TOL[x.dtype])


@pytest.mark.parametrize("num_tokens", [0, 1, 3, 17])
@pytest.mark.parametrize("inter", [1, 7, 64, 130, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_into_poisoned_out(num_tokens, inter, dtype):
    x = make_input((num_tokens, 2 * inter), dtype, seed=num_tokens * 1009 + inter)
    x_before = x.clone()
    out = torch.full((num_tokens, inter), float("nan"), dtype=dtype, device=DEVICE)
    got = silu_and_mul(x, out=out)
    assert got is out
    assert_matches(out, x)
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # input untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_allocates_and_keeps_leading_dims(dtype):
    x = make_input((2, 3, 2 * 96), dtype, seed=1)
    out = silu_and_mul(x)
    assert out.shape == (2, 3, 96)
    assert_matches(out, x)


def test_silu_and_mul_strided_rows():
    """Rows further apart than 2I (x a column slice of a wider buffer): the row stride is honoured."""
    wide = make_input((5, 2 * 70 + 9), torch.float32, seed=2)
    x = wide[:, : 2 * 70]
    assert x.stride(0) == 2 * 70 + 9
    assert_matches(silu_and_mul(x), x)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_extreme_gates(dtype):
    """Large |gate|: exp(-gate) overflows to inf for very negative gates, giving -0, never NaN."""
    gate = torch.tensor([-6e4, -1e4, -100.0, -20.0, -1.0, 0.0, 1e-3, 1.0, 20.0, 100.0, 1e4, 6e4])
    up = torch.tensor([1.0, -1.0, 2.0, 0.5, 3.0, 7.0, 1.0, -2.0, 0.25, 1.0, 1.0, 1e-3])
    x = torch.cat([gate, up])[None].to(dtype).to(DEVICE)
    out = silu_and_mul(x)
    assert torch.isfinite(out).all()
    assert_matches(out, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_close_to_hf_rounding(dtype):
    """HF (and layers.SiluAndMul on CPU) round F.silu's output to x's dtype before the multiply: one
    extra rounding, so the kernel may differ by about one rounding step on some elements."""
    x = make_input((4, 2 * 256), dtype, seed=3)
    d = x.shape[-1] // 2
    hf = F.silu(x[:, :d]) * x[:, d:]
    tol = 2 * TOL[dtype]
    torch.testing.assert_close(silu_and_mul(x), hf, rtol=tol, atol=tol)


@pytest.mark.skipif(not CUDA, reason="layers.SiluAndMul uses the kernel only on CUDA")
def test_layer_uses_kernel_on_cuda():
    x = make_input((9, 2 * 300), torch.bfloat16, seed=4)
    torch.testing.assert_close(SiluAndMul()(x), silu_and_mul(x), rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need CUDA")
def test_capturable_in_cuda_graph():
    """No host sync in the launcher: it captures, and replays on new input data."""
    x = make_input((3, 2 * 1000), torch.bfloat16, seed=5)
    out = torch.empty(3, 1000, dtype=torch.bfloat16, device=DEVICE)
    silu_and_mul(x, out=out)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        silu_and_mul(x, out=out)
    x.copy_(make_input((3, 2 * 1000), torch.bfloat16, seed=6))
    out.fill_(float("nan"))
    graph.replay()
    assert_matches(out, x)


@pytest.mark.parametrize("block", [64, 2048])
def test_explicit_block(block):
    x = make_input((3, 2 * 130), torch.float32, seed=7)
    assert_matches(silu_and_mul(x, block=block), x)


def test_empty_intermediate_and_no_rows():
    assert silu_and_mul(torch.empty(4, 0, device=DEVICE)).shape == (4, 0)
    assert silu_and_mul(torch.empty(0, 3, 8, device=DEVICE)).shape == (0, 3, 4)


def test_block_choice_spreads_decode_and_keeps_prefill_blocks_large():
    assert choose_block(1, 18944) == 256  # 74 programs for one decode token (Qwen2-7B)
    assert choose_block(139, 18944) == 1024
    assert choose_block(8192, 18944) == 1024


@pytest.mark.parametrize(
    "x_shape,out_kwargs,match",
    [
        ((3, 7), {}, "2 \\* intermediate"),  # odd last dim
        ((3, 8), {"dtype": torch.float16}, "out dtype"),
        ((3, 8), {"shape": (3, 5)}, "out shape"),
        ((3, 8), {"shape": (4, 4)}, "out shape"),
    ],
)
def test_rejects_bad_shapes_and_dtypes(x_shape, out_kwargs, match):
    x = torch.randn(x_shape, device=DEVICE)
    out = None
    if out_kwargs:
        shape = out_kwargs.get("shape", (x_shape[0], x_shape[1] // 2))
        out = torch.empty(shape, dtype=out_kwargs.get("dtype", x.dtype), device=DEVICE)
    with pytest.raises(ValueError, match=match):
        silu_and_mul(x, out=out)


def test_rejects_non_contiguous_and_unsupported_inputs():
    with pytest.raises(ValueError, match="contiguous last dimension"):
        silu_and_mul(torch.randn(4, 8, device=DEVICE).t())  # [8, 4] with last-dim stride 8
    with pytest.raises(ValueError, match="out must be contiguous"):
        silu_and_mul(torch.randn(3, 8, device=DEVICE), out=torch.empty(4, 3, device=DEVICE).t())
    with pytest.raises(ValueError, match="not supported"):
        silu_and_mul(torch.ones(3, 8, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        silu_and_mul(torch.randn(3, 8, device=DEVICE), block=300)
