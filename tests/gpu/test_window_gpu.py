"""GPU: sliding-window models through the whole engine with CUDA graphs and async scheduling on (the Triton
kernels' windowed decode and prefill, the fused batch-1 paths beside them): a small Gemma 3 (sliding and full
layers, Gemma's norm kernel) and a Mistral with a 64-token window, prompt logprobs and greedy tokens' logprobs
against Transformers on the same sequences (prompts up to 300 tokens: well past the windows), fp32 on the GPU."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import logprob_errors_against, small_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODELS = {
    "gemma3": dict(head_dim=128, sliding_window=64, query_pre_attn_scalar=128,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "qwen2": dict(use_sliding_window=True, sliding_window=64, max_window_layers=1),
    "gemma2": dict(head_dim=128, sliding_window=64, query_pre_attn_scalar=128, attn_logit_softcapping=5.0,
                   final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention",
                                                              "sliding_attention"]),
}


@pytest.mark.parametrize("arch", list(MODELS))
def test_windowed_logprobs_match_transformers_on_gpu(tmp_path, arch) -> None:
    from pagedserve import LLM

    hf = small_checkpoint(tmp_path, arch, seed=3, rope_theta=1e6, **MODELS[arch]).cuda()
    llm = LLM(str(tmp_path), dtype="float32", max_model_len=1024, max_num_batched_tokens=128,
              gpu_memory_utilization=0.3)
    assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
    windows = [layer.self_attn.sliding_window for layer in llm.engine.worker.runner.model.model.layers]
    assert 64 in windows and None in windows
    worst = max(logprob_errors_against(llm, hf, seed=5, max_prompt=300))
    print(f"{arch} window: worst |ours - Transformers| logprob {worst:.2e}")
    assert worst < 5e-3
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    # Its cache (30% of the card) and graphs go before the next case sizes its own from the free memory.
    import gc

    del llm
    gc.collect()
    torch.cuda.empty_cache()
