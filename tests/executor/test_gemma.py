"""Gemma 3 (models/gemma.py) against Transformers in fp32 on CPU: the text model's variants, its multimodal
checkpoint served as text, the engine end to end past the sliding window, and what is refused."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM
from tests.executor.helpers import (
    hf_logits,
    make_runner,
    max_rel_err,
    randomize_,
    save_tiny_model,
    scheduled,
    step,
    tiny_hf_config,
    tiny_hf_model,
)
from tests.executor.test_model_runner import run_mixed_batch_against_hf
from tests.executor.test_tensor_parallel import assert_greedy_as_hf, tiny_checkpoint


@pytest.mark.parametrize("overrides", [
    {},  # tied embeddings, two sliding layers (window 6, base 1e4) then a full one (base 1e6, linear x2)
    dict(final_logit_softcapping=5.0, tie_word_embeddings=False),
    dict(attention_bias=True, rope_scaling=None),
], ids=["default", "softcap-untied", "bias-no-scaling"])
def test_gemma3_matches_transformers(overrides: dict, tmp_path) -> None:
    hf = save_tiny_model("gemma3", tmp_path, **overrides)
    runner, sampler = make_runner(tmp_path)
    layers = runner.model.model.layers
    assert [layer.self_attn.sliding_window for layer in layers] == [6, 6, None]
    tokens = list(range(7, 50, 2))  # 22 tokens: well past the window
    runner.execute(step(scheduled("r", tokens, 0, list(range(1, 7)), needs_sample=True)))
    assert max_rel_err(sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]) < 1e-4


@pytest.mark.parametrize("overrides", [{}, dict(final_logit_softcapping=None)], ids=["caps", "attention-cap-only"])
def test_gemma2_matches_transformers(overrides: dict, tmp_path) -> None:
    """Gemma 2: no q / k norms, attention logit soft-capping (3 here, so that it matters) in the attention, final
    logit soft-capping, sliding and full layers alternating, one rope base."""
    hf = save_tiny_model("gemma2", tmp_path, **overrides)
    runner, sampler = make_runner(tmp_path)
    attn = runner.model.model.layers[0].self_attn
    assert attn.q_norm is None and attn._attn_kwargs == {"window": 6, "softcap": 3.0}
    tokens = list(range(7, 50, 2))
    runner.execute(step(scheduled("r", tokens, 0, list(range(1, 7)), needs_sample=True)))
    assert max_rel_err(sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]) < 1e-4
    uncapped = tiny_hf_model("gemma2", attn_logit_softcapping=None, **overrides)
    assert max_rel_err(hf_logits(uncapped, tokens)[-1], hf_logits(hf, tokens)[-1]) > 1e-3  # the cap matters


def test_gemma3_mixed_step_matches_transformers(tmp_path) -> None:
    run_mixed_batch_against_hf("gemma3", tmp_path, "cpu", "torch", tolerance=1e-4)


def test_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path) -> None:
    """Gemma3ForConditionalGeneration (gemma-3-4b and up): the text config and the language model's tensors are
    used, the vision tower's skipped; logits as the multimodal model's on text."""
    import transformers

    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=tiny_hf_config("gemma3").to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4)
    hf = transformers.Gemma3ForConditionalGeneration(config)
    randomize_(hf)
    hf.eval().save_pretrained(tmp_path)
    runner, sampler = make_runner(tmp_path)
    tokens = list(range(7, 50, 2))
    runner.execute(step(scheduled("r", tokens, 0, list(range(1, 7)), needs_sample=True)))
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([tokens])).logits[0, -1].float()
    assert max_rel_err(sampler.logits[-1]["r"], expected) < 1e-4


def test_llm_generates_as_transformers(tmp_path, real_model_dir) -> None:
    """Chunked prefills (16-token chunks) of 40-token prompts through sliding and full layers, a prefix hit,
    batched decodes; greedy tokens and logprobs as Transformers'."""
    hf = tiny_checkpoint(tmp_path, real_model_dir, "gemma3")
    llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, max_num_batched_tokens=16, block_size=4,
              skip_warmup=True)
    base = [(17 * i) % 250 + 3 for i in range(40)]
    assert_greedy_as_hf(llm, hf, [[base], [base[:24] + [9, 8, 7], [5, 17, 99]]], 8)
    assert llm.engine.get_stats()["prefix_cache_hits"] >= 24


@pytest.mark.parametrize("overrides,message", [
    (dict(attn_logit_softcapping=50.0), "attention logit soft-capping"),
    (dict(hidden_activation="silu"), "hidden_activation 'silu'"),
    (dict(use_bidirectional_attention=True), "bidirectional attention"),
])
def test_gemma_variants_that_are_refused(overrides: dict, message: str, tmp_path) -> None:
    save_tiny_model("gemma3", tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        make_runner(tmp_path)
