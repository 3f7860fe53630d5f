"""How much a hybrid model's KV cache holds with and without the hybrid layout (core/kv_cache.py's window groups,
vLLM's hybrid allocator): computed by the engine's own code (sliding_window_of per layer, worker.hybrid_layout,
scheduler.request_capacity_tokens) for a KV budget, without weights or a GPU.

    python scripts/hybrid_capacity.py [--budget-gib 40] [--config config.json ...]

Presets: gpt-oss-20b (docs/gpt-oss-20b-config.json), and Gemma 3 27B / 1B and Gemma 2 9B from their published shapes.
For each: the layout (group size, window groups), the blocks of 16 tokens the budget holds (one table for every layer
against the groups), the longest request, and how many requests of a context length run at once (each holding its
whole context in the full-attention group and its window, a block of slack either side, in each window group).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from pagedserve.config import EngineConfig
from pagedserve.core.scheduler import request_capacity_tokens, window_kv_tokens
from pagedserve.executor.models.decoder import head_dim_of, sliding_window_of
from pagedserve.executor.worker import hybrid_layout

BLOCK = 16
MAX_BATCHED = 8192
CONTEXTS = (512, 2048, 8192, 32768)


def presets() -> dict:
    from transformers import Gemma2Config, Gemma3TextConfig, GptOssConfig

    root = Path(__file__).resolve().parents[1]
    return {
        "gpt-oss-20b": GptOssConfig(**json.loads((root / "docs/gpt-oss-20b-config.json").read_text())),
        "Gemma 3 27B": Gemma3TextConfig(num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16,
                                        head_dim=128, sliding_window=1024, max_position_embeddings=131072),
        "Gemma 3 1B": Gemma3TextConfig(num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                                       head_dim=256, sliding_window=512, max_position_embeddings=32768),
        "Gemma 2 9B": Gemma2Config(num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                   sliding_window=4096, max_position_embeddings=8192),
    }


def report(name: str, hf_config, budget_gib: float) -> None:
    layers = hf_config.num_hidden_layers
    context = hf_config.max_position_embeddings
    windows = [sliding_window_of(hf_config, i, context) for i in range(layers)]
    bytes_per_block = layers * 2 * BLOCK * hf_config.num_key_value_heads * head_dim_of(hf_config) * 2  # bf16
    uniform = int(budget_gib * 2**30) // bytes_per_block
    model = SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(self_attn=SimpleNamespace(sliding_window=w))
                                                          for w in windows]))
    layout = hybrid_layout(EngineConfig(model=name), model, uniform)
    if layout is None:
        print(f"{name}: not a hybrid model (windowed layers: {sum(w is not None for w in windows)} of {layers})")
        return
    groups = layout.num_window_groups
    longest = request_capacity_tokens(layout.num_blocks, BLOCK, groups,
                                      window_kv_tokens(layout.window, MAX_BATCHED, BLOCK))
    print(f"{name}: {layers} layers, {sum(w is not None for w in windows)} windowed (window {layout.window}); "
          f"groups of {layout.group_size} layers: 1 full-attention + {groups} window; {budget_gib:g} GiB of bf16 KV")
    print(f"  blocks of {BLOCK} tokens: one table {uniform:,} (of {layers} layers), groups {layout.num_blocks:,} "
          f"(of {layout.group_size}); the longest request {uniform * BLOCK:,} -> {longest:,} tokens (the model's "
          f"context: {context:,})")
    window_blocks = -(-(layout.window - 1) // BLOCK) + 2
    cells = []
    for c in (c for c in CONTEXTS if c <= context):
        blocks = -(-c // BLOCK)
        hybrid = layout.num_blocks // (blocks + groups * min(blocks, window_blocks))
        cells.append(f"{c:,}: {uniform // blocks:,} -> {hybrid:,} ({hybrid / max(1, uniform // blocks):.2f}x)")
    print("  requests at once by context:", "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-gib", type=float, default=40.0, help="GiB of KV cache (default 40)")
    parser.add_argument("--config", action="append", default=[], help="a model's config.json (else the presets)")
    args = parser.parse_args()
    if args.config:
        from transformers import AutoConfig

        configs = {path: AutoConfig.from_pretrained(Path(path).parent if path.endswith(".json") else path)
                   for path in args.config}
    else:
        configs = presets()
    for name, hf_config in configs.items():
        report(name, getattr(hf_config, "text_config", hf_config), args.budget_gib)


if __name__ == "__main__":
    main()
