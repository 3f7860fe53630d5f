"""GPU: LoRA adapters with CUDA graphs and async scheduling on (steps with adapters run eager, the others keep their
graphs), on a small random Qwen2 checkpoint, against Transformers with each adapter merged into its weights: fp32
(strict) in a mixed batch of adapters and base requests, and bf16 at one token a step, where the fused batch-1
kernels (qkv + rotary, gate_up + SiLU) must stand aside for the adapter."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tests.executor.test_lora import merged, write_adapter
from tests.gpu.helpers import small_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-gpu")
    hf = small_checkpoint(folder, seed=5)
    pairs1 = write_adapter(folder / "a1", hf, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"], rank=8, alpha=16, seed=1, b_std=0.02)
    pairs2 = write_adapter(folder / "a2", hf, ["q_proj", "v_proj"], rank=4, alpha=4, seed=2, rslora=True,
                           b_std=0.02)
    refs = {None: hf, "a1": merged(hf, pairs1, 2.0), "a2": merged(hf, pairs2, 4 / math.sqrt(4))}
    return folder, refs


def errors(llm, refs, names, prompts, loras, max_tokens=10) -> dict:
    """Greedy answers with logprobs; per adapter name, |engine - merged Transformers| over every answer token, and
    against the base model (to show the adapter mattered)."""
    from pagedserve import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras)
    worst: dict = {}
    for name, prompt, out in zip(names, prompts, outs, strict=True):
        gen = out.outputs[0].token_ids
        for key, ref in ((name, refs[name]), ("base-of-" + str(name), refs[None])):
            model = ref.cuda()
            with torch.no_grad():
                lp = model(torch.tensor([prompt + gen], device="cuda")).logits[0].float().log_softmax(-1).cpu()
            err = max(abs(e.logprob - lp[len(prompt) + j - 1, gen[j]].item())
                      for j, e in enumerate(out.outputs[0].logprobs))
            worst[key] = max(worst.get(key, 0.0), err)
    return worst


def test_lora_mixed_batch_fp32_on_gpu(checkpoint) -> None:
    from pagedserve import LLM, LoRARequest

    folder, refs = checkpoint
    llm = LLM(str(folder), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=1024,
              max_num_batched_tokens=128, gpu_memory_utilization=0.3)
    assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
    loras = {"a1": LoRARequest("a1", 1, str(folder / "a1")), "a2": LoRARequest("a2", 2, str(folder / "a2"))}
    rng = random.Random(3)
    names = [None, "a1", "a2"] * 4
    prompts = [[rng.randrange(100, 100000) for _ in range(rng.randrange(5, 300))] for _ in names]
    worst = errors(llm, refs, names, prompts, [loras.get(n) for n in names])
    print("lora fp32:", {k: f"{v:.2e}" for k, v in worst.items()})
    assert worst[None] < 1e-3 and worst["a1"] < 1e-3 and worst["a2"] < 1e-3
    assert worst["base-of-a1"] > 0.05 and worst["base-of-a2"] > 0.05  # the adapters changed the answers
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_lora_at_one_token_a_step_bf16_on_gpu(checkpoint) -> None:
    from pagedserve import LLM, LoRARequest

    folder, refs = checkpoint
    llm = LLM(str(folder), dtype="bfloat16", enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=1024,
              gpu_memory_utilization=0.3)
    lora = LoRARequest("a1", 1, str(folder / "a1"))
    rng = random.Random(4)
    prompt = [rng.randrange(100, 100000) for _ in range(40)]
    # One request at a time: its decode steps are batch 1. The base model's bf16 error is the noise level.
    worst = errors(llm, refs, ["a1"], [prompt], [lora], max_tokens=16)
    worst |= errors(llm, refs, [None], [prompt], [None], max_tokens=16)
    print("lora bf16 batch 1:", {k: f"{v:.2e}" for k, v in worst.items()})
    assert worst["a1"] < max(0.1, 3 * worst[None])
    assert worst["base-of-a1"] > 5 * worst["a1"]  # the adapter was applied at every step
