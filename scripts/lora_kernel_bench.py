"""What LoRA adds to a decoder layer's four projections at the Qwen2-7B shapes, per layer, on the GPU: the Triton
shrink / expand kernels (kernels/lora_sgmv.py) against the torch path (matmul over every slot, the slot mask,
addmm), each timed as 28 layers' worth of calls inside one CUDA graph (as in the engine's graphs), for T tokens
spread round robin over S adapters (and with no adapter at all), rank 16, max_loras 4.

    python scripts/lora_kernel_bench.py [--tokens 1,16,64,139,256] [--output-json F]
    python scripts/lora_kernel_bench.py --sweep --tokens 64,139,256   # shrink and expand configs, S adapters used

With --sweep, each shrink config (block rows, target programs) is timed with the default expand and each expand
config (block rows, columns a tile, tiles a program, warps) with the default shrink: the two kernels share only
the partial sums, so their times add.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from pagedserve.executor.kernels import lora_sgmv

SHAPES = {"qkv": (3584, [3584, 512, 512]), "o": (3584, [3584]), "gate_up": (3584, [18944, 18944]),
          "down": (18944, [3584])}
LAYERS = 28
DEVICE = "cuda"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,16,64,139,256")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--output-json")
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    dev = torch.device(DEVICE)
    dt = torch.bfloat16
    s_max, r = args.slots, args.rank
    layers = {}
    for name, (k, parts) in SHAPES.items():
        rt = len(parts) * r
        n = sum(parts)
        layers[name] = dict(k=k, n=n, rt=rt, a=torch.randn(s_max * rt, k, device=dev, dtype=dt) / k**0.5,
                            b=torch.randn(n, s_max * rt, device=dev, dtype=dt) * 0.01,
                            col_slot=torch.arange(s_max * rt, device=dev) // rt + 1)
    results = []
    for t in [int(v) for v in args.tokens.split(",")]:
        for used in ((s_max,) if args.sweep else (0, 1, s_max)):
            slots = np.zeros(t, dtype=np.int64) if used == 0 else (np.arange(t) % used + 1)
            order = torch.from_numpy(np.argsort(slots, kind="stable")).to(dev)
            starts = torch.from_numpy(np.concatenate([[0], np.cumsum(np.bincount(slots, minlength=s_max + 1))])).to(dev)
            token_slot = torch.from_numpy(slots).to(dev)
            xs = {name: torch.randn(t, v["k"], device=dev, dtype=dt) for name, v in layers.items()}
            ys = {name: torch.randn(t, v["n"], device=dev, dtype=dt) for name, v in layers.items()}
            masks = {name: (token_slot[:, None] == v["col_slot"][None, :]).to(dt) for name, v in layers.items()}
            partials = {name: torch.empty(max(lora_sgmv.partials_rows(t), 64 * t) * v["rt"], device=dev)
                        for name, v in layers.items()}

            def kernels(xs=xs, ys=ys, order=order, starts=starts, partials=partials, shrink=None, expand=None):
                for _ in range(LAYERS):
                    for name, v in layers.items():
                        h = lora_sgmv.lora_shrink(xs[name], v["a"], order, starts, partials[name], s_max, v["rt"],
                                                  tune=shrink)
                        lora_sgmv.lora_expand(h, v["b"], order, starts, ys[name], s_max, tune=expand)

            if args.sweep:
                row = {"tokens": t, "adapters_used": used, "default_us_a_layer": timed(kernels),
                       "torch_us_a_layer": timed(torch_path_fn(xs, ys, masks, layers))}
                print(json.dumps(row), flush=True)
                for bm in (16, 32, 64):
                    for target in (32, 64, 128, 256):
                        cfg = {"bm": bm, "target": target}
                        us = timed(lambda cfg=cfg: kernels(shrink=cfg))
                        print(json.dumps({"tokens": t, "shrink": cfg, "us_a_layer": us}), flush=True)
                        results.append({"tokens": t, "shrink": cfg, "us_a_layer": us})
                    for bn, tiles in ((64, 1), (128, 1), (64, 4), (128, 4), (64, 8), (256, 2)):
                        for warps in (4, 8):
                            cfg = {"bm": bm, "bn": bn, "tiles": tiles, "warps": warps}
                            us = timed(lambda cfg=cfg: kernels(expand=cfg))
                            print(json.dumps({"tokens": t, "expand": cfg, "us_a_layer": us}), flush=True)
                            results.append({"tokens": t, "expand": cfg, "us_a_layer": us})
                results.append(row)
                continue

            def torch_path(xs=xs, ys=ys, masks=masks):
                for _ in range(LAYERS):
                    for name, v in layers.items():
                        h = (xs[name] @ v["a"].T).mul_(masks[name])
                        ys[name].addmm_(h, v["b"].T)

            row = {"tokens": t, "adapters_used": used}
            # correctness once: both ways from the same y
            y0 = {name: y.clone() for name, y in ys.items()}
            for name, v in layers.items():
                h = lora_sgmv.lora_shrink(xs[name], v["a"], order, starts, partials[name], s_max, v["rt"])
                lora_sgmv.lora_expand(h, v["b"], order, starts, ys[name], s_max)
                want = y0[name].float() + (((xs[name] @ v["a"].T) * masks[name]) @ v["b"].T.to(dt)).float()
                row[f"err_{name}"] = float(((ys[name].float() - want).abs().max() / want.abs().max()).item())
                ys[name].copy_(y0[name])
            for label, fn in (("kernels", kernels), ("torch", torch_path)):
                row[f"{label}_us_a_layer"] = timed(fn)
            print(json.dumps(row), flush=True)
            results.append(row)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


def torch_path_fn(xs, ys, masks, layers):
    def run():
        for _ in range(LAYERS):
            for name, v in layers.items():
                h = (xs[name] @ v["a"].T).mul_(masks[name])
                ys[name].addmm_(h, v["b"].T)
    return run


def timed(fn) -> float:
    """us a layer: fn (LAYERS layers' worth of calls) captured in a CUDA graph, best of 5 x 10 replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(10):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / 10 * 1000 / LAYERS)
    return round(min(times), 2)


if __name__ == "__main__":
    main()
