"""Random LoRA adapters of a model's shapes, for `bench throughput / latency --num-loras K` (what adapters cost)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile


def add_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-loras", type=int, default=0,
                   help="run every request with one of K random LoRA adapters (round robin; implies --enable-lora)")
    p.add_argument("--lora-rank", type=int, default=16, help="the random adapters' rank (with --num-loras)")


def prepare_lora_args(args: argparse.Namespace) -> None:
    """--num-loras K: the engine is built with LoRA on, room for K adapters of --lora-rank."""
    num = getattr(args, "num_loras", 0)
    if num < 0 or getattr(args, "lora_rank", 16) < 1:
        raise ValueError("--num-loras must be >= 0 and --lora-rank >= 1")
    if num:
        args.enable_lora = True
        args.max_loras = max(getattr(args, "max_loras", 4), num)
        args.max_lora_rank = max(getattr(args, "max_lora_rank", 16), args.lora_rank)


def random_adapters(hf_config, num: int, rank: int, seed: int = 0) -> list:
    """`num` PEFT adapters targeting every decoder projection in every layer (A ~ N(0, 1/in), B ~ N(0, 0.01 / r):
    a delta of about a tenth of the base output), written to a temporary folder; returns their LoRARequests."""
    import torch
    from safetensors.torch import save_file

    from pagedserve.lora import PROJECTIONS, LoRARequest

    h, inter = hf_config.hidden_size, hf_config.intermediate_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or h // heads
    shapes = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv_heads * head_dim), "v_proj": (h, kv_heads * head_dim),
              "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    root = tempfile.mkdtemp(prefix="pagedserve-bench-lora-")
    out = []
    g = torch.Generator().manual_seed(seed)
    for k in range(num):
        folder = os.path.join(root, f"lora{k}")
        os.makedirs(folder)
        tensors = {}
        for layer in range(hf_config.num_hidden_layers):
            for name in PROJECTIONS:
                fan_in, fan_out = shapes[name]
                part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{part}.{name}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) / fan_in**0.5).bfloat16()
                tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.1 / rank).bfloat16()
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(PROJECTIONS),
                       "bias": "none"}, f)
        out.append(LoRARequest(f"lora{k}", k + 1, folder))
    return out


__all__ = ["add_lora_args", "prepare_lora_args", "random_adapters"]
