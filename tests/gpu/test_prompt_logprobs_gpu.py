"""GPU: prompt logprobs with CUDA graphs and async scheduling on (their steps run eager, for the hidden states),
on a small random-weight Qwen2 (.devcache/qwen2-7b's tokenizer). Teacher forcing: a greedy answer's decode
logprobs, sampled through the decode graphs, equal the prompt logprobs of the same tokens fed back as a prompt
through the prefill path, chunked, beside other requests. (Against Transformers: tests/test_prompt_logprobs.py.)"""

from __future__ import annotations

import random

import pytest
import torch

from tests.gpu.test_async_gpu import small_model_dir  # noqa: F401 - the shared fixture

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


# k = 1 takes the fused kernel (kernels/logprob_stats.py), k = 3 torch's top-k; the decode logprobs (logprobs=1)
# take the kernel in both.
@pytest.mark.parametrize("dtype,tol,k", [("float32", 2e-3, 1), ("bfloat16", 6e-2, 3)])
def test_prompt_logprobs_equal_decode_logprobs_on_gpu(small_model_dir: str, dtype: str, tol: float,  # noqa: F811
                                                       k: int) -> None:
    from pagedserve import LLM, SamplingParams

    llm = LLM(small_model_dir, load_format="dummy", max_model_len=2048, max_num_batched_tokens=256,
              gpu_memory_utilization=0.3, dtype=dtype)
    assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 100000) for _ in range(rng.randrange(20, 400))] for _ in range(8)]
    greedy = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0, logprobs=1)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    fed = [p + o.outputs[0].token_ids for p, o in zip(prompts, first)]
    asks = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0, prompt_logprobs=k)
    plain = SamplingParams(max_tokens=30, ignore_eos=True, temperature=1.0, seed=4)
    # Beside decoding requests, so prompt rows share steps with decodes.
    outs = llm.generate([{"prompt_token_ids": p} for p in fed] + [{"prompt_token_ids": p[:50]} for p in prompts],
                        [asks] * len(fed) + [plain] * len(prompts), use_tqdm=False)
    worst = 0.0
    for prompt, o, out in zip(prompts, first, outs):
        entries = out.prompt_logprobs[len(prompt):]
        assert [e.token_id for e in entries] == o.outputs[0].token_ids
        for e, d in zip(entries, o.outputs[0].logprobs, strict=True):
            worst = max(worst, abs(e.logprob - d.logprob))
            assert (e.top[0][0] == d.token_id and e.rank == 1) or e.top[0][1] - e.logprob < tol  # greedy: rank 1
        assert all(len(e.top) == k and all(a[1] >= b[1] for a, b in zip(e.top, e.top[1:]))
                   for e in out.prompt_logprobs[1:])
    print(f"{dtype}: worst |prompt - decode logprob| {worst:.2e}")
    assert worst < tol
    assert all(o.prompt_logprobs is None for o in outs[len(fed):])
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
