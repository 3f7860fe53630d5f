"""GPU: async scheduling (placeholder tokens filled in on the device, CUDA graphs, Triton kernels)
gives the same tokens as one-step-at-a-time scheduling, on a small random-weight Qwen2 built from the
7B config's tokenizer folder (.devcache/qwen2-7b, made by scripts/make_7b_config.sh)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from tests.gpu.helpers import SOURCE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]



@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> str:
    if not (SOURCE / "config.json").exists():
        pytest.skip("no .devcache/qwen2-7b (run scripts/make_7b_config.sh)")
    folder = tmp_path_factory.mktemp("small-qwen2")
    for f in SOURCE.iterdir():
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    config = json.loads((SOURCE / "config.json").read_text())
    config.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, max_window_layers=4, layer_types=["full_attention"] * 4)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_async_equals_sync_on_gpu(small_model_dir: str) -> None:
    from pagedserve import LLM, SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 100000) for _ in range(rng.randrange(5, 300))] for _ in range(48)]
    params = [SamplingParams(max_tokens=rng.randrange(1, 40), ignore_eos=True,
                             temperature=0.0 if i % 3 else 1.0, seed=i) for i in range(len(prompts))]
    results = {}
    for mode in (False, True):
        llm = LLM(small_model_dir, load_format="dummy", max_model_len=2048, max_num_batched_tokens=1024,
                  async_scheduling=mode, gpu_memory_utilization=0.3)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[mode] = [o.outputs[0].token_ids for o in outs]
        stats = llm.engine.get_stats()
        assert stats["num_free_blocks"] == stats["num_total_blocks"]
        del llm, outs
        import gc

        gc.collect()  # the engine's CUDA graphs and KV cache go before the next one is built
        torch.cuda.empty_cache()
    assert [len(t) for t in results[True]] == [p.max_tokens for p in params]
    same = sum(a == b for a, b in zip(results[False], results[True]))
    print(f"async vs sync on GPU: {same}/{len(prompts)} requests identical")
    assert same == len(prompts)
