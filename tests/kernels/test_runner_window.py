"""Sliding windows through the runner with the Triton backend (the interpreter on CPU): a mixed step (chunked
prefill, prefix hit, decodes) and a decode-only step whose full-attention layer runs the step's work list while
its sliding layer splits the window's keys, both against Transformers. Lives with the kernel tests, whose conftest
turns the interpreter on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.executor.kernels import paged_attention_decode as pad
from tests.executor.helpers import hf_logits, make_runner, max_rel_err, save_tiny_model, scheduled, step
from tests.executor.test_model_runner import run_mixed_batch_against_hf

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = 5e-3 if CUDA else 1e-4


@pytest.mark.parametrize("arch,overrides", [("mistral", dict(sliding_window=5)),
                                            ("qwen2", dict(use_sliding_window=True, sliding_window=6,
                                                           max_window_layers=1)),
                                            ("gemma3", {}), ("gemma2", {}),  # gemma2: the kernels' soft-capping
                                            ("gpt_oss", {})],  # the kernels' sinks (window 6, full layers)
                         ids=["mistral", "qwen2", "gemma3", "gemma2", "gpt-oss"])
def test_mixed_step_with_a_window_on_the_triton_backend(arch, overrides, tmp_path) -> None:
    run_mixed_batch_against_hf(arch, tmp_path, DEVICE, "triton", tolerance=TOL, overrides=overrides)


def test_mixed_step_partial_rotary_longrope_on_the_triton_backend(tmp_path) -> None:
    """Phi-4-mini's rotary: LongRoPE (short factors, the attention factor of factor 4) over 12 of 16 dims; on CUDA
    the plain in-place rotary kernel, then the KV write (the fused kernels rotate whole heads)."""
    factors = {"short_factor": [1.0, 1.2, 1.9, 2.5, 3.1, 3.3], "long_factor": [1.0, 2.0, 4.0, 8.0, 9.0, 9.5]}
    run_mixed_batch_against_hf("phi3", tmp_path, DEVICE, "triton", tolerance=TOL,
                               overrides=dict(partial_rotary_factor=0.75, original_max_position_embeddings=128,
                                              rope_scaling={"rope_type": "longrope", "factor": 4.0, **factors}))


def test_decode_step_work_list_beside_a_sliding_layer(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pad, "MIN_CHUNK", 64)  # chunks of 64 tokens: the long sequences split
    monkeypatch.setattr(pad, "num_sms", lambda device: 8)  # six sequences fill 8 "SMs"
    hf = save_tiny_model("qwen2", tmp_path, use_sliding_window=True, sliding_window=37, max_window_layers=1)
    runner, sampler = make_runner(tmp_path, block_size=4, num_blocks=160, device=DEVICE, dtype=torch.float32,
                                  attention_backend="triton")
    layers = runner.model.model.layers
    assert [layer.self_attn.sliding_window for layer in layers] == [None, 37]
    runner.pad_eager_steps = False
    rng = np.random.default_rng(0)
    seqs = {f"r{i}": rng.integers(1, 250, n).tolist() for i, n in enumerate([100, 70, 20, 66, 40, 9])}
    blocks, nxt = {}, 1
    for rid, toks in seqs.items():
        need = (len(toks) + 1 + 3) // 4
        blocks[rid], nxt = list(range(nxt, nxt + need)), nxt + need
    out = runner.execute(step(*(scheduled(r, t, 0, blocks[r], True) for r, t in seqs.items())))
    for rid, logits in sampler.logits[-1].items():
        assert max_rel_err(logits, hf_logits(hf, seqs[rid])[-1]) < TOL, rid
    for rid, token in zip(seqs, out.sampled_token_ids):
        seqs[rid].append(token)
    decode = step(*(scheduled(r, t[-1:], len(t) - 1, blocks[r], True) for r, t in seqs.items()))
    assert runner.prepare_inputs(decode).ctx.attn_metadata.decode_work is not None
    runner.execute(decode)
    for rid, logits in sampler.logits[-1].items():
        assert max_rel_err(logits, hf_logits(hf, seqs[rid])[-1]) < TOL, rid
