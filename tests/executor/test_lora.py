"""LoRA adapters (LLM(..., enable_lora=True), LoRARequest) on tiny random checkpoints in fp32 on CPU, against
Transformers with each adapter merged into its weights (W + scale * B A): several adapters and the base model in one
batch, merged projections (q|k|v, gate|up) with some parts untargeted, rsLoRA, chunked prefill, the prefix cache kept
apart per adapter, slot reuse, and refused adapters."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagedserve import LLM, LoRARequest, SamplingParams
from tests.executor.test_tensor_parallel import hf_greedy, tiny_checkpoint

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [11, 12, 13], list(range(30, 70))]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter(folder: Path, hf, targets: list[str], rank: int, alpha: float, seed: int, rslora: bool = False,
                  extra_config: dict | None = None, b_std: float = 0.2) -> dict:
    """A PEFT-format adapter with random A (std 0.2) and B (std b_std) for `targets` in every layer; returns
    {module path: (A, B)}."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, {}
    for name, module in hf.named_modules():
        short = name.rsplit(".", 1)[-1]
        if short in targets and isinstance(module, torch.nn.Linear):
            a = torch.randn(rank, module.in_features, generator=g) * 0.2
            b = torch.randn(module.out_features, rank, generator=g) * b_std
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            pairs[name] = (a, b)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
              "use_rslora": rslora, "modules_to_save": None, **(extra_config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return pairs


def merged(hf, pairs: dict, scale: float):
    """Transformers' model with the adapter merged into its weights: the reference."""
    model = copy.deepcopy(hf)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            modules[name].weight += scale * (b @ a)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, real_model_dir):
    folder = tmp_path_factory.mktemp("lora-base")
    hf = tiny_checkpoint(folder, real_model_dir, "qwen2").eval()
    adapters = {}
    a1 = write_adapter(folder / "a1", hf, ALL, rank=4, alpha=8, seed=1)
    adapters["a1"] = (LoRARequest("a1", 1, str(folder / "a1")), merged(hf, a1, 8 / 4))
    a2 = write_adapter(folder / "a2", hf, ["q_proj", "v_proj"], rank=8, alpha=4, seed=2, rslora=True)
    adapters["a2"] = (LoRARequest("a2", 2, str(folder / "a2")), merged(hf, a2, 4 / math.sqrt(8)))
    a3 = write_adapter(folder / "a3", hf, ["up_proj", "down_proj", "k_proj"], rank=2, alpha=2, seed=3)
    adapters["a3"] = (LoRARequest("a3", 3, str(folder / "a3")), merged(hf, a3, 1.0))
    return folder, hf, adapters


def test_adapters_and_the_base_model_in_one_batch_match_merged_transformers(setup) -> None:
    folder, hf, adapters = setup
    llm = LLM(str(folder), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=128,
              cpu_kv_cache_gib=0.05, max_num_batched_tokens=16, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=1)
    names = [None, "a1", "a2", None, "a1", "a2"]
    prompts = [PROMPTS[i % 3] for i in range(len(names))]
    loras = [adapters[n][0] if n else None for n in names]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    for name, prompt, out in zip(names, prompts, outs, strict=True):
        ref_ids, ref_lps = hf_greedy(adapters[name][1] if name else hf, prompt, 6)
        assert out.outputs[0].token_ids == ref_ids, name
        assert [lp.logprob for lp in out.outputs[0].logprobs] == pytest.approx(ref_lps, abs=1e-4)
    # The adapters change the answers (else the test could not fail).
    base = [o.outputs[0].logprobs[0].logprob for o in outs[:1]]
    assert base != [o.outputs[0].logprobs[0].logprob for o in outs[1:2]]

    # Prefix cache: the long prompt again under a2 hits a2's blocks; under a3 and the base model (never run with
    # it) it does not: each adapter's K/V are its own.
    again = llm.generate([{"prompt_token_ids": PROMPTS[2]}] * 3, params, use_tqdm=False,
                         lora_request=[adapters["a2"][0], adapters["a3"][0], None])
    assert again[0].num_cached_tokens > 0 and again[1].num_cached_tokens == again[2].num_cached_tokens == 0
    # max_loras=2: a3 took the slot of a1 (the least recently used adapter no live request holds; a2's request
    # was live). Its answer is a3's, and a1 comes back into a slot after.
    assert again[1].outputs[0].token_ids == hf_greedy(adapters["a3"][1], PROMPTS[2], 6)[0]
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False, lora_request=adapters["a1"][0])
    assert out[0].outputs[0].token_ids == hf_greedy(adapters["a1"][1], PROMPTS[0], 6)[0]
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def assert_free(llm: LLM) -> None:
    stats = llm.engine.get_stats()
    assert not llm.engine.has_unfinished_requests() and stats["num_free_blocks"] == stats["num_total_blocks"]


def test_more_adapters_than_slots_wait_for_one(setup) -> None:
    """max_loras=1 and three adapters in one call: a request whose adapter finds every slot held by running
    requests waits (the ones behind it with a resident adapter go ahead); each answer is its own adapter's."""
    folder, hf, adapters = setup
    llm = LLM(str(folder), enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=128, cpu_kv_cache_gib=0.05,
              dtype="float32")
    engine = llm.engine
    order = []
    step = engine.scheduler.schedule

    def recording():
        out = step()
        order.append({r.request_id: r.lora_slot for r in out.scheduled if r.num_computed_tokens == 0})
        return out

    engine.scheduler.schedule = recording
    names = ["a1", "a3", "a1", None, "a2", "a3"]
    params = SamplingParams(temperature=0, max_tokens=4)
    outs = llm.generate([{"prompt_token_ids": PROMPTS[i % 2]} for i in range(len(names))], params, use_tqdm=False,
                        lora_request=[adapters[n][0] if n else None for n in names])
    for i, (name, out) in enumerate(zip(names, outs)):
        assert out.outputs[0].token_ids == hf_greedy(adapters[name][1] if name else hf, PROMPTS[i % 2], 4)[0], i
    admitted = [rid for step_ids in order for rid in step_ids]
    # The first step admits a1's two requests and the base one; a3 and a2 wait for the slot in turn.
    assert set(admitted[:3]) == {outs[0].request_id, outs[2].request_id, outs[3].request_id}
    assert all(slot in (0, 1) for step_ids in order for slot in step_ids.values())
    assert_free(llm)


def test_a_waiting_requests_adapter_stays_read_on_the_host(setup, tmp_path) -> None:
    """With a host cache of one adapter, a request waiting for the slot keeps its adapter read: its folder may be
    gone by the time the slot frees."""
    folder, hf, adapters = setup
    llm = LLM(str(folder), enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=128, cpu_kv_cache_gib=0.05,
              dtype="float32")
    llm.engine.worker.runner.lora_manager.CPU_CACHE = 1
    shutil.copytree(folder / "a3", tmp_path / "a3")
    moved = LoRARequest("a3-moved", 7, str(tmp_path / "a3"))
    engine, params = llm.engine, SamplingParams(temperature=0, max_tokens=4)
    engine.add_request("first", PROMPTS[0], params, lora_request=adapters["a1"][0])
    engine.step()  # a1 holds the only slot
    engine.add_request("waits", PROMPTS[1], params, lora_request=moved)
    engine.add_request("other", PROMPTS[0], params, lora_request=adapters["a2"][0])  # pushes the host cache
    shutil.rmtree(tmp_path / "a3")
    stats = engine.get_stats()  # what the server's lora_requests_info gauge shows
    assert stats["running_lora_adapters"] == ["a1"] and stats["waiting_lora_adapters"] == ["a2", "a3-moved"]
    assert stats["max_loras"] == 1
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id] = out.outputs[0].token_ids
    assert outs["waits"] == hf_greedy(adapters["a3"][1], PROMPTS[1], 4)[0]
    assert outs["other"] == hf_greedy(adapters["a2"][1], PROMPTS[0], 4)[0]
    assert_free(llm)


def test_bad_adapters_and_settings_are_value_errors(setup, tmp_path) -> None:
    folder, hf, adapters = setup
    llm = LLM(str(folder), enable_lora=True, max_loras=1, max_lora_rank=4, max_model_len=64, cpu_kv_cache_gib=0.05)
    p = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="rank 8, above max_lora_rank 4"):
        llm.generate([[1, 2]], p, lora_request=adapters["a2"][0])
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        llm.generate([[1, 2]], p, lora_request=LoRARequest("nope", 9, str(tmp_path / "nope")))
    write_adapter(tmp_path / "emb", hf, ["q_proj"], rank=2, alpha=2, seed=0,
                  extra_config={"modules_to_save": ["lm_head"]})
    with pytest.raises(ValueError, match="modules_to_save"):
        llm.generate([[1, 2]], p, lora_request=LoRARequest("emb", 5, str(tmp_path / "emb")))
    write_adapter(tmp_path / "dora", hf, ["q_proj"], rank=2, alpha=2, seed=0, extra_config={"use_dora": True})
    with pytest.raises(ValueError, match="DoRA"):
        llm.generate([[1, 2]], p, lora_request=LoRARequest("dora", 6, str(tmp_path / "dora")))
    assert_free(llm)
    with pytest.raises(ValueError, match="LoRA requests for"):
        llm.generate([[1, 2], [3]], p, lora_request=[adapters["a1"][0]])
    plain = LLM(str(folder), max_model_len=64, cpu_kv_cache_gib=0.05)
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.generate([[1, 2]], p, lora_request=adapters["a1"][0])
    assert_free(llm)
    assert_free(plain)


def test_eager_steps_without_adapters_skip_the_lora_kernels(setup) -> None:
    """With LoRA enabled, an eager step whose tokens have no adapter adds nothing (the CUDA graphs, captured once,
    always carry the kernels): the base model's answers are the plain engine's, and neither the masks (torch path)
    nor the partial sums (Triton kernels) are ever asked for."""
    folder, hf, adapters = setup
    kwargs = dict(max_model_len=128, cpu_kv_cache_gib=0.05, dtype="float32")
    lora_llm, plain = LLM(str(folder), enable_lora=True, max_lora_rank=8, **kwargs), LLM(str(folder), **kwargs)
    manager = lora_llm.engine.worker.runner.lora_manager
    reads = []
    mask_for, partials_for = manager.mask_for, manager.partials_for
    manager.mask_for = lambda layer: reads.append(layer) or mask_for(layer)
    manager.partials_for = lambda layer: reads.append(layer) or partials_for(layer)
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=0)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    got, want = lora_llm.generate(prompts, params, use_tqdm=False), plain.generate(prompts, params, use_tqdm=False)
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [x.logprob for x in a.outputs[0].logprobs] == pytest.approx([x.logprob for x in b.outputs[0].logprobs],
                                                                          abs=1e-6)
    assert reads == []
    out = lora_llm.generate(prompts[:1], params, use_tqdm=False, lora_request=adapters["a1"][0])
    assert reads and out[0].outputs[0].token_ids == hf_greedy(adapters["a1"][1], PROMPTS[0], 5)[0]


def test_an_adapter_named_by_hub_id_is_downloaded_with_the_token(setup, monkeypatch) -> None:
    """vLLM takes a Hugging Face repo id for an adapter's path: its adapter files are downloaded (with --hf-token,
    into --download-dir) and read from there. The Hub is out of reach here: snapshot_download is stood in for by a
    copy of a local adapter, and what it was asked is checked."""
    import argparse

    import huggingface_hub

    from pagedserve.entrypoints.openai.cli_serve import lora_requests_from_args

    folder, hf, adapters = setup
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, cache_dir=None, token=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns), cache_dir, token))
        if repo_id != "someone/a1-lora":
            raise huggingface_hub.errors.RepositoryNotFoundError(f"{repo_id} not found")
        return str(folder / "a1")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    llm = LLM(str(folder), enable_lora=True, max_loras=1, max_lora_rank=8, max_model_len=64, cpu_kv_cache_gib=0.05,
              dtype="float32", hf_token="hf_secret", download_dir=str(folder / "hub"))
    params = SamplingParams(temperature=0, max_tokens=4)
    out = llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False,
                       lora_request=LoRARequest("hub", 7, "someone/a1-lora"))
    assert out[0].outputs[0].token_ids == hf_greedy(adapters["a1"][1], PROMPTS[0], 4)[0]
    assert calls == [("someone/a1-lora", ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"),
                      str(folder / "hub"), "hf_secret")]
    with pytest.raises(ValueError, match="no LoRA adapter at 'someone/missing'.*Hub could not give it"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False,
                     lora_request=LoRARequest("gone", 8, "someone/missing"))
    assert_free(llm)
    # The server's --lora-modules: downloaded at start-up; the requests then name the local folder.
    args = argparse.Namespace(lora_modules=["hub=someone/a1-lora"], hf_token="hf_secret", download_dir=None)
    assert lora_requests_from_args(args)["hub"].lora_path == str(folder / "a1")
    # Local paths that do not exist are no Hub ids to try: the plain error, no download (absolute; relative with a
    # leading dot; relative whose first part is a local folder, where a typo must not fetch someone's repo).
    calls.clear()
    monkeypatch.chdir(folder)
    for path in (f"{folder}/nope", "./a1-typo", "a1/typo"):
        with pytest.raises(ValueError, match="adapter_config.json is missing"):
            lora_requests_from_args(argparse.Namespace(lora_modules=[f"x={path}"]))
    assert calls == []
    # The request the engine keeps names the downloaded folder: other ranks (tensor parallelism) and later reads
    # need no Hub.
    engine = llm.engine
    checked, salt = engine._lora_checked(LoRARequest("hub", 7, "someone/a1-lora"))
    assert checked.lora_path == str(folder / "a1") and salt == "lora:7"
