"""Compiles the sampling kernel's variants for sm_90 on a machine without a GPU (Triton's frontend,
its passes and ptxas all run on the CPU): catches compile errors the interpreter does not see (e.g. None
passed to a nested jit function) before a device call. The local Triton may differ from the GPU's.

    python scripts/compile_sm90_sample.py
"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedserve.executor.kernels import sample as m

target = GPUTarget("cuda", 90, 32)
for split in (True, False):
    sig = {"logits_ptr": "*fp32", "temps_ptr": "*fp64", "seeds_ptr": "*i64", "offsets_ptr": "*i64",
           "out_ptr": "*i64", "part_val_ptr": "*fp32", "part_idx_ptr": "*i32",
           "num_rows": "i32", "stride_row": "i32", "vocab": "i32", "chunk": "i32", "num_splits": "i32",
           "ROWS": "constexpr", "TILE": "constexpr", "SPLIT": "constexpr", "USE_PDL": "constexpr"}
    consts = {"ROWS": 1, "TILE": 1024, "SPLIT": split, "USE_PDL": True}
    src = ASTSource(m._sample_gumbel_kernel, sig, constexprs=consts)
    try:
        k = triton.compile(src, target=target)
        print(split, "compiled", list(k.asm))
    except Exception as e:
        msg = str(e)
        print(split, type(e).__name__, msg[:300])
