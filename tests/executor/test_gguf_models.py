"""GGUF files of Gemma 3 and of the Qwen MoE models, written as llama.cpp writes them (tensor names from gguf-py's own
name map, Gemma's norms stored as 1 + w, the experts stacked per layer, f32 tensors), loaded by the engine against
Transformers on the same weights (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.executor.layers import rope_attention_factor, rope_parameters
from pagedserve.executor.loader import load_model
from tests.executor.helpers import hf_logits, make_runner, max_rel_err, scheduled, step, tiny_hf_model

TOKENS = [3, 17, 101, 5, 250, 64, 9, 33, 12, 200, 7, 8, 9, 10, 11, 12, 90, 91]  # past the window of 6


def write_gguf_mapped(hf, path: Path, arch: str) -> None:
    import gguf

    cfg = hf.config
    model_arch = {"gemma3": gguf.MODEL_ARCH.GEMMA3, "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE,
                  "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE, "gemma2": gguf.MODEL_ARCH.GEMMA2,
                  "phi3": gguf.MODEL_ARCH.PHI3}[arch]
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    writer.add_rope_freq_base(rope["rope_theta"])
    if arch == "phi3":  # as llama.cpp's converter: the rotated width, LongRoPE's factors as two tensors
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if rope.get("rope_type") == "longrope":
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            writer.add_rope_scaling_attn_factors(rope_attention_factor(rope_parameters(cfg)[1]))
            for kind in ("long", "short"):
                factors = torch.tensor(rope[f"{kind}_factor"], dtype=torch.float32).numpy()
                writer.add_tensor(gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, f"ROPE_FACTORS_{kind.upper()}")]
                                  + ".weight", factors)
    if arch in ("gemma2", "gemma3", "phi3") and cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "gemma3":
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
    elif arch in ("qwen3moe", "qwen2moe"):
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if arch == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    state = {k: v for k, v in hf.state_dict().items() if "rotary" not in k}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        array = tensor.float()
        if name.endswith(".experts.gate_up_proj"):  # Transformers' stacked [E, 2I, H]: llama.cpp's gate and up
            base = name[: -len(".gate_up_proj")]
            gate, up = array.chunk(2, dim=1)
            for part, value in (("gate_proj", gate), ("up_proj", up)):
                writer.add_tensor(names.get_name(f"{base}.{part}") + ".weight", value.contiguous().numpy())
            continue
        if name.endswith(".experts.down_proj"):
            writer.add_tensor(names.get_name(name) + ".weight", array.contiguous().numpy())
            continue
        base, _, kind = name.rpartition(".")
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            array = array + 1.0
        if name.endswith("shared_expert_gate.weight"):
            array = array.reshape(-1)
        writer.add_tensor(f"{names.get_name(base)}.{kind}", array.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch,gguf_arch,overrides", [
    # six layers: the default pattern's five sliding then one full (a GGUF carries no layer_types); head_dim as the
    # attention scale, as llama.cpp takes it for every Gemma 3 but the 27B
    ("gemma3", "gemma3", dict(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=16)),
    ("gemma3", "gemma3", dict(num_hidden_layers=6, layer_types=None, query_pre_attn_scalar=16, rope_scaling=None)),
    ("qwen3_moe", "qwen3moe", {}),
    ("qwen2_moe", "qwen2moe", {}),
    # gemma2: every other layer sliding, from the first (what llama.cpp assumes), both soft-caps in the metadata
    ("gemma2", "gemma2", dict(query_pre_attn_scalar=16, num_hidden_layers=4, layer_types=None)),
    ("phi3", "phi3", dict(sliding_window=6)),  # q|k|v and gate|up fused in the file too
    # Phi-4-mini's rotary: 12 of 16 dims, LongRoPE (a context of 128 past the original 16: the long factors, as
    # Transformers picks them for these 18 tokens)
    ("phi3", "phi3", dict(partial_rotary_factor=0.75, original_max_position_embeddings=16,
                          rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 2.2, 2.4],
                                        "long_factor": [1.0, 2.5, 4.0, 7.0, 9.0, 12.0]})),
], ids=["gemma3", "gemma3-no-scaling", "qwen3moe", "qwen2moe", "gemma2", "phi3", "phi3-longrope-partial"])
def test_gguf_of_new_architectures_matches_transformers(arch, gguf_arch, overrides, tmp_path) -> None:
    hf = tiny_hf_model(arch, **overrides)
    path = tmp_path / "tiny.gguf"
    write_gguf_mapped(hf, path, gguf_arch)
    _, config = load_model(EngineConfig(model=str(path)), str(path), "cpu", torch.float32)
    assert config.architectures == [type(hf).__name__]
    runner, sampler = make_runner(path)
    runner.execute(step(scheduled("r", TOKENS, 0, [1, 2, 3, 4, 5], needs_sample=True)))
    assert max_rel_err(sampler.logits[-1]["r"], hf_logits(hf, TOKENS)[-1]) < 1e-4
