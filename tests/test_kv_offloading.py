"""KV offloading (--kv-offloading-size): prefix-cache blocks evicted from a small device cache go to the CPU tier and
come back on a later hit, as copies the runner makes before the step's forward: the answers equal Transformers' and
the plain engine's, and the prompt that comes back is served from the CPU tier (its blocks not recomputed)."""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from tests.executor.test_tensor_parallel import hf_greedy, tiny_checkpoint


def run(llm: LLM, prompts: list[list[int]]) -> list:
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    return [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0] for p in prompts]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_evicted_prefix_blocks_come_back_from_the_cpu_tier(async_scheduling, tmp_path, real_model_dir) -> None:
    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    kw = dict(dtype="float32", num_kv_blocks=12, block_size=4, max_model_len=48, skip_warmup=True,
              async_scheduling=async_scheduling)
    llm = LLM(str(tmp_path), kv_offloading_size=0.001, **kw)  # 0.001 GiB: plenty of 4-token blocks here
    first = [(7 * i) % 250 + 3 for i in range(30)]
    others = [[(13 * i + k) % 250 + 3 for i in range(30)] for k in (1, 2)]
    outs = run(llm, [first, *others, first])  # the two others evict the first's blocks from the device
    stats = llm.engine.get_stats()
    assert stats["num_cpu_kv_blocks"] > 20 and stats["cpu_prefix_cache_hits"] >= 24
    assert outs[3].num_cached_tokens >= 24  # its 7 full blocks but the last token's, from the CPU tier
    for prompt, out in zip([first, *others, first], outs, strict=True):
        ids, logprobs = hf_greedy(hf, prompt, 6)
        assert out.outputs[0].token_ids == ids
        assert [lp.logprob for lp in out.outputs[0].logprobs] == pytest.approx(logprobs, abs=1e-4)
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert llm.llm_engine is llm.engine and llm.reset_prefix_cache()
    assert run(llm, [first])[0].num_cached_tokens == 0  # forgotten, the CPU tier too
    plain = LLM(str(tmp_path), **kw)
    again = run(plain, [first, *others, first])
    assert again[3].num_cached_tokens == 0  # without the CPU tier the evicted prefix is recomputed
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]


def test_kv_offloading_needs_prefix_caching(tmp_path) -> None:
    from pagedserve.config import EngineConfig

    with pytest.raises(ValueError, match="needs enable_prefix_caching"):
        EngineConfig(kv_offloading_size=1.0, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="> 0 GiB"):
        EngineConfig(kv_offloading_size=0.0)


def test_kv_offloading_with_two_ranks(tmp_path, real_model_dir) -> None:
    """Tensor parallelism (two CPU ranks over gloo): each rank copies its heads' slice of the blocks, as rank 0's
    scheduler lists them; the returning prompt from the CPU tier answers as Transformers."""
    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=12, block_size=4, max_model_len=48, skip_warmup=True,
              kv_offloading_size=0.001, tensor_parallel_size=2, device="cpu")
    try:
        first = [(7 * i) % 250 + 3 for i in range(30)]
        others = [[(13 * i + k) % 250 + 3 for i in range(30)] for k in (1, 2)]
        outs = run(llm, [first, *others, first])
        assert outs[3].num_cached_tokens >= 24 and llm.engine.get_stats()["cpu_prefix_cache_hits"] >= 24
        ids, logprobs = hf_greedy(hf, first, 6)
        assert outs[3].outputs[0].token_ids == ids
        assert [lp.logprob for lp in outs[3].outputs[0].logprobs] == pytest.approx(logprobs, abs=1e-4)
    finally:
        llm.engine.worker.close()
