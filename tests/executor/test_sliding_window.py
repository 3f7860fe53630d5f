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
    capped to what one request can hold: the memory of 12 blocks of both layers is 24 of one (core/kv_cache.py's
    groups), less the 6 its window group holds: 72 tokens (without the groups: 48)."""
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
    assert qwen.engine.config.max_model_len == 72
    one_table = LLM(str(tmp_path / "q"), dtype="float32", num_kv_blocks=12, block_size=4, max_num_batched_tokens=8,
                    skip_warmup=True, disable_hybrid_kv_cache_manager=True)
    assert one_table.engine.config.max_model_len == 48


def test_disable_sliding_window_caps_the_context_at_the_window(tmp_path, real_model_dir) -> None:
    """vLLM's --disable-sliding-window: the context is the window (16), where full attention equals the model's;
    answers as Transformers'. A longer --max-model-len is refused."""
    hf = tiny_checkpoint(tmp_path, real_model_dir, "mistral", sliding_window=16)
    llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, disable_sliding_window=True, skip_warmup=True)
    assert llm.engine.config.max_model_len == 16 and llm.engine.scheduler.sliding_window is None
    assert_greedy_as_hf(llm, hf, [[[(3 * i) % 250 + 3 for i in range(10)]]], 5)
    with pytest.raises(ValueError, match="context of 16 tokens"):
        LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, disable_sliding_window=True, max_model_len=32)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_hybrid_model_windowed_layers_hold_their_window_only(async_scheduling, tmp_path, real_model_dir) -> None:
    """Qwen2 with a full-attention layer and a windowed one (window 6), vLLM's hybrid allocator (core/kv_cache.py):
    each layer a group of its own, one KV tensor for both (a block belongs to one group at a time), so the memory of
    24 blocks of both layers is 48 blocks of one; a running request holds only its window on the windowed layer. A
    request of 40 + 80 tokens (more than one table for both layers holds in that memory: 96 tokens, the context cut
    to that) runs beside another, preempting when the pool runs out, both answering as Transformers; then every
    block is free."""
    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2", **QWEN2_SLIDING)
    kwargs = dict(dtype="float32", num_kv_blocks=24, block_size=4, max_num_batched_tokens=8, max_num_seqs=2,
                  skip_warmup=True)
    llm = LLM(str(tmp_path), async_scheduling=async_scheduling, **kwargs)
    engine = llm.engine
    kv = engine.scheduler.kv_cache
    assert (kv.window, kv.num_window_groups, kv.num_blocks) == (6, 1, 48)
    caches = engine.worker.runner.kv_caches
    assert caches[0] is caches[1] and tuple(caches[0].shape[:2]) == (2, 48)
    # one request: 48 blocks less the window's (6 + 8 + 2 x 4 tokens: 6 blocks) in the window group
    assert engine.scheduler.request_capacity == (48 - 6) * 4 and engine.config.max_model_len == 128
    prompts = [[(7 * i) % 250 + 3 for i in range(40)], [(11 * i) % 250 + 3 for i in range(30)]]
    lengths = (80, 60)
    for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=n, logprobs=0))
    outs, most_window = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0]
        most_window = max([most_window] + [len(kv.get_window_blocks(r)) for r in ("r0", "r1")])
    for i, (prompt, n) in enumerate(zip(prompts, lengths, strict=True)):
        ids, logprobs = hf_greedy(hf, prompt, n)
        assert outs[f"r{i}"].token_ids == ids
        assert [lp.logprob for lp in outs[f"r{i}"].logprobs] == pytest.approx(logprobs, abs=1e-4)
    assert most_window <= 6  # the window's blocks at most (its tokens, a step's 8 and a block of slack either side)
    assert engine.get_stats()["num_preemptions"] >= 1
    assert kv.num_free_blocks == 48 and [b.ref_cnt for b in kv.pool.blocks] == [0] * 48
    # the same memory as one table for both layers: 24 blocks of 4, so the context is cut to 96
    one_pool = LLM(str(tmp_path), disable_hybrid_kv_cache_manager=True, **kwargs)
    assert one_pool.engine.scheduler.kv_cache.window is None and one_pool.engine.scheduler.kv_cache.num_blocks == 24
    assert one_pool.engine.config.max_model_len == 96


def test_hybrid_prefix_hits_need_the_window_groups_keys(tmp_path, real_model_dir) -> None:
    """A repeated 41-token prompt of a hybrid model hits its 40 cached tokens while the first request still runs;
    with the window group's block of positions 36-39 evicted, the hit stops at 36 (position 36 attends to 31..36,
    still cached). Every answer as Transformers'; every block free at the end."""
    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2", **QWEN2_SLIDING)
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=40, block_size=4, max_num_batched_tokens=16,
              max_num_seqs=2, skip_warmup=True)
    engine = llm.engine
    kv = engine.scheduler.kv_cache
    assert kv.window == 6 and kv.num_window_groups == 1 and kv.num_blocks == 80
    prompt = [(13 * i) % 250 + 3 for i in range(41)]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    ref = hf_greedy(hf, prompt, 6)
    engine.add_request("a", prompt, params)
    while engine.scheduler.get_request("a").num_computed_tokens < 41:
        engine.step()
    index_9 = kv.get_window_block_ids("a")[0][9]
    engine.add_request("b", prompt, params)  # while a runs
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    assert engine.get_stats()["prefix_cache_hits"] == 40
    block = kv.pool.blocks[index_9]
    assert block.block_hash is not None and block.ref_cnt == 0
    kv.pool.evict(block)
    engine.add_request("c", prompt, params)
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    assert engine.get_stats()["prefix_cache_hits"] == 40 + 36
    for rid in ("a", "b", "c"):
        assert outs[rid].token_ids == ref[0]
        assert [lp.logprob for lp in outs[rid].logprobs] == pytest.approx(ref[1], abs=1e-4)
    assert kv.num_free_blocks == 80


def test_hybrid_layouts() -> None:
    """worker.hybrid_layout: groups of the size with the fewest layer slots (the full-attention layers one group),
    the memory of N blocks of every layer as N x layers / size blocks of a group; one table where the groups would
    leave more than a tenth of their slots unused, for models without windows or with every layer windowed, and with
    --disable-hybrid-kv-cache-manager or KV offloading."""
    from types import SimpleNamespace

    from pagedserve.config import EngineConfig
    from pagedserve.executor.worker import hybrid_layout

    def model(windows):
        return SimpleNamespace(model=SimpleNamespace(
            layers=[SimpleNamespace(self_attn=SimpleNamespace(sliding_window=w)) for w in windows]))

    config = EngineConfig(model="m")
    gpt_oss = hybrid_layout(config, model([128, None] * 12), 1000)
    assert (gpt_oss.group_size, gpt_oss.num_window_groups, gpt_oss.num_blocks, gpt_oss.window) == (12, 1, 2000, 128)
    assert gpt_oss.group_of_layer == (1, 0) * 12 and gpt_oss.slot_of_layer[:4] == (0, 0, 1, 1)
    gemma3 = hybrid_layout(config, model([None if (i + 1) % 6 == 0 else 1024 for i in range(62)]), 1000)
    assert (gemma3.group_size, gemma3.num_window_groups, gemma3.num_blocks) == (13, 4, 1000 * 62 // 13)
    assert sorted(gemma3.group_of_layer).count(0) == 10 and max(gemma3.slot_of_layer) == 12
    assert hybrid_layout(config, model([None] * 21 + [64] * 7), 1000) is None  # groups of 21: 42 slots for 28
    assert hybrid_layout(config, model([None] * 4), 1000) is None
    assert hybrid_layout(config, model([64] * 4), 1000) is None
    windows = [128, None] * 12
    assert hybrid_layout(EngineConfig(model="m", disable_hybrid_kv_cache_manager=True), model(windows), 10) is None
    assert hybrid_layout(EngineConfig(model="m", kv_offloading_size=1.0), model(windows), 10) is None


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_hybrid_model_with_speculative_decoding(async_scheduling, tmp_path, real_model_dir) -> None:
    """A hybrid model (Qwen2, layer 0 full, layers 1-2 window 6: two window groups) drafting by n-gram lookup:
    drafted steps' rows read every group's tables, rejected drafts' positions are recomputed; greedy answers (a
    looping prompt, so drafts are kept) and logprobs as Transformers', every block free at the end."""
    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2", num_hidden_layers=3, **QWEN2_SLIDING)
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=30, block_size=4, max_num_batched_tokens=16,
              skip_warmup=True, async_scheduling=async_scheduling,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                                  "prompt_lookup_min": 1})
    kv = llm.engine.scheduler.kv_cache
    assert kv.num_window_groups == 2 and kv.num_blocks == 90
    loop = [5, 9, 2, 7, 1, 3] * 5
    assert_greedy_as_hf(llm, hf, [[loop, [(3 * i) % 250 + 5 for i in range(20)]]], 40)
    stats = llm.engine.scheduler.spec_stats
    assert stats.num_drafts > 0 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # kept and rejected ones
    assert kv.num_free_blocks == 90
