"""GPU: speculative decoding (n-gram drafts) with CUDA graphs on, on a small random Qwen2 checkpoint: the drafted
steps run the mixed-step graphs (several logits rows a sequence); every kept token's logprob matches Transformers
(fp32 strict; bf16 within the plain engine's own error), and each greedy token is Transformers' argmax (within the
error). The checkpoint's small weights (std 0.02) make its greedy answers fall into loops, which drafts then catch."""

from __future__ import annotations

import gc
import random

import pytest
import torch

from tests.gpu.helpers import small_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spec-gpu")
    return folder, small_checkpoint(folder, seed=6, std=0.02)


def looping_prompts(seed: int, count: int) -> list[list[int]]:
    """Random token runs repeated 2-4 times: drafts come from the prompts' own repeats and the answers' loops."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        run = [rng.randrange(100, 100000) for _ in range(rng.randrange(3, 40))]
        out.append((run * rng.randrange(2, 5))[: rng.randrange(len(run) + 1, 4 * len(run) + 1)])
    return out


def generate(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def worst_error(outs, prompts, hf) -> tuple[float, float]:
    """Over every generated token: the worst |engine - Transformers (fp32, on the GPU)| of its logprob, and the worst
    amount by which Transformers' likeliest token beats it (0 when greedy picked Transformers' argmax)."""
    model = hf.cuda()
    worst, worst_gap = 0.0, 0.0
    for prompt, out in zip(prompts, outs, strict=True):
        gen = out.outputs[0].token_ids
        with torch.no_grad():
            lp = model(torch.tensor([prompt + gen], device="cuda")).logits[0].float().log_softmax(-1).cpu()
        for j, entry in enumerate(out.outputs[0].logprobs):
            assert entry.token_id == gen[j]
            row = lp[len(prompt) + j - 1]
            worst = max(worst, abs(entry.logprob - row[gen[j]].item()))
            worst_gap = max(worst_gap, row.max().item() - row[gen[j]].item())
    return worst, worst_gap


def build(folder, dtype: str, spec: dict | None, **kw):
    from pagedserve import LLM

    gc.collect()
    torch.cuda.empty_cache()
    return LLM(str(folder), dtype=dtype, max_model_len=1024, gpu_memory_utilization=0.25, speculative_config=spec, **kw)


def count_mixed_graph_runs(llm) -> list[int]:
    mixed = llm.engine.worker.runner.mixed_graphs
    assert mixed is not None
    calls = [0]
    run = mixed.run

    def counted(*args, **kwargs):
        calls[0] += 1
        return run(*args, **kwargs)

    mixed.run = counted
    return calls


def test_spec_decode_fp32_on_gpu(checkpoint) -> None:
    from pagedserve import SamplingParams

    folder, hf = checkpoint
    prompts = looping_prompts(1, 12)
    greedy = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0, logprobs=1)
    seeded = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8, seed=9, top_k=50)
    llm = build(folder, "float32", SPEC)
    assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
    mixed_runs = count_mixed_graph_runs(llm)
    outs = generate(llm, prompts, greedy)
    spec_seeded = [o.outputs[0].token_ids for o in generate(llm, prompts, seeded)]
    stats = llm.engine.get_stats()
    drafts = stats["spec_decode"]
    print(f"spec fp32: drafts {drafts['num_drafts']}, kept {drafts['num_accepted_tokens']} of "
          f"{drafts['num_draft_tokens']}, mixed graph steps {mixed_runs[0]}")
    assert drafts["num_accepted_tokens"] > 0 and mixed_runs[0] > 0
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    worst, gap = worst_error(outs, prompts, hf)
    print(f"spec fp32: worst logprob error {worst:.2e}, worst argmax gap {gap:.2e}")
    assert worst < 1e-3 and gap < 1e-3
    # Seeded sampling: each position's own seed, so a run without drafts gives the same tokens (but where a
    # near-tie of the two graphs' arithmetic flips one: at most one sequence of twelve).
    del llm
    plain = build(folder, "float32", None)
    plain_seeded = [o.outputs[0].token_ids for o in generate(plain, prompts, seeded)]
    assert sum(a != b for a, b in zip(plain_seeded, spec_seeded)) <= 1


def test_spec_decode_bf16_batch_1_on_gpu(checkpoint) -> None:
    """One request at a time (drafted steps of 1 + 4 tokens in the 16-token graph): its bf16 error against
    Transformers in fp32 stays within twice the plain engine's own on the same answers."""
    from pagedserve import SamplingParams

    folder, hf = checkpoint
    prompts = looping_prompts(2, 4)
    params = SamplingParams(max_tokens=48, ignore_eos=True, temperature=0.0, logprobs=1)
    errors = {}
    for name, spec in (("plain", None), ("spec", SPEC)):
        llm = build(folder, "bfloat16", spec)
        outs = [generate(llm, [p], params)[0] for p in prompts]
        errors[name], gap = worst_error(outs, prompts, hf)
        assert gap < 5e-2
        if spec:
            drafts = llm.engine.get_stats()["spec_decode"]
            assert drafts["num_accepted_tokens"] > 0
        del llm
    print(f"spec bf16 batch 1: worst logprob error {errors['spec']:.2e} (plain engine {errors['plain']:.2e})")
    assert errors["spec"] < 2 * errors["plain"] + 2e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_draft_model_on_gpu(checkpoint, dtype) -> None:
    """A draft model (executor/draft_model.py) with CUDA graphs and async scheduling on: the checkpoint as its own
    draft keeps nearly every draft (its batched draft steps and the target's checks round alike but for near-ties),
    every kept token's logprob as Transformers', all blocks of both caches free after."""
    from pagedserve import SamplingParams

    folder, hf = checkpoint
    prompts = looping_prompts(3, 12)
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0, logprobs=1)
    llm = build(folder, dtype, {"method": "draft_model", "model": str(folder), "num_speculative_tokens": 4})
    proposer = llm.engine.worker.draft_proposer
    assert llm.engine.async_scheduling and proposer.runner.cuda_graphs is not None
    outs = generate(llm, prompts, params)
    stats = llm.engine.get_stats()
    drafts = stats["spec_decode"]
    worst, gap = worst_error(outs, prompts, hf)
    print(f"spec draft-model {dtype}: drafts {drafts['num_drafts']}, kept {drafts['num_accepted_tokens']} of "
          f"{drafts['num_draft_tokens']}; worst logprob error {worst:.2e}, worst argmax gap {gap:.2e}")
    assert drafts["acceptance_rate"] > 0.9
    assert stats["num_free_blocks"] == stats["num_total_blocks"] == proposer.num_free_blocks
    limit = 1e-3 if dtype == "float32" else 1e-1
    assert worst < limit and gap < limit
