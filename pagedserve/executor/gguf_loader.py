"""GGUF (llama.cpp) files: a HF-style config from the metadata, HF-named weights from the tensors.

Quantized tensors (Q4_K, Q5_0, Q8_0, ...) are dequantized to fp32 with gguf-py's numpy code, one
tensor at a time; the model then stores them in its own dtype. Tensor names map as:

    token_embd -> model.embed_tokens       output_norm -> model.norm      output -> lm_head
    blk.N.attn_norm -> model.layers.N.input_layernorm      blk.N.ffn_norm -> ...post_attention_layernorm
    blk.N.attn_q/k/v/output -> ...self_attn.q/k/v/o_proj   blk.N.ffn_gate/up/down -> ...mlp.gate/up/down_proj

    blk.N.attn_q_norm / attn_k_norm -> ...self_attn.q_norm / k_norm (qwen3: an RMSNorm per head of q and k)

qwen2moe / qwen3moe add the router (ffn_gate_inp), the experts stacked per layer (ffn_gate_exps / ffn_up_exps
[E, I, H], ffn_down_exps [E, H, I]) and qwen2moe's shared expert (ffn_*_shexp, ffn_gate_inp_shexp); gemma3 its
sandwich norms (post_attention_norm, ffn_norm as the pre-feedforward norm, post_ffw_norm), all of its norms stored as
1 + w (undone here), and no query_pre_attn_scalar or local rope base in the metadata (llama.cpp's own values taken);
gemma2 the same norms and its two soft-caps, every other layer sliding; phi3 its fused attn_qkv and ffn_up (gate|up).

llama.cpp's converter permutes the rows of Q and K for the `llama` architecture (its rope pairs
adjacent dims, HF's rotates halves); we undo that. `qwen2` and `qwen3` are stored unpermuted (neox rope
in both).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

# GGUF general.architecture -> the HF architecture name our registry knows.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                      "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
                      "gemma3": "Gemma3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM"}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    # mixture of experts (qwen2moe / qwen3moe): the router, the experts stacked [E, I, H] / [E, H, I], the shared one
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    # gemma3's sandwich norms (its ffn_norm is the pre-feedforward norm: _GEMMA_BLOCK_NAMES)
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GEMMA_BLOCK_NAMES = {**_BLOCK_NAMES, "ffn_norm": "pre_feedforward_layernorm"}
# phi3 stores q|k|v and gate|up fused (models/decoder.py's Phi3ForCausalLM splits them)
_PHI3_BLOCK_NAMES = {**_BLOCK_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_ARCH_BLOCK_NAMES = {"gemma2": _GEMMA_BLOCK_NAMES, "gemma3": _GEMMA_BLOCK_NAMES, "phi3": _PHI3_BLOCK_NAMES}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


@functools.lru_cache(maxsize=2)
def _reader(path: str) -> Any:
    # Parsing the metadata (a 150k-token vocabulary) takes a while; config and weights share it.
    from gguf import GGUFReader

    return GGUFReader(path)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_hf_config(path: str) -> Any:
    """A transformers config (Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE, Gemma 3 text) built from GGUF metadata."""
    import transformers
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported GGUF architectures: "
                         f"{', '.join(GGUF_ARCHITECTURES)}")
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF files with a rope_freqs tensor (Llama 3.1-style rope scaling) are not "
                         "supported; use the HF safetensors folder of this model instead")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    num_heads = int(meta("attention.head_count"))
    hidden_size = int(meta("embedding_length"))
    head_dim = int(meta("attention.key_length", hidden_size // num_heads))
    rope_dim = int(meta("rope.dimension_count", head_dim))
    if rope_dim != head_dim and arch != "phi3":  # (Phi-4-mini's partial rotary factor: below)
        raise ValueError(f"partial rotary embeddings (rope dim {rope_dim} < head dim {head_dim}) "
                         f"are not supported for GGUF architecture {arch!r}")
    kwargs: dict[str, Any] = dict(
        architectures=[GGUF_ARCHITECTURES[arch]],
        vocab_size=int(embed.shape[-1]),  # ggml shapes list the fastest dim first: [hidden, vocab]
        hidden_size=hidden_size,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta("context_length", 4096)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    scaling_type = meta("rope.scaling.type")
    if scaling_type not in (None, "none"):
        factor = float(meta("rope.scaling.factor", 1.0))
        kwargs["rope_scaling"] = {"rope_type": scaling_type, "factor": factor}
    if arch in ("qwen2moe", "qwen3moe"):  # llama.cpp renormalizes qwen3moe's top-k weights, not qwen2moe's
        kwargs |= dict(num_experts=int(meta("expert_count")), num_experts_per_tok=int(meta("expert_used_count")),
                       moe_intermediate_size=int(meta("expert_feed_forward_length")), decoder_sparse_step=1,
                       mlp_only_layers=[], norm_topk_prob=arch == "qwen3moe")
        if arch == "qwen2moe":
            kwargs["shared_expert_intermediate_size"] = int(meta("expert_shared_feed_forward_length", 0))
            config = transformers.Qwen2MoeConfig(**kwargs)
        else:
            kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
            config = transformers.Qwen3MoeConfig(**kwargs)
    elif arch == "gemma2":  # (llama.cpp's attention scale: hidden / heads for the 27B, 46 blocks; head_dim else)
        kwargs |= dict(hidden_activation="gelu_pytorch_tanh", sliding_window=int(meta("attention.sliding_window")),
                       query_pre_attn_scalar=hidden_size // num_heads if kwargs["num_hidden_layers"] == 46
                       else head_dim, attn_logit_softcapping=meta("attn_logit_softcapping"),
                       final_logit_softcapping=meta("final_logit_softcapping"),
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                    for i in range(kwargs["num_hidden_layers"])])
        config = transformers.Gemma2Config(**kwargs)
    elif arch == "phi3":
        kwargs["sliding_window"] = meta("attention.sliding_window")
        kwargs["pad_token_id"] = None
        kwargs["partial_rotary_factor"] = rope_dim / head_dim
        if "rope_factors_long.weight" in tensor_names:  # LongRoPE, as llama.cpp's converter stores it
            kwargs["rope_scaling"] = _gguf_longrope(reader, meta, kwargs["max_position_embeddings"])
            kwargs["original_max_position_embeddings"] = kwargs["rope_scaling"]["original_max_position_embeddings"]
        config = transformers.Phi3Config(**kwargs)
    elif arch == "gemma3":
        # llama.cpp keeps neither query_pre_attn_scalar nor the local layers' rope base: it takes hidden / heads for
        # the 27B (62 blocks) and head_dim otherwise, and 10,000 (newer files: rope.freq_base_swa).
        pattern = int(meta("attention.sliding_window_pattern", 6) or 6)
        kwargs |= dict(hidden_activation="gelu_pytorch_tanh", sliding_window=int(meta("attention.sliding_window")),
                       query_pre_attn_scalar=hidden_size // num_heads if kwargs["num_hidden_layers"] == 62
                       else head_dim, rope_local_base_freq=float(meta("rope.freq_base_swa", 10000.0)),
                       final_logit_softcapping=meta("final_logit_softcapping"),
                       layer_types=["sliding_attention" if (i + 1) % pattern else "full_attention"
                                    for i in range(kwargs["num_hidden_layers"])])
        config = transformers.Gemma3TextConfig(**kwargs)
    elif arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        kwargs["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
        config = LlamaConfig(**kwargs)
    elif arch == "qwen3":  # head_dim from attention.key_length (128 in the Qwen3 family, not hidden / heads)
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config = Qwen3Config(**kwargs)
    else:
        config = Qwen2Config(**kwargs)
    config.name_or_path = path
    return config


def _gguf_longrope(reader: Any, meta: Any, context: int) -> dict[str, Any]:
    """Phi-3 / Phi-4-mini's LongRoPE from a GGUF: the per-dimension factors as the rope_factors_long / _short
    tensors, the pretraining context and the attention factor in the metadata."""
    factors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1).tolist() for t in reader.tensors
               if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    if len(factors) != 2:
        raise ValueError("a GGUF with LongRoPE needs both rope_factors_long and rope_factors_short tensors")
    original = int(meta("rope.scaling.original_context_length", context))
    scaling: dict[str, Any] = {"rope_type": "longrope", "long_factor": factors["rope_factors_long.weight"],
                               "short_factor": factors["rope_factors_short.weight"],
                               "original_max_position_embeddings": original}
    if meta("rope.scaling.attn_factor") is not None:
        scaling["attention_factor"] = float(meta("rope.scaling.attn_factor"))
    return scaling


def undo_llama_qk_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert `permute`: per head, rows were reordered from the HF layout
    [first half | second half] to interleaved pairs (x0, x_{d/2}, x1, x_{d/2+1}, ...)."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _tensor_to_torch(tensor: Any) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml order -> torch order
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        array = np.array(tensor.data)  # copy off the read-only memory map
    else:
        array = quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(array).reshape(shape)


def hf_name(gguf_name: str, arch: str | None = None) -> str | None:
    """The HF parameter name of a GGUF tensor name, or None for tensors we do not use. Stacked experts come as
    `mlp.experts.gate_proj` / `up_proj` / `down_proj` (no `.weight`: models/moe.py loads them whole)."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[base]}.{kind}"
    names = _ARCH_BLOCK_NAMES.get(arch, _BLOCK_NAMES)
    match = _BLOCK_RE.match(gguf_name)
    if match and match.group(2) in names:
        layer, part, kind = match.groups()
        if part.endswith("_exps"):
            return f"model.layers.{layer}.{names[part]}"
        return f"model.layers.{layer}.{names[part]}.{kind}"
    return None


def iterate_gguf_weights(path: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, fp32/fp16 CPU tensor) for every tensor of the file the model uses."""
    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    is_llama = arch == "llama"
    for tensor in reader.tensors:
        name = hf_name(tensor.name, arch)
        if name is None:
            continue
        value = _tensor_to_torch(tensor)
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):  # llama.cpp stores Gemma's norms as 1 + w
            value = value - 1.0
        if name.endswith("shared_expert_gate.weight"):  # stored as [H]
            value = value.reshape(1, -1)
        if is_llama and ".attn_q." in tensor.name:
            value = undo_llama_qk_permute(value, hf_config.num_attention_heads)
        elif is_llama and ".attn_k." in tensor.name:
            value = undo_llama_qk_permute(value, hf_config.num_key_value_heads)
        yield name, value
