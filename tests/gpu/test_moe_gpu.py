"""GPU: small random MoE models (Qwen3-MoE: 32 experts, top 4, renormalized; Qwen2-MoE: a gated shared expert) through
the whole engine with CUDA graphs and async scheduling on, the experts in the Triton grouped GEMMs
(kernels/fused_moe.py): prompt logprobs (prefill, chunked) and greedy tokens' logprobs (decode graphs) against
Transformers on the same sequences, fp32 on the GPU; no KV block left."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import logprob_errors_against, small_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MOE = {
    "qwen3_moe": dict(head_dim=128, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen2_moe": dict(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=256,
                      shared_expert_intermediate_size=512, decoder_sparse_step=1, mlp_only_layers=[1]),
}


@pytest.mark.parametrize("arch", list(MOE))
def test_moe_logprobs_match_transformers_on_gpu(tmp_path, arch) -> None:
    from pagedserve import LLM
    from pagedserve.executor.kernels import fused_moe

    hf = small_checkpoint(tmp_path, arch, seed=3, rope_theta=1e6, **MOE[arch]).cuda()
    calls: list[int] = []
    kernel = fused_moe.fused_experts

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return kernel(x, *args, **kwargs)

    fused_moe.fused_experts = counted
    try:
        llm = LLM(str(tmp_path), dtype="float32", max_model_len=1024, max_num_batched_tokens=128,
                  gpu_memory_utilization=0.3)
        assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
        worst = max(logprob_errors_against(llm, hf, seed=5, max_prompt=300))
    finally:
        fused_moe.fused_experts = kernel
    print(f"{arch}: worst |ours - Transformers| logprob {worst:.2e}, expert launches {len(calls)}")
    assert calls
    assert worst < 5e-3
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
