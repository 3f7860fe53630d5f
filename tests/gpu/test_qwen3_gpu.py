"""GPU: a small random Qwen3 (q/k RMSNorm per head, head_dim 128 != hidden / heads) through the whole engine
with CUDA graphs and async scheduling on: the prompt logprobs (prefill path, chunked) and the greedy tokens'
logprobs (decode graphs) against Transformers' log-softmax of the same sequences, fp32 on the GPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.executor.helpers import randomize_
from tests.gpu.helpers import logprob_errors_against
from tests.gpu.test_async_gpu import SOURCE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qwen3_logprobs_match_transformers_on_gpu(tmp_path) -> None:
    if not (SOURCE / "config.json").exists():
        pytest.skip("no .devcache/qwen2-7b (run scripts/make_7b_config.sh)")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pagedserve import LLM

    for f in SOURCE.iterdir():  # the tokenizer
        if f.name != "config.json":
            shutil.copy(f, tmp_path / f.name)
    vocab = json.loads((SOURCE / "config.json").read_text())["vocab_size"]
    config = Qwen3Config(vocab_size=vocab, hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=2048,
                         rope_theta=1e6, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"])
    hf = Qwen3ForCausalLM(config)
    randomize_(hf, seed=3, std=0.05)
    hf.save_pretrained(tmp_path)
    hf = hf.cuda().eval()

    llm = LLM(str(tmp_path), dtype="float32", max_model_len=1024, max_num_batched_tokens=128,
              gpu_memory_utilization=0.3)
    assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
    worst = max(logprob_errors_against(llm, hf, seed=5, max_prompt=300))
    print(f"qwen3: worst |ours - Transformers| logprob {worst:.2e}")
    assert worst < 5e-3  # the Triton attention's fp32 dots run in TF32
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
