"""The MoE experts of one layer at the Qwen3-30B-A3B shapes (128 experts of 768 columns, hidden 2048, top 8) on the
GPU: the Triton grouped GEMMs (kernels/fused_moe.py, routing alignment included) timed inside a CUDA graph of
LAYERS calls, against the torch loop over experts (models/moe.py's experts_torch, eager, with its host sync), for T
tokens routed uniformly at random. Prints us a layer, the bytes of the experts the step reads over that time (GB/s),
and the products' TFLOP/s; checks the kernels against the torch loop (bf16, relative error).

    python scripts/moe_kernel_bench.py [--tokens 1,8,64,256,1024,8192] [--output-json F]
    python scripts/moe_kernel_bench.py --sweep --tokens 1,64,1024    # launch plans (BM, BN, BK, warps)
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from pagedserve.executor.kernels import fused_moe
from pagedserve.executor.models.moe import experts_torch, route

LAYERS = 8


def graph_time_us(fn, iters: int = 5) -> float:
    fn()  # compile
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(LAYERS):
                fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAYERS)
    return sorted(times)[len(times) // 2]


def eager_time_us(fn, iters: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,8,64,256,1024,8192")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--output-json")
    args = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    e, k, h, i = args.experts, args.top_k, args.hidden, args.inter
    w13 = torch.randn(e, 2 * i, h, device=dev, dtype=dt) / h**0.5
    w2 = torch.randn(e, h, i, device=dev, dtype=dt) / i**0.5
    expert_bytes = 3 * h * i * 2
    results = []
    for t in [int(v) for v in args.tokens.split(",")]:
        x = torch.randn(t, h, device=dev, dtype=dt)
        weights, ids = route(torch.randn(t, e, device=dev), k, True)
        read = int(torch.unique(ids).numel())
        ref = experts_torch(x, w13, w2, ids, weights).float()
        out = fused_moe.fused_experts(x, w13, w2, ids, weights).float()
        err = float((out - ref).abs().max() / ref.abs().max())
        flops = 2 * t * k * 3 * h * i
        plans = [None]
        if args.sweep:
            plans += list(itertools.product((16, 32, 64, 128), (64, 128, 256), (64, 128), (4, 8)))
        for plan in plans:
            try:
                args_ = (x, w13, w2, ids, weights)
                us = graph_time_us(lambda plan=plan, a=args_: fused_moe.fused_experts(*a, plan=plan))
            except Exception as exc:  # noqa: BLE001 (a plan that does not compile: shared memory, registers)
                print(f"T={t} plan {plan}: {type(exc).__name__}")
                continue
            row = dict(tokens=t, plan=plan or fused_moe.moe_plan(t * k), kernel_us=us, experts_read=read,
                       gb_per_s=read * expert_bytes / us / 1e3, tflops=flops / us / 1e6, max_rel_err=err)
            if plan is None:
                row["torch_us"] = eager_time_us(lambda a=(x, w13, w2, ids, weights): experts_torch(*a))
            results.append(row)
            print(f"T={t:5d} plan {row['plan']}: {us:9.1f} us a layer ({read} experts read: "
                  f"{row['gb_per_s']:7.1f} GB/s, {row['tflops']:6.1f} TFLOP/s)"
                  + (f", torch loop {row['torch_us']:9.1f} us, max rel err {err:.1e}" if plan is None else ""))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
