"""Tensor parallelism on CPU (gloo): two ranks, each a process with half of a tiny model's heads and MLP
columns, against Transformers in fp32 and against one rank; bad sizes; the server with two ranks."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.distributed import _STATE
from pagedserve.executor.models.decoder import tp_slice
from tests.conftest import TOKENIZER_FILES
from tests.executor.helpers import save_tiny_model

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], [11, 12, 13], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]


def tp_worker_pids() -> set[int]:
    """Live processes running a tensor-parallel rank (pagedserve.executor.tp_worker)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"pagedserve.executor.tp_worker" in cmdline:
                pids.add(int(entry))
    return pids


def new_ranks_after_waiting(before: set[int], timeout_s: float = 10.0) -> set[int]:
    """The rank processes started since `before` that are still alive after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (left := tp_worker_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def tiny_checkpoint(folder: Path, real_model_dir: str, arch: str, **overrides) -> object:
    """A saved tiny random HF model (real weights on disk, so every rank loads the same ones) with the real
    tokenizer's files beside it (the prompts here are token ids below the tiny vocabulary)."""
    hf = save_tiny_model(arch, folder, **overrides)
    for name in TOKENIZER_FILES:
        if os.path.exists(f"{real_model_dir}/{name}"):
            shutil.copy(f"{real_model_dir}/{name}", folder / name)
    return hf


def hf_greedy(hf, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    ids, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            ids.append(token)
    return ids[len(prompt):], logprobs


def assert_greedy_as_hf(llm, hf, prompt_batches: list[list[list[int]]], max_tokens: int) -> None:
    """Each batch of prompts through llm.generate (one call a batch, in order: a later batch may hit an earlier one's
    prefix), greedy: the tokens and their logprobs as Transformers' (hf_greedy)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0)
    for prompts in prompt_batches:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        for prompt, out in zip(prompts, outs, strict=True):
            ids, logprobs = hf_greedy(hf, prompt, max_tokens)
            assert out.outputs[0].token_ids == ids
            assert [lp.logprob for lp in out.outputs[0].logprobs] == pytest.approx(logprobs, abs=1e-4)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.parametrize(
    "arch,overrides",
    # llama: row-parallel biases, tied embeddings, and a vocabulary of 251 (the second rank's slice padded)
    # qwen2_moe: each rank a half of every expert's columns and of the shared expert's, a dense layer beside;
    # gemma3: sliding and full layers, Gemma's norms and scaled embedding over the split vocabulary; phi3: its fused
    # q|k|v and gate|up split into their parts before each rank takes its slice
    [("qwen2", {}), ("llama", dict(attention_bias=True, mlp_bias=True, vocab_size=251)),
     ("qwen2_moe", dict(mlp_only_layers=[1])), ("gemma3", {}), ("phi3", {}), ("granite", {}), ("gpt_oss", {})],
    ids=["qwen2", "llama-biases-odd-vocab", "qwen2-moe", "gemma3", "phi3-fused", "granite", "gpt-oss"],
)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=TWO_GPUS)])
def test_two_ranks_match_transformers(tmp_path, real_model_dir, arch, overrides, device) -> None:
    """gloo on CPU; on a machine with two GPUs also NCCL, ranks on cuda:0 / cuda:1 (fp32, the Triton kernels)."""
    hf = tiny_checkpoint(tmp_path, real_model_dir, arch, **overrides)
    before = tp_worker_pids()
    llm = LLM(str(tmp_path), tensor_parallel_size=2, max_model_len=64, cpu_kv_cache_gib=0.05, device=device,
              dtype="float32", skip_warmup=True)
    try:
        ranks = set(llm.engine.worker.tp_procs and [p.pid for p in llm.engine.worker.tp_procs])
        assert len(ranks) == 1 and ranks <= tp_worker_pids() - before  # rank 1 is its own live process
        # Prompt logprobs too: their LM-head rows are gathered from both ranks' vocabulary slices.
        params = SamplingParams(temperature=0, max_tokens=6, logprobs=1, prompt_logprobs=2)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        for prompt, out in zip(PROMPTS, outs, strict=True):
            ref_ids, ref_logprobs = hf_greedy(hf, prompt, 6)
            assert out.outputs[0].token_ids == ref_ids
            got = [lp.logprob for lp in out.outputs[0].logprobs]
            assert got == pytest.approx(ref_logprobs, abs=1e-4)
            with torch.no_grad():
                ref = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
            assert out.prompt_logprobs[0] is None
            got = [(e.token_id, e.logprob, [t for t, _ in e.top]) for e in out.prompt_logprobs[1:]]
            assert [g[0] for g in got] == prompt[1:]
            assert [g[1] for g in got] == pytest.approx([ref[p - 1, prompt[p]].item() for p in range(1, len(prompt))],
                                                        abs=1e-4)
            assert [g[2] for g in got] == [ref[p - 1].topk(2).indices.tolist() for p in range(1, len(prompt))]
        # Embeddings: rank 0 pools its hidden states, which the row-parallel all-reduces made whole.
        for prompt, emb in zip(PROMPTS, llm.embed([{"prompt_token_ids": p} for p in PROMPTS]), strict=True):
            with torch.no_grad():
                ref = torch.nn.functional.normalize(hf.model(torch.tensor([prompt])).last_hidden_state[0, -1], dim=0)
            assert torch.allclose(torch.tensor(emb.outputs.embedding), ref, atol=1e-5)
    finally:
        llm.engine.worker.close()
    assert not (tp_worker_pids() - before)  # close() ended rank 1


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_two_ranks_equal_one_rank_with_chunks_prefix_hits_and_n(tmp_path, real_model_dir, async_scheduling) -> None:
    """Chunked prefill (8-token budget), a shared prefix served from the cache, n=2: the same tokens and
    logprobs as one rank, and the same prefix-cache hits (one block table serves both ranks). With async
    scheduling a decode's token is a placeholder when its step is sent: rank 1 fills it from rank 0's
    broadcast samples, or its K/V (and so rank 0's next logits) would go wrong."""
    tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    prefix = list(range(20, 52))  # two 16-token blocks
    prompts = [{"prompt_token_ids": prefix + [7, 8, 9]}, {"prompt_token_ids": prefix + [100, 101]}]
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=5, logprobs=1)
    results = []
    for tp in (1, 2):
        llm = LLM(str(tmp_path), tensor_parallel_size=tp, max_model_len=64, cpu_kv_cache_gib=0.05, device="cpu",
                  max_num_batched_tokens=8, block_size=16, async_scheduling=async_scheduling)
        assert llm.engine.async_scheduling == async_scheduling
        try:
            first = llm.generate(prompts[:1], params)
            second = llm.generate(prompts[1:], params)
            results.append([(c.token_ids, [round(lp.logprob, 4) for lp in c.logprobs])
                            for o in first + second for c in o.outputs])
            assert second[0].num_cached_tokens == 32  # the prefix's two blocks, hit in the cache
            # Structured outputs: rank 0 masks its gathered logits; the constrained tokens match one rank's too.
            constrained = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=1.0, seed=5,
                                                               structured_outputs={"regex": "[0-9]{3}-[a-z]{2}"}))
            assert all(re.fullmatch("[0-9]{3}-[a-z]{2}", o.outputs[0].text) for o in constrained)
            results[-1].append([o.outputs[0].token_ids for o in constrained])
        finally:
            llm.engine.worker.close()
    assert results[0] == results[1]


def test_two_ranks_with_speculative_decoding_equal_one_rank(tmp_path, real_model_dir) -> None:
    """Drafted steps (n-gram drafts, several logits rows a request): every rank takes the same LM-head rows, so two
    ranks give one rank's tokens and logprobs, and both give the tokens of a run without drafts."""
    tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    loop = [5, 6, 7, 8] * 6  # drafts come from the prompt's own repeats
    prompts = [{"prompt_token_ids": loop}, {"prompt_token_ids": [9, 10, 11, 9, 10, 11, 9, 10]}]
    params = [SamplingParams(temperature=0.0, max_tokens=12, logprobs=1, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=4, max_tokens=10, logprobs=1, ignore_eos=True)]
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    results = []
    for tp, speculative_config in ((1, None), (1, spec), (2, spec)):
        llm = LLM(str(tmp_path), tensor_parallel_size=tp, max_model_len=64, cpu_kv_cache_gib=0.05, device="cpu",
                  speculative_config=speculative_config)
        try:
            outs = llm.generate(prompts, params)
            results.append([(c.token_ids, [round(lp.logprob, 3) for lp in c.logprobs])
                            for o in outs for c in o.outputs])
            if speculative_config:
                assert llm.engine.get_stats()["spec_decode"]["num_drafts"] > 0
        finally:
            llm.engine.worker.close()
    assert results[1] == results[2]
    assert [r[0] for r in results[0]] == [r[0] for r in results[1]]


def test_bad_tensor_parallel_settings(tmp_path, real_model_dir) -> None:
    tiny_checkpoint(tmp_path, real_model_dir, "qwen2")  # 4 heads, 2 kv heads, MLP 96
    before = tp_worker_pids()
    with pytest.raises(ValueError, match="does not divide num_key_value_heads"):
        LLM(str(tmp_path), tensor_parallel_size=4, max_model_len=64, cpu_kv_cache_gib=0.05, device="cpu")
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        LLM(str(tmp_path), tensor_parallel_size=0)
    # the refused start's ranks end too (killed by rank 0, or by their own error)
    assert not new_ranks_after_waiting(before)


def test_a_dead_rank_fails_the_next_step_clearly(tmp_path, real_model_dir) -> None:
    tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    llm = LLM(str(tmp_path), tensor_parallel_size=2, max_model_len=64, cpu_kv_cache_gib=0.05, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=3)
    try:
        first = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)[0].outputs[0].token_ids
        assert len(first) == 3
        proc = llm.engine.worker.tp_procs[0]
        # A stop of the process group (systemd's SIGTERM to every process of the unit) is rank 0's to act on.
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None
        assert llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)[0].outputs[0].token_ids == first
        proc.kill()
        proc.wait()
        with pytest.raises(RuntimeError, match="tensor-parallel rank 1 .* exited with code -9"):
            llm.generate([{"prompt_token_ids": [8, 9]}], params)
    finally:
        llm.engine.worker.close()  # no hang with the rank gone


def test_ranks_exit_when_rank_0_is_killed_while_they_start(tmp_path, real_model_dir) -> None:
    """Rank 0's process killed (SIGKILL: no goodbye) right after it spawned the other ranks: they ignore SIGTERM and
    would wait for it in the rendezvous; they watch their parent and exit instead."""
    import subprocess
    import sys
    import textwrap

    tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    script = textwrap.dedent(f"""
        import os, signal
        import pagedserve.executor.tp_worker as tp
        from pagedserve import LLM
        start = tp.start_tp_workers
        def start_then_die(*args, **kwargs):
            procs = start(*args, **kwargs)
            print("rank pid", procs[0].pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        tp.start_tp_workers = start_then_die
        LLM({str(tmp_path)!r}, tensor_parallel_size=2, max_model_len=64, cpu_kv_cache_gib=0.05, device="cpu")
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    pid = None
    try:
        line = proc.stdout.readline()
        assert line.startswith("rank pid"), line
        pid = int(line.split()[-1])
        proc.wait(10)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.1)
        assert time.monotonic() < deadline, "the rank outlived rank 0"
    finally:
        proc.kill()
        if pid is not None and os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)

def test_bench_floor_counts_every_card(monkeypatch) -> None:
    import argparse

    import pagedserve.bench.ceilings as ceilings
    from pagedserve.bench.common import card_ceilings

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Card")
    monkeypatch.setattr(ceilings, "measure_ceilings", lambda: (4.0e12, 8.0e14))
    args = argparse.Namespace(peak_bandwidth=None, peak_flops=None, tensor_parallel_size=2)
    assert card_ceilings(args, "cuda") == (8.0e12, 1.6e15, "2 x Card")
    args = argparse.Namespace(peak_bandwidth=3.0e12, peak_flops=7.0e14, tensor_parallel_size=1)
    assert card_ceilings(args, "cuda") == (3.0e12, 7.0e14, "Card")
    assert card_ceilings(argparse.Namespace(peak_bandwidth=None, peak_flops=None, tensor_parallel_size=2), "cpu") \
        == (None, None, "cpu")


def test_the_step_message_leaves_out_the_histories() -> None:
    """Ranks 1..N-1 get what to compute (not the prompt / output histories, which only rank 0's sampler
    reads): the message stays the size of the step, not of every request's length."""
    import pickle

    from pagedserve.core.outputs import ScheduledRequest, SchedulerOutput
    from pagedserve.executor.worker import _for_other_ranks

    params = SamplingParams(temperature=0)
    req = ScheduledRequest("r1", [7, 8, 9], 4000, list(range(251)), True, params, list(range(3000)),
                           list(range(1000)), 999, draft_token_ids=[8, 9])
    step = SchedulerOutput([req], 1, ["gone"], ["preempted"])
    slim = _for_other_ranks(step)
    (got,) = slim.scheduled
    assert (got.request_id, got.token_ids, got.num_computed_tokens, got.block_ids, got.needs_sample,
            got.output_index, got.draft_token_ids) == ("r1", [7, 8, 9], 4000, list(range(251)), True, 999, [8, 9])
    assert got.prompt_token_ids == [] and got.output_token_ids == []
    assert slim.num_batched_tokens == 1
    # A prompt still giving prompt logprobs travels (the ranks take the same LM-head rows); not after its first token.
    asks = SamplingParams(prompt_logprobs=1)
    for output_index, expected in ((0, list(range(3000))), (1, [])):
        req = ScheduledRequest("r2", [7] * 16, 0, [0], False, asks, list(range(3000)), [], output_index)
        assert _for_other_ranks(SchedulerOutput([req], 16)).scheduled[0].prompt_token_ids == expected
    assert (slim.finished_request_ids, slim.preempted_request_ids) == (["gone"], ["preempted"])
    assert len(pickle.dumps(slim)) < len(pickle.dumps(step)) / 4
    # A hybrid model's window tables travel from the window of the step's first token on (4000 - 128 + 1 = 3873:
    # block 242 of 16 tokens), what lies behind it left out
    tables = [list(range(1000, 1251)), list(range(2000, 2251))]
    req = ScheduledRequest("r3", [7], 4000, list(range(251)), True, params, [], [], 5, window_block_ids=tables)
    (got,) = _for_other_ranks(SchedulerOutput([req], 1), window=128, block_size=16).scheduled
    assert got.window_first == 242 and got.window_block_ids == [list(range(1242, 1251)), list(range(2242, 2251))]
    assert _for_other_ranks(SchedulerOutput([req], 1)).scheduled[0].window_block_ids == tables  # no window given


def test_tp_slice_splits_columns_and_rows(monkeypatch) -> None:
    monkeypatch.setattr(_STATE, "size", 2)
    monkeypatch.setattr(_STATE, "rank", 1)
    w = torch.arange(24.0).reshape(4, 6)
    b = torch.arange(4.0)
    assert torch.equal(tp_slice("model.layers.0.self_attn.k_proj.weight", w), w[2:])
    assert torch.equal(tp_slice("model.layers.0.self_attn.q_proj.bias", b), b[2:])
    assert torch.equal(tp_slice("model.layers.0.mlp.up_proj.weight", w), w[2:])
    assert torch.equal(tp_slice("model.layers.0.self_attn.o_proj.weight", w), w[:, 3:])
    assert torch.equal(tp_slice("model.layers.0.mlp.down_proj.weight", w), w[:, 3:])
    assert torch.equal(tp_slice("model.layers.0.mlp.down_proj.bias", b), torch.zeros(4))  # rank 0 adds it
    for whole in ("model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert tp_slice(whole, w) is w
    vocab = torch.arange(10.0)[:, None].expand(5 * 2, 3)[:5]  # a vocabulary of 5 rows: 3 a rank, padded
    assert torch.equal(tp_slice("model.embed_tokens.weight", vocab), torch.tensor([[3.0] * 3, [4.0] * 3, [0.0] * 3]))
    assert torch.equal(tp_slice("lm_head.weight", vocab), tp_slice("model.embed_tokens.weight", vocab))
    monkeypatch.setattr(_STATE, "rank", 0)
    assert tp_slice("model.layers.0.mlp.down_proj.bias", b) is b


def test_server_with_two_ranks(tmp_path, real_model_dir) -> None:
    from tests.entrypoints.conftest import RealServer

    tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    before = tp_worker_pids()
    server = RealServer(str(tmp_path), "--tensor-parallel-size", "2", "--max-model-len", "64",
                        "--cpu-kv-cache-gib", "0.05", "--device", "cpu")
    try:
        assert len(tp_worker_pids() - before) == 1
        body = {"model": httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"],
                "prompt": [5, 17, 99, 3], "max_tokens": 4, "temperature": 0}
        r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
    assert not new_ranks_after_waiting(before), server.output()[-3000:]


def test_two_ranks_with_fp8_weights_match_transformers_on_their_shards(tmp_path, real_model_dir) -> None:
    """quantization="fp8" with two ranks: each rank quantizes the slice it loaded, so the row scales of o_proj and
    down_proj (split along their inputs) belong to each half of a row; Transformers with the weights rounded the same
    way gives the same greedy tokens and logprobs (gloo, fp32 on CPU)."""
    from pagedserve.executor.quantization import dequantize_rows_fp8, quantize_rows_fp8

    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2")

    def rounded(weight: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_rows_fp8(weight)
        return dequantize_rows_fp8(q, scale, weight.dtype)

    with torch.no_grad():
        for name, module in hf.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("o_proj", "down_proj"):  # row-parallel: each rank holds half of every row
                halves = module.weight.chunk(2, dim=1)
                module.weight.copy_(torch.cat([rounded(h) for h in halves], dim=1))
            elif leaf in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                module.weight.copy_(rounded(module.weight))
    two_ranks_match_hf_greedy(tmp_path, hf, quantization="fp8")


def two_ranks_match_hf_greedy(folder, hf, **engine_kwargs) -> None:
    """Two CPU ranks (gloo, fp32) give `hf`'s greedy tokens and logprobs for PROMPTS."""
    llm = LLM(str(folder), tensor_parallel_size=2, max_model_len=64, cpu_kv_cache_gib=0.05, device="cpu",
              dtype="float32", skip_warmup=True, **engine_kwargs)
    try:
        params = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        for prompt, out in zip(PROMPTS, outs, strict=True):
            ref_ids, ref_logprobs = hf_greedy(hf, prompt, 6)
            assert out.outputs[0].token_ids == ref_ids
            assert [lp.logprob for lp in out.outputs[0].logprobs] == pytest.approx(ref_logprobs, abs=1e-4)
    finally:
        llm.engine.worker.close()


def test_two_ranks_with_an_fp8_kv_cache_and_checkpoint_scales(tmp_path, real_model_dir) -> None:
    """kv_cache_dtype="fp8" with two ranks, each holding its own kv heads in e4m3, and the checkpoint's KV-cache
    scales folded into each rank's shards (qkv rows, o_proj's columns): Transformers rounding K / p and V / p gives
    the same greedy tokens and logprobs (gloo, fp32 on CPU)."""
    from tests.executor.helpers import kv_rounded_to_fp8, write_kv_scales
    from tests.executor.test_kv_cache_dtype import SCALES

    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    write_kv_scales(tmp_path, SCALES)
    with kv_rounded_to_fp8(hf, [(4.0, 0.5), (1.0, 1.0)]):  # SCALES as powers of two
        two_ranks_match_hf_greedy(tmp_path, hf, kv_cache_dtype="fp8")


def test_two_ranks_with_lora_adapters_match_merged_transformers(tmp_path, real_model_dir) -> None:
    """LoRA over two ranks: q/k/v/gate/up keep A whole and split B's rows, o/down split A's columns and keep B
    (each rank's partial delta joins the projection's all-reduce); rank 1 loads what rank 0's scheduler put in
    each slot. Two adapters and the base model in one batch, through a slot swap (max_loras=1)."""
    from pagedserve import LoRARequest
    from tests.executor.test_lora import merged, write_adapter

    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2").eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    refs = {None: hf}
    loras = {}
    for i, name in enumerate(("x", "y"), start=1):
        pairs = write_adapter(tmp_path / name, hf, targets, rank=4, alpha=8, seed=i, b_std=0.05)
        refs[name] = merged(hf, pairs, 2.0)
        loras[name] = LoRARequest(name, i, str(tmp_path / name))
    llm = LLM(str(tmp_path), tensor_parallel_size=2, max_model_len=64, cpu_kv_cache_gib=0.05, device="cpu",
              dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=4)
    try:
        names = ["x", None, "y", "x"]
        params = SamplingParams(temperature=0, max_tokens=5, logprobs=0)
        outs = llm.generate([{"prompt_token_ids": PROMPTS[i % 3]} for i in range(4)], params,
                            lora_request=[loras.get(n) for n in names])
        for i, (name, out) in enumerate(zip(names, outs)):
            ref_ids, ref_lps = hf_greedy(refs[name], PROMPTS[i % 3], 5)
            assert out.outputs[0].token_ids == ref_ids, name
            assert [lp.logprob for lp in out.outputs[0].logprobs] == pytest.approx(ref_lps, abs=1e-4)
    finally:
        llm.engine.worker.close()
