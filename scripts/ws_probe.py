"""Warp-specialized TMA tiles on a GPU, case by case, each config in a child process with a deadline: a kernel
that hangs (a barrier never released) costs one timeout, and the driver goes on with the next config in a new
child. Prints each config's error against an fp32 reference and its time against cuBLAS (CUDA-graph replays,
weights rotated past L2), as bench_skinny_gemm does.

    python scripts/ws_probe.py                      # the cases below
    WS_PROBE_CASES="down:144:128+16,128,64,4,8 ..." python scripts/ws_probe.py
    (a case: shape:M:block_m[+tail],block_n,block_k,stages,split; shape in bench_skinny_gemm.MODELS["7b"] or
     a small KxN such as 136x33b for a test shape with a bias)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

CASES = (
    # the default workload's decode M: down, o, qkv, gate_up
    "down:144:128+16,128,64,4,8 down:144:128+16,128,64,4,4 down:144:128+16,64,64,6,4 down:144:256,128,64,3,8 "
    "down:144:128+16,256,64,3,8 o:144:128+16,64,64,6,2 o:144:128+16,128,64,4,4 o:144:128+16,64,64,6,1 "
    "qkv:144:128+16,64,64,6,1 qkv:144:128+16,128,64,4,2 gate_up:144:128+16,128,64,4,1 gate_up:144:256,128,64,3,1 "
    "gate_up:144:128+16,256,64,3,1 "
    # the GPU test's shapes, where run 2's test phase hung (loops of 2-4 K steps, fewer than or equal to stages)
    "200x70b:130:128,64,64,3,1 200x70:33:16+16,64,64,4,2 136x33b:130:128+16,128,64,3,1 136x33b:9:128+16,128,64,3,1"
)
DEADLINE_S = float(os.environ.get("WS_PROBE_TIMEOUT", "40"))


def parse(case: str):
    shape, m, cfg = case.split(":")
    tile, block_n, block_k, stages, split = cfg.split(",")
    block_m, _, tail = tile.partition("+")
    return shape, int(m), (int(block_m), int(tail or 0), int(block_n), int(block_k), int(stages), int(split))


def child(cases: list[str]) -> None:
    import torch

    for case in cases:
        print(f"START {case}", flush=True)
        print(f"DONE {case}: {run_case(case)}", flush=True)
        torch.cuda.empty_cache()


def run_case(case: str) -> str:
    import torch
    import torch.nn.functional as F
    import triton

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_skinny_gemm import MODELS, ROTATE_BYTES

    from pagedserve.executor.kernels.skinny_gemm import SkinnyConfig, skinny_linear

    dev = "cuda"
    name, m, (block_m, tail, block_n, block_k, stages, split) = parse(case)
    if name in MODELS["7b"]:
        k, n, has_bias = MODELS["7b"][name]
    else:
        dims, has_bias = name.rstrip("b"), name.endswith("b")
        k, n = (int(v) for v in dims.split("x"))
    gen = torch.Generator(device=dev).manual_seed(n + k + m)
    w0 = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02
    copies = max(1, -(-ROTATE_BYTES // w0.nbytes))
    weights = [w0] + [w0.clone() for _ in range(copies - 1)]
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02 if has_bias else None
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=gen)
    ref = x.float() @ w0.float().T + (bias.float() if has_bias else 0.0)
    cfg = SkinnyConfig(block_n, block_k, 4, stages, split, True, block_m, True, tail, True)
    out = torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)
    skinny_linear(x, w0, bias, out=out, config=cfg)
    torch.cuda.synchronize()
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item() if torch.isfinite(out).all() else float("inf")

    def timed(op):
        def run():
            for i in range(copies):
                op(i)

        return triton.testing.do_bench_cudagraph(run, rep=10, return_mode="median") * 1e3 / copies

    nbytes = 2 * (w0.numel() + x.numel())
    ws_us = timed(lambda i: skinny_linear(x, weights[i], bias, out=out, config=cfg))
    cublas_us = timed(lambda i: F.linear(x, weights[i], bias))
    return (f"err {err:.1e}  ws {ws_us:8.2f} us ({nbytes / ws_us / 1e3:5.0f} GB/s)  cuBLAS {cublas_us:8.2f} us  "
            f"x{cublas_us / ws_us:.2f} vs cuBLAS")  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    pending = (os.environ.get("WS_PROBE_CASES") or CASES).split()
    start = time.perf_counter()
    import selectors

    while pending:
        proc = subprocess.Popen([sys.executable, __file__, "--child", *pending], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        current, deadline = None, time.monotonic() + DEADLINE_S + 20  # the first case also imports and compiles
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                proc.kill()
                current = current or pending[0]
                print(f"TIMEOUT {current} (> {DEADLINE_S:.0f} s: a hang)", flush=True)
                break
            line = proc.stdout.readline()
            if not line:
                break
            line = line.rstrip()
            if line.startswith("START "):
                current, deadline = line[6:], time.monotonic() + DEADLINE_S
            elif line.startswith("DONE "):
                print(line, flush=True)
                pending.remove(current)
                current = None
            elif "Warning" not in line:
                print(f"  {line}", flush=True)
        proc.wait()
        if current is not None:  # the child hung or died on `current`: skip it, go on in a new child
            if proc.returncode != -9:
                print(f"FAILED {current} (rc {proc.returncode})", flush=True)
            pending.remove(current)
    print(f"(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
