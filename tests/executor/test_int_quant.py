"""AWQ and GPTQ checkpoints (executor/int_quant.py): tiny models whose projections are packed as AutoAWQ (4-bit
gemm) and AutoGPTQ (4 / 8-bit, the "gptq" format's zero - 1 and "gptq_v2"'s plain zeros, act-order g_idx, one
group) write them, loaded and dequantized by the engine, against Transformers computing with the same dequantized
weights (fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pagedserve.executor.int_quant import AWQ_ORDER, dequantize
from pagedserve.executor.quantization import checkpoint_quantization
from tests.executor.helpers import hf_logits, make_runner, max_rel_err, scheduled, step, tiny_hf_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantize(w: torch.Tensor, bits: int, groups: torch.Tensor, num_groups: int):
    """w [out, in] -> (q [in, out], zeros [groups, out], scales [groups, out] fp16, dequantized [out, in]): min-max
    asymmetric quantization per (group of input rows, column)."""
    wt = w.t().float()  # [in, out]
    top = (1 << bits) - 1
    lo = torch.stack([wt[groups == g].min(0).values for g in range(num_groups)]).clamp(max=0)
    hi = torch.stack([wt[groups == g].max(0).values for g in range(num_groups)]).clamp(min=0)
    scales = ((hi - lo) / top).clamp_min(1e-6).half()
    zeros = (-lo / scales.float()).round().clamp(0, top).long()
    q = (wt / scales.float()[groups] + zeros[groups]).round().clamp(0, top).long()
    deq = ((q - zeros[groups]).float() * scales.float()[groups]).t()
    return q, zeros, scales, deq


def _pack(values: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack 32 / bits values a word along `dim` (order: which value of each run of 8 goes to nibble i)."""
    per = 32 // bits
    v = values.long() if dim == 1 else values.long().t()
    v = v.reshape(v.shape[0], -1, per)
    if order is not None:
        v = v[:, :, list(order)]
    words = sum(v[:, :, i] << (bits * i) for i in range(per))
    words = words.to(torch.int32) if words.max() < 2**31 else (words - (words >= 2**31) * 2**32).to(torch.int32)
    return words if dim == 1 else words.t().contiguous()


def write_quantized(hf, folder, method: str, bits: int = 4, group: int = 32, fmt: str = "gptq",
                    act_order: bool = False) -> None:
    """Save `hf` with every decoder projection quantized as `method` writes it; `hf` then computes with the
    dequantized weights (both sides the same numbers)."""
    hf.save_pretrained(folder)
    state = {k: v.clone() for k, v in hf.state_dict().items() if "rotary" not in k}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in state if n.endswith(".weight") and any(f".{p}." in n for p in PROJECTIONS)]:
        w = state.pop(name)
        prefix = name[: -len(".weight")]
        out_f, in_f = w.shape
        size = group if group > 0 else in_f
        num_groups = in_f // size
        groups = torch.arange(in_f) // size
        if act_order:
            groups = groups[torch.randperm(in_f, generator=gen)]
        q, zeros, scales, deq = _quantize(w, bits, groups, num_groups)
        if method == "awq":
            state[prefix + ".qweight"] = _pack(q, 4, 1, AWQ_ORDER)
            state[prefix + ".qzeros"] = _pack(zeros, 4, 1, AWQ_ORDER)
        else:
            state[prefix + ".qweight"] = _pack(q, bits, 0)
            state[prefix + ".qzeros"] = _pack(zeros - (1 if fmt == "gptq" else 0), bits, 1)
            state[prefix + ".g_idx"] = groups.to(torch.int32)
        state[prefix + ".scales"] = scales
        with torch.no_grad():
            hf.get_parameter(name).copy_(deq)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    if method == "awq":
        config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                         "version": "gemm"}
    else:
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group,
                                         "desc_act": act_order, "sym": False, "checkpoint_format": fmt}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("arch,method,kwargs", [
    ("qwen2", "awq", dict(group=32)),
    ("qwen2", "gptq", dict(bits=4, group=32)),  # zeros stored minus one
    ("llama", "gptq", dict(bits=4, group=16, act_order=True)),  # act-order: g_idx permutes the groups
    ("qwen3", "gptq", dict(bits=8, group=-1, fmt="gptq_v2")),  # 8-bit, one group, plain zeros
], ids=["awq", "gptq4", "gptq4-act-order", "gptq8-v2"])
def test_quantized_checkpoint_matches_transformers_on_its_weights(arch, method, kwargs, tmp_path) -> None:
    hf = tiny_hf_model(arch)
    write_quantized(hf, tmp_path, method, **kwargs)
    runner, sampler = make_runner(tmp_path)
    assert runner.model.quantization is None  # held as 16-bit (here fp32) projections
    tokens = list(range(7, 50, 2))
    runner.execute(step(scheduled("r", tokens, 0, list(range(1, 7)), needs_sample=True)))
    assert max_rel_err(sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]) < 1e-4


def test_awq_dequantize_unpacks_the_column_order() -> None:
    """One word per row: AutoAWQ puts column AWQ_ORDER[i] in nibble i."""
    q = torch.arange(8).repeat(2, 1)  # [in 2, out 8]: column n holds value n
    packed = _pack(q, 4, 1, AWQ_ORDER)
    assert packed[0, 0].item() == sum(AWQ_ORDER[i] << (4 * i) for i in range(8))
    from pagedserve.executor.int_quant import IntQuantConfig

    w = dequantize(IntQuantConfig("awq", 4, 2, 0), packed, torch.zeros(1, 1, dtype=torch.int32),
                   torch.ones(1, 8, dtype=torch.float16))
    assert w.t().tolist() == q.float().tolist()


def test_awq_then_fp8(tmp_path) -> None:
    """--quantization fp8 on an AWQ checkpoint: dequantized, then re-quantized to fp8 rows."""
    write_quantized(tiny_hf_model("qwen2"), tmp_path, "awq")
    runner, _ = make_runner(tmp_path, quantization="fp8")
    assert runner.model.quantization == "fp8"


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "zero_point": False}, "without zero points"),
    ({"quant_method": "gptq", "bits": 3}, "3 bits"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "bitsandbytes"}, "'bitsandbytes' is not supported"),
])
def test_unsupported_variants_are_named(qc, message) -> None:
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=message):
        checkpoint_quantization(SimpleNamespace(quantization_config=qc))


def test_a_projection_missing_a_part_is_named(tmp_path) -> None:
    from safetensors.torch import load_file

    write_quantized(tiny_hf_model("qwen2"), tmp_path, "awq")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj lacks qzeros"):
        make_runner(tmp_path)
