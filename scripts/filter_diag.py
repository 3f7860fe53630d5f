"""Threshold kernel diagnosis on a GPU: each case in a subprocess with a timeout (a row's programs wait at
a barrier, so a bug can hang), printing its time and whether its kept sets are right.

    python scripts/filter_diag.py            # every case
    python scripts/filter_diag.py CASE       # one case (what the parent runs in each subprocess)
Case: ROWS:FILTER:PROGRAMS with FILTER topk|topp|both and PROGRAMS 0 for the default."""
from __future__ import annotations

import os
import subprocess
import sys
import time

CASES = os.environ.get("FILTER_DIAG_CASES", "1:topk:1 1:topk:2 16:topk:0 16:both:0 256:topk:0 256:both:0 256:topp:0 "
                                            "1:topp:0").split()


def run_case(case: str) -> None:
    import torch

    from pagedserve.executor.kernels import sample_filter as sf
    from pagedserve.executor.sampler import apply_sampling_filters

    rows, filt, progs = case.split(":")
    rows, progs = int(rows), int(progs)
    gen = torch.Generator(device="cuda").manual_seed(rows)
    logits = torch.randn(rows, 152064, device="cuda", generator=gen) * 2
    k = {"topk": 50, "topp": 0, "both": 20}[filt]
    p = {"topk": 1.0, "topp": 0.9, "both": 0.8}[filt]
    temps = torch.ones(rows, dtype=torch.float64, device="cuda")
    top_k = torch.full((rows,), k, dtype=torch.int64, device="cuda")
    top_p = torch.full((rows,), p, dtype=torch.float64, device="cuda")
    min_p = torch.zeros(rows, dtype=torch.float64, device="cuda")
    kw = {"num_programs": progs} if progs else {}
    thr = sf.filter_thresholds(logits, temps, top_k, top_p, min_p, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        thr = sf.filter_thresholds(logits, temps, top_k, top_p, min_p, **kw)
    torch.cuda.synchronize()
    us = (time.perf_counter() - t0) / 5 * 1e6
    kept = logits >= thr[:, None]
    ref = apply_sampling_filters(logits.clone(), torch.ones(rows, device="cuda"), top_k, top_p.float(),
                                 min_p.float()) > 0  # fmt: skip
    diff = (kept != ref).sum(1)
    # Top-p rows may differ by a boundary token or two (fp32 mass sums in another order than the sorted cumsum).
    verdict = "ok" if int(diff.max()) <= (2 if p < 1.0 else 0) else "WRONG"
    key = next(iter(sf._RESIDENT), None)  # (one variant a process)
    c = progs or sf.programs_per_row(rows, 152064, logits.device, sf._RESIDENT.get(key, 8))
    print(f"{case:12s} programs/row {c}"
          f" regs {sf.REGISTERS.get(key)} resident/SM {sf._RESIDENT.get(key)}: {us:8.1f} us a call (host included), "
          f"kept mean {kept.sum(1).float().mean().item():.1f}, rows differing {int((diff > 0).sum())}, "
          f"max diff {int(diff.max())}: {verdict}", flush=True)


def main() -> None:
    if len(sys.argv) > 1:
        run_case(sys.argv[1])
        return
    for case in CASES:
        try:
            out = subprocess.run([sys.executable, __file__, case], capture_output=True, text=True, timeout=30,
                                 env=os.environ)  # fmt: skip
            print(out.stdout.strip() or f"{case}: rc {out.returncode} {out.stderr.strip()[-600:]}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"{case:12s} TIMEOUT (30 s)", flush=True)


if __name__ == "__main__":
    main()
