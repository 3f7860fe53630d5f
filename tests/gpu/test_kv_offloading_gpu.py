"""GPU: KV offloading with CUDA graphs and async scheduling on (a small random Qwen2, a device cache of 40 blocks):
prompts that evict each other's prefix blocks, then come back, answer as the plain engine does, the returning ones
from the CPU tier (pinned memory, copies queued before the step's forward)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.gpu.helpers import small_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_kv_offloading_on_gpu(tmp_path) -> None:
    from pagedserve import LLM, SamplingParams

    small_checkpoint(tmp_path, seed=8)
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 100000) for _ in range(200)] for _ in range(4)]
    order = [0, 1, 2, 3, 0, 1]  # 4 x 200 tokens in a 640-token cache: 0 and 1 come back evicted
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    results = {}
    for offload in (None, 0.05):
        llm = LLM(str(tmp_path), dtype="bfloat16", num_kv_blocks=40, block_size=16, max_model_len=512,
                  kv_offloading_size=offload)
        assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
        outs = [llm.generate([{"prompt_token_ids": prompts[i]}], params, use_tqdm=False)[0] for i in order]
        results[offload] = ([o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs],
                            llm.engine.get_stats())
        del llm
    plain, offloaded = results[None], results[0.05]
    print(f"offload: cached tokens plain {plain[1]}, offloaded {offloaded[1]}, "
          f"CPU hits {offloaded[2]['cpu_prefix_cache_hits']}")
    assert offloaded[0] == plain[0]
    assert offloaded[1][4] >= 192 and offloaded[2]["cpu_prefix_cache_hits"] >= 192
