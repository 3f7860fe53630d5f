"""Weight sources: HF folders (single and sharded), GGUF files, dummy weights, source resolution."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.executor.gguf_loader import GGUF_ARCHITECTURES
from pagedserve.executor.loader import (
    ModelSource,
    fetch_model_source,
    get_eos_token_ids,
    load_model,
    resolve_model_path,
)
from tests.executor.helpers import (
    hf_logits,
    make_runner,
    max_rel_err,
    save_tiny_model,
    scheduled,
    step,
    tiny_hf_config,
    tiny_hf_model,
)

TOKENS = [3, 17, 101, 5, 250, 64, 9, 33, 12, 200, 7]  # 11 tokens, block size 4


def _runner_logits(model_path: str | Path, tokens: list[int] = TOKENS) -> torch.Tensor:
    runner, sampler = make_runner(model_path)
    runner.execute(step(scheduled("r", tokens, 0, [1, 2, 3], needs_sample=True)))
    return sampler.logits[-1]["r"]


def test_sharded_safetensors_folder_with_index(tmp_path: Path) -> None:
    hf = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert max_rel_err(_runner_logits(tmp_path), hf_logits(hf, TOKENS)[-1]) < 1e-4


def test_missing_weights_are_an_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_tiny_model("llama", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    config = EngineConfig(model=str(tmp_path))
    with pytest.raises(ValueError, match=r"lacks weights for model\.layers\.1\.mlp\.gate_up_proj\.weight"):
        load_model(config, str(tmp_path), "cpu", torch.float32)


# --- GGUF ---------------------------------------------------------------------------------------


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows of the llama architecture."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


GGUF_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}


def gguf_name(hf_name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_BLOCK_NAMES[module]}.{kind}"


def write_gguf(hf_model, path: Path, arch: str) -> None:
    """A GGUF of `hf_model` as llama.cpp would write it: f32 norms/biases, f16 attention and
    embeddings, Q8_0 MLP weights. The HF model's weights are replaced by what the file holds
    (the f16 / Q8_0 round trip), so both sides compute with identical numbers."""
    import gguf

    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = {k: v for k, v in hf_model.state_dict().items() if "rotary" not in k}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        array = tensor.float().numpy()
        if tensor.ndim == 1:
            stored, raw = array, array
        elif ".mlp." in name:
            stored = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            raw = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType.Q8_0).reshape(array.shape)
        else:
            stored = array.astype(np.float16)
            raw = stored.astype(np.float32)
        with torch.no_grad():
            hf_model.state_dict()[name].copy_(torch.from_numpy(np.array(raw)))
        if arch == "llama" and ".q_proj." in name:
            stored = llama_cpp_permute(stored, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            stored = llama_cpp_permute(stored, config.num_key_value_heads)
        if stored.dtype == np.uint8:
            writer.add_tensor(gguf_name(name), stored, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),  # tied embeddings, Q/K permuted in the file
    ("qwen2", {}),  # untied output.weight, QKV bias, no permutation
    ("llama", {"attention_bias": True, "tie_word_embeddings": False}),  # permuted biases too
    ("qwen3", {"head_dim": 32}),  # q/k norms per head, head_dim != hidden / heads, unpermuted
])
def test_gguf_matches_hf(arch: str, overrides: dict, tmp_path: Path) -> None:
    hf = tiny_hf_model(arch, **overrides)
    path = tmp_path / "tiny.gguf"
    write_gguf(hf, path, arch)
    model, hf_config = load_model(EngineConfig(model=str(path)), str(path), "cpu", torch.float32)
    assert hf_config.architectures == [GGUF_ARCHITECTURES[arch]]
    assert hf_config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert get_eos_token_ids(hf_config) == {2}
    assert max_rel_err(_runner_logits(path), hf_logits(hf, TOKENS)[-1]) < 1e-4


@pytest.mark.slow
def test_real_qwen_gguf_matches_hf(qwen_gguf_path: str, real_model_dir: str) -> None:
    """Our GGUF loader on the real Qwen2.5-Coder-0.5B against HF on the folder converted from it."""
    from transformers import AutoModelForCausalLM

    tokens = [151644, 872, 198, 40451, 752, 264, 21646, 13, 151645, 198, 151644, 77091, 198]
    ours = _runner_logits(Path(qwen_gguf_path), tokens[:12])
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    expected = hf_logits(hf, tokens[:12])[-1]
    assert max_rel_err(ours, expected) < 1e-4  # seen: 6e-7 (both dequantize with gguf-py)


@pytest.mark.slow
def test_real_smollm2_gguf_matches_transformers_gguf_loader(smollm2_gguf_path: str) -> None:
    """A real llama-architecture GGUF (Q4_1, Q/K permuted by llama.cpp) against transformers'
    own GGUF loader."""
    from transformers import AutoModelForCausalLM

    path = Path(smollm2_gguf_path)
    tokens = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511]
    ours = _runner_logits(path, tokens)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    assert max_rel_err(ours, hf_logits(hf, tokens)[-1]) < 1e-4  # seen: 2e-6


# --- dummy weights and source resolution ---------------------------------------------------------


def test_dummy_weights_from_config_only_folder(tmp_path: Path) -> None:
    tiny_hf_config("qwen2", architectures=["Qwen2ForCausalLM"]).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json"]

    def load(seed: int) -> dict[str, torch.Tensor]:
        config = EngineConfig(model=str(tmp_path), load_format="dummy", seed=seed)
        model, _ = load_model(config, str(tmp_path), "cpu", torch.float32)
        return {k: v.clone() for k, v in model.state_dict().items()}

    first, again, other = load(0), load(0), load(1)
    assert first["model.layers.0.self_attn.qkv_proj.weight"].shape == (64 + 2 * 32, 64)
    assert first["model.layers.0.self_attn.qkv_proj.bias"].shape == (128,)
    assert first["model.layers.1.mlp.gate_up_proj.weight"].shape == (2 * 96, 64)
    assert first["lm_head.weight"].shape == (256, 64)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert torch.equal(first["model.norm.weight"], torch.ones(64))
    assert 0.015 < first["model.embed_tokens.weight"].std() < 0.025
    # And it runs.
    runner, sampler = make_runner(tmp_path, load_format="dummy")
    runner.execute(step(scheduled("r", [1, 2, 3], 0, [1], needs_sample=True)))
    assert torch.isfinite(sampler.logits[-1]["r"]).all()


def test_resolve_model_path_kinds(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"")
    assert resolve_model_path(str(tmp_path / "hf")) == ModelSource("folder", str(tmp_path / "hf"))
    assert resolve_model_path(str(tmp_path / "g")) == ModelSource("gguf", str(tmp_path / "g" / "m.gguf"))
    assert resolve_model_path(str(tmp_path / "g" / "m.gguf")).kind == "gguf"
    assert resolve_model_path(str(tmp_path / "g" / "m.gguf")).folder == str(tmp_path / "g")
    hub_id = "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model_path(hub_id) == ModelSource("hub", hub_id)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_hub_id_offline_says_to_pass_a_local_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", "/nonexistent-pagedserve-test")
    with pytest.raises(ValueError, match="pass a local folder"):
        fetch_model_source("pagedserve-test/no-such-model-xyz")


def test_eos_ids_include_generation_config(tmp_path: Path) -> None:
    config = tiny_hf_config("qwen2", eos_token_id=5)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 5]}))
    assert get_eos_token_ids(config, str(tmp_path)) == {5, 7}
    assert get_eos_token_ids(config) == {5}


def test_plain_config_matches_autoconfig_where_it_is_used(real_model_dir: str, tmp_path) -> None:
    """The start-up path reads config.json without AutoConfig when it spells out every field; the
    fields the model reads must equal AutoConfig's, and anything left to a config class's defaults or
    conversions (rope scaling, a missing field, another model type) goes to AutoConfig."""
    import json
    import shutil

    from transformers import AutoConfig

    from pagedserve.executor.layers import rope_parameters
    from pagedserve.executor.loader import read_plain_config
    from pagedserve.executor.models.decoder import head_dim_of, num_kv_heads_of

    plain, auto = read_plain_config(real_model_dir), AutoConfig.from_pretrained(real_model_dir)
    assert plain is not None
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                 "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "eos_token_id", "architectures"):
        assert getattr(plain, name) == getattr(auto, name), name
    assert head_dim_of(plain) == head_dim_of(auto) and num_kv_heads_of(plain) == num_kv_heads_of(auto)
    assert rope_parameters(plain)[0] == rope_parameters(auto)[0]

    data = json.load(open(f"{real_model_dir}/config.json"))
    for change in ({"rope_scaling": {"type": "linear", "factor": 2.0}},
                   {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
                   {"model_type": "mistral"}, {"use_sliding_window": True}, {"hidden_act": "gelu"}):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**data, **change}))
        assert read_plain_config(str(folder)) is None, change
    folder = tmp_path / "missing"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({k: v for k, v in data.items() if k != "tie_word_embeddings"}))
    assert read_plain_config(str(folder)) is None
    shutil.rmtree(folder)
    assert read_plain_config(str(folder)) is None  # no folder at all
