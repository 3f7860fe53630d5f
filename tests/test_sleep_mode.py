"""Sleep mode (LLM.sleep / wake_up, executor/sleep.py): the device memory of the weights and the KV cache is freed
in place and taken back. Level 1 gives back the same model (answers equal Transformers' before and after); level 2
discards the weights, which come back zeroed until load_weights brings new ones (then the answers are Transformers'
with those); the model's buffers (rotary tables) survive both; requests are refused while anything sleeps; with
tensor parallelism (gloo) every rank sleeps, wakes and takes new weights."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.executor.helpers import tiny_hf_model
from tests.executor.test_tensor_parallel import tiny_checkpoint
from tests.test_load_weights import KW, PROMPT, answer, assert_as_hf


def storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # llama: tied embeddings (one storage, two names)
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_level_1_gives_back_the_same_model(arch, async_scheduling, tmp_path, real_model_dir) -> None:
    hf = tiny_checkpoint(tmp_path, real_model_dir, arch)
    llm = LLM(str(tmp_path), async_scheduling=async_scheduling, **KW)
    runner = llm.engine.worker.runner
    assert_as_hf(llm, hf)
    assert assert_as_hf(llm, hf) >= 16  # cached
    rotary = [b.clone() for b in runner.model.buffers()]
    weights = storage_bytes(runner.model.parameters()) + storage_bytes(runner.kv_caches)
    freed = llm.sleep(1)
    assert freed >= weights * 0.99 and llm.engine.is_sleeping()
    # Freed in place: the parameters and caches are the same objects, with no memory under them.
    assert storage_bytes(runner.model.parameters()) == 0 and storage_bytes(runner.kv_caches) == 0
    assert storage_bytes(runner.model.buffers()) == 0
    with pytest.raises(ValueError, match="asleep"):
        llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.sleep(1) == 0  # already asleep: nothing more to free
    llm.wake_up()
    assert not llm.engine.is_sleeping()
    assert all(torch.equal(a, b) for a, b in zip(rotary, runner.model.buffers(), strict=True))
    assert assert_as_hf(llm, hf) == 0  # the prefix cache was forgotten with the KV cache
    assert assert_as_hf(llm, hf) >= 16


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_level_2_discards_the_weights_for_new_ones(arch, tmp_path, real_model_dir) -> None:
    tiny_checkpoint(tmp_path / "old", real_model_dir, arch)
    llm = LLM(str(tmp_path / "old"), **KW)
    runner = llm.engine.worker.runner
    rotary = [b.clone() for b in runner.model.buffers()]
    answer(llm)
    llm.sleep(2)
    with pytest.raises(ValueError, match="asleep"):
        llm.load_weights(tiny_hf_model(arch, seed=1).state_dict())
    llm.wake_up(["weights"])  # the weights first (the cache still sleeps: a lower peak while loading)
    assert llm.engine.is_sleeping() and storage_bytes(runner.kv_caches) == 0
    assert all(float(p.abs().sum()) == 0 for p in runner.model.parameters())  # discarded: zeros, not the old ones
    assert all(torch.equal(a, b) for a, b in zip(rotary, runner.model.buffers(), strict=True))  # buffers kept
    with pytest.raises(ValueError, match="asleep"):
        llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=2), use_tqdm=False)
    new = tiny_hf_model(arch, seed=1)
    assert llm.load_weights(new.state_dict()) == len(new.state_dict())
    llm.wake_up(["kv_cache"])
    assert not llm.engine.is_sleeping()
    assert_as_hf(llm, new)
    # Level 1 then 2: the host copies are dropped too; level 2 then a whole wake-up: zeros until new weights.
    llm.sleep(1)
    llm.sleep(2)
    llm.wake_up()
    assert all(float(p.abs().sum()) == 0 for p in runner.model.parameters())
    donor = tiny_hf_model(arch, seed=2)
    donor.save_pretrained(tmp_path / "donor")
    llm.load_weights(str(tmp_path / "donor"))
    assert_as_hf(llm, donor)


def test_bad_sleep_calls_are_refused(tmp_path, real_model_dir) -> None:
    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    llm = LLM(str(tmp_path), **KW)
    for level in (0, 3, "1"):
        with pytest.raises(ValueError, match="level must be 1"):
            llm.sleep(level)
    for tags in (["weight"], "weights", [None]):
        with pytest.raises(ValueError, match="tags must be a list"):
            llm.wake_up(tags)
    llm.engine.add_request("busy", PROMPT, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="unfinished"):
        llm.sleep(1)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    llm.wake_up()  # awake: nothing to do
    with pytest.raises(ValueError, match="not a folder"):
        llm.load_weights(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights in"):
        llm.load_weights(str(tmp_path / "empty"))
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"")  # (a trainer still writing it)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        llm.load_weights(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="floating point"):
        llm.load_weights({"model.norm.weight": torch.ones(64, dtype=torch.int8)})
    assert_as_hf(llm, hf)  # nothing was changed by the refused calls
    quantized = LLM(str(tmp_path), quantization="fp8", **KW)
    with pytest.raises(ValueError, match="fp8"):
        quantized.sleep(2)  # its weights could not come back through load_weights
    quantized.sleep(1)  # level 1 keeps them: fine
    quantized.wake_up()
    assert answer(quantized)[0] == answer(LLM(str(tmp_path), quantization="fp8", **KW))[0]


def test_draft_model_sleeps_with_the_target(tmp_path, real_model_dir) -> None:
    """Speculative decoding with a draft model: the draft's weights and cache sleep too (always kept: level 2
    discards the target's only), and after the target's new weights the answers are exact again."""
    tiny_checkpoint(tmp_path / "target", real_model_dir, "qwen2")
    hf = tiny_checkpoint(tmp_path / "draft", real_model_dir, "qwen2", seed=3)
    llm = LLM(str(tmp_path / "target"), speculative_config={"method": "draft_model", "model": str(tmp_path / "draft"),
                                                            "num_speculative_tokens": 3}, **KW)
    draft = llm.engine.worker.draft_proposer.runner
    answer(llm)
    llm.sleep(2)
    assert storage_bytes(draft.model.parameters()) == 0 and storage_bytes(draft.kv_caches) == 0
    llm.wake_up(["weights"])
    assert all(float(p.abs().sum()) > 0 for p in draft.model.parameters())  # the draft's own weights came back
    llm.load_weights(hf.state_dict())  # the target now equals the draft: every draft is accepted
    llm.wake_up(["kv_cache"])
    before = llm.engine.get_stats()["spec_decode"]
    assert_as_hf(llm, hf)
    after = llm.engine.get_stats()["spec_decode"]
    drafted = after["num_draft_tokens"] - before["num_draft_tokens"]
    assert drafted > 0 and after["num_accepted_tokens"] - before["num_accepted_tokens"] == drafted


def test_tensor_parallel_ranks_sleep_wake_and_load(tmp_path, real_model_dir) -> None:
    """Two ranks over gloo: level 1 and back, then level 2 with new weights as a state dict (sent to rank 1 in
    chunks) and as a folder (read by each rank): the answers are Transformers' each time."""
    hf = tiny_checkpoint(tmp_path / "old", real_model_dir, "qwen2")
    llm = LLM(str(tmp_path / "old"), tensor_parallel_size=2, dtype="float32", max_model_len=64,
              cpu_kv_cache_gib=0.05, skip_warmup=True)
    try:
        assert_as_hf(llm, hf)
        llm.sleep(1)
        llm.wake_up()
        assert_as_hf(llm, hf)
        new = tiny_hf_model("qwen2", seed=1)
        llm.sleep(2)
        llm.wake_up(["weights"])
        llm.load_weights(new.state_dict())
        llm.wake_up(["kv_cache"])
        assert_as_hf(llm, new)
        donor = tiny_hf_model("qwen2", seed=2)
        donor.save_pretrained(tmp_path / "donor")
        llm.load_weights(str(tmp_path / "donor"))
        assert_as_hf(llm, donor)
    finally:
        llm.engine.worker.close()
