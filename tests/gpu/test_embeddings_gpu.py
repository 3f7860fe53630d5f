"""GPU: embeddings (LLM.embed) with CUDA graphs and async scheduling on, on a small random Qwen2 saved as a checkpoint
(fp32, the Triton kernels), against Transformers' normalized last hidden state of the same prompts: alone, chunked,
and beside decoding requests, including one-token prompts, whose step would otherwise be a decode graph step."""

from __future__ import annotations

import random

import pytest
import torch

from tests.gpu.helpers import small_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_embeddings_match_transformers_on_gpu(tmp_path) -> None:
    from pagedserve import LLM, PoolingParams, SamplingParams

    hf = small_checkpoint(tmp_path, seed=4).cuda()

    llm = LLM(str(tmp_path), dtype="float32", max_model_len=1024, max_num_batched_tokens=128,
              gpu_memory_utilization=0.3)
    assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 100000) for _ in range(n)] for n in (1, 1, 5, 40, 300, 700)]
    engine = llm.engine
    decode = SamplingParams(max_tokens=60, ignore_eos=True, temperature=0.0)
    for i in range(6):  # decoding requests, so the embedding requests join steps of running decodes
        engine.add_request(f"gen{i}", [rng.randrange(100, 100000) for _ in range(20)], decode, final_only=True)
    for _ in range(4):
        engine.step()
    for i, p in enumerate(prompts):
        engine.add_request(f"emb{i}", p, SamplingParams.for_pooling(PoolingParams(dimensions=None)), final_only=True)
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] = out
    alone = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    worst = 0.0
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = torch.nn.functional.normalize(hf.model(torch.tensor([p], device="cuda")).last_hidden_state[0, -1],
                                                dim=0).cpu()
        for vector in (got[f"emb{i}"].embedding, alone[i].outputs.embedding):
            worst = max(worst, (torch.tensor(vector) - ref).abs().max().item())
    print(f"embeddings: worst |ours - Transformers| {worst:.2e}")
    assert worst < 2e-3  # the Triton attention's fp32 dots run in TF32
    assert all(len(got[f"gen{i}"].outputs[0].token_ids) == 60 for i in range(6))
    engine.step()
    stats = engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
