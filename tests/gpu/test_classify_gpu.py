"""GPU: a sequence classifier (Qwen2ForSequenceClassification, small and random, beside .devcache's tokenizer) with
CUDA graphs and async scheduling on: LLM.classify's probabilities against Transformers' in fp32 on the GPU, the
engine in fp32 and bf16, prompts of 1 to 500 tokens (chunked at 128)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from tests.gpu.helpers import SOURCE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_classify_matches_transformers_on_gpu(tmp_path, dtype, tol) -> None:
    if not (SOURCE / "config.json").exists():
        pytest.skip("no .devcache/qwen2-7b (run scripts/make_7b_config.sh)")
    import transformers

    from pagedserve import LLM
    from tests.executor.helpers import randomize_

    for f in SOURCE.iterdir():
        if f.name != "config.json":
            shutil.copy(f, tmp_path / f.name)
    vocab = json.loads((SOURCE / "config.json").read_text())["vocab_size"]
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      num_labels=4, pad_token_id=0, tie_word_embeddings=False)
    hf = transformers.Qwen2ForSequenceClassification(config)
    randomize_(hf, seed=5, std=0.05)
    hf.eval().save_pretrained(tmp_path)
    hf = hf.cuda()
    llm = LLM(str(tmp_path), dtype=dtype, max_model_len=1024, max_num_batched_tokens=128, gpu_memory_utilization=0.2)
    assert len(llm.engine.class_labels) == 4 and llm.engine.worker.runner.cuda_graphs is not None
    rng = random.Random(3)
    prompts = [[rng.randrange(100, 100000) for _ in range(n)] for n in (1, 7, 130, 500)]
    outs = llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    worst = 0.0
    for prompt, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([prompt], device="cuda")).logits[0].float().softmax(-1).cpu()
        worst = max(worst, float((torch.tensor(out.outputs.probs) - want).abs().max()))
    print(f"classify {dtype}: worst probability error {worst:.2e}")
    assert worst < tol
