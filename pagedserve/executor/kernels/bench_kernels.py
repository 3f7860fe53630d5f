"""GPU benchmark of the paged-attention kernels at Qwen2-7B shapes (Hq=28, Hkv=4, D=128, block 16, bf16).

    python -m pagedserve.executor.kernels.bench_kernels [--tune decode|splits|decode-mix|prefill|silu|sample]
        [--dtype bf16|fp16]

1. Correctness vs a float32 torch reference (decode, split and unsplit; mixed prefill batch).
2. Decode: batch 1/64/256 x context 512/2048/8192, median of triton.testing.do_bench (L2 flushed
   between runs) and of CUDA-graph replays; achieved GB/s counts the K+V bytes of the batch's context
   once, against the ~3.0 TB/s device-to-device copy ceiling measured on the H100.
3. Mixed (chunked-prefill) batches: decode kernel + prefill kernel vs the prefill kernel alone.
4. Prefill: 1x1024, 8x512 (and 1x4096) fresh tokens, TFLOP/s = 4 * Hq * D * visible (q, k) pairs.
--tune sweeps tile/warp/stage configs of one kernel (decode ranked by graph replay time) or the
decode split count, and prints the best few per case.
Block tables are random permutations of the physical blocks, as after a while of serving.
--tune decode-kv runs only decode at the default workload's batches with a 16-bit and an fp8 KV cache.
--tune decode-mix runs only decode over mixed context lengths (batch 139 at U[100,2048], 256 at
U[100,1536], 64 at U[100,2048]: the throughput workloads' mix), sweeping split count x tile x warps,
then the default config with a launch order (seq_order): none, index order (the ordered kernel's
grid, kv heads fastest, without reordering) and longest-first, each with 3 and 2 pipeline stages.
--tune silu runs only the MLP's SiLU·mul (I=18944, T=1/139/8192): the fused kernel at its default and
other block sizes vs torch's F.silu(gate) * up, in us and GB/s of 3*I elements a row (read gate and
up, write the product; torch's two kernels move 5*I). Graph replays don't flush L2: at T=1 and 139
(0.1 and 16 MB) the data stays in L2, as it does when the gate|up matmul has just written it.
--tune sample runs only the random sampling of temperature-1.0 rows (V=152064, S=1/139/256, bf16 and
fp32 logits): the torch path (Sampler with use_fused_kernel=False: /T, softmax, exponential_ noise,
p/q, argmax) vs the fused Triton kernel (kernels/sample.py), whole Sampler.sample calls by do_bench
(their host time too, as they take host lists) and the device work alone by CUDA-graph replay, plus
a sweep of the kernel's tile / split count; GB/s counts reading the logits once (S*V elements).
Graph replays don't flush L2 (bf16 logits: 0.3 / 42 / 78 MB at S = 1 / 139 / 256); do_bench does.
--tune sample-filter runs only filtered sampling (top-p / top-k / min-p, S = 1 / 64 / 256, fp32 logits, flat
and peaked rows): the torch path vs the threshold kernel (kernels/sample_filter.py) + the fused sampler.

Seen on an H100 80GB HBM3 (torch 2.11, triton 3.6, bf16, defaults, CUDA-graph replay medians):
decode batch 256 at 512/2048/8192 tokens: 95/100/101% of the 3.0 TB/s copy ceiling; batch 64: 83/93/98%;
batch 1: 5.7/7.4/9.8 us (launch-bound). Mixed 63 decodes x 2048 + a 512-token chunk: 0.156 ms.
Prefill 1x1024: 0.035 ms (215 TFLOP/s), 8x512: 0.080 ms (188), 1x4096: 0.313 ms (384, 48% of 798).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math

import torch
import torch.nn.functional as F
import triton

from pagedserve.executor.kernels import sample as sample_kernel
from pagedserve.executor.kernels.kv_cache_write import write_kv_cache
from pagedserve.executor.kernels.paged_attention_decode import (
    choose_num_splits,
    longest_first_order,
    paged_attention_decode,
)
from pagedserve.executor.kernels.paged_attention_prefill import paged_attention_prefill
from pagedserve.executor.kernels.silu_mul import choose_block, silu_and_mul

HQ, HKV, D, BS = 28, 4, 128, 16
COPY_CEILING = 3.0e12  # bytes/s, measured device-to-device copy on the H100 (read + write)
MATMUL_CEILING = 798e12  # flop/s, measured 8192^3 bf16 matmul on the H100


def make_case(q_lens, ctx_lens, dtype, seed=0):
    """Random cache (all slots filled) + shuffled block tables for sequences of ctx+q tokens."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    nblk = [math.ceil(s / BS) for s in seq_lens]
    num_blocks = sum(nblk) + 1
    perm = torch.randperm(num_blocks - 1, device="cuda", generator=g) + 1
    tables = torch.zeros(len(seq_lens), max(nblk), dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(nblk):
        tables[i, :n] = perm[start : start + n]
        start += n
    kv_cache = torch.randn(2, num_blocks, BS, HKV, D, device="cuda", dtype=dtype, generator=g)
    query = torch.randn(sum(q_lens), HQ, D, device="cuda", dtype=dtype, generator=g)
    qsl = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device="cuda")
    return query, kv_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), qsl


def reference(query, kv_cache, tables, seq_lens, qsl, scale):
    out = torch.empty(query.shape, dtype=torch.float32, device="cuda")
    qsl_h, lens_h = qsl.tolist(), seq_lens.tolist()
    for s, seq_len in enumerate(lens_h):
        q = query[qsl_h[s] : qsl_h[s + 1]].float()
        blocks = tables[s, : math.ceil(seq_len / BS)].long()
        k, v = (kv_cache[i, blocks].reshape(-1, HKV, D)[:seq_len].float() for i in (0, 1))
        k, v = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        pos = seq_len - q.shape[0] + torch.arange(q.shape[0], device="cuda")
        scores.masked_fill_(torch.arange(seq_len, device="cuda")[None] > pos[:, None], float("-inf"))
        out[qsl_h[s] : qsl_h[s + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "NaN/inf in output (unwritten elements?)"
    return ((out.float() - ref).norm() / ref.norm()).item()


def check_correctness(dtype) -> None:
    scale = D**-0.5
    print("== correctness (relative L2 error vs fp32 torch; bf16 passes below 1e-2)")
    ctx = [1, 17, 530, 2047, 4100, 8191, 63, 1000]
    query, kv, tables, lens, qsl = make_case([1] * len(ctx), [c - 1 for c in ctx], dtype, seed=1)
    ref = reference(query, kv, tables, lens, qsl, scale)
    for splits in (1, 4, None):
        out = torch.full_like(query, float("nan"))
        paged_attention_decode(query, kv, tables, lens, scale, out=out, num_splits=splits)
        print(f"decode   splits={splits!s:4}  rel err {rel_err(out, ref):.2e}")
    q_lens, ctx_lens = [700, 300, 1, 129, 64, 1, 1], [0, 512, 1000, 333, 64, 2000, 0]
    query, kv, tables, lens, qsl = make_case(q_lens, ctx_lens, dtype, seed=2)
    out = torch.full_like(query, float("nan"))
    paged_attention_prefill(query, kv, qsl, lens, tables, scale, max(q_lens), out=out)
    print(f"prefill  mixed batch  rel err {rel_err(out, reference(query, kv, tables, lens, qsl, scale)):.2e}")
    # KV write: exact.
    key = torch.randn(64, HKV, D, device="cuda", dtype=dtype)
    slots = torch.randperm(kv.shape[1] * BS, device="cuda")[:64]
    write_kv_cache(key, key, kv, slots)
    got = kv[0].reshape(-1, HKV, D)[slots]
    print(f"kv write exact: {torch.equal(got, key)}")


def _label(cfg: dict) -> str:
    keys = {"block_m": "m", "block_n": "n", "num_warps": "w", "num_stages": "s", "num_splits": "S"}
    return "".join(f"{short}{cfg[k]}" for k, short in keys.items() if k in cfg) or "default"


def bench_decode(dtype, configs, top: int) -> None:
    """Configs are ranked by CUDA-graph replay time (decode runs in graphs when serving)."""
    scale = D**-0.5
    print("\n== decode (median ms; GB/s of K+V context bytes; % of 3.0 TB/s copy ceiling)")
    print(f"{'batch':>5} {'ctx':>5} {'splits':>6} {'config':>14} {'eager ms':>9} {'GB/s':>7} {'%':>5}"
          f" {'graph ms':>9} {'GB/s':>7} {'%':>5}")  # fmt: skip
    for batch, ctx in itertools.product((1, 64, 256), (512, 2048, 8192)):
        query, kv, tables, lens, _ = make_case([1] * batch, [ctx - 1] * batch, dtype, seed=batch + ctx)
        kv_bytes = 2 * batch * ctx * HKV * D * kv.element_size()
        out = torch.empty_like(query)
        results = []
        for cfg in configs:
            run = functools.partial(
                paged_attention_decode, query, kv, tables, lens, scale, out=out, max_seq_len=ctx, **cfg
            )
            run()
            torch.cuda.synchronize()
            results.append((triton.testing.do_bench_cudagraph(run, return_mode="median"), cfg, run))
        results.sort(key=lambda r: r[0])
        ms_graph, cfg, run = results[0]
        ms = triton.testing.do_bench(run, return_mode="median")
        splits = cfg.get("num_splits") or choose_num_splits(batch, HKV, ctx, cfg.get("block_n", 64),
                                                             query.device)  # fmt: skip
        gbs, gbs_g = kv_bytes / ms / 1e6, kv_bytes / ms_graph / 1e6
        print(f"{batch:5d} {ctx:5d} {splits:6d} {_label(cfg):>14} {ms:9.4f} {gbs:7.0f} {gbs / 30:5.1f}"
              f" {ms_graph:9.4f} {gbs_g:7.0f} {gbs_g / 30:5.1f}")  # fmt: skip
        if top > 1:
            print("      next: " + ", ".join(f"{_label(c)} {t * 1e3:.1f}us" for t, c, _ in results[1:top]))


def bench_decode_mix(dtype) -> None:
    """Decode over the context-length mix of the throughput workloads (each sequence's own length drawn
    uniformly), where a (sequence, kv head) program per long sequence can leave the step waiting on a
    few long programs: split counts x tiles x warps, ranked by CUDA-graph replay time."""
    scale = D**-0.5
    print("\n== decode over mixed lengths (graph replay medians; GB/s of the batch's K+V bytes)")
    rng = torch.Generator().manual_seed(0)
    for batch, lo, hi in ((139, 100, 2048), (256, 100, 1536), (64, 100, 2048)):
        ctx = torch.randint(lo, hi + 1, (batch,), generator=rng).tolist()
        query, kv, tables, lens, qsl = make_case([1] * batch, [c - 1 for c in ctx], dtype, seed=batch)
        kv_bytes = 2 * sum(ctx) * HKV * D * kv.element_size()
        ref = reference(query, kv, tables, lens, qsl, scale)
        out = torch.empty_like(query)
        auto = choose_num_splits(batch, HKV, max(ctx), 64, query.device)
        results = []
        for splits, block_n, warps in itertools.product((1, 2, 3, 4, 6, 8, 12), (32, 64), (2, 4)):
            run = functools.partial(
                paged_attention_decode,
                query,
                kv,
                tables,
                lens,
                scale,
                out=out,
                max_seq_len=max(ctx),
                num_splits=splits,
                block_n=block_n,
                num_warps=warps,
            )
            out.fill_(float("nan"))
            run()
            assert rel_err(out, ref) < 1e-2, (splits, block_n, warps)
            results.append((triton.testing.do_bench_cudagraph(run, return_mode="median"), splits, block_n, warps))
        results.sort()
        default = next(r for r in results if r[1:] == (auto, 64, 2))
        print(
            f"batch {batch}, ctx U[{lo},{hi}] ({kv_bytes / 1e6:.0f} MB): default (S{auto} n64 w2) "
            f"{default[0] * 1e3:.1f} us ({kv_bytes / default[0] / 1e6:.0f} GB/s)"
        )
        for ms, splits, block_n, warps in results[:6]:
            print(f"    S{splits} n{block_n} w{warps}: {ms * 1e3:.1f} us ({kv_bytes / ms / 1e6:.0f} GB/s)")
        # Launch order, default config (S{auto} n64 w2). "index": seq_order = arange, i.e. the ordered
        # kernel's 1-D grid (a sequence's kv heads adjacent) without reordering, to separate the grid's
        # effect from the ordering's; fewer stages use less shared memory (more programs per SM).
        orders = {
            "none": None,
            "index": torch.arange(batch, dtype=torch.int32, device="cuda"),
            "longest": torch.from_numpy(longest_first_order(ctx)).cuda(),
        }
        cells = []
        for (name, order), stages in itertools.product(orders.items(), (3, 2)):
            run = functools.partial(paged_attention_decode, query, kv, tables, lens, scale, out=out,
                                    max_seq_len=max(ctx), num_splits=auto, block_n=64, num_warps=2,
                                    num_stages=stages, seq_order=order)  # fmt: skip
            out.fill_(float("nan"))
            run()
            assert rel_err(out, ref) < 1e-2, (name, stages)
            ms = triton.testing.do_bench_cudagraph(run, return_mode="median")
            cells.append(f"{name} s{stages} {kv_bytes / ms / 1e6:.0f}")
        print("    order (S{} n64 w2), GB/s: {}".format(auto, " | ".join(cells)))


def bench_decode_work(dtype) -> None:
    """The default workload's decode steps (inputs and outputs U[100, 1024], all requests started
    together; at batch b the step where b are still running): the longest-first order against the
    work list (decode_work_list) at a few slot counts per SM and minimum chunks."""
    import numpy as np

    from pagedserve.executor.kernels import paged_attention_decode as pad

    scale = D**-0.5
    sms = pad.num_sms(torch.device("cuda"))
    rng = np.random.default_rng(0)
    inputs, outputs = rng.integers(100, 1025, 256), rng.integers(100, 1025, 256)
    print("\n== decode at the default workload's batches: order vs work list (graph replay GB/s of K+V)")
    for batch in (256, 200, 139, 97, 64, 40):
        step_ = next(s for s in range(2000) if (outputs > s).sum() <= batch)
        ctx = (inputs[outputs > step_] + step_).tolist()
        query, kv, tables, lens, qsl = make_case([1] * len(ctx), [c - 1 for c in ctx], dtype, seed=batch)
        kv_bytes = 2 * sum(ctx) * HKV * D * kv.element_size()
        ref = reference(query, kv, tables, lens, qsl, scale)
        out = torch.empty_like(query)
        auto = choose_num_splits(len(ctx), HKV, max(ctx), 64, query.device)
        cells = []
        order = torch.from_numpy(longest_first_order(ctx)).cuda()
        variants = [("order", dict(seq_order=order, num_splits=auto))]
        for per_sm, min_chunk in ((2, 256), (4, 256), (2, 128), (6, 128)):
            work = pad.decode_work_list(ctx, HKV, sms, 64, min_chunk=min_chunk, programs_per_sm=per_sm)
            splits = int((work[5] > 1).sum())
            variants.append((f"work p{per_sm} c{min_chunk} ({work.shape[1]} items, {splits} split)",
                             dict(work=torch.from_numpy(work).cuda())))
        for name, kwargs in variants:
            run = functools.partial(paged_attention_decode, query, kv, tables, lens, scale, out=out,
                                    max_seq_len=max(ctx), block_n=64, num_warps=2, **kwargs)  # fmt: skip
            out.fill_(float("nan"))
            run()
            assert rel_err(out, ref) < 1e-2, name
            ms = triton.testing.do_bench_cudagraph(run, return_mode="median")
            cells.append(f"{name} {ms * 1e3:.1f} us {kv_bytes / ms / 1e6:.0f}")
        head = f"batch {len(ctx)} (step {step_}, ctx {min(ctx)}-{max(ctx)}, {kv_bytes / 1e6:.0f} MB): "
        print(head + " | ".join(cells))


def _mixed_case(dtype, num_dec: int, ctx: int, chunk: int, chunk_ctx: int) -> tuple[float, float, int]:
    scale = D**-0.5
    q_lens, ctx_lens = [1] * num_dec + [chunk], [ctx - 1] * num_dec + [chunk_ctx]
    query, kv, tables, lens, qsl = make_case(q_lens, ctx_lens, dtype, seed=num_dec)
    kv_bytes = 2 * (num_dec * ctx + chunk + chunk_ctx) * HKV * D * kv.element_size()
    out = torch.empty_like(query)
    max_q, max_s = chunk, max(ctx, chunk + chunk_ctx)

    def split():
        paged_attention_decode(query, kv, tables, lens, scale, out=out, max_seq_len=max_s,
                               query_start_loc=qsl, num_decodes=num_dec)  # fmt: skip
        paged_attention_prefill(query, kv, qsl, lens, tables, scale, max_q, out=out, skip_decodes=True)

    def unified():
        paged_attention_prefill(query, kv, qsl, lens, tables, scale, max_q, out=out)

    ref = reference(query, kv, tables, lens, qsl, scale)
    times = []
    for fn in (split, unified):
        out.fill_(float("nan"))
        fn()
        assert rel_err(out, ref) < 1e-2, fn.__name__
        times.append(triton.testing.do_bench_cudagraph(fn, return_mode="median"))
    return times[0], times[1], kv_bytes


def bench_mixed(dtype) -> None:
    """A chunked-prefill step: many decodes plus one prompt chunk; decode kernel + prefill kernel
    (the backend's default) vs the prefill kernel alone doing every sequence."""
    print("\n== mixed batch (median ms of graph replays): decodes + one prefill chunk (+ its cached ctx)")
    print(f"{'decodes':>7} {'ctx':>5} {'chunk':>9} {'split ms':>9} {'unified ms':>10} {'KV GB/s split':>13}")
    for num_dec, ctx, chunk, chunk_ctx in ((63, 2048, 512, 1024), (255, 1024, 256, 0), (16, 8192, 1024, 0)):
        t_split, t_unified, kv_bytes = _mixed_case(dtype, num_dec, ctx, chunk, chunk_ctx)
        print(f"{num_dec:7d} {ctx:5d} {chunk:4d}+{chunk_ctx:<4d} {t_split:9.4f} {t_unified:10.4f}"
              f" {kv_bytes / t_split / 1e6:13.0f}")  # fmt: skip


def bench_prefill(dtype, configs, top: int) -> None:
    scale = D**-0.5
    print("\n== prefill (fresh causal prompts; median ms eager and of graph replays; TFLOP/s from the")
    print("   graph time = 4*Hq*D*visible (q, k) pairs / time; ranked by graph time)")
    print(f"{'shape':>8} {'config':>16} {'eager ms':>9} {'graph ms':>9} {'TFLOP/s':>8} {'% of 798':>8}")
    for batch, length in ((1, 1024), (8, 512), (1, 4096)):
        query, kv, tables, lens, qsl = make_case([length] * batch, [0] * batch, dtype, seed=length)
        flops = 4 * HQ * D * batch * length * (length + 1) / 2
        out = torch.empty_like(query)
        results = []
        for cfg in configs:
            run = functools.partial(
                paged_attention_prefill, query, kv, qsl, lens, tables, scale, length, out=out, **cfg
            )
            try:
                run()
            except Exception as exc:  # e.g. out of shared memory for a large config
                print(f"  skip {cfg}: {type(exc).__name__}")
                continue
            torch.cuda.synchronize()
            results.append((triton.testing.do_bench_cudagraph(run, return_mode="median"), cfg, run))
        results.sort(key=lambda r: r[0])
        ms_graph, cfg, run = results[0]
        ms = triton.testing.do_bench(run, return_mode="median")
        tflops = flops / ms_graph / 1e9
        pct = 100 * tflops * 1e12 / MATMUL_CEILING
        print(f"{batch:>3}x{length:<4} {_label(cfg):>16} {ms:9.4f} {ms_graph:9.4f} {tflops:8.1f} {pct:8.1f}")
        if top > 1:
            print("      next: " + ", ".join(f"{_label(c)} {flops / t / 1e9:.0f}TF" for t, c, _ in results[1:top]))


def _torch_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def bench_silu_mul(dtype, inter: int = 18944) -> None:
    print(f"\n== SiLU·mul, I={inter} (median us of CUDA-graph replays; GB/s of 3*I elements a row;"
          " % of the 3.0 TB/s copy ceiling)")  # fmt: skip
    print(f"{'T':>5} {'variant':>14} {'us':>9} {'GB/s':>7} {'%':>5}  rel err vs fp32, max |diff| vs torch")
    for num_tokens in (1, 139, 8192):
        x = torch.randn(num_tokens, 2 * inter, device="cuda", dtype=dtype)
        gate, up = x[:, :inter], x[:, inter:]
        ref32 = F.silu(gate.float()) * up.float()
        torch_out = _torch_silu_mul(gate, up)
        nbytes = 3 * num_tokens * inter * x.element_size()
        default = choose_block(num_tokens, inter)
        variants = [("torch", functools.partial(_torch_silu_mul, gate, up))]
        for block in (default, *(b for b in (128, 256, 512, 1024, 2048, 4096) if b != default)):
            out = torch.full((num_tokens, inter), float("nan"), device="cuda", dtype=dtype)
            name = f"block {block}" + (" *" if block == default else "")
            variants.append((name, functools.partial(silu_and_mul, x, out=out, block=block)))
        for name, run in variants:
            got = run()  # silu_and_mul returns its `out`
            torch.cuda.synchronize()
            us = triton.testing.do_bench_cudagraph(run, return_mode="median") * 1e3
            gbs = nbytes / us / 1e3
            err32 = rel_err(got, ref32)  # also asserts no NaN left from the poisoned `out`
            err_torch = (got.float() - torch_out.float()).abs().max().item()
            print(f"{num_tokens:5d} {name:>14} {us:9.2f} {gbs:7.0f} {gbs / 30:5.1f}  {err32:.2e}, {err_torch:.2e}")
        del x, gate, up, ref32, torch_out, variants


def _sample_requests(num_rows: int, params=None) -> list:
    """num_rows requests at output position 7 with `params` (default: temperature 1.0)."""
    from pagedserve.core.outputs import ScheduledRequest
    from pagedserve.sampling_params import SamplingParams

    params = params or SamplingParams(temperature=1.0)
    return [ScheduledRequest(request_id=str(i), token_ids=[0], num_computed_tokens=0, block_ids=[0],
                             needs_sample=True, sampling_params=params, prompt_token_ids=[0],
                             output_token_ids=[], output_index=7) for i in range(num_rows)]  # fmt: skip


def _torch_race(logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """The torch path's device work for unfiltered rows (sampler._sample_filtered without its host
    lists): fp32 copy, /T and softmax, q ~ Exp(1), p / q, argmax. Graph-capturable."""
    from pagedserve.executor.sampler import apply_sampling_filters

    num_rows = logits.shape[0]
    off = torch.zeros(num_rows, dtype=torch.long, device=logits.device)
    probs = apply_sampling_filters(logits.float(), temps, off, temps * 0 + 1, temps * 0,
                                   max_top_k=0, use_top_p=False, use_min_p=False)  # fmt: skip
    q = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(torch.float32).tiny)
    return probs.div_(q).argmax(dim=-1)


def _host_us(fn, reps: int = 50) -> float:
    """Median wall time of enqueueing one call (no sync inside; the device may still be busy)."""
    import time

    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return sorted(times)[reps // 2] * 1e6


def bench_sample(vocab: int = 152064) -> None:
    from pagedserve.executor.sampler import Sampler

    print(f"\n== random sampling, temperature 1.0, V={vocab} (median us; GB/s of reading the logits once;"
          " graph = CUDA-graph replay, bench = do_bench incl. host time, host = enqueue wall time)")  # fmt: skip
    print(f"{'dtype':>5} {'S':>4} {'variant':>30} {'us':>9} {'GB/s':>7} {'host us':>8}")
    for dtype, num_rows in itertools.product((torch.bfloat16, torch.float32), (1, 139, 256)):
        gen = torch.Generator(device="cuda").manual_seed(num_rows)
        logits = (torch.randn(num_rows, vocab, device="cuda", generator=gen) * 3).to(dtype)
        nbytes = logits.numel() * logits.element_size()
        reqs = _sample_requests(num_rows)
        temps = torch.ones(num_rows, device="cuda")
        seeds = torch.arange(num_rows, device="cuda") * 7919
        offsets = torch.full((num_rows,), 7, dtype=torch.long, device="cuda")
        out = torch.full((num_rows,), -1, dtype=torch.long, device="cuda")
        torch_sampler = Sampler(vocab, set(), use_fused_kernel=False)
        fused_sampler = Sampler(vocab, set(), use_fused_kernel=True)
        rows = []
        for name, sampler in (("torch Sampler.sample", torch_sampler), ("fused Sampler.sample", fused_sampler)):
            run = functools.partial(sampler.sample, logits, reqs)
            ids = run().token_ids
            assert ((ids >= 0) & (ids < vocab)).all()
            rows.append((name + " bench", triton.testing.do_bench(run, return_mode="median") * 1e3, _host_us(run)))
        race = functools.partial(_torch_race, logits, temps)
        race()
        rows.append(("torch race graph", triton.testing.do_bench_cudagraph(race, return_mode="median") * 1e3,
                     _host_us(race)))  # fmt: skip
        tile = sample_kernel.choose_tile(vocab)
        splits = sample_kernel.choose_num_splits(num_rows, vocab, tile)
        configs: list[tuple[int, int]] = []
        for t, n in [(tile, splits)] + [(t, n) for t in (512, 1024, 2048) for n in (splits // 2, splits * 2, 1)]:
            n = sample_kernel.split_layout(vocab, t, n)[0]  # the split count the launcher will use
            if (t, n) not in configs:
                configs.append((t, n))
        for t, n in configs:
            run = functools.partial(sample_kernel.sample_gumbel, logits, temps, seeds, offsets, out=out, tile=t,
                                    num_splits=n)  # fmt: skip
            out.fill_(-1)
            run()
            assert ((out >= 0) & (out < vocab)).all(), "unwritten ids"
            star = " *" if (t, n) == configs[0] else ""  # the default
            name = f"kernel tile {t} splits {n}{star}"
            rows.append((name + " graph", triton.testing.do_bench_cudagraph(run, return_mode="median") * 1e3,
                         _host_us(run)))  # fmt: skip
        for name, us, host in rows:
            print(f"{str(dtype).removeprefix('torch.'):>5} {num_rows:4d} {name:>30} {us:9.2f} {nbytes / us / 1e3:7.0f}"
                  f" {host:8.1f}")  # fmt: skip
        del logits


def _filtered_draw(logits, temps, top_k, top_p, min_p, seeds, offsets) -> torch.Tensor:
    from pagedserve.executor.kernels.sample_filter import filter_thresholds

    thresholds = filter_thresholds(logits, temps, top_k, top_p, min_p)
    return sample_kernel.sample_gumbel(logits, temps, seeds, offsets, thresholds=thresholds)


FILTER_CASES = (  # (label, SamplingParams kwargs): what chat clients send
    ("top_p 0.9", {"temperature": 0.7, "top_p": 0.9}),
    ("top_k 50", {"temperature": 0.7, "top_k": 50}),
    ("top_k 50 + top_p 0.95", {"temperature": 0.7, "top_k": 50, "top_p": 0.95}),
    ("min_p 0.05", {"temperature": 0.7, "min_p": 0.05}),
)


def bench_sample_filter(vocab: int = 152064) -> None:
    """Filtered random sampling (top-p / top-k / min-p), fp32 logits as the LM head gives them: the torch
    path (sort, softmax, cumsum, scatter) vs the threshold kernel + the fused sampler, whole
    Sampler.sample calls by do_bench (host time included), plus the device work alone by graph replay.
    Two kinds of rows: 'flat' (N(0, 1) logits: random weights, a nucleus of most of the vocabulary)
    and 'peaked' (N(0, 3): a trained model's, a nucleus of tens of tokens at T = 0.7). Each
    configuration's kept sets are checked against the torch filters first."""
    from pagedserve.executor.kernels.sample_filter import filter_thresholds
    from pagedserve.executor.sampler import Sampler, apply_sampling_filters
    from pagedserve.sampling_params import SamplingParams

    print(f"\n== filtered random sampling, V={vocab}, fp32 logits (median us; graph = CUDA-graph replay of the"
          " threshold + sampling kernels; bench = do_bench of Sampler.sample incl. host time)")  # fmt: skip
    print(f"{'rows':>6} {'S':>4} {'filter':>22} {'torch bench':>12} {'fused bench':>12} {'fused graph':>12} "
          f"{'thr graph':>10} {'kept':>8} {'mismatch':>8}")  # fmt: skip
    for kind, scale in (("flat", 1.0), ("peaked", 3.0)):
        for num_rows in (1, 64, 256):
            gen = torch.Generator(device="cuda").manual_seed(num_rows)
            logits = torch.randn(num_rows, vocab, device="cuda", generator=gen) * scale
            for label, kwargs in FILTER_CASES:
                params = SamplingParams(**kwargs)
                reqs = _sample_requests(num_rows, params)
                temps = torch.full((num_rows,), params.temperature, dtype=torch.float64, device="cuda")
                top_k = torch.full((num_rows,), params.top_k if 0 < params.top_k < vocab else 0, device="cuda")
                top_p = torch.full((num_rows,), params.top_p, dtype=torch.float64, device="cuda")
                min_p = torch.full((num_rows,), params.min_p, dtype=torch.float64, device="cuda")
                thr = filter_thresholds(logits, temps, top_k, top_p, min_p)
                kept = logits * (1.0 / temps.float())[:, None] >= thr[:, None]
                ref = apply_sampling_filters(logits, temps.float(), top_k, top_p.float(), min_p.float()) > 0
                mismatch = int((kept != ref).sum())
                seeds = torch.arange(num_rows, device="cuda") * 7919
                offsets = torch.full((num_rows,), 7, dtype=torch.long, device="cuda")

                thr_only = functools.partial(filter_thresholds, logits, temps, top_k, top_p, min_p)
                device_work = functools.partial(_filtered_draw, logits, temps, top_k, top_p, min_p, seeds, offsets)
                times = []
                for fused in (False, True):
                    sampler = Sampler(vocab, set(), use_fused_kernel=fused)
                    run = functools.partial(sampler.sample, logits, reqs)
                    run()
                    times.append(triton.testing.do_bench(run, return_mode="median") * 1e3)
                device_work()
                graph = triton.testing.do_bench_cudagraph(device_work, return_mode="median") * 1e3
                thr_us = triton.testing.do_bench_cudagraph(thr_only, return_mode="median") * 1e3
                print(f"{kind:>6} {num_rows:4d} {label:>22} {times[0]:12.1f} {times[1]:12.1f} {graph:12.1f} "
                      f"{thr_us:10.1f} {kept.sum(1).float().mean().item():8.0f} {mismatch:8d}")  # fmt: skip
    from pagedserve.executor.kernels import sample_filter as sf

    print(f"threshold kernel: {sf.WARPS} warp(s) a program, tile {sf.TILE}; registers a thread "
          f"{dict(sf.REGISTERS)}, programs an SM {dict(sf._RESIDENT)}")


def bench_decode_kv(dtype) -> None:
    """The default workload's decode steps (as bench_decode_work) on the work-list path the engine takes,
    with a 16-bit cache and the same values in an fp8 (e4m3) cache: tiles x warps x stages, graph replay
    time and GB/s of each cache's own K+V bytes (the fp8 cache reads half)."""
    import numpy as np

    from pagedserve.executor.kernels import paged_attention_decode as pad

    scale = D**-0.5
    sms = pad.num_sms(torch.device("cuda"))
    rng = np.random.default_rng(0)
    inputs, outputs = rng.integers(100, 1025, 256), rng.integers(100, 1025, 256)
    print("\n== decode, 16-bit vs fp8 KV cache, work list (graph replay us, GB/s of the cache's K+V bytes)")
    for batch in (256, 139, 64):
        step_ = next(s for s in range(2000) if (outputs > s).sum() <= batch)
        ctx = (inputs[outputs > step_] + step_).tolist()
        query, kv16, tables, lens, qsl = make_case([1] * len(ctx), [c - 1 for c in ctx], dtype, seed=batch)
        kv8 = kv16.clamp(-448, 448).to(torch.float8_e4m3fn)
        out = torch.empty_like(query)
        for name, kv in (("16-bit", kv16), ("fp8", kv8)):
            ref = reference(query, kv.to(dtype), tables, lens, qsl, scale)
            kv_bytes = 2 * sum(ctx) * HKV * D * kv.element_size()
            cells = []
            for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4), (2, 3)):
                work = torch.from_numpy(pad.decode_work_list(ctx, HKV, sms, block_n)).cuda()
                run = functools.partial(paged_attention_decode, query, kv, tables, lens, scale, out=out,
                                        max_seq_len=max(ctx), block_n=block_n, num_warps=warps,
                                        num_stages=stages, work=work)  # fmt: skip
                out.fill_(float("nan"))
                try:
                    run()
                except Exception as exc:  # e.g. shared memory over the limit at a large tile
                    cells.append((float("inf"), f"n{block_n} w{warps} s{stages} failed: {type(exc).__name__}"))
                    continue
                assert rel_err(out, ref) < 1e-2, (name, block_n, warps, stages)
                ms = triton.testing.do_bench_cudagraph(run, return_mode="median")
                cells.append((ms, f"n{block_n} w{warps} s{stages} {ms * 1e3:.1f} us {kv_bytes / ms / 1e6:.0f}"))
            cells.sort()
            print(f"batch {len(ctx)} (ctx {min(ctx)}-{max(ctx)}) {name} ({kv_bytes / 1e6:.0f} MB): "
                  + " | ".join(c for _, c in cells[:5]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--tune", choices=("decode", "splits", "decode-mix", "decode-work", "decode-kv", "prefill",
                                           "silu", "sample", "sample-filter"),
                        help="sweep one kernel's configs (or decode num_splits), print the best")  # fmt: skip
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"Hq={HQ} Hkv={HKV} D={D} block={BS} {args.dtype}")  # fmt: skip
    if args.tune == "silu":
        bench_silu_mul(dtype)
        return
    if args.tune == "sample":
        bench_sample()
        return
    if args.tune == "sample-filter":
        bench_sample_filter()
        return
    if args.tune == "decode-work":
        bench_decode_work(dtype)
        return
    if args.tune == "decode-kv":
        bench_decode_kv(dtype)
        return
    if args.tune == "decode-mix":
        bench_decode_mix(dtype)
        return
    check_correctness(dtype)
    top = 1
    decode_cfgs, prefill_cfgs = [{}], [{}]
    if args.tune == "decode":
        top = 6
        space = itertools.product((32, 64, 128), (1, 2, 4, 8), (2, 3, 4))
        decode_cfgs = [dict(block_n=n, num_warps=w, num_stages=s) for n, w, s in space]
    elif args.tune == "splits":
        top = 6
        decode_cfgs = [{}] + [dict(num_splits=s) for s in (1, 2, 4, 8, 16, 32, 64)]
    elif args.tune == "prefill":
        top = 6
        space = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
        prefill_cfgs = [dict(block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in space]
    if args.tune in (None, "decode", "splits"):
        bench_decode(dtype, decode_cfgs, top)
    if args.tune is None:
        bench_mixed(dtype)
    if args.tune in (None, "prefill"):
        bench_prefill(dtype, prefill_cfgs, top)


if __name__ == "__main__":
    main()
