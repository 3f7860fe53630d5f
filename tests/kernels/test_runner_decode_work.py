"""The runner's decode work list end to end (Triton backend; the interpreter on CPU): a decode-only step
whose batch fills the (pretend) SMs runs the work path, long sequences cut into chunks merged by the
last one to finish, and its logits match Hugging Face's; with PAGEDSERVE_DECODE_WORK=0 the same step
takes the plain longest-first order. Lives with the kernel tests, whose conftest turns the interpreter on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.executor.kernels import paged_attention_decode as pad
from tests.executor.helpers import hf_logits, make_runner, max_rel_err, save_tiny_model, scheduled, step

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("use_work", [True, False], ids=["work", "order"])
def test_decode_step_with_work_list_matches_hf(use_work: bool, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PAGEDSERVE_DECODE_WORK", "1" if use_work else "0")
    monkeypatch.setattr(pad, "MIN_CHUNK", 64)  # chunks of 64 tokens: the tiny model's sequences split
    monkeypatch.setattr(pad, "num_sms", lambda device: 8)  # six sequences fill 8 "SMs" (also on a GPU)
    hf = save_tiny_model("qwen2", tmp_path, num_hidden_layers=1)
    runner, sampler = make_runner(tmp_path, block_size=4, num_blocks=160, device=DEVICE,
                                  dtype=torch.float32, attention_backend="triton")
    assert runner.backend.decode_work == use_work
    runner.pad_eager_steps = False
    rng = np.random.default_rng(0)
    lens = [100, 70, 20, 66, 40, 9]
    seqs = {f"r{i}": rng.integers(1, 250, n).tolist() for i, n in enumerate(lens)}
    blocks, nxt = {}, 1
    for rid, toks in seqs.items():
        need = (len(toks) + 1 + 3) // 4
        blocks[rid], nxt = list(range(nxt, nxt + need)), nxt + need
    out = runner.execute(step(*(scheduled(r, t, 0, blocks[r], True) for r, t in seqs.items())))
    for rid, token in zip(seqs, out.sampled_token_ids):
        seqs[rid].append(token)

    decode = step(*(scheduled(r, t[-1:], len(t) - 1, blocks[r], True) for r, t in seqs.items()))
    meta = runner.prepare_inputs(decode).ctx.attn_metadata
    assert pad.uses_work_list(len(seqs), runner._num_kv_heads, pad.num_sms(runner.device))
    if use_work:
        assert meta.decode_work is not None and meta.seq_order is None
        work = meta.decode_work.cpu().numpy()
        assert (work[5] > 1).any() and (work[5] == 1).any()  # split and unsplit sequences both
    else:
        assert meta.decode_work is None and meta.seq_order is not None
    runner.execute(decode)
    for rid, logits in sampler.logits[-1].items():
        assert max_rel_err(logits, hf_logits(hf, seqs[rid])[-1]) < (5e-3 if CUDA else 1e-4), rid
