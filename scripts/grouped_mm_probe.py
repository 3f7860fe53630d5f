"""GPU probe: does torch's own CUTLASS GEMM (torch._grouped_mm: a Hopper TMA warp-specialized kernel, ping-pong
64 x 128 x 128 tiles with a 2-CTA cluster when a side is <= 128, cooperative 128 x 256 x 64 otherwise) stream the
Qwen2-7B projections' weights faster than cuBLAS at decode batches?

    python scripts/grouped_mm_probe.py [--m 96,104,128,144] [--shapes qkv,o,gate_up,down]

For each shape and M, the median us per call over CUDA-graph replays with the weight rotated past L2 (as
scripts/tunable_probe.py), for:
  cublas   F.linear(x, W)                                  (what the engine runs)
  gmm      torch._grouped_mm(x[None], W.t()[None])         tokens as CUTLASS's M
  gmm-swap torch._grouped_mm(W[None], x.t()[None])         weight rows as M, tokens as N (the output transposed)
and each one's largest error against F.linear relative to its largest output.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from tunable_probe import ROTATE_BYTES, time_us  # (scripts/ is on the path when run as a script)

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}  # (K, N)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="96,104,128,144")
    parser.add_argument("--shapes", default="qkv,o,gate_up,down")
    parser.add_argument("--rep", type=int, default=30)
    args = parser.parse_args()
    dev = torch.device("cuda")
    print(f"grouped-mm {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    totals: dict[tuple[int, str], float] = {}
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        w0 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        copies = max(1, math.ceil(ROTATE_BYTES / w0.nbytes))
        weights = [w0] + [w0.clone() for _ in range(copies - 1)]
        byte_floor_us = w0.nbytes / 3.0e12 * 1e6
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xt = x.t().contiguous().t()  # the same values; for the swapped call below x.t() is [K, M] row-major
            ref = F.linear(x, w0).float()
            ways = {
                "cublas": (lambda i, x=x, w=weights: F.linear(x, w[i]), lambda o: o),
                "gmm": (lambda i, x=x, w=weights: torch._grouped_mm(x[None], w[i].t()[None]), lambda o: o[0]),
                "gmm-swap": (lambda i, xt=xt, w=weights: torch._grouped_mm(w[i][None], xt.t()[None]),
                             lambda o: o[0].t()),
            }
            line = [f"grouped-mm {name:8} M={m:4d} (bytes at 3.0 TB/s {byte_floor_us:6.1f} us):"]
            for way, (op, view) in ways.items():
                try:
                    out = view(op(0)).float()
                    err = ((out - ref).abs().max() / ref.abs().max()).item()
                    us = time_us(op, copies, args.rep)
                except Exception as exc:  # noqa: BLE001 - a probe: print why a way cannot run and go on
                    line.append(f"{way} failed ({type(exc).__name__}: {str(exc)[:80]})")
                    continue
                totals[(m, way)] = totals.get((m, way), 0.0) + us
                line.append(f"{way} {us:7.2f} us (err {err:.1e})")
            print("  ".join(line), flush=True)
        weights.clear()
        torch.cuda.empty_cache()
    for (m, way), us in sorted(totals.items()):
        print(f"grouped-mm layer M={m:4d} {way:9}: {us:8.1f} us", flush=True)


if __name__ == "__main__":
    main()
