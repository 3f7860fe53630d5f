"""The 4-bit weight GEMM (kernels/w4a16.py) against a float64 reference of the dequantized weight, in Triton's
interpreter on CPU (compiled on a GPU): fresh random values, zeros and scales, the output poisoned with NaN, several
shapes (one row, rows and columns no tile divides, groups of 16 to 128, one group), fp32 and fp16, a bias; the
layout packed from AWQ's and GPTQ's (int_quant.unpack_parts then pack_int4_rows); the engine on AWQ / GPTQ
checkpoints through it against Transformers."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels import w4a16

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float32, torch.float16]


def _random_int4(k: int, n: int, group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=g)
    zeros = torch.randint(1, 16, (k // group, n), generator=g)  # (GPTQ's format stores zero - 1: 0 cannot be)
    scales = (torch.rand(k // group, n, generator=g) * 0.05 + 0.001).half()
    weight = ((q - zeros.repeat_interleave(group, 0)).double() * scales.double().repeat_interleave(group, 0)).t()
    return q, zeros, scales, weight  # weight [n, k]


@pytest.mark.parametrize("m,k,n,group", [(1, 64, 48, 32), (5, 128, 70, 64), (33, 256, 96, 128), (17, 64, 40, 16),
                                         (3, 96, 64, 96)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_w4a16_matches_the_dequantized_weight(m, k, n, group, dtype, bias, monkeypatch) -> None:
    monkeypatch.setattr(w4a16, "_empty", lambda *shape, **kw: torch.full(shape, float("nan"), **kw))
    q, zeros, scales, weight = _random_int4(k, n, group, m * 7 + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    packed = [t.to(DEVICE) for t in w4a16.pack_int4_rows(q, zeros, scales)]
    y = w4a16.w4a16_linear(x.to(DEVICE), *packed, group, b.to(DEVICE) if bias else None)
    ref = x.double() @ weight.t() + (b.double() if bias else 0)
    assert y.dtype == dtype and y.shape == (m, n) and torch.isfinite(y).all()
    # bf16 (on the GPU): the dequantized weight is rounded to bf16 before the dot, 2^-9 relative a value: ~3e-3 of the
    # largest output measured at k 64-128 (session 30, H100); a wrong group, zero or nibble is off by O(1).
    tol = {torch.float32: 1e-6, torch.float16: 3e-3, torch.bfloat16: 1e-2}[dtype]
    assert (y.double().cpu() - ref).abs().max() <= tol * ref.abs().max()


def test_packing_from_awq_and_gptq_layouts() -> None:
    """int_quant's unpacked values packed for the kernel give back the checkpoint's dequantized weight."""
    from pagedserve.executor.int_quant import AWQ_ORDER, IntQuantConfig, dequantize, unpack_parts
    from tests.executor.test_int_quant import _pack

    q, zeros, scales, weight = _random_int4(64, 32, 32, 3)
    awq = (_pack(q, 4, 1, AWQ_ORDER), _pack(zeros, 4, 1, AWQ_ORDER), scales)
    gptq = (_pack(q, 4, 0), _pack(zeros - 1, 4, 1), scales)
    for config, parts in ((IntQuantConfig("awq", 4, 32, 0), awq), (IntQuantConfig("gptq", 4, 32, 1), gptq)):
        packed, row_scales, zs = w4a16.pack_int4_rows(*unpack_parts(config, *parts)[:3])
        x = torch.eye(64, dtype=torch.float32)  # y = W^T: the weight itself
        got = w4a16.w4a16_linear(x.to(DEVICE), packed.to(DEVICE), row_scales.to(DEVICE), zs.to(DEVICE), 32)
        torch.testing.assert_close(got.cpu().t().double(), weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(dequantize(config, *parts).double(), weight, rtol=0, atol=1e-6)


def test_bad_shapes_are_refused() -> None:
    q, zeros, scales, _ = _random_int4(64, 32, 32, 1)
    packed = w4a16.pack_int4_rows(q, zeros, scales)
    with pytest.raises(ValueError, match="group size 8"):
        w4a16.w4a16_linear(torch.randn(2, 64), *packed, 8)
    with pytest.raises(ValueError, match=r"x \[.., 128\]"):
        w4a16.w4a16_linear(torch.randn(2, 128), *packed, 32)


@pytest.mark.parametrize("method,kwargs,kept", [
    ("awq", dict(group=32), True),
    ("gptq", dict(bits=4, group=-1), True),  # one group a row
    ("gptq", dict(bits=4, group=16, act_order=True), False),  # act-order groups: dequantized instead
    ("gptq", dict(bits=8, group=32), False),  # 8-bit: dequantized
    ("compressed-tensors", dict(symmetric=True, group=16), True),  # llm-compressor's W4A16
    ("compressed-tensors", dict(symmetric=False, group=32), True),
    ("compressed-tensors", dict(symmetric=False, group=16, act_order=True), False),
], ids=["awq", "gptq-one-group", "gptq-act-order", "gptq8", "ct-w4a16-sym", "ct-w4a16-asym", "ct-act-order"])
@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's path on CPU (tests/gpu/test_int4_gpu.py: CUDA)")
def test_engine_on_4bit_checkpoints_matches_transformers(method, kwargs, kept, tmp_path, monkeypatch) -> None:
    """PAGEDSERVE_INT4_KERNELS=1 (the interpreter on CPU): the projections stay 4-bit where the layout holds them,
    and the logits of a prefill and a decode step equal Transformers' on the dequantized weights."""
    from tests.executor.helpers import hf_logits, make_runner, max_rel_err, scheduled, step, tiny_hf_model
    from tests.executor.test_int_quant import write_quantized

    monkeypatch.setenv("PAGEDSERVE_INT4_KERNELS", "1")
    hf = tiny_hf_model("qwen2")
    if method == "compressed-tensors":
        pytest.importorskip("compressed_tensors")
        from tests.executor.test_compressed_int import write_compressed

        write_compressed(hf, tmp_path, **kwargs)
    else:
        write_quantized(hf, tmp_path, method, **kwargs)
    runner, sampler = make_runner(tmp_path)
    attn = runner.model.model.layers[0].self_attn
    assert (attn.qkv_proj.w4_qweight is not None) == kept and (attn.qkv_proj.weight is None) == kept
    assert runner.model.quantization == ("int4" if kept else None)
    tokens = list(range(7, 40, 2))
    out = runner.execute(step(scheduled("r", tokens, 0, list(range(1, 7)), needs_sample=True)))
    assert max_rel_err(sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]) < 1e-4
    tokens.append(out.sampled_token_ids[0])
    runner.execute(step(scheduled("r", tokens[-1:], len(tokens) - 1, list(range(1, 7)), needs_sample=True,
                                  all_token_ids=tokens)))
    assert max_rel_err(sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]) < 1e-4


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's path on CPU (the runner built on the CPU)")
def test_dummy_weights_of_a_4bit_config(tmp_path, monkeypatch) -> None:
    """--load-format dummy on an AWQ config: random 4-bit projections (the 4-bit shapes benchmarked without a
    checkpoint), the LM head and norms as usual; a step runs and its logits are finite and spread."""
    import json

    from tests.executor.helpers import make_runner, scheduled, step, tiny_hf_config

    monkeypatch.setenv("PAGEDSERVE_INT4_KERNELS", "1")
    config = tiny_hf_config("qwen2").to_dict() | {"architectures": ["Qwen2ForCausalLM"], "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner, sampler = make_runner(tmp_path, load_format="dummy")
    assert runner.model.quantization == "int4"
    down = runner.model.model.layers[0].mlp.down_proj
    assert down.weight is None and down.w4_qweight.shape == (64, 96 // 8) and down.w4_group == 32
    assert runner.model.lm_head.weight is not None
    runner.execute(step(scheduled("r", list(range(3, 20)), 0, [1, 2, 3, 4, 5], needs_sample=True)))
    logits = sampler.logits[-1]["r"]
    assert torch.isfinite(logits).all() and logits.std() > 0.01
