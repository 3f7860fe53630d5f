"""dtype "auto" on a CPU: bfloat16 where the CPU multiplies bf16 natively, else float32; the bf16 engine on the real
embedded model against Transformers in fp32 (the tests elsewhere pin the CPU's auto dtype to float32:
tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.executor import worker

PROMPTS = ["def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[len(arr) // 2]\n",
           "The quick brown fox jumps over the lazy dog. " * 3 + "Write a haiku about autumn:",
           "import numpy as np\n\ndef softmax(x):\n"]


def test_auto_dtype_on_cpu_follows_native_bf16_and_the_override(monkeypatch) -> None:
    cpu, auto = torch.device("cpu"), EngineConfig()
    monkeypatch.delenv("PAGEDSERVE_CPU_DTYPE", raising=False)
    monkeypatch.setattr(worker, "cpu_has_native_bf16", lambda: True)
    assert worker.resolve_dtype(auto, cpu) is torch.bfloat16
    assert worker.resolve_dtype(EngineConfig(dtype="float32"), cpu) is torch.float32  # an explicit dtype wins
    monkeypatch.setattr(worker, "cpu_has_native_bf16", lambda: False)
    assert worker.resolve_dtype(auto, cpu) is torch.float32
    monkeypatch.setenv("PAGEDSERVE_CPU_DTYPE", "bfloat16")
    assert worker.resolve_dtype(auto, cpu) is torch.bfloat16
    monkeypatch.setenv("PAGEDSERVE_CPU_DTYPE", "float16")
    with pytest.raises(ValueError, match="PAGEDSERVE_CPU_DTYPE"):
        worker.resolve_dtype(auto, cpu)
    assert worker.resolve_dtype(EngineConfig(dtype="float16"), cpu) is torch.float16


def test_bf16_engine_on_cpu_is_as_close_to_fp32_transformers_as_its_bf16(real_model_dir: str, monkeypatch) -> None:
    """The default dtype of a CPU with native bf16: every prompt token's logprob within 0.1 of Transformers' fp32
    (Transformers' own bf16 is 0.03-0.09 off on these prompts), the same top-1 choices and greedy tokens."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("PAGEDSERVE_CPU_DTYPE", "bfloat16")  # what "auto" picks on such a CPU
    llm = LLM(real_model_dir, max_model_len=512)
    assert llm.engine.worker.dtype is torch.bfloat16
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    errors, agree, total = [], 0, 0
    for out in outs:
        ids = out.prompt_token_ids
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            greedy = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
        for p in range(1, len(ids)):
            errors.append(abs(out.prompt_logprobs[p].logprob - ref[p - 1, ids[p]].item()))
            agree += out.prompt_logprobs[p].top[0][0] == int(ref[p - 1].argmax())
            total += 1
        assert out.outputs[0].token_ids[:6] == greedy[:6]
    assert max(errors) < 0.1 and sum(errors) / len(errors) < 0.02, (max(errors), sum(errors) / len(errors))
    assert agree / total >= 0.95
    assert max(errors) > 1e-4  # bf16 indeed (fp32 is ~1e-5 off)
