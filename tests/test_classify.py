"""Sequence classification models (*ForSequenceClassification: classifiers, reward models, cross-encoder
rerankers): LLM.classify's probabilities and LLM.score's cross-encoder scores against Transformers' own
classification model on the same random weights (fp32, CPU); what such a model refuses, and what others refuse."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.conftest import TOKENIZER_FILES
from tests.executor.helpers import TINY, randomize_


def classifier_checkpoint(folder, real_model_dir: str, arch: str, num_labels: int, **overrides):
    import transformers

    config_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
                  "qwen3": transformers.Qwen3Config}[arch]
    model_cls = {"qwen2": transformers.Qwen2ForSequenceClassification,
                 "llama": transformers.LlamaForSequenceClassification,
                 "qwen3": transformers.Qwen3ForSequenceClassification}[arch]
    extra = {"head_dim": 16} if arch == "qwen3" else {}
    labels = {i: f"class_{i}" for i in range(num_labels)}
    config = config_cls(**{**TINY, **extra, **overrides}, num_labels=num_labels, id2label=labels,
                        label2id={v: k for k, v in labels.items()}, pad_token_id=0, tie_word_embeddings=False)
    model = model_cls(config)
    randomize_(model, seed=3)
    model.eval().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if os.path.exists(f"{real_model_dir}/{name}"):
            shutil.copy(f"{real_model_dir}/{name}", folder / name)
    return model


PROMPTS = [[(7 * i) % 250 + 3 for i in range(n)] for n in (5, 17, 40)]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_classify_matches_transformers(arch, tmp_path, real_model_dir) -> None:
    hf = classifier_checkpoint(tmp_path, real_model_dir, arch, 3)
    llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, max_num_batched_tokens=16, skip_warmup=True)
    assert llm.engine.class_labels == ["class_0", "class_1", "class_2"]
    outs = llm.classify([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0].softmax(-1)
        assert out.outputs.num_classes == 3 and out.prompt_token_ids == prompt
        assert out.outputs.probs == pytest.approx(want.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="classification and scoring only"):
        llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="does not embed"):
        llm.embed(["hello"], use_tqdm=False)
    with pytest.raises(ValueError, match="one-label classifier"):
        llm.score("a", "b", use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_cross_encoder_scores_pairs_as_transformers(tmp_path, real_model_dir) -> None:
    """A one-label classifier scores (query, document) pairs: the sigmoid of its logit for the pair's tokens."""
    hf = classifier_checkpoint(tmp_path, real_model_dir, "qwen2", 1, vocab_size=151_936)  # the real tokenizer's ids
    llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, skip_warmup=True)
    docs = ["the cat sat", "on a mat", "stock prices fell sharply"]
    outs = llm.score("where did the cat sit?", docs, use_tqdm=False)
    tokenizer = llm.engine.tokenizer
    for doc, out in zip(docs, outs, strict=True):
        ids = tokenizer.hf("where did the cat sit?", doc)["input_ids"]
        assert out.prompt_token_ids == list(ids)
        with torch.no_grad():
            want = hf(torch.tensor([ids])).logits[0, 0].sigmoid().item()
        assert out.outputs.score == pytest.approx(want, abs=1e-5)
    assert llm.classify(["x y z"], use_tqdm=False)[0].outputs.num_classes == 1


def test_a_causal_model_does_not_classify(real_model_dir) -> None:
    llm = LLM(real_model_dir, max_model_len=128, cpu_kv_cache_gib=0.05)
    with pytest.raises(ValueError, match="needs a sequence classification model"):
        llm.classify(["hello"], use_tqdm=False)
