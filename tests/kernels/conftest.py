"""Kernel tests run the Triton kernels in the interpreter when there is no GPU.

Triton picks interpreter-or-compiler when a kernel is *decorated* (module import), from the env var
TRITON_INTERPRET. This conftest sets it before the kernel modules are imported by the tests here; if
an earlier test directory already imported them compiled, they are reloaded so the kernels are
re-decorated for the interpreter. With CUDA present nothing changes: kernels compile for the GPU.

The variable stays set for the rest of the pytest process; plain-torch tests are unaffected by it.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

KERNEL_MODULES = (
    "pagedserve.executor.kernels.pdl",  # first: the others call its pdl_enter
    "pagedserve.executor.kernels.kv_cache_write",
    "pagedserve.executor.kernels.paged_attention_decode",
    "pagedserve.executor.kernels.paged_attention_prefill",  # after decode: imports its helper
    "pagedserve.executor.kernels.rotary_kv_write",
    "pagedserve.executor.attention.triton_backend",
    "pagedserve.executor.kernels.fused_norm",
    "pagedserve.executor.kernels.rotary",
    "pagedserve.executor.kernels.silu_mul",
    "pagedserve.executor.kernels.skinny_gemm",
    "pagedserve.executor.kernels.gate_up_silu",
    "pagedserve.executor.kernels.qkv_rope_kv",  # after gate_up_silu: imports its helper
    "pagedserve.executor.kernels.sample",
    "pagedserve.executor.kernels.penalties",
    "pagedserve.executor.kernels.logprob_stats",
    "pagedserve.executor.kernels.fp8_quant",
    "pagedserve.executor.kernels.segments",  # before the two that import its helper
    "pagedserve.executor.kernels.lora_sgmv",
    "pagedserve.executor.kernels.fused_moe",
    "pagedserve.executor.kernels.w4a16",
)

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in KERNEL_MODULES:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])
