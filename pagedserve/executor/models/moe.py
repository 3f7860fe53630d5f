"""The mixture-of-experts MLP of Qwen2-MoE, Qwen3-MoE and Mixtral, for a flat token batch.

A router (a [E, H] matrix) scores each token's experts; softmax in fp32 over all E, the top k kept (renormalized
to sum to 1 for Mixtral and where the config's `norm_topk_prob` says so), as Transformers routes. Each expert is a
SiLU-gated MLP; their weights are held stacked, as the fused kernels read them:

    experts.w13  [E, 2 I, H]  each expert's gate_proj rows, then its up_proj rows
    experts.w2   [E, H, I]    each expert's down_proj

Qwen2-MoE adds a shared expert (a plain MLP every token goes through) scaled by sigmoid(shared_expert_gate(x)).
gpt-oss (models/gpt_oss.py) adds biases (b13 [E, 2I], b2 [E, H]) and its own gate: gate clamped to <= limit, up to
[-limit, limit], (up + 1) * gate * sigmoid(alpha * gate) (act="gpt_oss").
Checkpoints name the experts one by one (mlp.experts.{e}.gate_proj / up_proj / down_proj; Mixtral's
block_sparse_moe.experts.{e}.w1 / w3 / w2); Transformers 5's in-memory names (experts.gate_up_proj [E, 2I, H],
experts.down_proj [E, H, I]) load too.

The experts run on CUDA as two Triton grouped GEMMs (kernels/fused_moe.py: no host sync, so CUDA graphs capture
them), elsewhere as a torch loop over the experts a step uses (PAGEDSERVE_MOE_KERNELS=1 runs the kernels off CUDA,
in Triton's interpreter: tests; =0 the torch loop on CUDA too, which needs --enforce-eager). With tensor
parallelism each rank holds a slice of every expert's intermediate columns (gate/up rows, down columns) and the
block's output is summed over the ranks once (the shared expert's partial output with it).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.distributed import all_reduce, shard, tp_rank, tp_size

# A checkpoint's per-expert tensor: (the MoE block's name, expert, part). Mixtral's w1 / w3 / w2 are gate / up / down.
EXPERT_TENSOR = re.compile(r"^(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
# Transformers 5's stacked experts, as its modules hold them in memory.
# (GGUF files stack gate and up apart: experts.gate_proj / up_proj [E, I, H], gguf_loader.py)
# gpt-oss names its experts' biases gate_up_proj_bias / down_proj_bias.
STACKED_EXPERTS = re.compile(r"^(.*)\.experts\.(gate_up_proj|gate_proj|up_proj|down_proj)(_bias)?$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def num_experts_of(hf_config: Any) -> int:
    return int(getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None) or 0)


def is_moe_layer(hf_config: Any, layer_idx: int) -> bool:
    """Whether layer layer_idx's MLP is the sparse block (Qwen-MoE's decoder_sparse_step and mlp_only_layers)."""
    if num_experts_of(hf_config) == 0:
        return False
    if layer_idx in (getattr(hf_config, "mlp_only_layers", None) or []):
        return False
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    return (layer_idx + 1) % step == 0


def use_moe_kernels(device: torch.device) -> bool:
    mode = os.environ.get("PAGEDSERVE_MOE_KERNELS", "auto")
    return mode == "1" or (mode != "0" and device.type == "cuda")


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, expert ids [T, k]) from the router's logits [T, E]."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


ACTIVATIONS = ("silu", "gpt_oss")


def gated(gate: torch.Tensor, up: torch.Tensor, act: str = "silu", alpha: float = 1.702, limit: float = 7.0
          ) -> torch.Tensor:
    """An expert's gated activation: SwiGLU (silu(gate) * up), or gpt-oss's clamped variant."""
    if act == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def experts_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                  route_weights: torch.Tensor, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                  act: str = "silu", alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """The reference: a loop over the experts the step uses (a host sync for their counts). [T, H] in x's dtype.
    b13 [E, 2I] / b2 [E, H]: the experts' biases (gpt-oss); act, alpha, limit: see gated()."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the torch path of the MoE experts cannot run inside a CUDA graph; unset "
                           "PAGEDSERVE_MOE_KERNELS=0 or pass --enforce-eager")
    t, top_k = ids.shape
    inter = w2.shape[2]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    out = torch.zeros(t * top_k, x.shape[1], dtype=torch.float32, device=x.device)
    weights = route_weights.reshape(-1).float()
    start = 0
    for expert, count in enumerate(counts):
        if count:
            entries = order[start:start + count]
            gate_up = x[entries // top_k] @ w13[expert].t()
            if b13 is not None:
                gate_up = gate_up + b13[expert]
            h = gated(gate_up[:, :inter], gate_up[:, inter:], act, alpha, limit)
            down = h @ w2[expert].t()
            if b2 is not None:
                down = down + b2[expert]
            out[entries] = down.float() * weights[entries, None]
        start += count
    return out.view(t, top_k, -1).sum(1).to(x.dtype)


class _Matrix(nn.Module):
    """A weight read by F.linear, not a projection (no fp8, no LoRA): the router and the shared expert's gate."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols), requires_grad=False)


class MoEExperts(nn.Module):
    """gpt_oss: gpt-oss's experts (biases, its gate, and its checkpoints' layout: gate_up_proj [E, H, 2I] with the
    gate and up columns interleaved, down_proj [E, I, H])."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, gpt_oss: bool = False,
                 alpha: float = 1.702, limit: float = 7.0) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate = shard(intermediate_size, "moe_intermediate_size")  # this rank's columns
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate), requires_grad=False)
        self.gpt_oss = gpt_oss
        self.act, self.alpha, self.limit = ("gpt_oss" if gpt_oss else "silu"), float(alpha), float(limit)
        # gpt-oss's biases: b2 is added once, after the ranks' partial outputs are summed (rank 0 holds it).
        self.b13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate), requires_grad=False) \
            if gpt_oss else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False) if gpt_oss else None
        self._parts: set[tuple[int, str]] = set()

    def load_part(self, expert: int, part: str, tensor: torch.Tensor) -> None:
        """One expert's gate / up [I, H] or down [H, I] as the checkpoint stores it (whole: sliced here per rank)."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} of a model with {self.num_experts} experts")
        if part == "down":
            self._copy(self.w2[expert], _columns(tensor, 1), f"expert {expert} down_proj")
        else:
            rows = slice(0, self.intermediate) if part == "gate" else slice(self.intermediate, 2 * self.intermediate)
            self._copy(self.w13[expert, rows], _columns(tensor, 0), f"expert {expert} {part}_proj")
        self._parts.add((expert, part))

    def load_stacked(self, which: str, tensor: torch.Tensor) -> None:
        """Transformers 5's stacked gate_up_proj [E, 2I, H] or down_proj [E, H, I] (whole); a GGUF file's gate_proj
        or up_proj [E, I, H]; gpt-oss's (see the class) and its biases (which ends in _bias)."""
        if self.gpt_oss:
            self._load_gpt_oss(which, tensor)
            return
        if which.endswith("_bias"):
            raise ValueError(f"experts.{which}: this model's experts have no biases")
        if which == "down_proj":
            self._copy(self.w2, _columns(tensor, 2), "experts.down_proj")
            self._parts.update((e, "down") for e in range(self.num_experts))
            return
        if which in ("gate_proj", "up_proj"):
            rows = slice(0, self.intermediate) if which == "gate_proj" else slice(self.intermediate, None)
            self._copy(self.w13[:, rows], _columns(tensor, 1), f"experts.{which}")
            self._parts.update((e, which[:-5]) for e in range(self.num_experts))
            return
        gate, up = tensor.chunk(2, dim=1)
        self._copy(self.w13, torch.cat([_columns(gate, 1), _columns(up, 1)], dim=1), "experts.gate_up_proj")
        self._parts.update((e, p) for e in range(self.num_experts) for p in ("gate", "up"))

    def _load_gpt_oss(self, which: str, tensor: torch.Tensor) -> None:
        if which in ("gate_up_proj", "gate_up_proj_bias"):  # gate and up interleaved along the last dim
            gate, up = tensor[..., 0::2], tensor[..., 1::2]
            if which == "gate_up_proj":  # [E, H, I] each: rows of w13 are their columns
                gate, up = gate.transpose(1, 2), up.transpose(1, 2)
                self._copy(self.w13, torch.cat([_columns(gate, 1), _columns(up, 1)], dim=1), "experts.gate_up_proj")
                self._parts.update((e, p) for e in range(self.num_experts) for p in ("gate", "up"))
            else:
                self._copy(self.b13, torch.cat([_columns(gate, 1), _columns(up, 1)], dim=1),
                           "experts.gate_up_proj_bias")
                self._parts.update((e, "bias13") for e in range(self.num_experts))
        elif which == "down_proj":  # [E, I, H]
            self._copy(self.w2, _columns(tensor.transpose(1, 2), 2), "experts.down_proj")
            self._parts.update((e, "down") for e in range(self.num_experts))
        elif which == "down_proj_bias":  # [E, H]: added once over the ranks
            self._copy(self.b2, tensor if tp_rank() == 0 else torch.zeros_like(tensor), "experts.down_proj_bias")
            self._parts.update((e, "bias2") for e in range(self.num_experts))
        else:
            raise ValueError(f"experts.{which}: not a gpt-oss expert tensor (gate_up_proj, down_proj and their "
                             "_bias)")

    def loaded(self) -> set[str]:
        """Which of w13 / w2 (and b13 / b2) every expert's parts filled."""
        done = set()
        if self.gpt_oss:
            for name, part in (("b13", "bias13"), ("b2", "bias2")):
                if all((e, part) in self._parts for e in range(self.num_experts)):
                    done.add(name)
        if all((e, "gate") in self._parts and (e, "up") in self._parts for e in range(self.num_experts)):
            done.add("w13")
        if all((e, "down") in self._parts for e in range(self.num_experts)):
            done.add("w2")
        return done

    @staticmethod
    def _copy(param: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
        if tensor.shape != param.shape:
            raise ValueError(f"{what}: checkpoint shape {tuple(tensor.shape)} does not match the model's "
                             f"{tuple(param.shape)}; is config.json the right one?")
        if tensor.dtype == torch.float8_e4m3fn:
            raise ValueError(f"{what}: fp8 experts are not supported (the experts are held in the model's dtype)")
        param.copy_(tensor)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, route_weights: torch.Tensor) -> torch.Tensor:
        if use_moe_kernels(x.device):
            from pagedserve.executor.kernels.fused_moe import fused_experts

            return fused_experts(x, self.w13, self.w2, ids, route_weights, b13=self.b13, b2=self.b2, act=self.act,
                                 alpha=self.alpha, limit=self.limit)
        return experts_torch(x, self.w13, self.w2, ids, route_weights, self.b13, self.b2, self.act, self.alpha,
                             self.limit)


def _columns(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's slice of an expert tensor's intermediate dimension `dim`."""
    return tensor if tp_size() == 1 else tensor.chunk(tp_size(), dim=dim)[tp_rank()]


class SparseMoeBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's gated shared expert). forward: [T, H] -> [T, H], summed over the ranks."""

    def __init__(self, hf_config: Any, renormalize: bool) -> None:
        super().__init__()
        from pagedserve.executor.models.decoder import DecoderMLP

        hidden = hf_config.hidden_size
        num_experts = num_experts_of(hf_config)
        self.top_k = int(hf_config.num_experts_per_tok)
        if not 0 < self.top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok {self.top_k} for {num_experts} experts")
        self.renormalize = renormalize
        # Qwen-MoE: moe_intermediate_size; Mixtral: intermediate_size is the experts'.
        inter = getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size
        self.gate = _Matrix(num_experts, hidden)
        self.experts = MoEExperts(num_experts, hidden, inter)
        shared = int(getattr(hf_config, "shared_expert_intermediate_size", 0) or 0)
        self.shared_expert = DecoderMLP(hidden, shared, bias=False, reduce=False) if shared else None
        self.shared_expert_gate = _Matrix(1, hidden) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(F.linear(x, self.gate.weight), self.top_k, self.renormalize)
        out = self.experts(x, ids, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(F.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return all_reduce(out)


def expert_key(name: str) -> tuple[str, int, str] | None:
    """(MoE block, expert, part) of a per-expert checkpoint tensor's name, Mixtral's block_sparse_moe as mlp."""
    match = EXPERT_TENSOR.match(name)
    if not match:
        return None
    return match.group(1).replace(".block_sparse_moe", ".mlp"), int(match.group(2)), _PART[match.group(3)]


__all__ = ["ACTIVATIONS", "MoEExperts", "SparseMoeBlock", "expert_key", "experts_torch", "gated", "is_moe_layer",
           "num_experts_of", "route", "use_moe_kernels"]
