"""LoRA on the device: adapter slots beside the model's projections, and the per-token delta.

With `enable_lora`, every decoder projection gets a `LoRALayer` holding all `max_loras` slots densely: A as
[S * Rt, in] and B as [out, S * Rt], slot s in columns (s - 1) * Rt ... s * Rt, Rt = parts * R (R = max_lora_rank;
a merged projection, q|k|v or gate|up, keeps each part's A in its own R rows and its B block-diagonally). An adapter
of rank r < R fills r of its part's rows (the rest stay zero), its scale folded into B. Before every step the model
runner hands the manager the step's per-token slots (0: no adapter), the tokens sorted by slot and each slot's first
index among them; each projection then adds, for every token t with an adapter,

    y[t] += (x[t] A_s^T) B_s^T    (s: t's slot)

On CUDA, for forwards of up to KERNEL_MAX_TOKENS tokens, two Triton kernels a projection do it
(kernels/lora_sgmv.py: shrink and expand, each block of tokens with its slot's A and B only); otherwise (larger
forwards, off CUDA, PAGEDSERVE_LORA_KERNELS=0) three torch ops over every slot's columns with a 0/1 mask of each
token's slot (matmul, multiply by the mask, addmm). Shapes are static either way, so the
CUDA graphs capture them (the step's slots, order and starts live in fixed buffers; each replay reads the step's).
A step without adapters pays the kernels' launches in the graphs (their programs find no tokens); an eager step
without adapters (a long prefill) skips them. The fused batch-1 kernels that bypass the projections' forward
(qkv + rotary, gate_up + SiLU) stand aside on such models.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from pagedserve.distributed import tp_size
from pagedserve.lora import PROJECTIONS, LoRARequest, LoRAWeights, read_adapter

# Up to this many tokens a forward the kernels run (the decode graphs' largest size); prefill chunks above it take
# the torch path, which ran the 8,192-token mixed steps as fast (session 24, run 1). Per layer at the Qwen2-7B shapes
# on an H200, four adapters (us, kernels / torch; run 6): 1 token 24.4 / 40.5, 16 32.4 / 42.1, 64 39.0 / 45.4, 139
# 54.8 / 58.4, 256 66.1 / 70.8. Batch-1 decode with an adapter: 209.7 tok/s against 182.7.
KERNEL_MAX_TOKENS = 256


class LoRALayer:
    def __init__(self, manager: LoRAManager, in_features: int, part_sizes: list[int], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.manager = manager
        self.part_sizes = list(part_sizes)
        self.max_rank = max_rank
        self.cols_per_slot = len(part_sizes) * max_rank
        width = num_slots * self.cols_per_slot
        self.a = torch.zeros(width, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(sum(part_sizes), width, dtype=dtype, device=device)
        self.col_slot = torch.arange(width, device=device) // self.cols_per_slot + 1  # [width] int64: 1..S

    def _cols(self, slot: int) -> slice:
        return slice((slot - 1) * self.cols_per_slot, slot * self.cols_per_slot)

    def clear(self, slot: int) -> None:
        self.a[self._cols(slot)].zero_()
        self.b[:, self._cols(slot)].zero_()

    def set_part(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor) -> None:
        rank = a.shape[0]
        c0 = (slot - 1) * self.cols_per_slot + part * self.max_rank
        o0 = sum(self.part_sizes[:part])
        self.a[c0:c0 + rank].copy_(a)
        self.b[o0:o0 + b.shape[0], c0:c0 + rank].copy_(b)

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.manager.active:  # an eager step without adapters
            return y
        manager = self.manager
        if x.shape[0] > manager.token_slot.shape[0]:
            raise RuntimeError(f"a LoRA step of {x.shape[0]} tokens; the slot buffer holds "
                               f"{manager.token_slot.shape[0]}")
        if manager.use_kernels and x.shape[0] <= manager.kernel_max_tokens:
            from pagedserve.executor.kernels.lora_sgmv import lora_expand, lora_shrink

            if x.stride(-1) != 1:
                x = x.contiguous()
            h = lora_shrink(x, self.a, manager.token_order, manager.slot_starts, manager.partials_for(self),
                            manager.max_loras, self.cols_per_slot)
            return lora_expand(h, self.b, manager.token_order, manager.slot_starts, y, manager.max_loras)
        mask = manager.mask_for(self)
        h = (x.to(self.a.dtype) @ self.a.T).mul_(mask[: x.shape[0]])
        return y.addmm_(h.to(y.dtype), self.b.T.to(y.dtype))


class LoRAManager:
    """Adapter slots: up to `max_loras` adapters resident at once. The engine registers a request's adapter when
    the request arrives (read and checked; kept on the host, the newest CPU_CACHE of them); the scheduler asks for
    its slot when it admits the request, loading it over the least recently used adapter that no running request
    holds, or makes the request wait while every slot is held."""

    CPU_CACHE = 8  # adapters kept read on the host beyond those of unfinished requests

    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int, max_tokens: int) -> None:
        """max_tokens: the most tokens any forward runs (padded eager steps, graph sizes, the memory profile)."""
        self.max_loras = max_loras
        self.max_rank = max_rank
        device = next(model.parameters()).device
        self.token_slot = torch.zeros(max_tokens, dtype=torch.int64, device=device)  # filled before each step
        # The Triton kernels (kernels/lora_sgmv.py): on CUDA unless PAGEDSERVE_LORA_KERNELS=0; =1 also elsewhere
        # (the Triton interpreter on CPU, for tests).
        mode = os.environ.get("PAGEDSERVE_LORA_KERNELS", "auto")
        self.use_kernels = mode == "1" or (mode != "0" and device.type == "cuda")
        # The step's tokens sorted by slot and each slot's first index among them (load_step): what the kernels
        # read. starts[s] .. starts[s + 1] are slot s's; starts[max_loras + 1] is the step's token count.
        self.token_order = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_starts = torch.zeros(max_loras + 2, dtype=torch.int64, device=device)
        self._partials: dict[int, torch.Tensor] = {}  # per columns a slot: the shrink's fp32 partial sums
        self._max_tokens = max_tokens
        # Forwards of more tokens take the torch path (PAGEDSERVE_LORA_KERNEL_MAX_TOKENS; KERNEL_MAX_TOKENS).
        self.kernel_max_tokens = int(os.environ.get("PAGEDSERVE_LORA_KERNEL_MAX_TOKENS", KERNEL_MAX_TOKENS))
        # False while an eager step without adapters runs (the runner sets it): the layers add nothing. True
        # otherwise, so the CUDA graphs, captured once, always hold the adapters' kernels.
        self.active = True
        # Per column layout (columns a slot, dtype): the [max_tokens, S * Rt] 0/1 mask of each token's slot, made
        # from token_slot by load_step (outside any graph, one kernel each) and read by the layers.
        self._masks: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers: dict[tuple[int, str], LoRALayer] = {}
        self._dtype = torch.float32
        self.num_layers = len(model.model.layers)
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            # (An MoE layer's sparse MLP takes no adapters: its projections are the stacked experts.)
            projections = [("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj)]
            if hasattr(mlp, "gate_up_proj"):
                projections += [("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)]
            for name, module in projections:
                weight = module.weight
                # fp8 weights (quantization="fp8"): the adapter in bf16 beside them
                dtype = weight.dtype if weight.element_size() > 1 else torch.bfloat16
                module.lora = LoRALayer(self, module.in_features,
                                        getattr(module, "output_sizes", [module.out_features]), max_loras, max_rank,
                                        dtype, weight.device)
                self.layers[(i, name)] = module.lora
                self._dtype = dtype  # adapters are kept on the host in the slots' dtype
        for layer in self.layers.values():  # buffers made now, before the KV cache takes the memory (and never
            if self.use_kernels:            # inside a graph capture): the kernels' partial sums, the torch path's masks
                self.partials_for(layer)
            if not self.use_kernels or self.kernel_max_tokens < max_tokens:
                self.mask_for(layer)
        self._slots: OrderedDict[int, int] = OrderedDict()  # lora_int_id -> slot, least recently used first
        self._names: dict[int, str] = {}  # lora_int_id -> name, for every adapter registered
        self._read: OrderedDict[int, LoRAWeights] = OrderedDict()  # lora_int_id -> weights on the host
        self.pending_loads: list[tuple[int, LoRARequest]] = []  # tensor parallelism: see take_loads
        # The adapter ids of unfinished requests (the engine sets it): those stay read, so a waiting request's
        # adapter never has to be read again when its slot comes (its folder may be gone by then).
        self.live_ids: Callable[[], set[int]] = set

    def register(self, request: LoRARequest) -> None:
        """Reads and checks `request`'s adapter (once per id); ValueError for a bad one."""
        known = self._names.get(request.lora_int_id)
        if known is not None and known != request.lora_name:
            raise ValueError(f"lora_int_id {request.lora_int_id} is already the adapter {known!r}")
        self._weights(request)
        self._names[request.lora_int_id] = request.lora_name

    def _weights(self, request: LoRARequest) -> LoRAWeights:
        adapter = self._read.get(request.lora_int_id)
        if adapter is not None:
            self._read.move_to_end(request.lora_int_id)
            return adapter
        adapter = _this_ranks_part(read_adapter(request.lora_path, dtype=self._dtype))
        if adapter.rank > self.max_rank:
            raise ValueError(f"the adapter {request.lora_name!r} has rank {adapter.rank}, above max_lora_rank "
                             f"{self.max_rank}")
        for (layer, name), (a, b) in adapter.weights.items():
            target, part = PROJECTIONS[name]
            lora = self.layers.get((layer, target))
            if lora is None:
                if layer < self.num_layers:  # an MoE layer's MLP: its experts take no adapters
                    raise ValueError(f"the adapter {request.lora_name!r} targets {name} of layer {layer}, a "
                                     "mixture-of-experts MLP, which takes no LoRA weights here")
                raise ValueError(f"the adapter {request.lora_name!r} targets layer {layer}, which this model lacks")
            if a.shape[1] != lora.a.shape[1] or b.shape[0] != lora.part_sizes[part]:
                raise ValueError(f"the adapter {request.lora_name!r}: layer {layer} {name} has lora_A "
                                 f"{tuple(a.shape)} / lora_B {tuple(b.shape)}, which do not fit this model")
        self._read[request.lora_int_id] = adapter
        if len(self._read) > self.CPU_CACHE:
            live = self.live_ids() | {request.lora_int_id}
            for lora_id in [i for i in self._read if i not in live][: len(self._read) - self.CPU_CACHE]:
                del self._read[lora_id]
        return adapter

    def slot_of(self, request: LoRARequest, in_use: set[int]) -> int | None:
        """The slot holding `request`'s adapter, loading it (into a free slot, or over the least recently used one
        not in `in_use`) when it is not resident; None while every slot is in use."""
        slot = self._slots.get(request.lora_int_id)
        if slot is not None:
            self._slots.move_to_end(request.lora_int_id)
            return slot
        used = set(self._slots.values())
        free = [s for s in range(1, self.max_loras + 1) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next((lid for lid, s in self._slots.items() if s not in in_use), None)
            if victim is None:
                return None
            slot = self._slots.pop(victim)
        self.load_into(slot, request)
        if tp_size() > 1:
            self.pending_loads.append((slot, request))
        return slot

    def load_into(self, slot: int, request: LoRARequest) -> None:
        """`request`'s adapter into `slot` (over whatever it held): the scheduler's choice on rank 0, the step
        message's on the other ranks of tensor parallelism."""
        for lora_id in [i for i, s in self._slots.items() if s == slot]:
            del self._slots[lora_id]
        adapter = self._weights(request)  # (read again if it left the host cache)
        for layer in self.layers.values():
            layer.clear(slot)
        for (layer, name), (a, b) in adapter.weights.items():
            target, part = PROJECTIONS[name]
            lora = self.layers[(layer, target)]
            lora.set_part(slot, part, a.to(lora.a.dtype), b.to(lora.b.dtype))
        self._slots[request.lora_int_id] = slot
        self._names[request.lora_int_id] = request.lora_name

    def take_loads(self) -> list[tuple[int, LoRARequest]]:
        """The slot loads since the last call (rank 0 sends them with the step: SchedulerOutput.lora_loads)."""
        loads, self.pending_loads = self.pending_loads, []
        return loads

    def partials_for(self, layer: LoRALayer) -> torch.Tensor:
        """The shrink's fp32 partial sums for layers of `layer`'s columns a slot (one buffer each, which every
        such layer uses in turn)."""
        buf = self._partials.get(layer.cols_per_slot)
        if buf is None:
            from pagedserve.executor.kernels.lora_sgmv import partials_rows

            rows = partials_rows(self._max_tokens)
            buf = self._partials[layer.cols_per_slot] = torch.empty(rows * layer.cols_per_slot,
                                                                    dtype=torch.float32, device=layer.a.device)
        return buf

    def mask_for(self, layer: LoRALayer) -> torch.Tensor:
        key = (layer.cols_per_slot, layer.a.dtype)
        entry = self._masks.get(key)
        if entry is None:
            mask = (self.token_slot[:, None] == layer.col_slot[None, :]).to(layer.a.dtype)
            entry = self._masks[key] = (mask, layer.col_slot)
        return entry[0]

    def step_layout(self, token_slots: np.ndarray, out: np.ndarray) -> None:
        """Writes into `out` (step_size(n) int64 values, n = len(token_slots)) the step's per-token slots, the
        token indices sorted by slot (stable) and each slot's first index among them: what load_step takes."""
        n = token_slots.shape[0]
        out[:n] = token_slots
        out[n : 2 * n] = np.argsort(token_slots, kind="stable")
        out[2 * n] = 0
        np.cumsum(np.bincount(token_slots, minlength=self.max_loras + 1), out=out[2 * n + 1 :])

    def step_size(self, num_tokens: int) -> int:
        return 2 * num_tokens + self.max_loras + 2

    def load_step(self, layout: torch.Tensor) -> None:
        """step_layout's values (a device tensor) into the buffers the layers read: the slots (zeros after them: a
        graph's padding, a padded eager step), the order and starts, and the torch path's masks."""
        n = (layout.shape[0] - self.max_loras - 2) // 2
        self.token_slot[n:].zero_()
        self.token_slot[:n].copy_(layout[:n])
        if self.use_kernels:
            self.token_order[:n].copy_(layout[n : 2 * n])
            self.slot_starts.copy_(layout[2 * n :])
        for mask, col_slot in self._masks.values():
            torch.eq(self.token_slot[:, None], col_slot[None, :], out=mask)


def _this_ranks_part(adapter: LoRAWeights) -> LoRAWeights:
    """Tensor parallelism: a column-parallel projection (q, k, v, gate, up) keeps A whole and this rank's rows of B;
    a row-parallel one (o, down) this rank's columns of A and B whole, so each rank adds (x_r A_r^T) B^T to its
    partial output and the projection's all-reduce sums the adapter's delta with the rest."""
    if tp_size() == 1:
        return adapter
    from pagedserve.executor.models.decoder import tp_slice

    weights = {}
    for (layer, name), (a, b) in adapter.weights.items():
        hf_name = f"model.layers.{layer}.{'mlp' if name in _MLP else 'self_attn'}.{name}.weight"
        if name in ("o_proj", "down_proj"):
            weights[(layer, name)] = (tp_slice(hf_name, a).contiguous(), b)
        else:
            weights[(layer, name)] = (a, tp_slice(hf_name, b).contiguous())
    return LoRAWeights(adapter.rank, weights)


_MLP = ("gate_proj", "up_proj", "down_proj")

__all__ = ["LoRALayer", "LoRAManager"]
