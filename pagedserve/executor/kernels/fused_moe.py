"""A mixture-of-experts MLP for a batch of tokens as two grouped GEMMs (vLLM's fused_moe in spirit): each token
goes through its top-k experts, each expert's (token, choice) entries taken together.

The experts' weights are dense arrays (models/moe.py): w13 [E, 2I, H] (each expert's gate rows, then its up rows)
and w2 [E, H, I]. The step's routing (ids [T, k] of experts, weights [T, k]) becomes, on the device and without a
host sync (moe_align),

    order  [T * k]  the flat entries f = token * k + choice sorted by expert (stable)
    starts [E + 1]  starts[e] = the first index in `order` of expert e's entries; starts[E] = T * k

so expert e's entries are order[starts[e] : starts[e + 1]]. A program takes one block of BM entries of one expert,
found from the per-expert block counts in the kernel (kernels/segments.py, shared with LoRA's), so the grid depends on
T alone (cdiv(T k, BM) + min(E, T k) blocks at most) and a CUDA graph captures it once.

    gate_up: grid (blocks, cdiv(I, BN)). h[f, n] = silu(x[t] w_gate[e, n]) * (x[t] w_up[e, n]) for f's token t,
             both products in fp32, rounded once to h's dtype. gpt-oss (ACT 1): each product plus its bias
             (b13 [E, 2I]), then (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
    down:    grid (blocks, cdiv(H, BN)). y[f, n] = route_weight[f] * (h[f] w2[e, n] (+ b2[e, n])), in fp32, rounded
             once.
    The caller sums y's k rows of each token (fp32 sums, one rounding): no atomics, so a step's output does not
    depend on the order programs finish in.

Both kernels start with pdl_enter (programmatic dependent launch on Hopper).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.executor.kernels.pdl import launch_kwargs as pdl_launch_kwargs
from pagedserve.executor.kernels.pdl import pdl_enter
from pagedserve.executor.kernels.segments import segment_block


@triton.jit
def _moe_gate_up_kernel(x_ptr, w_ptr, order_ptr, starts_ptr, h_ptr, bias_ptr, K, N, top_k,
                        stride_xm, stride_we, stride_wn, stride_hm, alpha, limit,
                        NUM_EXPERTS: tl.constexpr, E_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr = False,
                        ACT: tl.constexpr = 0, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    expert, entry, row_ok = segment_block(starts_ptr, order_ptr, tl.program_id(0), NUM_EXPERTS, E_POW2, BM, 0)
    if expert < NUM_EXPERTS:
        tok = entry // top_k
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = n < N
        gate_rows = w_ptr + expert.to(tl.int64) * stride_we + n[:, None].to(tl.int64) * stride_wn
        up_rows = gate_rows + N * stride_wn
        acc_gate = tl.zeros((BM, BN), dtype=tl.float32)
        acc_up = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < K
            xt = tl.load(x_ptr + tok[:, None] * stride_xm + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
            w_mask = n_ok[:, None] & k_ok[None, :]
            wg = tl.load(gate_rows + k[None, :], mask=w_mask, other=0.0)
            wu = tl.load(up_rows + k[None, :], mask=w_mask, other=0.0)
            acc_gate = tl.dot(xt, tl.trans(wg), acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(xt, tl.trans(wu), acc_up, input_precision=DOT_PRECISION)
        if HAS_BIAS:  # b13[e]: the gate's N columns, then the up's
            bias_row = bias_ptr + expert.to(tl.int64) * 2 * N
            acc_gate += tl.load(bias_row + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_up += tl.load(bias_row + N + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:  # gpt-oss
            g = tl.minimum(acc_gate, limit)
            u = tl.minimum(tl.maximum(acc_up, -limit), limit)
            h = (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))
        else:
            h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
        tl.store(h_ptr + entry[:, None] * stride_hm + n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(h_ptr, w_ptr, order_ptr, starts_ptr, route_ptr, y_ptr, bias_ptr, K, N,
                     stride_hm, stride_we, stride_wn, stride_ym,
                     NUM_EXPERTS: tl.constexpr, E_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr = False,
                     USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    expert, entry, row_ok = segment_block(starts_ptr, order_ptr, tl.program_id(0), NUM_EXPERTS, E_POW2, BM, 0)
    if expert < NUM_EXPERTS:
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = n < N
        w_rows = w_ptr + expert.to(tl.int64) * stride_we + n[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            k_ok = k < K
            ht = tl.load(h_ptr + entry[:, None] * stride_hm + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
            wt = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(ht, tl.trans(wt), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:  # b2[e]
            acc += tl.load(bias_ptr + expert.to(tl.int64) * N + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        route = tl.load(route_ptr + entry, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + entry[:, None] * stride_ym + n[None, :], (acc * route[:, None]).to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def moe_plan(num_entries: int) -> tuple[int, int, int, int]:
    """(entries a block, BN, BK, warps) for a step of num_entries (token, choice) entries: 16-entry blocks while
    each expert holds few (decode), 64 above (prefill). Not tuned on a GPU yet."""
    if num_entries <= 256:
        return 16, 64, 64, 4
    return 64, 128, 64, 8


def moe_align(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [T k], starts [E + 1]) of the routing ids [T, k], on their device, without a host sync."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat.to(torch.int64), torch.ones_like(flat, dtype=torch.int64))
    starts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    torch.cumsum(counts, 0, out=starts[1:])
    return order, starts


_empty = torch.empty  # (the tests poison the kernels' outputs through it)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                  route_weights: torch.Tensor, plan: tuple[int, int, int, int] | None = None,
                  b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, act: str = "silu",
                  alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """sum over each token's k choices of route_weight * expert(x): x [T, H], w13 [E, 2I, H], w2 [E, H, I], ids
    [T, k] (experts), route_weights [T, k] -> [T, H] in x's dtype. plan: moe_plan's tuple (tuning). b13 [E, 2I],
    b2 [E, H], act ("silu" or "gpt_oss"), alpha, limit: gpt-oss's experts (models/moe.py gated())."""
    t, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    if w13.shape != (num_experts, 2 * inter, hidden) or w2.shape != (num_experts, hidden, inter):
        raise ValueError(f"fused_experts: w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} for hidden size {hidden}")
    if ids.shape != route_weights.shape or ids.shape[0] != t:
        raise ValueError(f"fused_experts: ids {tuple(ids.shape)}, weights {tuple(route_weights.shape)} for {t} tokens")
    if act not in ("silu", "gpt_oss"):
        raise ValueError(f"fused_experts: act must be 'silu' or 'gpt_oss', got {act!r}")
    for name, bias, shape in (("b13", b13, (num_experts, 2 * inter)), ("b2", b2, (num_experts, hidden))):
        if bias is not None and (tuple(bias.shape) != shape or not bias.is_contiguous()):
            raise ValueError(f"fused_experts: {name} must be a contiguous {shape}, got {tuple(bias.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    top_k = ids.shape[1]
    entries = t * top_k
    order, starts = moe_align(ids, num_experts)
    bm, bn, bk, warps = plan or moe_plan(entries)
    blocks = triton.cdiv(entries, bm) + min(num_experts, entries)
    meta = dict(NUM_EXPERTS=num_experts, E_POW2=max(2, triton.next_power_of_2(num_experts)), BM=bm, BN=bn, BK=bk,
                DOT_PRECISION=_dot_precision(w13.dtype), num_warps=warps, **pdl_launch_kwargs(x.device))
    h = _empty(entries, inter, dtype=x.dtype, device=x.device)
    _moe_gate_up_kernel[(blocks, triton.cdiv(inter, bn))](
        x, w13, order, starts, h, b13 if b13 is not None else h, hidden, inter, top_k, x.stride(0), w13.stride(0),
        w13.stride(1), h.stride(0), float(alpha), float(limit), HAS_BIAS=b13 is not None,
        ACT=1 if act == "gpt_oss" else 0, **meta)
    y = _empty(entries, hidden, dtype=x.dtype, device=x.device)
    route = route_weights.reshape(-1).float().contiguous()
    _moe_down_kernel[(blocks, triton.cdiv(hidden, bn))](
        h, w2, order, starts, route, y, b2 if b2 is not None else y, inter, hidden, h.stride(0), w2.stride(0),
        w2.stride(1), y.stride(0), HAS_BIAS=b2 is not None, **meta)
    return y.view(t, top_k, hidden).sum(1, dtype=torch.float32).to(x.dtype)


__all__ = ["fused_experts", "moe_align", "moe_plan"]
