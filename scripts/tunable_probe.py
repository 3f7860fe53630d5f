"""GPU probe: does PyTorch's TunableOp (torch.cuda.tunable: cuBLAS's default against the cuBLASLt heuristic's
candidate algorithms, timed per GEMM shape) beat the default cuBLAS choice on the Qwen2-7B projections?

    python scripts/tunable_probe.py [--m 64,96,144,256,8192] [--shapes qkv,o,gate_up,down,lm_head]

For each shape and M: the median us per F.linear call over CUDA-graph replays with the weight rotated past L2
(as scripts/bench_skinny_gemm.py), first with TunableOp off, then tuned (eager tuning with a rotating buffer
past L2, then the same graph timing with the tuned choice), and the choice TunableOp made.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F
import triton

SHAPES = {"qkv": (3584, 4608, True), "o": (3584, 3584, False), "gate_up": (3584, 37888, False),
          "down": (18944, 3584, False), "lm_head": (3584, 152064, False)}  # name: (K, N, bias)
ROTATE_BYTES = 256 << 20


def time_us(op, copies: int, rep: int) -> float:
    def run():
        for i in range(copies):
            op(i)

    return triton.testing.do_bench_cudagraph(run, rep=rep, return_mode="median") * 1e3 / copies


def time_linear(x, weights, bias, copies: int, rep: int) -> float:
    return time_us(lambda i: F.linear(x, weights[i], bias), copies, rep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="64,96,144,256,8192")
    parser.add_argument("--shapes", default="qkv,o,gate_up,down")
    parser.add_argument("--rep", type=int, default=20)
    parser.add_argument("--tuning-ms", type=int, default=50, help="TunableOp's time budget per candidate")
    args = parser.parse_args()
    tunable = torch.cuda.tunable
    tunable.set_filename(os.path.join(tempfile.mkdtemp(), "tunableop_results.csv"))
    tunable.set_rotating_buffer_size(ROTATE_BYTES >> 20)
    tunable.set_max_tuning_duration(args.tuning_ms)
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows = []
    for name in args.shapes.split(","):
        k, n, has_bias = SHAPES[name]
        w0 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        copies = max(1, math.ceil(ROTATE_BYTES / w0.nbytes))
        weights = [w0] + [w0.clone() for _ in range(copies - 1)]
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.02 if has_bias else None
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            copies_m = 1 if m > 1024 else copies  # prefill sizes: compute-bound, one weight is enough
            ref = F.linear(x, w0, bias).float()
            tunable.enable(False)
            base = time_linear(x, weights, bias, copies_m, args.rep)
            tunable.enable(True)
            tunable.tuning_enable(True)
            t0 = time.perf_counter()
            out = F.linear(x, w0, bias)
            torch.cuda.synchronize()
            tune_s = time.perf_counter() - t0
            tunable.tuning_enable(False)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            tuned = time_linear(x, weights, bias, copies_m, args.rep)
            tunable.enable(False)
            rows.append((name, m, base, tuned, tune_s, err))
            print(f"{name:8} M={m:5d}: default {base:9.2f} us  tuned {tuned:9.2f} us  x{base / tuned:.3f}  "
                  f"(tuning {tune_s:.2f} s, err vs default {err:.1e})", flush=True)
        weights.clear()
        torch.cuda.empty_cache()
    print("\nTunableOp's choices:")
    for result in tunable.get_results():
        print("  " + " | ".join(str(v) for v in result))
    for m in sorted({r[1] for r in rows}):
        sel = [r for r in rows if r[1] == m]
        print(f"M={m}: layer default {sum(r[2] for r in sel):.1f} us, tuned {sum(r[3] for r in sel):.1f} us")


if __name__ == "__main__":
    main()
