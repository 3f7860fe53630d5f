"""GPU: quantization="fp8" through the whole engine (CUDA graphs, async scheduling) on a small random Qwen2 against
Transformers in fp32 with the same projections rounded to fp8. Prompts up to ~600 tokens in 512-token chunks, so
prefill steps take the W8A8 path (per-token activations, torch._scaled_mm) and decode steps the skinny W8A16 GEMM.
fp32 engine: every path computes with the exact fp8 weights (tight bound); bf16: activations rounded too."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from tests.executor.helpers import randomize_
from tests.executor.test_model_runner import run_mixed_batch_against_hf
from tests.executor.test_quantization import round_projections_to_fp8
from tests.gpu.test_async_gpu import SOURCE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_mixed_batch_matches_hf_on_cuda(backend: str, tmp_path) -> None:
    run_mixed_batch_against_hf("qwen2", tmp_path, "cuda", backend, tolerance=5e-3, quantization="fp8")


def _logprob_errors(path, dtype: str, quantization: str | None, hf) -> list[float]:
    """|engine - Transformers| logprob of every prompt token and of 12 greedy tokens, 6 prompts of 30-600 tokens."""
    from pagedserve import LLM, SamplingParams

    llm = LLM(str(path), dtype=dtype, quantization=quantization, max_model_len=1024, max_num_batched_tokens=512,
              gpu_memory_utilization=0.3)
    assert llm.engine.async_scheduling and llm.engine.worker.runner.cuda_graphs is not None
    rng = random.Random(6)
    prompts = [[rng.randrange(100, 100000) for _ in range(rng.randrange(30, 600))] for _ in range(6)]
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.0, logprobs=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    errors = []
    for prompt, out in zip(prompts, outs):
        generated = out.outputs[0].token_ids
        full = prompt + generated
        with torch.no_grad():
            ref = hf(torch.tensor([full], device="cuda")).logits[0].float().log_softmax(-1).cpu()
        for i in range(1, len(prompt)):
            errors.append(abs(out.prompt_logprobs[i].logprob - ref[i - 1, prompt[i]].item()))
        for j, entry in enumerate(out.outputs[0].logprobs):
            assert entry.token_id == generated[j]
            errors.append(abs(entry.logprob - ref[len(prompt) + j - 1, generated[j]].item()))
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    del llm
    torch.cuda.empty_cache()
    return errors


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_engine_logprobs_match_transformers_on_gpu(dtype: str, tmp_path) -> None:
    """fp32: the fp8 engine within 5e-3 of Transformers on the fp8-rounded weights. bf16: its error against that
    reference no more than ~1.5x the plain bf16 engine's against the unrounded model (bf16 rounding dominates
    both; prefill adds the activations' fp8 rounding)."""
    if not (SOURCE / "config.json").exists():
        pytest.skip("no .devcache/qwen2-7b (run scripts/make_7b_config.sh)")
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM

    for f in SOURCE.iterdir():  # the tokenizer
        if f.name != "config.json":
            shutil.copy(f, tmp_path / f.name)
    vocab = json.loads((SOURCE / "config.json").read_text())["vocab_size"]
    config = Qwen2Config(vocab_size=vocab, hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_theta=1e6, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])
    hf = Qwen2ForCausalLM(config)
    randomize_(hf, seed=4, std=0.03)
    hf.save_pretrained(tmp_path)
    exact = copy.deepcopy(hf).cuda().eval()
    round_projections_to_fp8(hf)
    rounded = hf.cuda().eval()

    fp8 = _logprob_errors(tmp_path, dtype, "fp8", rounded)
    worst, mean = max(fp8), sum(fp8) / len(fp8)
    line = f"fp8 engine ({dtype}) vs Transformers on the fp8 weights: logprob error worst {worst:.2e}, mean {mean:.2e}"
    if dtype == "float32":
        print(f"{line} over {len(fp8)} tokens")
        assert worst < 5e-3  # the same weights; the Triton attention's fp32 dots run in TF32
        return
    plain = _logprob_errors(tmp_path, dtype, None, exact)
    p_worst, p_mean = max(plain), sum(plain) / len(plain)
    print(f"{line}; the plain bf16 engine vs the unrounded model: worst {p_worst:.2e}, mean {p_mean:.2e} "
          f"over {len(fp8)} tokens")
    assert mean <= 1.5 * p_mean + 5e-3 and worst <= 2 * p_worst + 5e-2
