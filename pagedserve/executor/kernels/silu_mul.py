"""SiLU·mul for the MLP of Llama/Qwen2 decoders, one pass over the merged gate|up projection.

    x: [..., 2 * I]  (gate in columns [0, I), up in [I, 2I); contiguous last dimension)
    silu_and_mul(x) -> [..., I] = silu(gate) * up,  in x's dtype (fp16 / bf16 / fp32)

Each element of gate and up is read once and each output element written once (3 * I elements a
row), instead of torch's silu kernel writing a [.., I] temporary that the multiply reads back.

Numerics: silu(g) = g / (1 + exp(-g)) and the product are computed in fp32 and rounded once, to x's
dtype. HF Qwen2/Llama (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`) and the torch path of
layers.SiluAndMul (`F.silu(gate) * up`) round twice in fp16/bf16: F.silu rounds its (fp32-computed)
output to the input dtype, then the multiply rounds again. So in bf16 the kernel's result can differ
from HF's by about one bf16 rounding step (relative ~2^-8) on some elements, and it is the closer of
the two to the exact fp32 value. In fp32 the two agree up to the last bit of exp.

Launch layout: a 1D grid of num_rows * cdiv(I, BLOCK) programs, program p handling row
p // num_blocks, columns [(p % num_blocks) * BLOCK, ... + BLOCK). The grid depends on shapes only (no
host sync: safe inside CUDA-graph capture). BLOCK shrinks (1024 -> 256) when there are few rows so a
decode step at batch 1 (I = 18944: 74 programs) still spreads over many SMs, while prefill gets
large programs with 16-byte vector accesses (8 elements per thread).

    row r:  x  | gate[0 .. I) | up[0 .. I) |        out | silu(gate) * up [0 .. I) |
                 ^ col          ^ col + I                 ^ col
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_BLOCK = 1024
MIN_BLOCK = 256
MIN_PROGRAMS = 512  # below this many programs at MAX_BLOCK, halve the block (down to MIN_BLOCK)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_o,
    inter,
    num_col_blocks,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr = False,  # pdl.launch_kwargs sets it with launch_pdl
):
    pdl_enter(USE_PDL)
    pid = tl.program_id(0).to(tl.int64)
    row = pid // num_col_blocks
    cols = (pid % num_col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    x_row = x_ptr + row * stride_x
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # As torch's CUDA silu: g / (1 + exp(-g)); large negative g gives g / inf = -0, not NaN.
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def choose_block(num_rows: int, inter: int) -> int:
    """Elements per program: MAX_BLOCK unless that leaves fewer than MIN_PROGRAMS programs."""
    block = MAX_BLOCK
    while block > MIN_BLOCK and num_rows * triton.cdiv(inter, block) < MIN_PROGRAMS:
        block //= 2
    return block


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None, *, block: int | None = None) -> torch.Tensor:
    """x [..., 2I] (gate | up) -> silu(gate) * up [..., I] in x's dtype; written into `out` if given
    (same leading shape, last dim I, x's dtype and device, contiguous). See the module docstring.

    block: elements per program, a power of two in [64, 8192] (for tuning; default choose_block).
    """
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x must be [..., 2 * intermediate] (gate | up), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; supported: float16, bfloat16, float32")
    if x.stride(-1) != 1:
        raise ValueError("x must have a contiguous last dimension")
    inter = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], inter)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != out_shape:
        raise ValueError(f"out shape {tuple(out.shape)} != expected {out_shape} for x shape {tuple(x.shape)}")
    elif out.dtype != x.dtype:
        raise ValueError(f"out dtype {out.dtype} != x dtype {x.dtype}")
    elif out.device != x.device:
        raise ValueError(f"out is on {out.device}, x on {x.device}")
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if block is not None and (block < 64 or block > 8192 or block & (block - 1)):
        raise ValueError(f"block must be a power of two in [64, 8192], got {block}")
    if out.numel() == 0:  # no rows (or I == 0, which reshape(-1, 0) can't take): nothing to launch
        return out
    x2 = x.reshape(-1, 2 * inter)  # a view unless x's leading dims are non-collapsible (then a copy)
    out2 = out.view(-1, inter)
    num_rows = x2.shape[0]
    block = block or choose_block(num_rows, inter)
    num_col_blocks = triton.cdiv(inter, block)
    _silu_and_mul_kernel[(num_rows * num_col_blocks,)](
        x2, out2, x2.stride(0), out2.stride(0), inter, num_col_blocks,
        BLOCK=block,
        num_warps=max(1, min(16, block // 256)),  # 8 elements (16 bytes in fp16/bf16) a thread up to 4096
        **pdl_launch_kwargs(x2.device),
    )  # fmt: skip
    return out


__all__ = ["silu_and_mul"]
