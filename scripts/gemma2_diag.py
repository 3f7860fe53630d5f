"""Gemma 2's mixed step on CUDA against Transformers, error by step and request, with either soft-cap switched off
and through either attention backend: which part moves the error (session 26's miss of test_runner_window[gemma2])."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tests.executor.test_model_runner as tmr  # noqa: E402

errs: list[tuple[str, float]] = []
_orig = tmr.max_rel_err


def recording(a, b):  # the per-request error, kept instead of asserted
    e = float(_orig(a, b))
    errs.append(e)
    return 0.0


tmr.max_rel_err = recording
device = "cuda" if torch.cuda.is_available() else "cpu"
variants = {"caps 3/5": {}, "no attn cap": dict(attn_logit_softcapping=None),
            "no final cap": dict(final_logit_softcapping=None),
            "no caps": dict(attn_logit_softcapping=None, final_logit_softcapping=None)}
for backend in ("triton", "torch"):
    for name, overrides in variants.items():
        errs.clear()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                tmr.run_mixed_batch_against_hf("gemma2", Path(tmp), device, backend, tolerance=1.0, overrides=overrides)
            except Exception as exc:  # noqa: BLE001 - a diagnostic: print and go on
                print(f"{backend:7s} {name:13s} raised {type(exc).__name__}: {str(exc)[:200]}")
                continue
        # steps: 1 (C, D, E), 2 (A, B, C, D, E in sampler order), 3 (E, B)
        print(f"{backend:7s} {name:13s} max {max(errs):.2e}  per check: " + " ".join(f"{e:.1e}" for e in errs))
