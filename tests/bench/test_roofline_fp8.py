"""The floor of an fp8 model: its projections at one byte a parameter and fp8 matrix rate, the LM head 16-bit."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config

from pagedserve.bench.roofline import ModelShape, workload_floor

CFG = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064)


def test_fp8_shape_reads_the_projections_at_one_byte() -> None:
    bf16 = ModelShape.from_hf_config(CFG, 2)
    fp8 = ModelShape.from_hf_config(CFG, 2, "fp8")
    lm_head = 152064 * 3584
    assert bf16.weight_bytes == 2 * bf16.dense_params
    assert fp8.fp8_params == bf16.dense_params - lm_head
    assert fp8.weight_bytes == fp8.fp8_params + 2 * lm_head
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token  # the KV cache stays 16-bit
    # Qwen2-7B: 14.14 GB of bf16 weights read a step, 7.62 GB in fp8
    assert round(bf16.weight_bytes / 1e9, 2) == 14.14 and round(fp8.weight_bytes / 1e9, 2) == 7.62


def test_fp8_floor_at_the_fp8_rate() -> None:
    bf16 = ModelShape.from_hf_config(CFG, 2)
    fp8 = ModelShape.from_hf_config(CFG, 2, "fp8")
    ins, outs = [1000] * 8, [4] * 8
    t_bf16, pre_bf16 = workload_floor(bf16, ins, outs, 4e12, 750e12)
    t_fp8, pre_fp8 = workload_floor(fp8, ins, outs, 4e12, 750e12, fp8_flops=1500e12)
    # prefill: the projections at twice the rate, the LM head's products at the bf16 rate
    expected = 8000 * 2 * (fp8.fp8_params / 1500e12 + (fp8.dense_params - fp8.fp8_params) / 750e12)
    assert pre_fp8 == pytest.approx(expected) and pre_fp8 < 0.6 * pre_bf16
    # batch-8 decode steps are bandwidth-bound: the weights' bytes shrink to 7.62 of 14.14 GB
    decode_bf16, decode_fp8 = t_bf16 - pre_bf16, t_fp8 - pre_fp8
    assert 0.5 < decode_fp8 / decode_bf16 < 0.6
    with pytest.raises(ValueError, match="fp8 matrix rate"):
        workload_floor(fp8, ins, outs, 4e12, 750e12)
