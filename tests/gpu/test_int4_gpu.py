"""GPU: a small random model quantized as AutoAWQ and AutoGPTQ write 4-bit checkpoints, through the whole engine with
CUDA graphs and async scheduling (bf16: the projections held 4-bit, the W4A16 kernel at every step size), against
Transformers computing in fp32 with the same dequantized weights: prompt and sampled tokens' logprobs."""

from __future__ import annotations

import pytest
import torch

from tests.gpu.helpers import logprob_errors_against, small_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_int4_logprobs_match_transformers_on_gpu(tmp_path, method) -> None:
    from pagedserve import LLM
    from tests.executor.test_int_quant import write_quantized

    hf = small_checkpoint(tmp_path, "qwen2", seed=3, rope_theta=1e6)
    write_quantized(hf, tmp_path, method, group=128)
    llm = LLM(str(tmp_path), dtype="bfloat16", max_model_len=1024, max_num_batched_tokens=128,
              gpu_memory_utilization=0.3)
    model = llm.engine.worker.runner.model
    assert model.quantization == "int4" and model.model.layers[0].mlp.down_proj.w4_qweight is not None
    assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
    errors = logprob_errors_against(llm, hf.cuda(), seed=5, max_prompt=300)
    worst, median = max(errors), sorted(errors)[len(errors) // 2]
    print(f"{method} int4: |ours (bf16) - Transformers (fp32)| logprob worst {worst:.2e}, median {median:.2e}")
    assert median < 2e-2 and worst < 0.5  # bf16 activations against fp32
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
