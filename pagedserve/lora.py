"""LoRA adapters: what a request names (vLLM's `LoRARequest`) and how a PEFT adapter folder is read.

An adapter folder holds `adapter_config.json` (r, lora_alpha, target_modules, use_rslora, ...) and
`adapter_model.safetensors` (or `adapter_model.bin`) with one `lora_A` [r, in] and `lora_B` [out, r] per targeted
projection, keyed as PEFT saves them (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`). A
projection's output becomes x W^T + scale * (x A^T) B^T with scale = lora_alpha / r (lora_alpha / sqrt(r) with
rsLoRA). The decoder projections (q, k, v, o, gate, up, down) may be targeted; adapters that change the embedding or
the LM head (`modules_to_save`, `embed_tokens`, `lm_head`), train biases, or use DoRA are refused with a ValueError.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

# A targeted projection: (its place in the model, the part of a merged projection it is).
PROJECTIONS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name
_ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]
_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """A request's adapter: a name (the server's `model` field), an id unique per adapter, and its folder."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError("lora_name must be a non-empty string")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError("lora_path must be a folder")


@dataclass(slots=True)
class LoRAWeights:
    """One adapter, read: rank, and per (layer, projection name) its A [r, in] and B [out, r] with B scaled."""

    rank: int
    weights: dict[tuple[int, str], tuple]  # (layer, "q_proj") -> (A, B * scale), torch tensors on the CPU


def resolve_adapter_path(path: str, token: str | bool | None = None, download_dir: str | None = None) -> str:
    """An adapter's folder: `path` itself when it is a local path, else the Hugging Face Hub repo `path` (owner/name,
    as vLLM takes one) downloaded, its adapter files only (with `token`, --hf-token; into `download_dir`, else the
    Hugging Face cache). Local: it exists, or it is not of the owner/name form, or it starts with `.`, or its first
    part is a local folder (a typo in `loras/sql` must not fetch someone's `loras/sql` repo). ValueError when the Hub
    cannot give it."""
    if (os.path.exists(path) or not _HUB_ID.match(path) or path.startswith(".")
            or os.path.isdir(path.split("/", 1)[0])):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=_ADAPTER_FILES, cache_dir=download_dir, token=token)
    except Exception as e:  # offline, unknown or gated repo, HTTP errors: the same advice
        raise ValueError(f"no LoRA adapter at {path!r}: no such folder here, and the Hugging Face Hub could not "
                         f"give it ({type(e).__name__}: {e})") from e


def read_adapter(path: str, dtype=None) -> LoRAWeights:
    """Reads a PEFT LoRA folder (A and scaled B in `dtype`, default fp32); ValueError for anything this engine
    cannot apply (see the module docstring). A Hub repo id goes through resolve_adapter_path first."""
    import torch

    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"no LoRA adapter at {path!r}: adapter_config.json is missing")
    with open(config_path) as f:
        cfg = json.load(f)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"the adapter at {path!r} is {cfg.get('peft_type')!r}, not LoRA")
    if cfg.get("use_dora"):
        raise ValueError("DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"adapters that train biases are not supported (bias={cfg.get('bias')!r})")
    if cfg.get("modules_to_save"):
        raise ValueError(f"adapters with modules_to_save ({cfg['modules_to_save']}) are not supported")
    if cfg.get("fan_in_fan_out"):
        raise ValueError("fan_in_fan_out adapters are not supported")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"adapter_config.json: r must be a positive integer, got {rank!r}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError("adapters with per-module ranks or alphas (rank_pattern / alpha_pattern) are not supported")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

    tensors = _read_tensors(path)
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"the adapter holds {key!r}: only the decoder projections "
                             f"({', '.join(PROJECTIONS)}) can take LoRA weights here")
        layer, name, which = int(m.group(1)), m.group(2), m.group(3)
        if name not in PROJECTIONS:
            raise ValueError(f"the adapter targets {name!r}; supported: {', '.join(PROJECTIONS)}")
        parts.setdefault((layer, name), {})[which] = tensor
    if not parts:
        raise ValueError(f"the adapter at {path!r} holds no LoRA weights")
    weights = {}
    for (layer, name), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {layer} {name}: the adapter holds lora_{''.join(ab)} without its pair")
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"layer {layer} {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                             f"have rank {rank}")
        weights[(layer, name)] = (a.to(dtype or torch.float32), (b * scale).to(dtype or torch.float32))
    return LoRAWeights(rank, weights)


def _read_tensors(path: str) -> dict:
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    binary = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(binary):
        import torch

        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ValueError(f"no adapter_model.safetensors (or .bin) in {path!r}")


__all__ = ["PROJECTIONS", "LoRARequest", "LoRAWeights", "read_adapter"]
