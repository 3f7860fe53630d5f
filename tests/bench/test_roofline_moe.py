"""The floor of a mixture-of-experts model (bench/roofline.py): Qwen3-30B-A3B's published sizes (30.5 B parameters,
3.3 B activated), the experts a step reads, and a workload's floor against a hand count."""

from __future__ import annotations

import types

import pytest

from pagedserve.bench.roofline import ModelShape, decode_step_floor, workload_floor

QWEN3_30B_A3B = types.SimpleNamespace(
    hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    decoder_sparse_step=1, mlp_only_layers=[],
)


def test_qwen3_moe_sizes_are_the_model_cards() -> None:
    shape = ModelShape.from_hf_config(QWEN3_30B_A3B, 2)
    embedding = 151936 * 2048
    assert round((shape.dense_params + embedding + 128 * shape.expert_params) / 1e9, 1) == 30.5
    assert int((shape.active_params + embedding) / 1e8) == 33  # 3.35 B
    assert shape.expert_params == 48 * 3 * 2048 * 768
    # one token reads its 8 experts a layer; 64 tokens nearly all 128 (uniform routing)
    assert shape.experts_read(1) == pytest.approx(8.0)
    assert shape.experts_read(64) == pytest.approx(128 * (1 - (120 / 128) ** 64))
    assert 124 < shape.experts_read(64) < 128
    assert shape.step_weight_bytes(1) == pytest.approx(2 * (shape.dense_params + 8 * shape.expert_params))
    context_bytes = 1000 * 48 * 2 * 4 * 128 * 2
    assert decode_step_floor(shape, 1000, 4e12) == pytest.approx((shape.step_weight_bytes(1) + context_bytes) / 4e12)


def test_moe_workload_floor_by_hand() -> None:
    """Two requests of 10 input tokens, outputs of 1 and 2: prefill FLOPs over the active parameters, then two decode
    steps (batch 2, then batch 1), each the slower of its bytes and its FLOPs."""
    shape = ModelShape.from_hf_config(QWEN3_30B_A3B, 2)
    bandwidth, flops = 4e12, 800e12
    total, prefill = workload_floor(shape, [10, 10], [1, 2], bandwidth, flops)
    per_token = 2 * shape.active_params / flops
    assert prefill == pytest.approx(20 * per_token)
    expected = prefill
    for batch, context in ((2, 20), (1, 11)):
        f_time = per_token * batch + 4 * 2048 * 48 * context / flops
        expected += max(f_time, (shape.step_weight_bytes(batch) + context * shape.kv_bytes_per_token) / bandwidth)
    assert total == pytest.approx(expected)


def test_a_dense_model_is_unchanged() -> None:
    dense = types.SimpleNamespace(**{k: v for k, v in vars(QWEN3_30B_A3B).items() if k != "num_experts"})
    shape = ModelShape.from_hf_config(dense, 2)
    assert shape.expert_params == shape.num_experts == shape.top_k == 0
    assert shape.step_weight_bytes(64) == shape.weight_bytes == 2 * shape.active_params


def test_int4_projections_count_half_a_byte() -> None:
    """A 4-bit checkpoint held packed: the decoder projections at half a byte a parameter, the LM head 16-bit."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064)
    bf16, int4 = ModelShape.from_hf_config(cfg, 2), ModelShape.from_hf_config(cfg, 2, "int4")
    lm_head = 152064 * 3584
    assert int4.int4_params == bf16.dense_params - lm_head
    assert int4.weight_bytes == int4.int4_params // 2 + 2 * lm_head
    assert round(int4.weight_bytes / 1e9, 2) == 4.35 and int4.active_params == bf16.active_params


def test_gpt_oss_sizes_and_its_windowed_layers_kv() -> None:
    """gpt-oss-20b (docs/gpt-oss-20b-config.json): 20.9 B parameters, 3.6 B active (OpenAI's model card: 21 B and
    3.6 B); its 12 sliding layers read at most 128 keys a sequence, the 12 full ones the whole context."""
    import json
    from pathlib import Path

    cfg = types.SimpleNamespace(**json.loads((Path(__file__).parents[2] / "docs" / "gpt-oss-20b-config.json")
                                             .read_text()))
    shape = ModelShape.from_hf_config(cfg, 2)
    embedding = 201088 * 2880
    assert round((shape.dense_params + embedding + 32 * shape.expert_params) / 1e9, 1) == 20.9
    assert round((shape.active_params + embedding) / 1e9, 1) == 4.2  # (the card's 3.6 B leaves out both tables)
    assert round(shape.active_params / 1e9, 1) == 3.6
    assert (shape.windowed_layers, shape.window) == (12, 128)
    per_token = 24 * 2 * 8 * 64 * 2  # every layer's K and V
    assert shape.kv_bytes_per_token == per_token
    assert shape.kv_tokens([100]) == 100  # within the window: every layer reads all
    assert shape.kv_tokens([1000, 50]) == pytest.approx((12 * 1050 + 12 * (128 + 50)) / 24)
    floor = decode_step_floor(shape, 1000, 4e12)
    assert floor == pytest.approx((shape.step_weight_bytes(1) + (12 * 1000 + 12 * 128) / 24 * per_token) / 4e12)
