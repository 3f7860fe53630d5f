# ruff: noqa: E702, B023
"""Probe torch._scaled_mm (rowwise fp8) on this GPU at the Qwen2-7B projection shapes: which M it accepts,
bias support, error against an fp32 emulation, and device time against bf16 F.linear (CUDA events)."""
import torch
import torch.nn.functional as F

torch.manual_seed(0)
dev = "cuda"
print(torch.cuda.get_device_name(), torch.__version__, "cap", torch.cuda.get_device_capability())
SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
MS = [1, 2, 7, 16, 64, 139, 144, 256, 1024, 8192]
FMAX = torch.finfo(torch.float8_e4m3fn).max


def quant_rows(t):
    s = t.float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / FMAX
    return (t.float() / s).clamp(-FMAX, FMAX).to(torch.float8_e4m3fn), s


def timeit(fn, reps=50):
    for _ in range(3):
        fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    g.replay(); torch.cuda.synchronize()
    s.record()
    for _ in range(reps // 10):
        g.replay()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) * 1e3 / reps


tot = {}
for name, (n, k) in SHAPES.items():
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    wq, ws = quant_rows(w)
    wsr = ws.view(1, -1).contiguous()
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    for m in MS:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, xs = quant_rows(x)
        try:
            y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=wsr, out_dtype=torch.bfloat16)
        except Exception as exc:
            print(f"{name} M={m}: scaled_mm refused: {str(exc)[:160]}")
            continue
        ref = (xq.float() * xs) @ (wq.float() * ws).t()
        err = ((y.float() - ref).norm() / ref.norm()).item()
        try:
            yb = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=wsr, bias=bias, out_dtype=torch.bfloat16)
            berr = ((yb.float() - ref - bias.float()).norm() / ref.norm()).item()
        except Exception as exc:
            berr = f"refused {str(exc)[:80]}"
        t_bf = timeit(lambda: F.linear(x, w))
        t_f8 = timeit(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=wsr, out_dtype=torch.bfloat16))
        t_fa = timeit(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=wsr, out_dtype=torch.bfloat16,
                                               use_fast_accum=True))
        t_q = timeit(lambda: quant_rows(x))
        tot.setdefault(m, [0, 0, 0])
        tot[m][0] += t_bf; tot[m][1] += t_f8; tot[m][2] += t_q
        print(f"{name:8s} M={m:5d} err {err:.2e} bias {berr if isinstance(berr, str) else f'{berr:.2e}'} "
              f"bf16 {t_bf:8.1f} us  fp8 {t_f8:8.1f} us (fast-accum {t_fa:8.1f})  torch-quant {t_q:6.1f} us  "
              f"W GB/s bf16 {n*k*2/t_bf/1e3:6.0f} fp8 {n*k/t_f8/1e3:6.0f}")
for m, (a, b, q) in tot.items():
    print(f"layer M={m:5d}: bf16 {a:8.1f} us, fp8 {b:8.1f} us ({a/b:.2f}x), torch quant x4 {q:.1f} us")
