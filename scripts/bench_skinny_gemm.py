"""GPU benchmark of the Triton skinny GEMM (pagedserve/executor/kernels/skinny_gemm.py) vs cuBLAS.

    python scripts/bench_skinny_gemm.py [--model 7b|0.5b] [--shapes qkv,o,...] [--m 1,2,4,8] [--quick]
    python scripts/bench_skinny_gemm.py --m 16,64,128,256 --shapes qkv,o,gate_up,down   # decode batches

For each projection of the model (K -> N) and M tokens: median time per call over CUDA-graph
replays (triton.testing.do_bench_cudagraph) of F.linear (cuBLAS) and of skinny_linear over a sweep
of configs. Every graph calls the op on several copies of the weight in turn, enough copies to
total >= 256 MB (five times the H100's 50 MB L2), so, as in real decode where each layer's weights
come once per step, no call finds its weight in L2. GB/s = bytes read (W + x + bias) / time.

Sweep, M <= 8: the heuristic default, a few tile shapes of each inner product (fma only at M <= 2)
with the heuristic split count, then split counts for the best tile. M > 8 (up to 256; tensor cores
only): the heuristic default and LARGE_M_TILES, (block_m, block_n, block_k, warps, stages) tiles for
Hopper's wgmma (64 rows of W per warpgroup of 4 warps; block_m clamped to M's next power of 2), each
with the heuristic split count, then split counts for the best. Every config's output is checked
against x.float() @ W.float().T (+ bias) (max |err| / max |ref|; a config above 2e-2 is dropped).
Ends with per-shape lines "best triton X us (Y GB/s) vs cuBLAS Z us", a whole-layer sequence
(qkv, o, gate_up, down at each M, two layers' weights rotated) both ways, and a SKINNY_CONFIGS dict
to paste into skinny_gemm.py (keys (N, K, m_bucket); M=139 runs on the 256 entry). The first run
compiles ~100 Triton variants (M is not specialized: one variant per config serves every M); the
Triton cache makes later runs faster. `--m 16,64,128,256 --shapes qkv,o,gate_up,down` is meant to
fit one 10-minute GPU call (~4 min on an H100 with a cold cache, by estimate); --quick cuts it to the
default + 3 tiles per case and no split sweep.

--fp8: the weights quantized to float8_e4m3fn with a scale per row (executor/quantization.py), the skinny
GEMM reading them (skinny_linear's weight_scale) against cuBLAS on the bf16 weights, and torch._scaled_mm
after the per-token quantization kernel (the W8A8 path); the reference is x @ the dequantized weight, and
the dict printed is SKINNY_FP8_CONFIGS.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton

from pagedserve.executor.kernels.skinny_gemm import (
    FMA_MAX_M,
    MAX_M,
    SkinnyConfig,
    choose_config,
    choose_fp8_config,
    default_config,
    default_split_k,
    effective_split_k,
    fit_block_k,
    m_bucket,
    skinny_linear,
)
from pagedserve.executor.quantization import dequantize_rows_fp8, quantize_rows_fp8

MODELS = {  # name: (K, N, has_bias)
    "7b": {  # Qwen2-7B
        "qkv": (3584, 4608, True),
        "o": (3584, 3584, False),
        "gate_up": (3584, 37888, False),
        "down": (18944, 3584, False),
        "lm_head": (3584, 152064, False),
    },
    "0.5b": {  # Qwen2.5-0.5B: hidden 896, 14 heads / 2 KV heads of 64, intermediate 4864
        "qkv": (896, 1152, True),
        "o": (896, 896, False),
        "gate_up": (896, 9728, False),
        "down": (4864, 896, False),
        "lm_head": (896, 151936, False),
    },
}
DEVICE = torch.device("cuda")
ROTATE_BYTES = 256 << 20
MAX_ERR = 2e-2
FMA_TILES = [(4, 256, 4, 3), (4, 512, 4, 2), (8, 256, 4, 3), (16, 256, 4, 3), (16, 512, 8, 2),  # n, k, warps, stages
             # fewer rows a program (more programs: an even spread over the SMs for N = 3584), longer K steps
             (2, 512, 4, 3), (2, 1024, 4, 2), (4, 1024, 4, 2), (1, 1024, 4, 3), (8, 512, 8, 2)]
DOT_TILES = [(16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 8, 3)]
# M > 8, (block_m, block_n, block_k, warps, stages): block_n = 64 W rows per warpgroup of 4 warps (wgmma);
# shared memory (block_n + block_m) * block_k * 2 B * stages <= 196 KB. block_m is clamped to M's bucket.
LARGE_M_TILES = [
    (16, 64, 128, 4, 4),
    (32, 64, 128, 4, 4),
    (32, 128, 128, 8, 3),
    (64, 64, 64, 4, 4),
    (64, 64, 128, 4, 3),
    (64, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 3),
    (256, 64, 64, 8, 3),
    (256, 128, 64, 8, 3),
]
# --tma: the same dot path with both operands fetched by TMA (bulk tensor copies into shared memory),
# (block_m, block_n, block_k, warps, stages); shared memory (block_n + block_m) * block_k * 2 B * stages.
LARGE_M_TMA_TILES = [
    (32, 64, 128, 4, 6),
    (32, 128, 128, 4, 4),
    (64, 64, 128, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 128, 128, 4, 4),
    (128, 64, 128, 4, 3),
    (128, 128, 64, 8, 4),
    (256, 64, 64, 4, 4),
    (256, 128, 64, 8, 3),
]
# --tma at M in 129..255: two token tiles a program, 128 + tail rows (tail = M - 128 rounded up to a power of 2,
# >= 16), so M = 144 costs the tensor cores 144 rows, not 256. (block_n, block_k, warps, stages); shared memory
# (block_n + 128 + tail) * block_k * 2 B * stages.
TAIL_TMA_TILES = [
    (64, 64, 4, 4),
    (64, 64, 4, 6),
    (64, 128, 4, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 128, 8, 3),
    # 256 W rows a program: x (re-read from L2 by every n-tile) read half as often; 206-210 registers, one a SM.
    # Session 16 (H200, M = 144): slower than the 128-row tiles (down 55.6 vs 53.5 us; cuBLAS 46.3)
    (256, 64, 8, 3),
    (256, 32, 8, 4),
]
# --fp8, M <= 2: W rows of one byte an element, so longer K steps for the same bytes a lane
FP8_FMA_TILES = [(1, 1024, 4, 3), (2, 1024, 4, 3), (4, 1024, 4, 2), (2, 2048, 4, 2), (4, 2048, 8, 2), (8, 1024, 8, 2),
                 (4, 512, 4, 3), (8, 512, 4, 3)]
# --fp8, M >= 2: fp8 x (per-token quantization, timed with the GEMM) times fp8 W on the dot path (W8A8),
# (block_m, block_n, block_k, warps, stages); one-byte tiles, so longer K steps; block_m clamped to M's bucket
W8A8_TILES = [(16, 64, 256, 4, 4), (16, 128, 128, 8, 4), (32, 64, 256, 4, 4), (32, 128, 128, 8, 4),
              (64, 64, 256, 4, 3), (64, 128, 128, 8, 4), (128, 64, 128, 4, 4), (128, 128, 128, 8, 3),
              (256, 64, 128, 8, 3), (256, 128, 64, 8, 4)]
SPLITS = (1, 2, 3, 4, 5, 6, 8, 12)
FP8 = False  # --fp8
CUBLAS_ONLY = False  # --cublas-only: time F.linear at each M, no Triton sweep
TAIL_ONLY = False  # --tail-only: with --tma at 128 < M < 256, only the two-tile (128 + tail) configs
LT_TOO = False  # --lt: also time F.linear with torch.backends.cuda.preferred_blas_library("cublaslt")
CUBLAS_TIMES: dict[tuple[int, int, int], float] = {}  # (M, N, K) -> us, --cublas-only


def label(cfg: SkinnyConfig, k: int) -> str:
    split = effective_split_k(k, cfg.block_k, cfg.split_k)
    tail = f"+{cfg.block_m_tail}" if cfg.block_m_tail else ""
    kind = (f"tma m{cfg.block_m}{tail}" if cfg.use_tma else f"dot m{cfg.block_m}") if cfg.use_dot else "fma"
    return f"{kind} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} S{split}"


def candidates(m: int, n: int, k: int, num_sms: int, quick: bool, tma: bool = False) -> list[SkinnyConfig]:
    if m > FMA_MAX_M:
        return large_m_candidates(m, n, k, num_sms, quick, tma)
    configs = [default_config(m, n, k, torch.float8_e4m3fn if FP8 else torch.bfloat16, num_sms)]
    fma_tiles = FP8_FMA_TILES if FP8 else FMA_TILES
    tiles = [(t, True) for t in DOT_TILES] + ([(t, False) for t in fma_tiles] if m <= 2 else [])
    if quick:
        tiles = tiles[:2] + ([(fma_tiles[2], False)] if m <= 2 else [])
    for (block_n, block_k, warps, stages), use_dot in tiles:
        block_k = fit_block_k(k, block_k)
        split = default_split_k(n, k, block_n, block_k, num_sms)
        configs.append(SkinnyConfig(block_n, block_k, warps, stages, split, use_dot))
    return list(dict.fromkeys(configs))


def large_m_candidates(m: int, n: int, k: int, num_sms: int, quick: bool, tma: bool = False) -> list[SkinnyConfig]:
    """The heuristic default, then LARGE_M_TILES (or LARGE_M_TMA_TILES with tma; block_m clamped to
    m_bucket(M)) with the heuristic split."""
    bucket = max(16, m_bucket(m))
    table = LARGE_M_TMA_TILES if tma else LARGE_M_TILES
    tiles = list(dict.fromkeys((min(bm, bucket), bn, bk, w, st) for bm, bn, bk, w, st in table))
    if quick:  # the tiles with the largest block_m M uses
        tiles = [t for t in tiles if t[0] == bucket][:3] or tiles[-3:]
    configs = [default_config(m, n, k, torch.bfloat16, num_sms)]
    if TAIL_ONLY and tma and 128 < m < 256:
        tiles = []  # --tail-only: the two-tile configs alone (session 6 timed the others at these M)
    for block_m, block_n, block_k, warps, stages in tiles:
        block_k = fit_block_k(k, block_k)
        split = default_split_k(n, k, block_n, block_k, num_sms, m=m, block_m=block_m)
        configs.append(SkinnyConfig(block_n, block_k, warps, stages, split, True, block_m, tma))
    if tma and 128 < m < 256:
        tail = max(16, m_bucket(m - 128))
        for block_n, block_k, warps, stages in TAIL_TMA_TILES[-3:] if quick else TAIL_TMA_TILES:
            block_k = fit_block_k(k, block_k)
            split = default_split_k(n, k, block_n, block_k, num_sms, m=m, block_m=128 + tail)
            configs.append(SkinnyConfig(block_n, block_k, warps, stages, split, True, 128, True, tail))
    return list(dict.fromkeys(configs))


def time_us(op, num_copies: int, rep: int) -> float:
    """Median microseconds per op(i) call, op called on copies 0..num_copies-1 in turn in one graph."""

    def run():
        for i in range(num_copies):
            op(i)

    return triton.testing.do_bench_cudagraph(run, rep=rep, return_mode="median") * 1e3 / num_copies


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return math.inf
    return ((out.float() - ref).abs().max() / ref.abs().max()).item()


def bench_shape(name, k, n, has_bias, m_values, num_sms, rep, quick, results, tma=False) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(n + k)
    w0 = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16, generator=gen) * 0.02
    num_copies = max(1, math.ceil(ROTATE_BYTES / w0.nbytes))
    weights = [w0] + [w0.clone() for _ in range(num_copies - 1)]  # same values, other addresses
    bias = torch.randn(n, device=DEVICE, dtype=torch.bfloat16, generator=gen) * 0.02 if has_bias else None
    w_f32 = w0.float()
    fp8 = None
    if FP8:  # (fp8 copies rotated past L2 as well, their row scales, the bf16 weights for cuBLAS)
        q, scale = quantize_rows_fp8(w0)
        fp8 = ([q] + [q.clone() for _ in range(max(1, math.ceil(ROTATE_BYTES / q.nbytes)) - 1)], scale)
        w_f32 = dequantize_rows_fp8(q, scale, torch.float32)
    for m in m_values:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        ref = x.float() @ w_f32.T + (bias.float() if has_bias else 0.0)
        print(f"\n{name}  K={k} N={n}{' +bias' if has_bias else ''}  M={m}  "
              f"({w0.nbytes / 1e6:.1f} MB weight x {num_copies} copies)", flush=True)  # fmt: skip
        result = bench_case(x, weights, bias, ref, num_sms, rep, quick, tma, fp8)
        if result is not None:
            results[(name, m)] = result


def bench_case(x, weights, bias, ref, num_sms, rep, quick, tma=False, fp8=None) -> dict | None:
    """cuBLAS, then the sweep, for one x [M, K]; returns the best config and its time (None if none ran).
    fp8 = (fp8 weight copies, row scales): the sweep reads those (cuBLAS stays on the bf16 weights)."""
    (m, k), n, num_copies = x.shape, weights[0].shape[0], len(weights)
    read_bytes = 2 * (weights[0].numel() + x.numel() + (n if bias is not None else 0))
    err = max_rel_err(F.linear(x, weights[0], bias), ref)
    cublas_us = time_us(lambda i: F.linear(x, weights[i], bias), num_copies, rep)
    print(f"  {'cuBLAS F.linear (bf16 W)':32} {cublas_us:8.2f} us {read_bytes / cublas_us / 1e3:6.0f} GB/s  "
          f"err {err:.1e}")  # fmt: skip
    scale, mm_us = None, math.nan
    if fp8 is not None:
        from pagedserve.executor.kernels.fp8_quant import per_token_quant_fp8

        weights, scale = fp8
        num_copies = len(weights)
        read_bytes -= weights[0].numel()  # one byte an element

        def scaled_mm(i):
            xq, xs = per_token_quant_fp8(x)
            return torch._scaled_mm(xq, weights[i].t(), scale_a=xs, scale_b=scale.view(1, -1), bias=bias,
                                    out_dtype=x.dtype)

        mm_err = max_rel_err(scaled_mm(0), ref)
        mm_us = time_us(scaled_mm, num_copies, rep)
        print(f"  {'quant + _scaled_mm (fp8 W8A8)':32} {mm_us:8.2f} us {read_bytes / mm_us / 1e3:6.0f} GB/s  "
              f"err {mm_err:.1e}  x{cublas_us / mm_us:.2f} vs cuBLAS")  # fmt: skip
    if LT_TOO:  # the same call with torch's cuBLASLt preference (another heuristic, other kernels)
        before = torch.backends.cuda.preferred_blas_library()
        try:
            torch.backends.cuda.preferred_blas_library("cublaslt")
            lt_err = max_rel_err(F.linear(x, weights[0], bias), ref)
            lt_us = time_us(lambda i: F.linear(x, weights[i], bias), num_copies, rep)
        finally:
            torch.backends.cuda.preferred_blas_library(before)
        print(f"  {'cuBLASLt F.linear':32} {lt_us:8.2f} us {read_bytes / lt_us / 1e3:6.0f} GB/s  err {lt_err:.1e}"
              f"  x{cublas_us / lt_us:.2f} vs cuBLAS")  # fmt: skip
    if CUBLAS_ONLY:
        CUBLAS_TIMES[(m, n, k)] = cublas_us
        return None
    out = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)
    timed: dict[SkinnyConfig, float] = {}

    def try_config(cfg: SkinnyConfig) -> None:
        if cfg in timed:
            return
        try:
            out.fill_(float("nan"))
            skinny_linear(x, weights[0], bias, out=out, config=cfg, weight_scale=scale)
            err = max_rel_err(out, ref)
            if err > MAX_ERR:
                print(f"  {label(cfg, k):32} WRONG: err {err:.1e}")
                return
            us = time_us(lambda i: skinny_linear(x, weights[i], bias, out=out, config=cfg, weight_scale=scale),
                         num_copies, rep)
        except Exception as exc:  # e.g. out of shared memory for a large tile: skip that config
            print(f"  {label(cfg, k):32} skipped: {type(exc).__name__}: {str(exc)[:80]}")
            return
        timed[cfg] = us
        print(f"  {label(cfg, k):32} {us:8.2f} us {read_bytes / us / 1e3:6.0f} GB/s  err {err:.1e}"
              f"  x{cublas_us / us:.2f} vs cuBLAS", flush=True)  # fmt: skip

    configs = candidates(m, n, k, num_sms, quick, tma)
    print(f"  (heuristic default: {label(configs[0], k)})")
    committed = choose_config(m, n, k, x.dtype, x.device) if scale is None else configs[0]
    if committed != configs[0]:  # the SKINNY_CONFIGS entry the model would run
        print(f"  (SKINNY_CONFIGS entry: {label(committed, k)})")
        try_config(committed)
    for cfg in configs:
        try_config(cfg)
    if not timed:
        return None
    if not quick:  # split counts for the best tile
        best = min(timed, key=timed.get)
        same_tile = [c for c in timed if replace(c, split_k=1) == replace(best, split_k=1)]
        seen = {effective_split_k(k, c.block_k, c.split_k) for c in same_tile}
        for split in SPLITS:
            if effective_split_k(k, best.block_k, split) not in seen:
                seen.add(effective_split_k(k, best.block_k, split))
                try_config(replace(best, split_k=split))
    best = min(timed, key=timed.get)
    w8a8 = bench_w8a8(x, weights, scale, bias, ref, num_sms, rep, quick, cublas_us) if fp8 is not None else None
    return dict(k=k, n=n, bytes=read_bytes, cublas=cublas_us, us=timed[best], cfg=best,
                default_us=timed.get(configs[0], math.nan), mm=mm_us, w8a8=w8a8)  # fmt: skip


def bench_w8a8(x, weights, scale, bias, ref, num_sms, rep, quick, cublas_us) -> tuple[SkinnyConfig, float] | None:
    """--fp8: x quantized per token in the timed op, then the skinny GEMM's fp8 x fp8 dot; (best config, us)."""
    from pagedserve.executor.kernels.fp8_quant import per_token_quant_fp8

    (m, k), n = x.shape, weights[0].shape[0]
    out = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)
    bucket = max(16, m_bucket(m))
    tiles = list(dict.fromkeys((min(bm, bucket), bn, bk, w, st) for bm, bn, bk, w, st in W8A8_TILES))
    if quick:
        tiles = [t for t in tiles if t[0] == bucket][:3] or tiles[-3:]
    configs = [choose_fp8_config(m, n, k, x.device, w8a8=True)]
    for block_m, block_n, block_k, warps, stages in tiles:
        block_k = fit_block_k(k, block_k)
        split = default_split_k(n, k, block_n, block_k, num_sms, m=m, block_m=block_m)
        configs.append(SkinnyConfig(block_n, block_k, warps, stages, split, True, block_m))
    timed = {}

    def op(i, cfg):
        xq, xs = per_token_quant_fp8(x)
        skinny_linear(xq, weights[i], bias, out=out, config=cfg, out_dtype=out.dtype, weight_scale=scale, x_scale=xs)

    def try_config(cfg):
        if cfg in timed:
            return
        try:
            out.fill_(float("nan"))
            op(0, cfg)
            err = max_rel_err(out, ref)
            if err > 5e-2:  # the activations' own fp8 rounding on top
                print(f"  {'w8a8 ' + label(cfg, k):32} WRONG: err {err:.1e}")
                return
            us = time_us(lambda i: op(i, cfg), len(weights), rep)
        except Exception as exc:
            print(f"  {'w8a8 ' + label(cfg, k):32} skipped: {type(exc).__name__}: {str(exc)[:80]}")
            return
        timed[cfg] = us
        print(f"  {'w8a8 ' + label(cfg, k):32} {us:8.2f} us  err {err:.1e}  x{cublas_us / us:.2f} vs cuBLAS",
              flush=True)

    for cfg in dict.fromkeys(configs):
        try_config(cfg)
    if timed and not quick:
        best = min(timed, key=timed.get)
        for split in (1, 2, 4, 8):
            try_config(replace(best, split_k=split))
    if not timed:
        return None
    best = min(timed, key=timed.get)
    return best, timed[best]


def bench_layer(shapes, results, m, rep) -> None:
    """qkv, o, gate_up, down of one layer at M tokens, two layers' weights in turn (each > L2)."""
    names = ("qkv", "o", "gate_up", "down")
    if not all(name in shapes for name in names):
        return
    layers = []
    for _ in range(2):
        layer = []
        for name in names:
            k, n, has_bias = shapes[name]
            w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
            b = torch.randn(n, device=DEVICE, dtype=torch.bfloat16) * 0.02 if has_bias else None
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)
            cfg = (results[(name, m)]["cfg"] if (name, m) in results
                   else choose_fp8_config(m, n, k, w.device) if FP8 else choose_config(m, n, k, w.dtype, w.device))
            q, scale = quantize_rows_fp8(w) if FP8 else (w, None)
            layer.append((x, w, b, out, cfg, q, scale))
        layers.append(layer)
    layer_bytes = sum(2 * (w.numel() + x.numel() + (b.numel() if b is not None else 0)) for x, w, b, *_ in layers[0])
    cublas = time_us(lambda i: [F.linear(x, w, b) for x, w, b, *_ in layers[i]], len(layers), rep)
    skinny = time_us(lambda i: [skinny_linear(x, q, b, out=o, config=c, weight_scale=s)
                                for x, _, b, o, c, q, s in layers[i]], len(layers), rep)
    if FP8:
        print(f"\n== whole layer, fp8 weights through the skinny GEMM, M={m}: {skinny:.1f} us against cuBLAS bf16 "
              f"{cublas:.1f} us (x{cublas / skinny:.2f}); bf16 bytes {layer_bytes / 1e6:.0f} MB")  # fmt: skip
        return
    print(f"\n== whole layer (qkv, o, gate_up, down), M={m}, {layer_bytes / 1e6:.0f} MB per layer:")
    print(f"   cuBLAS {cublas:.1f} us ({layer_bytes / cublas / 1e3:.0f} GB/s)  vs  "
          f"triton {skinny:.1f} us ({layer_bytes / skinny / 1e3:.0f} GB/s)  x{cublas / skinny:.3f}")  # fmt: skip
    configs = ", ".join(f"{name} {label(c, x.shape[1])}" for name, (x, _, _, _, c) in zip(names, layers[0]))
    print(f"   triton configs: {configs}")


def bench_ceilings(rep) -> None:
    src = torch.empty(1 << 29, device=DEVICE, dtype=torch.bfloat16).normal_()  # 1 GiB
    dst = torch.empty_like(src)
    read_us = time_us(lambda i: torch.sum(src, dtype=torch.float32), 1, rep)
    copy_us = time_us(lambda i: dst.copy_(src), 1, rep)
    print(f"ceilings: torch.sum over 1 GiB bf16 (read) {src.nbytes / read_us / 1e3:.0f} GB/s; "
          f"copy 1 GiB (read+write) {2 * src.nbytes / copy_us / 1e3:.0f} GB/s")  # fmt: skip


def print_summary(results) -> None:
    print("\n== summary (median us per call of CUDA-graph replays, weights rotated past L2)")
    for (name, m), r in results.items():
        gbs, gbs_cublas = r["bytes"] / r["us"] / 1e3, r["bytes"] / r["cublas"] / 1e3
        print(f"{name:8} M={m}: best triton {r['us']:.2f} us ({gbs:.0f} GB/s) vs cuBLAS {r['cublas']:.2f} us "
              f"({gbs_cublas:.0f} GB/s)  x{r['cublas'] / r['us']:.2f}  [{label(r['cfg'], r['k'])}]"
              + (f"  _scaled_mm {r['mm']:.2f} us" if FP8 else "")
              + (f"  w8a8 {r['w8a8'][1]:.2f} us [{label(r['w8a8'][0], r['k'])}]" if r.get("w8a8") else ""))  # fmt: skip
    print("\n# Paste into skinny_gemm.py (keys (N, K, m_bucket); split_k as launched; block_m for dot configs):")
    print(f"{'SKINNY_FP8_CONFIGS' if FP8 else 'SKINNY_CONFIGS'}: dict[tuple[int, ...], dict[str, int | bool]] = {{")
    printed: dict[tuple[int, int, int], int] = {}  # key -> the M it was printed for
    for (name, m), r in results.items():
        key = (r["n"], r["k"], m_bucket(m))
        comment = "# " if key in printed else ""  # a second M of the same bucket: commented out
        printed.setdefault(key, m)
        c = r["cfg"]
        split = effective_split_k(r["k"], c.block_k, c.split_k)
        slower = "  SLOWER than cuBLAS" if r["us"] > r["cublas"] else ""
        slower += f"  (bucket {key[2]} already printed for M={printed[key]})" if comment else ""
        print(
            f"    # {name} M={m}: {r['us']:.1f} us vs cuBLAS {r['cublas']:.1f} us, "
            f"heuristic {r['default_us']:.1f} us{slower}"
        )
        block_m = f", block_m={c.block_m}" if c.use_dot else ""
        block_m += ", use_tma=True" if c.use_tma else ""
        block_m += f", block_m_tail={c.block_m_tail}" if c.block_m_tail else ""
        print(
            f"    {comment}{key}: dict(block_n={c.block_n}, block_k={c.block_k}, "
            f"num_warps={c.num_warps}, num_stages={c.num_stages}, split_k={split}, use_dot={c.use_dot}{block_m}),"
        )
    print("}")
    if FP8:
        print_fp8_tables(results)


def print_fp8_tables(results) -> None:
    """The fastest fp8 way per (shape, M bucket), FP8_LINEAR_MODES, and the W8A8 configs, to paste."""
    modes, w8a8 = {}, {}
    for (name, m), r in results.items():
        key = (r["n"], r["k"], m_bucket(m))
        times = {"w8a16": r["us"], "scaled_mm": r["mm"]}
        if r.get("w8a8"):
            times["w8a8"] = r["w8a8"][1]
            c = r["w8a8"][0]
            w8a8[key] = (f"dict(block_n={c.block_n}, block_k={c.block_k}, num_warps={c.num_warps}, "
                         f"num_stages={c.num_stages}, split_k={effective_split_k(r['k'], c.block_k, c.split_k)}, "
                         f"use_dot=True, block_m={c.block_m}),  # {name} M={m}: {r['w8a8'][1]:.1f} us")
        best = min(times, key=times.get)
        modes[key] = f'"{best}",  # {name} M={m}: ' + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + \
            f" us; cuBLAS bf16 {r['cublas']:.1f}"
    print("FP8_LINEAR_MODES: dict[tuple[int, int, int], str] = {")
    for key, line in modes.items():
        print(f"    {key}: {line}")
    print("}")
    print("SKINNY_W8A8_CONFIGS: dict[tuple[int, ...], dict[str, int | bool]] = {")
    for key, line in w8a8.items():
        print(f"    {key}: {line}")
    print("}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(MODELS), default="7b")
    parser.add_argument("--shapes", help="comma-separated subset of qkv,o,gate_up,down,lm_head")
    parser.add_argument("--m", default="1,2,4,8", help=f"comma-separated token counts (1..{MAX_M})")
    parser.add_argument("--quick", action="store_true", help="default + 3 configs per case, no split sweep")
    parser.add_argument("--cublas-only", action="store_true", help="time cuBLAS alone at each M (e.g. a ladder)")
    parser.add_argument("--tma", action="store_true", help="M > 8: sweep the TMA tiles (LARGE_M_TMA_TILES)")
    parser.add_argument("--tail-only", action="store_true", help="--tma at 128 < M < 256: only the 128 + tail tiles")
    parser.add_argument("--lt", action="store_true", help="also time F.linear under torch's cuBLASLt preference")
    parser.add_argument("--fp8", action="store_true", help="fp8 weights with row scales (SKINNY_FP8_CONFIGS)")
    parser.add_argument("--rep", type=int, default=10, help="ms of kernels per CUDA graph (triton do_bench_cudagraph)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_skinny_gemm needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    shapes = MODELS[args.model]
    names = args.shapes.split(",") if args.shapes else list(shapes)
    m_values = [int(v) for v in args.m.split(",")]
    if not all(1 <= m <= MAX_M for m in m_values):
        parser.error(f"--m values must be in 1..{MAX_M}, got {args.m}")
    global CUBLAS_ONLY, LT_TOO, TAIL_ONLY, FP8
    CUBLAS_ONLY, LT_TOO, TAIL_ONLY, FP8 = args.cublas_only, args.lt, args.tail_only, args.fp8
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} ({num_sms} SMs)  torch {torch.__version__}  triton {triton.__version__}"
          f"  model {args.model}  {'fp8 weights' if args.fp8 else 'bf16'}")  # fmt: skip
    start = time.perf_counter()
    bench_ceilings(args.rep)
    results: dict = {}
    for name in names:
        k, n, has_bias = shapes[name]
        bench_shape(name, k, n, has_bias, m_values, num_sms, args.rep, args.quick, results, args.tma)
        torch.cuda.empty_cache()
    if args.cublas_only:
        print("\n== cuBLAS per M (us; the layer's sum and us per token row)")
        print(f"{'M':>5} " + " ".join(f"{n:>9}" for n in names) + f" {'sum':>9} {'sum/M':>7}")
        for m in m_values:
            row = [CUBLAS_TIMES.get((m, shapes[n][1], shapes[n][0]), math.nan) for n in names]
            print(f"{m:5d} " + " ".join(f"{t:9.2f}" for t in row) + f" {sum(row):9.2f} {sum(row) / m:7.3f}")
    for m in m_values if not args.cublas_only else ():
        bench_layer({n: shapes[n] for n in names}, results, m, args.rep)
    print_summary(results)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
