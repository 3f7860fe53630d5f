"""GPU: a small random Qwen3 (q/k RMSNorm per head, head_dim 128 != hidden / heads) through the whole engine
with CUDA graphs and async scheduling on: the prompt logprobs (prefill path, chunked) and the greedy tokens'
logprobs (decode graphs) against Transformers' log-softmax of the same sequences, fp32 on the GPU."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import logprob_errors_against, small_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_qwen3_logprobs_match_transformers_on_gpu(tmp_path) -> None:
    from pagedserve import LLM

    hf = small_checkpoint(tmp_path, "qwen3", seed=3, head_dim=128, rope_theta=1e6).cuda()

    llm = LLM(str(tmp_path), dtype="float32", max_model_len=1024, max_num_batched_tokens=128,
              gpu_memory_utilization=0.3)
    assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
    worst = max(logprob_errors_against(llm, hf, seed=5, max_prompt=300))
    print(f"qwen3: worst |ours - Transformers| logprob {worst:.2e}")
    assert worst < 5e-3  # the Triton attention's fp32 dots run in TF32
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
