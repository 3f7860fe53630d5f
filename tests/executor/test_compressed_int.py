"""llm-compressor's integer checkpoints (quant_method "compressed-tensors", executor/int_quant.py): tiny models whose
projections the `compressed-tensors` library itself compresses (pack-quantized W4A16 symmetric / asymmetric per group,
W8A16 per channel, int-quantized 8-bit; an act-order g_idx), loaded by the engine, against Transformers computing with
the weights that library decompresses (fp32)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pagedserve.executor.quantization import checkpoint_quantization
from tests.executor.helpers import hf_logits, make_runner, max_rel_err, scheduled, step, tiny_hf_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_compressed(hf, folder, bits: int = 4, symmetric: bool = True, group: int | None = 16,
                     fmt: str = "pack-quantized", act_order: bool = False) -> None:
    """Save `hf` with every decoder projection compressed by compressed-tensors (lm_head left dense, in `ignore`);
    `hf` then computes with the library's decompressed weights. (The library is imported here, not at collection:
    it imports Triton, which must come after tests/kernels/conftest.py has switched it to its interpreter.)"""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    hf.save_pretrained(folder)
    state = {k: v.clone() for k, v in hf.state_dict().items() if "rotary" not in k}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group else "channel", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = PackedQuantizationCompressor if fmt == "pack-quantized" else IntQuantizationCompressor
    gen = torch.Generator().manual_seed(0)
    for name in [n for n in state if n.endswith(".weight") and any(f".{p}." in n for p in PROJECTIONS)]:
        w = state.pop(name).float()
        prefix = name[: -len(".weight")]
        out_f, in_f = w.shape
        size = group or in_f
        if act_order:  # each input column's group: a permutation of the plain row // size
            g_idx = (torch.arange(in_f) // size)[torch.randperm(in_f, generator=gen)]
            cols = torch.stack([w[:, g_idx == g] for g in range(in_f // size)], 1)  # [out, groups, size]
        else:
            cols = w.view(out_f, in_f // size, size)
        scale, zp = calculate_qparams(cols.amin(-1), cols.amax(-1), args)
        scale = scale.to(torch.float16).float()
        zp = zp.round().to(torch.int8)
        if act_order:  # the library's compressor takes plain groups: quantize and pack by hand, its packer
            s, z = scale[:, g_idx], zp[:, g_idx].int()
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            q = (w / s + z).round().clamp(lo, hi)
            deq = (q - z) * s
            parts = {"weight_packed": pack_to_int32(q.to(torch.int8), bits), "weight_scale": scale.half(),
                     "weight_shape": torch.tensor(w.shape), "weight_g_idx": g_idx.int()}
            if not symmetric:
                parts["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
        else:
            parts = compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
            parts = {k: (v.half() if k == "weight_scale" else v) for k, v in parts.items()}
            # (decompressed with the fp16 scales' exact values in fp32: the library computes in the scale's dtype)
            deq = compressor.decompress({k: (v.float() if k == "weight_scale" else v.clone())
                                         for k, v in parts.items()}, scheme)["weight"].float()
        state.update({f"{prefix}.{k}": v.contiguous() for k, v in parts.items()})
        with torch.no_grad():
            hf.get_parameter(name).copy_(deq)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                      "weights": json.loads(args.model_dump_json())}},
    }
    if act_order:  # as checkpoints of llm-compressor's "group" act-order (dynamic; later versions dropped it) say
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("arch,kwargs", [
    ("qwen2", dict(bits=4, symmetric=True, group=16)),  # W4A16, llm-compressor's default scheme
    ("llama", dict(bits=4, symmetric=False, group=32)),  # asymmetric: packed zero points
    ("qwen3", dict(bits=8, symmetric=True, group=None)),  # W8A16 per channel
    ("qwen2", dict(bits=8, symmetric=True, group=None, fmt="int-quantized")),  # int8 values stored as they are
    ("qwen2", dict(bits=4, symmetric=False, group=16, act_order=True)),  # g_idx
], ids=["w4a16-sym", "w4a16-asym", "w8a16-channel", "int8-unpacked", "w4a16-act-order"])
def test_compressed_checkpoint_matches_transformers_on_its_weights(arch, kwargs, tmp_path, monkeypatch) -> None:
    """Dequantized at load (the 4-bit kernel's case: tests/kernels/test_w4a16.py)."""
    monkeypatch.setenv("PAGEDSERVE_INT4_KERNELS", "0")
    hf = tiny_hf_model(arch)
    write_compressed(hf, tmp_path, **kwargs)
    assert checkpoint_quantization(hf.config.__class__.from_pretrained(tmp_path)) == "compressed-tensors"
    runner, sampler = make_runner(tmp_path)
    assert runner.model.quantization is None
    tokens = list(range(7, 50, 2))
    runner.execute(step(scheduled("r", tokens, 0, list(range(1, 7)), needs_sample=True)))
    assert max_rel_err(sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]) < 1e-4


@pytest.mark.parametrize("groups,message", [
    ({"g": {"weights": {"type": "int", "num_bits": 3, "strategy": "group", "group_size": 16}}}, "not supported"),
    ({"g": {"weights": {"type": "int", "num_bits": 4, "strategy": "block", "block_structure": [128, 128]}}},
     "not supported"),
    ({"g": {"weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 16},
            "format": "int-quantized"}}, "not supported"),
    ({"a": {"weights": {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 16}},
      "b": {"weights": {"type": "int", "num_bits": 8, "strategy": "channel"}}}, "several weight schemes"),
])
def test_unsupported_compressed_schemes_are_named(groups, message) -> None:
    from types import SimpleNamespace

    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": groups}
    with pytest.raises(ValueError, match=message):
        checkpoint_quantization(SimpleNamespace(quantization_config=qc))


def test_a_projection_missing_a_part_is_named(tmp_path) -> None:
    from safetensors.torch import load_file

    write_compressed(tiny_hf_model("qwen2"), tmp_path, symmetric=False)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_zero_point"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj lacks weight_zero_point"):
        make_runner(tmp_path)
