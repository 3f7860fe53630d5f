"""Batch-1 weight prefetch into L2 from the small kernels (kernels/l2_prefetch.py, PAGEDSERVE_B1_PF_*).

A prefetch is a hint: it must change no result. On the GPU the RMSNorm (with its extra prefetch programs, after
and before their PDL wait) and the decode attention (every program asking for a share of the o projection) give
bit-identical outputs with it on and off, and a batch-1 decoder step through CUDA-graph-free eager calls does too.
Everywhere: which launches take it (CUDA with PDL, contiguous 16-byte aligned weights) and how much they ask for,
and that it stays out of the interpreter (inline PTX cannot run there)."""

from __future__ import annotations

import pytest
import torch

from pagedserve.executor.kernels import l2_prefetch, pdl
from pagedserve.executor.kernels.fused_norm import rms_norm
from pagedserve.executor.kernels.paged_attention_decode import paged_attention_decode

CUDA = torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not (CUDA and pdl.enabled(torch.device("cuda"))), reason="needs CUDA with PDL (sm_90+)")


def test_how_much_a_launch_asks_for(monkeypatch):
    weight = torch.zeros(64, 1024, dtype=torch.bfloat16)  # 128 KiB
    assert l2_prefetch.prefetch_bytes(weight) == 0  # CPU (or the interpreter): no PDL, no prefetch
    monkeypatch.setattr(l2_prefetch.pdl, "enabled", lambda device: True)
    assert l2_prefetch.prefetch_bytes(weight) == 128 * 1024
    assert l2_prefetch.prefetch_bytes(weight, 1000) == 992  # limited, rounded down to 16 bytes
    assert l2_prefetch.prefetch_bytes(None) == 0
    assert l2_prefetch.prefetch_bytes(weight[:, :1000]) == 0  # not contiguous
    assert l2_prefetch.prefetch_bytes(weight.view(-1)[1:]) == 0  # not 16-byte aligned
    monkeypatch.setattr(l2_prefetch, "OPROJ", False)
    monkeypatch.setattr(l2_prefetch, "NORM_MB", 0)
    assert l2_prefetch.oproj_bytes(weight) == 0 and l2_prefetch.norm_bytes(weight) == 0  # off by default
    monkeypatch.setattr(l2_prefetch, "OPROJ", True)
    monkeypatch.setattr(l2_prefetch, "NORM_MB", 1)
    big = torch.zeros(1024, 1024, dtype=torch.bfloat16)  # 2 MiB
    assert l2_prefetch.oproj_bytes(big) == 2 << 20  # all of it
    assert l2_prefetch.norm_bytes(big) == 1 << 20  # its first megabyte


@pytest.mark.parametrize("name", ["PAGEDSERVE_B1_PF_OPROJ", "PAGEDSERVE_B1_PF_NORM_MB"])
def test_bad_environment_value(monkeypatch, name):
    monkeypatch.setenv(name, "lots")
    with pytest.raises(ValueError, match=name):
        l2_prefetch._int_from_env(name)


def _off_and_on(monkeypatch, fn, **on):
    monkeypatch.setattr(l2_prefetch, "OPROJ", False)
    monkeypatch.setattr(l2_prefetch, "NORM_MB", 0)
    off = fn()
    for name, value in on.items():
        monkeypatch.setattr(l2_prefetch, name, value)
    result = fn()
    torch.cuda.synchronize()
    return off, result


@gpu_only
@pytest.mark.parametrize("early", [False, True])
@pytest.mark.parametrize("mb", [1, 16, 64])
@pytest.mark.parametrize("rows", [1, 3])
def test_gpu_norm_unchanged(monkeypatch, early, mb, rows):
    torch.manual_seed(mb + rows)
    x = torch.randn(rows, 3584, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(rows, 3584, device="cuda", dtype=torch.float32)
    weight = torch.rand(3584, device="cuda", dtype=torch.bfloat16) + 0.5
    nxt = torch.randn(2 * 18944, 3584, device="cuda", dtype=torch.bfloat16)  # gate_up: 271 MB, more than asked
    off, on = _off_and_on(monkeypatch, lambda: rms_norm(x, weight, 1e-6, residual, prefetch=nxt),
                          NORM_MB=mb, EARLY=early)
    assert torch.equal(off[0], on[0]) and torch.equal(off[1], on[1])
    # and against the plain torch norm
    total = x.float() + residual
    ref = (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * weight
    torch.testing.assert_close(on[0].float(), ref.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(on[1], total)


@gpu_only
@pytest.mark.parametrize("seq_len", [1, 130, 383, 5000])
def test_gpu_decode_attention_unchanged(monkeypatch, seq_len):
    torch.manual_seed(seq_len)
    hq, hkv, d, block_size, num_blocks = 28, 4, 128, 16, 400
    kv_cache = torch.randn(2, num_blocks, block_size, hkv, d, device="cuda", dtype=torch.bfloat16)
    query = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
    blocks = torch.randperm(num_blocks, device="cuda")[: -(-seq_len // block_size)].to(torch.int32)
    block_tables = torch.zeros(1, 2048 // block_size * 4, dtype=torch.int32, device="cuda")
    block_tables[0, : blocks.numel()] = blocks
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
    o_proj = torch.randn(3584, 3584, device="cuda", dtype=torch.bfloat16)

    def run():
        out = torch.full_like(query, float("nan"))
        return paged_attention_decode(query, kv_cache, block_tables, seq_lens, d**-0.5, out=out,
                                      max_seq_len=8192, prefetch=o_proj)

    off, on = _off_and_on(monkeypatch, run, OPROJ=True)
    assert torch.equal(off, on)
    # and against plain torch attention over the gathered context
    slots = torch.arange(seq_len, device="cuda")
    phys = block_tables[0, slots // block_size].long()
    k = kv_cache[0, phys, slots % block_size].float()  # [L, hkv, D]
    v = kv_cache[1, phys, slots % block_size].float()
    q = query[0].float().view(hkv, hq // hkv, d)
    scores = torch.einsum("hgd,lhd->hgl", q, k) * d**-0.5
    ref = torch.einsum("hgl,lhd->hgd", scores.softmax(-1), v).reshape(hq, d)
    torch.testing.assert_close(on[0].float(), ref, rtol=2e-2, atol=2e-2)
