"""Sliding-window attention (Mistral v0.1, Mixtral, Qwen2 / Qwen3 with use_sliding_window) through the torch
backend against Transformers in fp32: which layers slide, one mixed step, and the engine end to end with contexts
well past the window (chunked prefill, a prefix hit, decodes)."""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.executor.models.decoder import sliding_window_of
from tests.executor.helpers import tiny_hf_config
from tests.executor.test_model_runner import run_mixed_batch_against_hf
from tests.executor.test_tensor_parallel import assert_greedy_as_hf, hf_greedy, tiny_checkpoint

# Qwen2: layers from max_window_layers on slide (Transformers' layer_types); the first one attends to everything.
QWEN2_SLIDING = dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)


def test_which_layers_slide() -> None:
    mistral = tiny_hf_config("mistral", sliding_window=16)
    assert [sliding_window_of(mistral, i, 128) for i in range(2)] == [16, 16]
    assert sliding_window_of(mistral, 0, 16) is None  # a window no shorter than the context: full attention
    qwen2 = tiny_hf_config("qwen2", **QWEN2_SLIDING)
    assert qwen2.layer_types == ["full_attention", "sliding_attention"]
    assert [sliding_window_of(qwen2, i, 128) for i in range(2)] == [None, 6]
    assert sliding_window_of(tiny_hf_config("qwen2", use_sliding_window=False, sliding_window=6), 1, 128) is None
    assert sliding_window_of(tiny_hf_config("llama"), 0, 128) is None


@pytest.mark.parametrize("arch,overrides", [("mistral", dict(sliding_window=5)), ("qwen2", QWEN2_SLIDING),
                                            ("mixtral", dict(sliding_window=7))], ids=["mistral", "qwen2", "mixtral"])
def test_mixed_step_with_a_window_matches_transformers(arch: str, overrides: dict, tmp_path) -> None:
    run_mixed_batch_against_hf(arch, tmp_path, "cpu", "torch", tolerance=1e-4, overrides=overrides)


@pytest.mark.parametrize("arch,overrides", [("mistral", dict(sliding_window=16)), ("qwen2", QWEN2_SLIDING)],
                         ids=["mistral", "qwen2"])
def test_llm_with_a_window_generates_as_transformers(arch: str, overrides: dict, tmp_path, real_model_dir) -> None:
    hf = tiny_checkpoint(tmp_path, real_model_dir, arch, **overrides)
    llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, max_num_batched_tokens=16, block_size=4,
              skip_warmup=True)
    base = [(13 * i) % 250 + 3 for i in range(45)]
    assert_greedy_as_hf(llm, hf, [[base], [base[:28] + [9, 8, 7], [5, 17, 99]]], 10)
    assert llm.engine.get_stats()["prefix_cache_hits"] >= 28


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_blocks_behind_the_window_go_back_so_long_answers_fit_a_small_cache(async_scheduling, tmp_path,
                                                                              real_model_dir) -> None:
    """Every layer windowed (Mistral, window 6): a running request keeps only the blocks its window reaches, so two
    requests of 55 and 44 tokens run together in a cache of 8 blocks of 4 (32 tokens), each answering as Transformers;
    then every block is free. Qwen2 with full-attention layers (window on some layers only) gives nothing back."""
    hf = tiny_checkpoint(tmp_path, real_model_dir, "mistral", sliding_window=6)
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=8, block_size=4, max_model_len=64,
              max_num_batched_tokens=8, skip_warmup=True, async_scheduling=async_scheduling)
    assert llm.engine.scheduler.sliding_window == 6
    engine = llm.engine
    low = engine.scheduler.kv_cache.num_free_blocks
    prompts = [[(7 * i) % 250 + 3 for i in range(30)], [(11 * i) % 250 + 3 for i in range(22)]]
    for i, (prompt, n) in enumerate(zip(prompts, (25, 22), strict=True)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=n, logprobs=0))
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0]
        low = min(low, engine.scheduler.kv_cache.num_free_blocks)
    for i, (prompt, n) in enumerate(zip(prompts, (25, 22), strict=True)):
        ids, logprobs = hf_greedy(hf, prompt, n)
        assert outs[f"r{i}"].token_ids == ids
        assert [lp.logprob for lp in outs[f"r{i}"].logprobs] == pytest.approx(logprobs, abs=1e-4)
    assert low >= 0 and engine.get_stats()["num_free_blocks"] == 8
    tiny_checkpoint(tmp_path / "q", real_model_dir, "qwen2", **QWEN2_SLIDING)
    assert LLM(str(tmp_path / "q"), dtype="float32", cpu_kv_cache_gib=0.01, skip_warmup=True).engine.scheduler \
        .sliding_window is None


def test_a_windowed_model_keeps_its_context_in_a_smaller_cache(tmp_path, real_model_dir) -> None:
    """Without --max-model-len the context is the model's (128) even where the cache holds less (12 blocks of 4 =
    48 tokens): a request needs the window (6) and a step's budget (8) of it. Qwen2 with a full-attention layer is
    capped to the cache as before."""
    tiny_checkpoint(tmp_path / "m", real_model_dir, "mistral", sliding_window=6)
    llm = LLM(str(tmp_path / "m"), dtype="float32", num_kv_blocks=12, block_size=4, max_num_batched_tokens=8,
              skip_warmup=True)
    assert llm.engine.config.max_model_len == 128
    out = llm.generate([[(5 * i) % 250 + 3 for i in range(70)]], SamplingParams(temperature=0, max_tokens=30),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 30 and llm.engine.get_stats()["num_free_blocks"] == 12
    tiny_checkpoint(tmp_path / "q", real_model_dir, "qwen2", **QWEN2_SLIDING)
    qwen = LLM(str(tmp_path / "q"), dtype="float32", num_kv_blocks=12, block_size=4, max_num_batched_tokens=8,
               skip_warmup=True)
    assert qwen.engine.config.max_model_len == 48


def test_disable_sliding_window_caps_the_context_at_the_window(tmp_path, real_model_dir) -> None:
    """vLLM's --disable-sliding-window: the context is the window (16), where full attention equals the model's;
    answers as Transformers'. A longer --max-model-len is refused."""
    hf = tiny_checkpoint(tmp_path, real_model_dir, "mistral", sliding_window=16)
    llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, disable_sliding_window=True, skip_warmup=True)
    assert llm.engine.config.max_model_len == 16 and llm.engine.scheduler.sliding_window is None
    assert_greedy_as_hf(llm, hf, [[[(3 * i) % 250 + 3 for i in range(10)]]], 5)
    with pytest.raises(ValueError, match="context of 16 tokens"):
        LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, disable_sliding_window=True, max_model_len=32)
