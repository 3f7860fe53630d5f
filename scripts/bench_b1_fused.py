"""GPU benchmark of the batch-1 sublayer entries with the RMSNorm folded in, against norm kernel + GEMM,
and of the batch-1 LM head's skinny tiles (Qwen2-7B shapes, bf16).

    python scripts/bench_b1_fused.py

Each case runs as a CUDA graph over several copies of the weights (>= 256 MB, past the L2), as in a decode
step, with PDL where the kernels use it; median us per call (triton do_bench_cudagraph). Printed:
  * input norm + qkv: rms_norm then skinny_linear (two kernels) vs skinny_linear_rmsnorm (one);
  * post-attention norm + gate_up: rms_norm then gate_up_silu vs gate_up_silu with the norm folded, at
    block_n 1 / 2 / 4 and 2 / 3 stages;
  * LM head (fp32 logits): skinny fma tiles vs cuBLAS (torch.mm with an fp32 output).
Each fused output is checked against the unfused pair (max |err| / max |ref|).
"""

from __future__ import annotations

import torch
import triton

from pagedserve.executor.kernels.fused_norm import rms_norm
from pagedserve.executor.kernels.gate_up_silu import gate_up_silu
from pagedserve.executor.kernels.skinny_gemm import SkinnyConfig, skinny_linear, skinny_linear_rmsnorm

DEVICE = torch.device("cuda")
HIDDEN, INTER, QKV, VOCAB = 3584, 18944, 4608, 152064
EPS = 1e-6


def copies_for(nbytes: int) -> int:
    return max(1, -(-(256 << 20) // nbytes))


def time_us(op, num_copies: int) -> float:
    def run():
        for i in range(num_copies):
            op(i)

    return triton.testing.do_bench_cudagraph(run, rep=20, return_mode="median") * 1e3 / num_copies


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "triton", triton.__version__)
    x = torch.randn(1, HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    residual = torch.randn(1, HIDDEN, device=DEVICE) * 3
    norm_w = (1 + 0.1 * torch.randn(HIDDEN, device=DEVICE)).to(torch.bfloat16)

    n_qkv = copies_for(QKV * HIDDEN * 2)
    w_qkv = [torch.randn(QKV, HIDDEN, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(n_qkv)]
    b_qkv = torch.randn(QKV, device=DEVICE, dtype=torch.bfloat16) * 0.02

    def qkv_unfused(i):
        h, _ = rms_norm(x, norm_w, EPS, residual)
        return skinny_linear(h, w_qkv[i], b_qkv)

    def qkv_fused(i):
        return skinny_linear_rmsnorm(x, residual, norm_w, EPS, w_qkv[i], b_qkv)[0]

    err = rel(qkv_fused(0), qkv_unfused(0))
    t_un, t_fu = time_us(qkv_unfused, n_qkv), time_us(qkv_fused, n_qkv)
    print(f"qkv   norm + skinny {t_un:7.2f} us   fused {t_fu:7.2f} us   saved {t_un - t_fu:6.2f} us  err {err:.1e}")

    n_gu = copies_for(2 * INTER * HIDDEN * 2)
    w_gu = [torch.randn(2 * INTER, HIDDEN, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(n_gu)]
    for block_n in (1, 2, 4):
        for stages in (2, 3):
            def gu_unfused(i, block_n=block_n, stages=stages):
                h, _ = rms_norm(x, norm_w, EPS, residual)
                return gate_up_silu(h, w_gu[i], block_n=block_n, num_stages=stages)

            def gu_fused(i, block_n=block_n, stages=stages):
                return gate_up_silu(x, w_gu[i], block_n=block_n, num_stages=stages, residual=residual,
                                    norm_weight=norm_w, eps=EPS)[0]

            err = rel(gu_fused(0), gu_unfused(0))
            t_un, t_fu = time_us(gu_unfused, n_gu), time_us(gu_fused, n_gu)
            print(f"gate_up n{block_n} s{stages}: norm + fused gate_up {t_un:7.2f} us   norm folded {t_fu:7.2f} us"
                  f"   saved {t_un - t_fu:6.2f} us  err {err:.1e}")

    n_lm = copies_for(VOCAB * HIDDEN * 2)
    w_lm = [torch.randn(VOCAB, HIDDEN, device=DEVICE, dtype=torch.bfloat16) * 0.02 for _ in range(n_lm)]
    ref = torch.mm(x, w_lm[0].t(), out_dtype=torch.float32)
    t = time_us(lambda i: torch.mm(x, w_lm[i].t(), out_dtype=torch.float32), n_lm)
    print(f"lm_head cuBLAS {t:7.2f} us ({VOCAB * HIDDEN * 2 / t / 1e3:.0f} GB/s)")
    for block_n, block_k, warps, stages in [(8, 256, 4, 3), (4, 512, 4, 2), (4, 512, 4, 3), (8, 512, 4, 2),
                                            (2, 512, 4, 3), (16, 256, 4, 3), (8, 512, 8, 3)]:
        cfg = SkinnyConfig(block_n, block_k, warps, stages, 1, False)
        err = rel(skinny_linear(x, w_lm[0], config=cfg, out_dtype=torch.float32), ref)
        t = time_us(lambda i, cfg=cfg: skinny_linear(x, w_lm[i], config=cfg, out_dtype=torch.float32), n_lm)
        print(f"lm_head fma n{block_n} k{block_k} w{warps} s{stages}: {t:7.2f} us "
              f"({VOCAB * HIDDEN * 2 / t / 1e3:.0f} GB/s)  err {err:.1e}")


if __name__ == "__main__":
    main()
