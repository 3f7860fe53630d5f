"""Shared by the GPU engine tests: one engine's logprobs against Transformers' on the same sequences."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

SOURCE = Path(".devcache/qwen2-7b")  # the 7B config and its tokenizer (scripts/make_7b_config.sh)


def small_checkpoint(folder: Path, arch: str = "qwen2", seed: int = 4, std: float = 0.05, **overrides):
    """A small random Qwen2, Qwen3 or Qwen2/3-MoE (3 layers, width 512, the 7B's vocabulary) saved in `folder` beside
    .devcache/qwen2-7b's tokenizer (the test is skipped without it); returns Transformers' model on the CPU."""
    if not (SOURCE / "config.json").exists():
        pytest.skip("no .devcache/qwen2-7b (run scripts/make_7b_config.sh)")
    import transformers

    from tests.executor.helpers import randomize_

    for f in SOURCE.iterdir():
        if f.name != "config.json":
            shutil.copy(f, folder / f.name)
    name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe", "qwen2_moe": "Qwen2Moe",
            "gemma3": "Gemma3", "gemma2": "Gemma2"}[arch]
    config_cls = getattr(transformers, name + ("TextConfig" if arch == "gemma3" else "Config"))
    model_cls = getattr(transformers, name + "ForCausalLM")
    fields = dict(vocab_size=json.loads((SOURCE / "config.json").read_text())["vocab_size"], hidden_size=512,
                  intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                  max_position_embeddings=2048, tie_word_embeddings=False,
                  architectures=[model_cls.__name__], **overrides)
    config = config_cls(**fields)
    if arch == "gemma2":  # eager: the GPU machine's Transformers 5.17 builds Gemma 2 with SDPA, which drops the cap
        config._attn_implementation = "eager"
    hf = model_cls(config)
    randomize_(hf, seed=seed, std=std)
    hf.save_pretrained(folder)
    return hf.eval()


def logprob_errors_against(llm, hf, seed: int, max_prompt: int, num_prompts: int = 6,
                           max_tokens: int = 12) -> list[float]:
    """Greedy `max_tokens` tokens with their logprobs and every prompt token's logprob for `num_prompts` random
    prompts of 30..max_prompt tokens; returns |engine - Transformers| for each of those logprobs, Transformers
    (`hf`, on its own device) scoring the prompt plus the engine's tokens in one forward. Also checks that each
    reported logprob is the sampled token's."""
    from pagedserve import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 100000) for _ in range(rng.randrange(30, max_prompt))] for _ in range(num_prompts)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, logprobs=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    device = next(hf.parameters()).device
    errors = []
    for prompt, out in zip(prompts, outs, strict=True):
        generated = out.outputs[0].token_ids
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + generated], device=device)).logits[0].float().log_softmax(-1).cpu()
        for i in range(1, len(prompt)):
            errors.append(abs(out.prompt_logprobs[i].logprob - ref[i - 1, prompt[i]].item()))
        for j, entry in enumerate(out.outputs[0].logprobs):
            assert entry.token_id == generated[j]
            errors.append(abs(entry.logprob - ref[len(prompt) + j - 1, generated[j]].item()))
    return errors
