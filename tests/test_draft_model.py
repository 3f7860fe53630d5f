"""Speculative decoding with a draft model (executor/draft_model.py): the answers equal those of the engine without
drafts (greedy, seeded random, stops, n > 1, logprobs), with async scheduling too; a draft that is the target itself
keeps every draft; the proposer's chunked catch-up drafts what Transformers' greedy decoding gives, and its block
pool takes blocks back from idle requests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.core.outputs import PLACEHOLDER_TOKEN_ID
from pagedserve.spec_decode import SpeculativeConfig
from tests.test_spec_decode import PROMPTS, logprob_rows, mixed_params, summary


def truncated_copy(real_model_dir: str, folder: Path, num_layers: int) -> str:
    """The embedded model's first num_layers layers (its weights file linked, the rest of its layers skipped on
    load): a draft that agrees with the whole model on some tokens and not on others."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(real_model_dir):
        if name != "config.json" and not name.startswith("."):
            os.symlink(os.path.join(real_model_dir, name), folder / name)
    config = json.loads(Path(real_model_dir, "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:num_layers]
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module")
def draft_dir(real_model_dir: str, tmp_path_factory) -> str:
    return truncated_copy(real_model_dir, tmp_path_factory.mktemp("draft") / "model", 20)


@pytest.fixture(scope="module")
def plain(real_model_dir: str) -> LLM:
    return LLM(real_model_dir, max_model_len=512, cpu_kv_cache_gib=0.2)


def spec(model: str, k: int = 3) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": k}


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"] and stats["num_running"] == 0
    proposer = llm.engine.worker.draft_proposer
    assert proposer.num_free_blocks == stats["num_total_blocks"] and not proposer._states


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_drafted_outputs_equal_plain_outputs(async_scheduling, real_model_dir, draft_dir, plain) -> None:
    llm = LLM(real_model_dir, max_model_len=512, cpu_kv_cache_gib=0.2, async_scheduling=async_scheduling,
              speculative_config=spec(draft_dir))
    assert llm.engine.async_scheduling == async_scheduling
    want = plain.generate(PROMPTS, mixed_params(), use_tqdm=False)
    got = llm.generate(PROMPTS, mixed_params(), use_tqdm=False)
    assert summary(got) == summary(want)
    a, b = logprob_rows(got), logprob_rows(want)
    assert len(a) == len(b) > 60
    for x, y in zip(a, b):
        assert (x[0], x[2], x[3]) == (y[0], y[2], y[3])
        assert x[1] == pytest.approx(y[1], abs=1e-4)
    drafts = llm.engine.get_stats()["spec_decode"]
    # the 20-layer draft is right often, not always: both paths of the check ran
    assert drafts["num_drafts"] > 10 and 0 < drafts["num_accepted_tokens"] < drafts["num_draft_tokens"]
    assert drafts["acceptance_rate"] > 0.2
    assert_all_blocks_free(llm)


def test_the_target_as_its_own_draft_keeps_every_draft(real_model_dir, plain) -> None:
    llm = LLM(real_model_dir, max_model_len=512, cpu_kv_cache_gib=0.2, speculative_config=spec(real_model_dir, 4))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    engine = llm.engine
    engine.add_request("r", PROMPTS[1], params)
    steps, out = 0, None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o if o.finished else out
        steps += 1
    assert out.outputs[0].token_ids == plain.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    drafts = engine.get_stats()["spec_decode"]
    assert drafts["num_accepted_tokens"] == drafts["num_draft_tokens"] > 0
    assert steps <= 1 + -(-39 // 5) + 1, steps  # the prefill, then 5 tokens a step
    assert_all_blocks_free(llm)


def test_proposer_catches_up_in_chunks_and_drafts_as_transformers(tmp_path) -> None:
    """The draft proposer over a tiny model: a 13-token text caught up in chunks of 8 (two forwards), then three
    decodes; the drafts are Transformers' greedy tokens. After the text grows by a kept and a rejected draft, the
    next proposal starts from the common prefix. A request that needs more blocks than are free takes an idle
    request's; one that needs more than the pool gets no drafts."""
    from pagedserve.executor.draft_model import DraftModelProposer
    from tests.executor.helpers import make_runner, save_tiny_model
    from tests.executor.test_tensor_parallel import hf_greedy

    hf = save_tiny_model("qwen2", tmp_path)
    runner, _ = make_runner(tmp_path, block_size=4, num_blocks=8)
    from pagedserve.executor.sampler import Sampler

    runner.sampler = Sampler(256, set())
    config = SpeculativeConfig.parse(spec("unused", 4))
    proposer = DraftModelProposer(config, runner, num_blocks=8, block_size=4, max_num_batched_tokens=8)
    calls = []  # per forward: each row's token count, and whether its first token is a placeholder
    execute_async = runner.execute_async
    runner.execute_async = lambda out, *a: calls.append(
        [len(r.token_ids) * (-1 if r.token_ids[0] == PLACEHOLDER_TOKEN_ID else 1) for r in out.scheduled]
    ) or execute_async(out, *a)
    text = [(7 * i) % 250 + 3 for i in range(13)]
    drafts = proposer.propose("a", text, 4)
    assert drafts == hf_greedy(hf, text, 4)[0]
    assert calls == [[8], [5], [1], [-1], [-1]]  # chunks of 8, then decodes fed on the device from step 2
    assert proposer.num_free_blocks == 8 - 4  # positions 0..15
    text += [drafts[0], (drafts[1] + 1) % 256]  # the first draft kept, then another token
    calls.clear()
    assert proposer.propose("a", text, 2) == hf_greedy(hf, text, 2)[0]
    assert calls == [[1], [-1]]  # the cache holds 16 tokens, 14 of them the text's: its 15th fed, then a decode
    # "b" needs 4 blocks, 4 are free: fits; "c" then needs 3: takes idle "a"'s (not "b"'s, drafting with it)
    other = [(5 * i) % 250 + 3 for i in range(12)]
    out = proposer.propose_many([("b", other, 4), ("c", other[:9], 3)])
    assert out == [hf_greedy(hf, other, 4)[0], hf_greedy(hf, other[:9], 3)[0]]
    assert "a" not in proposer._states and proposer.num_free_blocks == 1
    # "e" needs 7 blocks: idle "c"'s 3 and the free one are not enough, and "b" (in the same call) keeps its own
    longer = other + [9, 9]
    out = proposer.propose_many([("b", longer, 2), ("e", list(range(3, 28)), 4)])
    assert out == [hf_greedy(hf, longer, 2)[0], []] and "c" not in proposer._states
    assert proposer.propose("d", list(range(3, 40)), 4) == []  # 40 positions: 10 blocks of a pool of 8
    for rid in ("b", "d", "e"):
        proposer.release(rid)
    assert proposer.num_free_blocks == 8


def test_a_draft_with_a_larger_vocabulary_is_refused(tmp_path, real_model_dir) -> None:
    from pagedserve.config import EngineConfig
    from pagedserve.executor.draft_model import load_draft
    from tests.executor.helpers import save_tiny_model, tiny_hf_config

    save_tiny_model("qwen2", tmp_path / "big", vocab_size=512)
    config = EngineConfig(model=real_model_dir)
    spec_config = SpeculativeConfig.parse(spec(str(tmp_path / "big")))
    with pytest.raises(ValueError, match="vocabulary"):
        load_draft(config, spec_config, torch.device("cpu"), torch.float32, tiny_hf_config("qwen2"), 128)


def test_draft_model_with_tensor_parallelism(tmp_path, real_model_dir) -> None:
    """Two CPU ranks: the draft (here the tiny target itself) runs whole on rank 0 (distributed.single_rank) beside
    the sharded target; greedy answers as Transformers', its drafts all kept."""
    from tests.executor.test_tensor_parallel import assert_greedy_as_hf, tiny_checkpoint

    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    llm = LLM(str(tmp_path), tensor_parallel_size=2, device="cpu", dtype="float32", max_model_len=64,
              cpu_kv_cache_gib=0.05, speculative_config=spec(str(tmp_path), 3))
    try:
        base = [(11 * i) % 250 + 3 for i in range(20)]
        assert_greedy_as_hf(llm, hf, [[base, base[:9] + [7, 8]]], 8)
        drafts = llm.engine.get_stats()["spec_decode"]
        assert drafts["num_drafts"] > 0 and drafts["acceptance_rate"] > 0.9
    finally:
        llm.engine.worker.close()


def test_warm_up_leaves_the_drafting_counters_at_zero(tmp_path) -> None:
    """The start-up warm-up (run on CUDA; called here by hand) drafts for its throwaway requests, and its random
    sampling rejects most drafts: its counts must not reach the served figures (session 30: a checkpoint drafting
    for itself read 37% kept on an H100, where every served draft was kept). The warm-up's rejections are checked
    to have happened, then every counter to be back at zero, and a served request to keep every draft."""
    from tests.executor.helpers import save_tiny_model

    save_tiny_model("qwen2", tmp_path, seed=3)
    llm = LLM(str(tmp_path), max_model_len=128, cpu_kv_cache_gib=0.05, speculative_config=spec(str(tmp_path), 4))
    engine = llm.engine
    during = engine.scheduler.spec_stats  # the counters the warm-up's steps add to
    engine.warm_up()
    assert during.num_drafts > 0 and during.num_accepted_tokens < during.num_draft_tokens
    stats = engine.get_stats()
    assert stats["spec_decode"]["num_drafts"] == stats["spec_decode"]["num_draft_tokens"] == 0
    assert stats["num_preemptions"] == 0 and stats["num_running"] == 0
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5, 9, 13, 17, 21, 25]}], params, use_tqdm=False)
    drafts = engine.get_stats()["spec_decode"]
    assert drafts["num_drafts"] > 0 and drafts["num_accepted_tokens"] == drafts["num_draft_tokens"]
    assert_all_blocks_free(llm)
