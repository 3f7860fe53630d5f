"""LoRA on the device: adapter slots beside the model's projections, and the per-step delta.

With `enable_lora`, every decoder projection gets a `LoRALayer`: for `max_loras` slots, A stacked as
[slots + 1, parts * R, in] and B as [slots + 1, out, parts * R] (R = max_lora_rank, slot 0 all zeros: no adapter).
A merged projection (q|k|v, gate|up) keeps each part's A in its own R rows and each part's B block-diagonally, so one
pair of matmuls serves all its parts; an adapter of rank r < R fills r of them (the rest stay zero), with its scale
folded into B. A step whose tokens use adapters runs eager: for each slot in use, the rows of its tokens take
y[rows] += (x[rows] A^T) B^T (index_select, two small matmuls, index_add_). Steps without adapters do nothing extra
and keep their CUDA graphs.

`ACTIVE` holds the running step's mapping (set by the model runner around its forward): the layers read it, and the
batch-1 fused kernels that bypass the projections' forward (qkv + rotary, gate_up + SiLU) stand aside while it is set.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from pagedserve.lora import PROJECTIONS, LoRARequest, LoRAWeights, read_adapter


@dataclass(slots=True)
class LoRAMapping:
    """One step's adapters: (slot, row indices of its tokens on the device) for each slot in use."""

    slots: list[tuple[int, torch.Tensor]]


ACTIVE: LoRAMapping | None = None


class LoRALayer:
    def __init__(self, in_features: int, part_sizes: list[int], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.part_sizes = list(part_sizes)
        self.max_rank = max_rank
        parts = len(part_sizes)
        self.a = torch.zeros(num_slots + 1, parts * max_rank, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots + 1, sum(part_sizes), parts * max_rank, dtype=dtype, device=device)

    def clear(self, slot: int) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()

    def set_part(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor) -> None:
        rank, r0 = a.shape[0], part * self.max_rank
        o0 = sum(self.part_sizes[:part])
        if a.shape[1] != self.a.shape[2] or b.shape[0] != self.part_sizes[part]:
            raise ValueError(f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a projection of "
                             f"{self.a.shape[2]} inputs and {self.part_sizes[part]} outputs")
        self.a[slot, r0:r0 + rank].copy_(a)
        self.b[slot, o0:o0 + b.shape[0], r0:r0 + rank].copy_(b)

    def apply(self, x: torch.Tensor, y: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
        for slot, rows in mapping.slots:
            xs = x.index_select(0, rows)
            delta = (xs @ self.a[slot].T) @ self.b[slot].T
            y.index_add_(0, rows, delta.to(y.dtype))
        return y


class LoRAManager:
    """Adapter slots: up to `max_loras` adapters resident at once. The engine registers a request's adapter when
    the request arrives (read and checked; kept on the host, the newest CPU_CACHE of them); the scheduler asks for
    its slot when it admits the request, loading it over the least recently used adapter that no running request
    holds, or makes the request wait while every slot is held."""

    CPU_CACHE = 32  # adapters kept read on the host

    def __init__(self, model: torch.nn.Module, max_loras: int, max_rank: int) -> None:
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.layers: dict[tuple[int, str], LoRALayer] = {}
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for name, module in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                                 ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)):
                weight = module.weight
                # fp8 weights (quantization="fp8"): the adapter in bf16 beside them
                dtype = weight.dtype if weight.element_size() > 1 else torch.bfloat16
                module.lora = LoRALayer(module.in_features, getattr(module, "output_sizes", [module.out_features]),
                                        max_loras, max_rank, dtype, weight.device)
                self.layers[(i, name)] = module.lora
        self._slots: OrderedDict[int, int] = OrderedDict()  # lora_int_id -> slot, least recently used first
        self._names: dict[int, str] = {}  # lora_int_id -> name, for every adapter registered
        self._read: OrderedDict[int, LoRAWeights] = OrderedDict()  # lora_int_id -> weights on the host

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
        adapter = read_adapter(request.lora_path)
        if adapter.rank > self.max_rank:
            raise ValueError(f"the adapter {request.lora_name!r} has rank {adapter.rank}, above max_lora_rank "
                             f"{self.max_rank}")
        for (layer, name), (a, b) in adapter.weights.items():
            target, part = PROJECTIONS[name]
            lora = self.layers.get((layer, target))
            if lora is None:
                raise ValueError(f"the adapter {request.lora_name!r} targets layer {layer}, which this model lacks")
            if a.shape[1] != lora.a.shape[2] or b.shape[0] != lora.part_sizes[part]:
                raise ValueError(f"the adapter {request.lora_name!r}: layer {layer} {name} has lora_A "
                                 f"{tuple(a.shape)} / lora_B {tuple(b.shape)}, which do not fit this model")
        self._read[request.lora_int_id] = adapter
        while len(self._read) > self.CPU_CACHE:
            self._read.popitem(last=False)
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
        adapter = self._weights(request)  # (read again if it left the host cache)
        for layer in self.layers.values():
            layer.clear(slot)
        for (layer, name), (a, b) in adapter.weights.items():
            target, part = PROJECTIONS[name]
            lora = self.layers[(layer, target)]
            lora.set_part(slot, part, a.to(lora.a.dtype), b.to(lora.b.dtype))
        self._slots[request.lora_int_id] = slot
        return slot


__all__ = ["ACTIVE", "LoRALayer", "LoRAManager", "LoRAMapping"]
