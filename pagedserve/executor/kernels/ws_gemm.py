"""Decode-batch projection GEMM for Hopper (sm_90), in Gluon: y[M, N] = x[M, K] @ W[N, K]^T, M <= 256 tokens.

Why: at the default workload's decode batches (M ~ 92-144) cuBLAS streams the 7B projections' weights at 70-78% of
the copy bandwidth, and Triton tiles lost to it (docs/gpu-notes.md, sessions 6-16: a token tile must be a power of 2,
and the automatic Hopper warp specialization hung). This kernel is written at the level cuBLAS's own Hopper kernels
work at, with Gluon's explicit partitions:

- swap-AB: W's rows are the MMA's M side (BN = 128 a tile, one warpgroup), the tokens its N side: one wgmma of BT
  tokens (a power of 2) and, when M is a little above it, a second of BT2 tokens on the same W tile in shared
  memory (M = 144 costs 128 + 16 rows of tensor work, not 256);
- warp specialization: one loader warp issues the TMA copies of W and x into a ring of STAGES buffers, gated by
  "empty" / "ready" mbarriers, while the MMA warpgroup consumes them with one wgmma group in flight;
- stream-K: the N / BN tiles' K steps, T in all, are cut into G equal ranges of consecutive steps, one per program
  (G = the SM count), so every SM streams the same number of weight bytes whatever the tile count (no wave tail,
  no split-K reduce kernel). A tile whose steps are spread over several programs is finished by the last of them
  to arrive: each writes its fp32 partial to a slot of `part` (two slots a program: its first and its last tile
  can be partial), takes a ticket from the tile's counter (acq_rel, after a barrier), and the one that completes
  the count sums the slots in program order (so the result does not depend on arrival order), writes the bf16
  tile and resets the counter for the next launch (CUDA-graph replays).

Gluon kernels need a Hopper GPU (no interpreter): tests/kernels/test_ws_gemm.py runs on CUDA only, against torch.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BN = 128  # weight rows a tile (the wgmma's M side, one warpgroup)
BK = 64  # K a step (128 bytes of bf16: the 128-byte swizzle)
_SMEM_BYTES = 232_448  # shared memory a block may have on sm_90
_SMEM_RESERVE = 40_960  # the epilogue's layout conversion (16-bit [128, 128]) and the barriers, with room


@gluon.jit
def _program_of(k, T, G):
    """The program whose range [p * T // G, (p + 1) * T // G) holds global K step k."""
    return ((k + 1) * G - 1) // T


@gluon.jit
def _ws_load(w_desc, x_desc, t_desc, w_bufs, x_bufs, t_bufs, ready, empty, k_lo, k_hi,
             KS: gl.constexpr, NBYTES: gl.constexpr, HAS_TAIL: gl.constexpr):
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    BN_: gl.constexpr = w_desc.block_type.shape[0]
    BK_: gl.constexpr = w_desc.block_type.shape[1]
    BT: gl.constexpr = x_desc.block_type.shape[0]
    for i in range(k_hi - k_lo):
        it = k_lo + i
        tile = it // KS
        kk = (it - tile * KS) * BK_
        s = i % STAGES
        # the ring's buffers start empty: the first pass waits on the phase before the barrier's initial one
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), NBYTES)
        tma.async_copy_global_to_shared(w_desc, [tile * BN_, kk], ready.index(s), w_bufs.index(s))
        tma.async_copy_global_to_shared(x_desc, [0, kk], ready.index(s), x_bufs.index(s))
        if HAS_TAIL:
            tma.async_copy_global_to_shared(t_desc, [BT, kk], ready.index(s), t_bufs.index(s))


@gluon.jit
def _store_tile(out_ptr, bias_ptr, acc, tile, t0, M, stride_om, OUT: gl.constexpr, HAS_BIAS: gl.constexpr):
    """acc [BN, BTx] fp32 (weight rows x tokens) (+ bias) to out[t0 + token, tile * BN + row] in the output dtype,
    tokens past M left out."""
    BN_: gl.constexpr = acc.type.shape[0]
    BTX: gl.constexpr = acc.type.shape[1]
    if HAS_BIAS:  # added in fp32, as cuBLAS's epilogue does
        acc = acc + gl.load(bias_ptr + tile * BN_ + gl.arange(0, BN_, layout=gl.SliceLayout(1, acc.type.layout))
                            ).to(gl.float32)[:, None]
    val = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), OUT)  # through shared memory: 16-bit, half the bytes
    offs_n = tile * BN_ + gl.arange(0, BN_, layout=gl.SliceLayout(1, OUT))
    offs_t = t0 + gl.arange(0, BTX, layout=gl.SliceLayout(0, OUT))
    ptrs = out_ptr + offs_t[None, :].to(gl.int64) * stride_om + offs_n[:, None]
    gl.store(ptrs, val, mask=offs_t[None, :] < M)


@gluon.jit
def _ws_mma(w_bufs, x_bufs, t_bufs, ready, empty, out_ptr, bias_ptr, part_ptr, cnt_ptr, M, stride_om, k_lo, k_hi, T,
            G, pid, KS: gl.constexpr, HAS_TAIL: gl.constexpr, HAS_BIAS: gl.constexpr, BT2: gl.constexpr,
            ACC: gl.constexpr, ACC2: gl.constexpr, OUT: gl.constexpr, RED: gl.constexpr):
    STAGES: gl.constexpr = w_bufs.type.shape[0]
    BN_: gl.constexpr = w_bufs.type.shape[1]
    BT: gl.constexpr = x_bufs.type.shape[1]
    BTT: gl.constexpr = BT + BT2  # a partial slot's columns (tokens)
    RC: gl.constexpr = 16  # tokens a pass of the reduce
    i = 0
    it = k_lo
    while it < k_hi:
        tile = it // KS
        seg_end = gl.minimum(k_hi, (tile + 1) * KS)
        acc = gl.zeros([BN_, BT], gl.float32, ACC)
        acc2 = gl.zeros([BN_, BT2], gl.float32, ACC2)
        for j in range(seg_end - it):
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc = warpgroup_mma(w_bufs.index(s), x_bufs.index(s).permute((1, 0)), acc, is_async=True)
            if HAS_TAIL:
                acc2 = warpgroup_mma(w_bufs.index(s), t_bufs.index(s).permute((1, 0)), acc2, is_async=True)
                acc, acc2 = warpgroup_mma_wait(num_outstanding=2, deps=(acc, acc2))
            else:
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            # the step before this one has been read by its wgmma group: its buffers go back to the loader
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=j > 0)
            i += 1
        if HAS_TAIL:
            acc, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc2))
        else:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES))

        if (it == tile * KS) & (seg_end == (tile + 1) * KS):  # the whole tile is this program's
            _store_tile(out_ptr, bias_ptr, acc, tile, 0, M, stride_om, OUT, HAS_BIAS)
            if HAS_TAIL:
                _store_tile(out_ptr, bias_ptr, acc2, tile, BT, M, stride_om, OUT, HAS_BIAS)
        else:
            # slot 0: a segment that starts this program's range; slot 1: one that ends it after starting earlier
            slot = pid * 2 + (k_lo < tile * KS).to(gl.int32)
            base = part_ptr + slot.to(gl.int64) * (BN_ * BTT)
            rows = gl.arange(0, BN_, layout=gl.SliceLayout(1, ACC))
            cols = gl.arange(0, BT, layout=gl.SliceLayout(0, ACC))
            gl.store(base + rows[:, None] * BTT + cols[None, :], acc)
            if HAS_TAIL:
                rows2 = gl.arange(0, BN_, layout=gl.SliceLayout(1, ACC2))
                cols2 = BT + gl.arange(0, BT2, layout=gl.SliceLayout(0, ACC2))
                gl.store(base + rows2[:, None] * BTT + cols2[None, :], acc2)
            gl.thread_barrier()  # every thread's partial stores come before the release below
            p_first = _program_of(tile * KS, T, G)
            p_last = _program_of((tile + 1) * KS - 1, T, G)
            arrived = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            gl.thread_barrier()
            if arrived == p_last - p_first:  # the last of the tile's programs: sum the slots in program order
                r_rows = gl.arange(0, BN_, layout=gl.SliceLayout(1, RED))
                r_cols = gl.arange(0, RC, layout=gl.SliceLayout(0, RED))
                n_offs = tile * BN_ + r_rows
                if HAS_BIAS:
                    bias = gl.load(bias_ptr + n_offs).to(gl.float32)
                for c in gl.static_range(BTT // RC):
                    total = gl.zeros([BN_, RC], gl.float32, RED)
                    for q in range(p_first, p_last + 1):
                        qslot = q * 2 + ((q * T) // G < tile * KS).to(gl.int32)
                        qbase = part_ptr + qslot.to(gl.int64) * (BN_ * BTT)
                        total += gl.load(qbase + r_rows[:, None] * BTT + (c * RC + r_cols)[None, :],
                                         cache_modifier=".cg")
                    if HAS_BIAS:
                        total = total + bias[:, None]
                    t_offs = c * RC + r_cols
                    ptrs = out_ptr + t_offs[None, :].to(gl.int64) * stride_om + n_offs[:, None]
                    gl.store(ptrs, total.to(out_ptr.dtype.element_ty), mask=t_offs[None, :] < M)
                gl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
        it = seg_end


@gluon.jit
def ws_gemm_kernel(w_desc, x_desc, t_desc, out_ptr, bias_ptr, part_ptr, cnt_ptr, M, stride_om, T, G,
                   KS: gl.constexpr, NBYTES: gl.constexpr, HAS_TAIL: gl.constexpr, HAS_BIAS: gl.constexpr,
                   BT2: gl.constexpr,
                   STAGES: gl.constexpr, num_warps: gl.constexpr):
    BN_: gl.constexpr = w_desc.block_type.shape[0]
    BK_: gl.constexpr = w_desc.block_type.shape[1]
    BT: gl.constexpr = x_desc.block_type.shape[0]
    pid = gl.program_id(0)
    k_lo = (pid * T) // G
    k_hi = ((pid + 1) * T) // G

    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BN_, BK_], w_desc.layout)
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BT, BK_], x_desc.layout)
    if HAS_TAIL:
        t_bufs = gl.allocate_shared_memory(t_desc.dtype, [STAGES, BT2, BK_], t_desc.layout)
    else:
        t_bufs = x_bufs  # not read
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)

    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                 instr_shape=[16, BT, 16])
    ACC2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BT2, 16])
    # stores: 8 consecutive weight rows (16 bytes of bf16) a thread, 16 threads along them: 256-byte runs of a token
    OUT: gl.constexpr = gl.BlockedLayout([8, 1], [16, 2], [1, num_warps], [0, 1])
    RED: gl.constexpr = gl.BlockedLayout([8, 2], [16, 2], [1, num_warps], [0, 1])

    gl.warp_specialize([
        (_ws_mma, (w_bufs, x_bufs, t_bufs, ready, empty, out_ptr, bias_ptr, part_ptr, cnt_ptr, M, stride_om, k_lo,
                   k_hi, T, G, pid, KS, HAS_TAIL, HAS_BIAS, BT2, ACC, ACC2, OUT, RED)),
        (_ws_load, (w_desc, x_desc, t_desc, w_bufs, x_bufs, t_bufs, ready, empty, k_lo, k_hi, KS, NBYTES, HAS_TAIL)),
    ], [1], [40])


def token_tiles(m: int) -> tuple[int, int]:
    """(BT, BT2): the main token tile (a power of 2, >= 16) and the tail tile (0: none) that cover m tokens."""
    if m <= 16:
        return 16, 0
    bt = 1 << (m - 1).bit_length()
    if bt <= 128:
        return bt, 0
    rest = m - 128
    if rest > 128:
        raise ValueError(f"ws_gemm takes at most 256 tokens, got {m}")
    return 128, max(16, 1 << (rest - 1).bit_length())


def _smem_layout(block):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)


class WsGemm:
    """y = x @ W^T through ws_gemm_kernel for one weight [N, K] (bf16 / fp16, N a multiple of 128, K of 64).

    Holds the weight's TMA descriptor, the partial slots and the tile counters (zero between launches), so a
    launch allocates nothing and can be captured in a CUDA graph."""

    def __init__(self, weight: torch.Tensor, num_sms: int | None = None, stages: int = 4) -> None:
        n, k = weight.shape
        if n % BN or k % BK:
            raise ValueError(f"ws_gemm needs N % {BN} == 0 and K % {BK} == 0, got {tuple(weight.shape)}")
        self.weight = weight
        self.n, self.k = n, k
        self.ks = k // BK
        self.tiles = n // BN
        self.total = self.tiles * self.ks
        sms = num_sms or torch.cuda.get_device_properties(weight.device).multi_processor_count
        self.grid = min(sms, self.total)
        self.stages = stages
        self.w_desc = TensorDescriptor.from_tensor(weight, [BN, BK], _smem_layout([BN, BK]))
        self.part = torch.empty(self.grid * 2 * BN * 256, device=weight.device, dtype=torch.float32)
        self.cnt = torch.zeros(self.tiles, device=weight.device, dtype=torch.int32)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None, bias: torch.Tensor | None = None
                 ) -> torch.Tensor:
        m = x.shape[0]
        if x.shape[1] != self.k or x.stride(1) != 1:
            raise ValueError(f"x must be [M, {self.k}] with contiguous rows, got {tuple(x.shape)}")
        if out is None:
            out = torch.empty(m, self.n, device=x.device, dtype=x.dtype)
        bt, bt2 = token_tiles(m)
        x_desc = TensorDescriptor.from_tensor(x, [bt, BK], _smem_layout([bt, BK]))
        t_desc = TensorDescriptor.from_tensor(x, [bt2, BK], _smem_layout([bt2, BK])) if bt2 else x_desc
        nbytes = (BN + bt + bt2) * BK * x.element_size()
        stages = min(self.stages, (_SMEM_BYTES - _SMEM_RESERVE) // nbytes)
        ws_gemm_kernel[(self.grid,)](
            self.w_desc, x_desc, t_desc, out, out if bias is None else bias, self.part, self.cnt, m, out.stride(0),
            self.total, self.grid, KS=self.ks, NBYTES=nbytes, HAS_TAIL=bool(bt2), HAS_BIAS=bias is not None,
            BT2=bt2 or 16, STAGES=stages, num_warps=4,
        )
        return out
