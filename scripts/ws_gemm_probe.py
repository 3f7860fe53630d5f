"""GPU probe: the Gluon warp-specialized stream-K GEMM (pagedserve/executor/kernels/ws_gemm.py) against cuBLAS at
the decode batches of the Qwen2-7B projections.

    python scripts/ws_gemm_probe.py [--m 64,96,128,144] [--shapes qkv,o,gate_up,down] [--stages 4] [--check-only]

First a check against torch on fresh random inputs with the output poisoned (NaN) before each launch, at several M
(tails included) and three launches in a row (the tile counters must come back to zero); then, unless --check-only,
the median us per call over CUDA-graph replays with the weights rotated past L2 (scripts/tunable_probe.py's timing),
cuBLAS (F.linear) beside it, and the layer's four projections summed per M.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F
from tunable_probe import ROTATE_BYTES, time_us  # (scripts/ is on the path when run as a script)

from pagedserve.executor.kernels.ws_gemm import WsGemm

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}  # (K, N)


def check(stages: int) -> bool:
    dev = torch.device("cuda")
    ok = True
    g = torch.Generator(device=dev).manual_seed(0)
    for (k, n) in ((256, 384), (3584, 4608), (18944, 3584), (640, 1280)):
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * 0.05
        op = WsGemm(w, stages=stages)
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g) if k == 3584 else None  # qkv has one
        for m in (1, 7, 16, 64, 96, 128, 136, 144, 160, 200, 256):
            worst = 0.0
            for _ in range(3):
                x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
                out = torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)
                op(x, out, bias)
                ref = x.float() @ w.float().t() + (0 if bias is None else bias.float())
                err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                worst = max(worst, err if not math.isnan(err) else float("inf"))
            left = int(op.cnt.abs().sum().item())
            good = worst < 1e-2 and left == 0
            ok &= good
            if not good or m in (1, 144, 256):
                print(f"ws-check K={k:5d} N={n:5d} M={m:3d} stages={stages}: rel err {worst:.2e}, counters left {left}"
                      f"{'' if good else '  FAIL'}", flush=True)
    print(f"ws-check stages={stages}: {'all passed' if ok else 'FAILED'}", flush=True)
    return ok


def timing(ms: list[int], shapes: list[str], stages: int, rep: int) -> None:
    dev = torch.device("cuda")
    totals: dict[tuple[int, str], float] = {}
    for name in shapes:
        k, n = SHAPES[name]
        w0 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        copies = max(1, math.ceil(ROTATE_BYTES / w0.nbytes))
        weights = [w0] + [w0.clone() for _ in range(copies - 1)]
        ops = [WsGemm(w, stages=stages) for w in weights]
        floor_us = w0.nbytes / 3.0e12 * 1e6
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, w0).float()
            ops[0](x, out)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            cub = time_us(lambda i, x=x, w=weights: F.linear(x, w[i]), copies, rep)
            ws = time_us(lambda i, x=x, out=out, o=ops: o[i](x, out), copies, rep)
            totals[(m, "cublas")] = totals.get((m, "cublas"), 0.0) + cub
            totals[(m, "ws")] = totals.get((m, "ws"), 0.0) + ws
            print(f"ws-time {name:8} M={m:4d} stages={stages} (bytes at 3.0 TB/s {floor_us:6.1f} us): "
                  f"cublas {cub:7.2f} us  ws {ws:7.2f} us ({w0.nbytes / ws / 1e6:.2f} TB/s, err {err:.1e})  "
                  f"ws/cublas {ws / cub:.3f}",
                  flush=True)
        ops.clear()
        weights.clear()
        torch.cuda.empty_cache()
    for m in ms:
        c, w = totals.get((m, "cublas")), totals.get((m, "ws"))
        if c and w:
            print(f"ws-time layer M={m:4d} stages={stages}: cublas {c:7.1f} us  ws {w:7.1f} us  ({w / c:.3f})",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="32,64,96,128,144,192,256")
    parser.add_argument("--shapes", default="qkv,o,gate_up,down")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--rep", type=int, default=30)
    parser.add_argument("--check-only", action="store_true")
    args = parser.parse_args()
    print(f"ws-probe {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    if not check(args.stages):
        sys.exit(1)
    if not args.check_only:
        timing([int(v) for v in args.m.split(",")], args.shapes.split(","), args.stages, args.rep)


if __name__ == "__main__":
    main()
