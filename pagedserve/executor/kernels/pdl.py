"""Programmatic dependent launch (PDL) for the step's Triton kernels (Hopper and later).

A step is a chain of ~300 short kernels (batch 1 on a 7B model: ~11 per layer), each waiting for the
previous one to finish before the hardware even starts launching it. Launched with PDL, a kernel's
programs are placed on the SMs while its predecessor still runs, and wait there (griddepcontrol.wait)
until the predecessor has finished and its writes are visible; the predecessor lets them in as soon
as every one of its own programs is running (griddepcontrol.launch_dependents). The launch latency
and the ramp of one kernel then overlap the tail of the previous one. Inside CUDA graphs the launch
attribute becomes a programmatic edge.

The contract each kernel keeps: `pdl_enter(USE_PDL)` is its first statement, so nothing is read or
written before the predecessor is done (no hazard of any kind), and `launch_kwargs(device)` is
passed at its launch, which sets USE_PDL and launch_pdl together. Kernels not launched with PDL
(cuBLAS, torch ops) keep the usual full serialization on both sides.

PAGEDSERVE_PDL=0 turns it off (A/B runs); it is off on CPUs (TRITON_INTERPRET) and before sm_90.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: PDL stays off (enabled() checks this)
    gdc_launch_dependents = gdc_wait = None


_OFF = gdc_wait is None or os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("PAGEDSERVE_PDL", "1") != "1"
# pdl_enter lets the next kernel launch *before* waiting for the previous one (PAGEDSERVE_PDL_EARLY=0: after), so a
# kernel's programs are placed, and the one-token GEMVs start loading weights, while the kernel two back still
# runs. Safe by construction: a grid launches only once every program of the one before it is placed, so running
# programs never wait for SM slots held by waiting ones, and each wait still covers the whole chain before it.
# On the H200 the batch-1 graph replay went 3.784 -> 3.772 ms; the default workload was unchanged (13,332.7 vs
# 13,335.9 tok/s: cuBLAS kernels there do not take PDL) (docs/gpu-notes.md, session 9 run 3).
PDL_EARLY = tl.constexpr(os.environ.get("PAGEDSERVE_PDL_EARLY", "1") == "1")
_ON_KWARGS = {"USE_PDL": True, "launch_pdl": True}
_OFF_KWARGS: dict = {}


@functools.lru_cache(maxsize=16)
def _kwargs_for(device: torch.device) -> dict:
    if _OFF or device.type != "cuda":
        return _OFF_KWARGS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _ON_KWARGS if torch.cuda.get_device_capability(index)[0] >= 9 else _OFF_KWARGS


def enabled(device: torch.device) -> bool:
    return _kwargs_for(device) is _ON_KWARGS


def launch_kwargs(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: PDL on (the kernel waits in pdl_enter) or nothing. Cached per
    device (a step launches hundreds of kernels; the environment is read once, at import)."""
    return _kwargs_for(device)


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """First statement of a kernel launched with launch_kwargs: let the next kernel's programs launch, and
    wait for the predecessor's writes (PDL_EARLY: in that order; else the other way round)."""
    if USE_PDL:
        if PDL_EARLY:
            gdc_launch_dependents()
            gdc_wait()
        else:
            gdc_wait()
            gdc_launch_dependents()


__all__ = ["PDL_EARLY", "enabled", "launch_kwargs", "pdl_enter"]
