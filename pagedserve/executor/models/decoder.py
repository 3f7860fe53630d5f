"""One decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3) over a flat, packed token batch.

forward(input_ids [T], positions [T], ctx) -> hidden [T, H]: the T new tokens of all scheduled
sequences back to back; attention reaches earlier tokens through the paged KV cache in `ctx`.
compute_logits(hidden [S, H]) -> [S, V] fp32, for the S rows that are sampled.

Parameter names mirror Hugging Face's, except the merged projections:
    self_attn.qkv_proj  = q_proj | k_proj | v_proj   (rows stacked in that order)
    mlp.gate_up_proj    = gate_proj | up_proj
`load_weights` takes HF-named tensors and routes the parts into the merged ones. Qwen3 adds an RMSNorm
over each head of q and of k (self_attn.q_norm / k_norm, [head_dim]) between the projection and rotary.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedserve.distributed import all_reduce, gather_last_dim, shard, tp_rank, tp_size, vocab_shard
from pagedserve.executor.attention.base import ForwardContext
from pagedserve.executor.layers import (
    _NO_SKINNY_GEMM,
    MERGED_PARAMS,
    GeluTanhAndMul,
    Linear,
    MergedLinear,
    RMSNorm,
    RopeStep,
    RotaryEmbedding,
    SiluAndMul,
    VocabEmbedding,
    rope_max_positions,
    rope_parameters,
)
from pagedserve.executor.models.moe import (
    STACKED_EXPERTS,
    MoEExperts,
    SparseMoeBlock,
    expert_key,
    is_moe_layer,
)

logger = logging.getLogger(__name__)

# fp8 checkpoints' activation scales: not used (activations are quantized per token at run time).
_BARE_PREFIXES = ("embed_tokens.", "layers.", "norm.")
_UNUSED_SCALES = (".input_scale",)
# Their KV-cache scales, one per layer (llm-compressor: self_attn.k_scale / v_scale; AutoFP8: the k/v projections'
# output_scale; older files: one kv_scale for both): kept on the attention module, used with kv_cache_dtype fp8
# (executor/kv_scales.py).
_KV_SCALE = re.compile(r"(.*\.self_attn)\.(?:(k|v)_scale|(k|v)_proj\.output_scale|(kv)_scale)$")

# (merged param, checkpoint part, shard index): q/k/v -> qkv_proj, gate/up -> gate_up_proj.
STACKED_PARAMS: list[tuple[str, str, int]] = [
    (".qkv_proj.", ".q_proj.", 0),
    (".qkv_proj.", ".k_proj.", 1),
    (".qkv_proj.", ".v_proj.", 2),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
]


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def num_kv_heads_of(hf_config: Any) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def sliding_window_of(hf_config: Any, layer_idx: int, context: int | None = None) -> int | None:
    """The keys a token of layer layer_idx sees (itself included), or None for full attention: Mistral / Mixtral's
    `sliding_window` on every layer; Qwen's only with use_sliding_window, on the layers `layer_types` marks
    "sliding_attention" (else those from max_window_layers on), as Transformers reads them. A window no shorter
    than the context changes nothing: None."""
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        sliding = layer_types[layer_idx] == "sliding_attention"
    elif hasattr(hf_config, "max_window_layers"):
        sliding = layer_idx >= hf_config.max_window_layers
    else:
        sliding = True
    if not sliding or (context is not None and window >= context):
        return None
    return int(window)


def uniform_sliding_window(model: Any) -> int | None:
    """The window when every attention layer of the model is windowed (Mistral v0.1, Phi-3-mini): keys further back
    are never read again, so their KV blocks can be given back (core/scheduler.py); None otherwise (full attention
    anywhere, as Gemma's global layers)."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    windows = [getattr(getattr(layer, "self_attn", None), "sliding_window", None) for layer in layers]
    return min(windows) if windows and all(w is not None for w in windows) else None


def hybrid_window_layers(model: Any) -> tuple[int, frozenset[int]] | None:
    """(the widest window, the windowed layers' indices) of a model whose layers are part windowed, part full
    attention (Gemma 2 / 3, gpt-oss, Qwen2 with max_window_layers): the windowed layers' K/V can live in a pool that
    holds each request's window only (core/kv_cache.py); None when no layer or every layer is windowed."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    windows = {i: getattr(getattr(layer, "self_attn", None), "sliding_window", None) for i, layer in enumerate(layers)}
    windowed = frozenset(i for i, w in windows.items() if w is not None)
    if not windowed or len(windowed) == len(windows):
        return None
    return max(windows[i] for i in windowed), windowed


def local_num_kv_heads(hf_config: Any) -> int:
    """The kv heads this rank's attention and KV cache hold (all of them without tensor parallelism)."""
    return shard(num_kv_heads_of(hf_config), "num_key_value_heads")


# Tensor parallelism: checkpoint tensors split along dim 0 (column-parallel: each rank computes its heads /
# MLP columns) or dim 1 (row-parallel: each rank takes the matching input slice; partial outputs are summed).
_COLUMN_PARALLEL = (".q_proj.", ".k_proj.", ".v_proj.", ".gate_proj.", ".up_proj.")
_ROW_PARALLEL = (".o_proj.", ".down_proj.")


def tp_slice(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of the HF-named checkpoint tensor (the whole tensor with one rank). A row-parallel
    bias is added once: rank 0 keeps it, the others take zeros."""
    size, rank = tp_size(), tp_rank()
    if size == 1:
        return tensor
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):  # vocabulary rows, the last slice padded
        start, rows = vocab_shard(tensor.shape[0])
        part = tensor[start:start + rows]
        missing = rows - part.shape[0]
        return part if not missing else torch.cat([part, part.new_zeros(missing, *part.shape[1:])])
    if name.endswith(".weight_scale"):  # fp8 checkpoints: per tensor (kept whole) or per output row
        column = any(part in name for part in _COLUMN_PARALLEL)
        return tensor.chunk(size, dim=0)[rank] if column and tensor.numel() > 1 else tensor
    if any(part in name for part in _COLUMN_PARALLEL) or name.endswith(".self_attn.sinks"):  # (sinks: per head)
        return tensor.chunk(size, dim=0)[rank]
    if any(part in name for part in _ROW_PARALLEL):
        if name.endswith(".bias"):
            return tensor if rank == 0 else torch.zeros_like(tensor)
        return tensor.chunk(size, dim=1)[rank]
    return tensor


# PAGEDSERVE_SKINNY_LM_HEAD=0: batch-1 logits through cuBLAS instead of the skinny GEMM (A/B runs). On
# the H100 the skinny one made the bench's decode step 187.1 -> 188.1 and 187.3 -> 188.0 tok/s in two
# calls (one earlier call showed 186.1 -> 184.9, within that call's noise; docs/gpu-notes.md, session 4).
_SKINNY_LM_HEAD = os.environ.get("PAGEDSERVE_SKINNY_LM_HEAD", "1") == "1" and not _NO_SKINNY_GEMM


# PAGEDSERVE_FUSED_GATE_UP=0: batch-1 MLP as gate_up GEMM then SiLU·mul, two kernels (A/B runs).
_FUSED_GATE_UP = os.environ.get("PAGEDSERVE_FUSED_GATE_UP", "1") == "1" and not _NO_SKINNY_GEMM


# PAGEDSERVE_FUSED_QKV_ROPE=0: one token's qkv GEMV, then rotary + the KV write, as two kernels (A/B runs).
# Fused (kernels/qkv_rope_kv.py), the H200's batch-1 graph replay went 3.833 -> 3.784 ms and decode
# 258.4 -> 261.7 tok/s, the same in two A/B pairs of one call (docs/gpu-notes.md, session 8 run 1).
_FUSED_QKV_ROPE = os.environ.get("PAGEDSERVE_FUSED_QKV_ROPE", "1") == "1" and not _NO_SKINNY_GEMM


def _fuses_qkv_rope(hidden: torch.Tensor, rope: RopeStep, backend: Any) -> bool:
    return (_FUSED_QKV_ROPE and hidden.shape[0] == 1 and hidden.is_cuda and hidden.dtype != torch.float32
            and rope.cos is None and rope.full and getattr(backend, "fuses_rotary", False))


class DecoderAttention(nn.Module):
    def __init__(self, hf_config: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, qk_norm: bool = False,
                 context: int | None = None, norm_cls: type[RMSNorm] = RMSNorm, scale: float | None = None,
                 softcap: float | None = None, qk_norm_full: bool = False, sinks: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        # A sliding window (keys a token sees), or None; Gemma 2's attention soft-capping: passed to the backend
        # only when set.
        self.sliding_window = sliding_window_of(hf_config, layer_idx, context)
        # A hybrid model's KV group (core/kv_cache.py; set by the model runner): 0 reads the step's block tables, k the
        # tables of window group k (AttentionMetadata.windows)
        self.kv_group = 0
        self._attn_kwargs: dict[str, Any] = {}
        if self.sliding_window is not None:
            self._attn_kwargs["window"] = self.sliding_window
        if softcap:
            self._attn_kwargs["softcap"] = float(softcap)
        # This rank's heads (all of them with one rank).
        self.num_heads = shard(hf_config.num_attention_heads, "num_attention_heads")
        self.num_kv_heads = local_num_kv_heads(hf_config)
        self.head_dim = head_dim_of(hf_config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5 if scale is None else scale
        qkv_sizes = [self.q_size, self.kv_size, self.kv_size]
        self.qkv_proj = MergedLinear(hf_config.hidden_size, qkv_sizes, qkv_bias)
        self.o_proj = Linear(self.q_size, hf_config.hidden_size, o_bias)
        # Qwen3: each head of q and k normed (one [head_dim] weight each, shared by the heads) before rotary;
        # OLMo 2 (qk_norm_full): q and k normed over all their heads at once (one weight of q_size / kv_size).
        self.qk_norm_full = qk_norm_full
        q_width, k_width = (self.q_size, self.kv_size) if qk_norm_full else (self.head_dim, self.head_dim)
        self.q_norm = norm_cls(q_width, hf_config.rms_norm_eps) if qk_norm or qk_norm_full else None
        self.k_norm = norm_cls(k_width, hf_config.rms_norm_eps) if qk_norm or qk_norm_full else None
        # An fp8 checkpoint's KV-cache scales ("k", "v"), as loaded; kv_scales.fold_kv_scales uses them.
        self.checkpoint_kv_scales: dict[str, float] = {}
        # gpt-oss: one learned logit a head (this rank's heads) beside the keys' in the softmax; held in fp32.
        self.sinks = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32), requires_grad=False) \
            if sinks else None

    def _backend_kwargs(self) -> dict[str, Any]:
        return self._attn_kwargs if self.sinks is None else {**self._attn_kwargs, "sinks": self.sinks}

    def forward(self, hidden: torch.Tensor, rope: RopeStep, ctx: ForwardContext) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        kv_cache = ctx.kv_caches[self.layer_idx]
        meta = ctx.attn_metadata
        if self.kv_group and meta.windows is not None:  # a hybrid model's windowed layer: its group's tables
            meta = meta.windows[self.kv_group - 1]
        # (With LoRA the projection's own forward adds the adapters: no fused kernel.)
        if (self.q_norm is None and self.qkv_proj.weight_scale is None and self.qkv_proj.lora is None
                and self.qkv_proj.weight is not None
                and _fuses_qkv_rope(hidden, rope, ctx.backend)):
            from pagedserve.executor.kernels.qkv_rope_kv import qkv_rope_kv_write

            q = qkv_rope_kv_write(hidden, self.qkv_proj.weight, self.qkv_proj.bias, rope.positions,
                                  rope.cos_sin_cache, kv_cache, meta.slot_mapping, self.num_heads)
            out = ctx.backend.forward(q, None, None, kv_cache, meta, self.scale, kv_written=True,
                                      **self._backend_kwargs())
            return all_reduce(self.o_proj(out.reshape(num_tokens, self.q_size)))
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(num_tokens, -1, self.head_dim) for t in (q, k, v))
        if self.q_norm is not None and not self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope.cos is None and rope.full and getattr(ctx.backend, "fuses_rotary", False):
            # CUDA + Triton backend: rotary happens inside the KV-cache write kernel.
            out = ctx.backend.forward(q, k, v, kv_cache, meta, self.scale, rope=rope,
                                      **self._backend_kwargs())
        else:
            q, k = rope.rotate(q, k)
            out = ctx.backend.forward(q, k, v, kv_cache, meta, self.scale, **self._backend_kwargs())
        return all_reduce(self.o_proj(out.reshape(num_tokens, self.q_size)))


class DecoderMLP(nn.Module):
    """reduce=False: this rank's partial output is left for the caller to sum (an MoE block's shared expert).
    act: "silu" (SwiGLU) or "gelu_tanh" (Gemma's GeGLU)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool, reduce: bool = True,
                 act: str = "silu") -> None:
        super().__init__()
        intermediate_size = shard(intermediate_size, "intermediate_size")  # this rank's columns
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias)
        self.silu = act == "silu"
        self.act = SiluAndMul() if self.silu else GeluTanhAndMul()
        self.reduce = all_reduce if reduce else (lambda x: x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if x.shape[0] == 1 and x.is_cuda and _FUSED_GATE_UP and gate_up.bias is None and self.silu \
                and gate_up.weight_scale is None and x.dtype != torch.float32 and gate_up.lora is None \
                and gate_up.weight is not None:
            # One token: gate_up GEMM and SiLU·mul in one kernel (kernels/gate_up_silu.py).
            from pagedserve.executor.kernels.gate_up_silu import gate_up_silu

            return self.reduce(self.down_proj(gate_up_silu(x, self.gate_up_proj.weight)))
        return self.reduce(self.down_proj(self.act(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, hf_config: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                 qk_norm: bool = False, moe_renormalize: bool | None = None, context: int | None = None) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(hf_config, layer_idx, qkv_bias, o_bias, qk_norm, context)
        # MoE models (moe_renormalize set): the sparse block where the config puts one (models/moe.py).
        self.mlp: nn.Module
        if moe_renormalize is not None and is_moe_layer(hf_config, layer_idx):
            self.mlp = SparseMoeBlock(hf_config, moe_renormalize)
        else:
            self.mlp = DecoderMLP(hf_config.hidden_size, hf_config.intermediate_size, mlp_bias)
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.residual_multiplier: float | None = None  # Granite's (set by its model class)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: RopeStep,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately so each norm can fold in the preceding add.
        # With 16-bit weights it is kept in fp32: 2 x num_layers adds rounded to bf16 are the
        # largest error of a bf16 forward against fp32 (HF rounds them; we don't).
        if residual is None:
            residual = hidden.float() if hidden.element_size() < 4 else hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, ctx)
        if self.residual_multiplier is not None:  # Granite: each sublayer's output scaled before its residual add
            hidden = hidden * self.residual_multiplier
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        hidden = self.mlp(hidden)
        if self.residual_multiplier is not None:
            hidden = hidden * self.residual_multiplier
        return hidden, residual


class DecoderModel(nn.Module):
    def __init__(
        self, hf_config: Any, max_position: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool, qk_norm: bool = False,
        moe_renormalize: bool | None = None, context: int | None = None, partial_rotary: bool = False,
        layer_cls: type[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(
            (layer_cls or DecoderLayer)(hf_config, i, qkv_bias, o_bias, mlp_bias, qk_norm, moe_renormalize, context)
            for i in range(hf_config.num_hidden_layers)
        )
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        theta, scaling = rope_parameters(hf_config)
        if not partial_rotary:  # as Transformers: only some architectures read the factor (Phi-3's do)
            scaling["partial_rotary_factor"] = 1.0
        self.rotary_emb = RotaryEmbedding(head_dim_of(hf_config), max_position, theta, scaling, context)
        self.embedding_multiplier: float | None = None  # Granite's (set by its model class)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embedding_multiplier is not None:
            hidden = hidden * self.embedding_multiplier
        rope = self.rotary_emb.prepare(positions)  # once per step, shared by every layer
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, rope, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DecoderForCausalLM(nn.Module):
    """Llama-family causal LM. Subclasses pick the bias flags their architecture uses, and whether the config's
    partial_rotary_factor applies (Transformers' Llama, Qwen and Mistral rotate whole heads whatever it says)."""

    partial_rotary = False
    layer_cls: type[nn.Module] | None = None  # the decoder layer (DecoderLayer unless a subclass says)

    def __init__(
        self, hf_config: Any, max_position: int | None = None, *,
        qkv_bias: bool, o_bias: bool = False, mlp_bias: bool = False, qk_norm: bool = False,
        moe_renormalize: bool | None = None,
    ) -> None:
        super().__init__()
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported; only 'silu'")
        self.config = hf_config
        self.max_position = max(max_position or 0, rope_max_positions(hf_config))
        # the context served (max_model_len, else the model's): a sliding window no shorter is no window
        context = max_position or rope_max_positions(hf_config)
        self.model = DecoderModel(hf_config, self.max_position, qkv_bias, o_bias, mlp_bias, qk_norm, moe_renormalize,
                                  context, self.partial_rotary, self.layer_cls)
        self._init_lm_head(hf_config)

    def _init_lm_head(self, hf_config: Any) -> None:
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.vocab_size = int(hf_config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens  # one shared [V, H] parameter (this rank's rows)
        else:
            self.lm_head = Linear(hf_config.hidden_size, vocab_shard(self.vocab_size)[1], bias=False)
        # Gemma 2's final logit soft-capping: cap * tanh(logits / cap)
        self.final_logit_softcapping = getattr(hf_config, "final_logit_softcapping", None)
        self.logits_scaling: float | None = None  # Granite's: logits / logits_scaling (set by its model class)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[S, V] fp32 logits. With tensor parallelism each rank computes its vocabulary slice and rank 0
        gathers them (the other ranks get None)."""
        logits = self.local_logits(hidden)
        return gather_last_dim(logits, self.vocab_size)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._head(hidden)
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping:
            cap = float(self.final_logit_softcapping)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight
        if hidden.is_cuda and hidden.shape[0] == 1 and hidden.dtype in (torch.bfloat16, torch.float16) \
                and _SKINNY_LM_HEAD:
            # One row (batch-1 decode): the skinny GEMM streams the [V, H] weight like the other
            # projections, and with PDL starts reading it during the final norm.
            from pagedserve.executor.kernels.skinny_gemm import skinny_linear

            return skinny_linear(hidden, weight, out_dtype=torch.float32)
        if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16):
            # fp32 out of the fp32 accumulator, same speed as a bf16 output: rounding logits of ~30 to
            # bf16 (steps of 0.125) would tie and flip near-equal candidates.
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        return torch.nn.functional.linear(hidden, weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into this model (any dtype/device); return the param names filled.

        Rotary `inv_freq` buffers are skipped (recomputed from the config), as is `lm_head.weight`
        when embeddings are tied. Unknown names are logged, skipped and kept in `self.skipped_weights`; the caller
        checks that nothing is missing.
        """
        self.skipped_weights: list[str] = []
        params = dict(self.named_parameters())
        merged_modules = {name: m for name, m in self.named_modules() if isinstance(m, MergedLinear)}
        linears = {name: m for name, m in self.named_modules() if isinstance(m, Linear)}
        loaded: set[str] = set()
        attention = {name: m for name, m in self.named_modules() if isinstance(m, DecoderAttention)}
        experts = {name: m for name, m in self.named_modules() if isinstance(m, MoEExperts)}
        for name, tensor in weights:
            if "rotary_emb." in name or name.endswith(_UNUSED_SCALES):
                continue
            if name.startswith(_BARE_PREFIXES):  # a bare decoder's checkpoint (an embedding model): no "model."
                name = "model." + name
            kv_scale = _KV_SCALE.match(name)
            if kv_scale:
                module = attention.get(kv_scale.group(1))
                if module is None:
                    logger.warning("skipping checkpoint tensor %s: no such attention layer", name)
                    self.skipped_weights.append(name)
                    continue
                if tensor.numel() != 1:
                    raise ValueError(f"{name}: a KV-cache scale must be one value per layer, got shape "
                                     f"{tuple(tensor.shape)}")
                for kind in kv_scale.group(2) or kv_scale.group(3) or "kv":  # "k", "v", or both
                    module.checkpoint_kv_scales[kind] = float(tensor.float().reshape(()))
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's MoE block
            if self._load_expert(name, tensor, experts, self.skipped_weights):
                continue
            tensor = tp_slice(name, tensor)
            # fp8 checkpoints: a projection whose weight (or scale) is fp8 is stored so, with a scale per row
            fp8 = name.endswith(".weight_scale") or (name.endswith(".weight") and tensor.dtype == torch.float8_e4m3fn)
            for merged, part, shard_index in STACKED_PARAMS:
                if part in name:
                    module_name, _, param_name = name.replace(part, merged).rpartition(".")
                    module = merged_modules.get(module_name)
                    if module is None:
                        logger.warning("skipping checkpoint tensor %s: no such parameter", name)
                        self.skipped_weights.append(name)
                        break
                    if fp8:
                        module.use_fp8_storage()
                    if param_name == "w4_scales":  # a 4-bit projection (int_quant: its scales come first)
                        module.use_int4_storage(tensor.shape[1])
                    if param_name == "weight_scale":
                        module.load_weight_scale(tensor, module.shard_rows(shard_index))
                    else:
                        module.load_shard(param_name, shard_index, tensor)
                        loaded.add(f"{module_name}.{param_name}:{shard_index}")
                    break
            else:
                module_name, _, param_name = name.rpartition(".")
                module = linears.get(module_name)
                if param_name.startswith("w4_") and module is not None:  # a 4-bit projection (scales first)
                    if param_name == "w4_scales":
                        module.use_int4_storage(tensor.shape[1])
                    params[name] = getattr(module, param_name)
                if fp8 and module is not None and not module_name.endswith("lm_head"):
                    module.use_fp8_storage()
                    if param_name == "weight_scale":
                        module.load_weight_scale(tensor)
                        continue
                    params[name] = module.weight
                param = params.get(name)
                if param is None:
                    logger.warning("skipping checkpoint tensor %s: no such parameter", name)
                    self.skipped_weights.append(name)
                    continue
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} does not match the "
                                     f"model's {tuple(param.shape)}; is config.json the right one?")
                if (param.dtype == torch.float8_e4m3fn) != (tensor.dtype == torch.float8_e4m3fn):
                    raise ValueError(f"{name}: a {tensor.dtype} tensor for a {param.dtype} parameter (only the decoder "
                                     "projections can be held in fp8, each with its weight_scale)")
                param.data.copy_(tensor)
                loaded.add(name)
        for module_name, module in experts.items():  # an MoE layer's experts: when every expert's parts came
            loaded.update(f"{module_name}.{param_name}" for param_name in module.loaded())
        # Report a merged parameter as loaded only when all of its shards were.
        for module_name, module in merged_modules.items():
            for param_name in MERGED_PARAMS:
                shards = {f"{module_name}.{param_name}:{i}" for i in range(len(module.output_sizes))}
                if shards <= loaded:
                    loaded.add(f"{module_name}.{param_name}")
                loaded -= shards
        return loaded


    @staticmethod
    def _load_expert(name: str, tensor: torch.Tensor, experts: dict[str, MoEExperts], skipped: list[str]) -> bool:
        """Whether `name` is an MoE expert tensor (then loaded into its layer's stacked experts)."""
        key = expert_key(name)
        stacked = STACKED_EXPERTS.match(name) if key is None else None
        if key is None and stacked is None:
            return False
        block = key[0] if key is not None else stacked.group(1)
        module = experts.get(block + ".experts")
        if module is None:
            logger.warning("skipping checkpoint tensor %s: no such MoE layer", name)
            skipped.append(name)
        elif key is not None:
            module.load_part(key[1], key[2], tensor)
        else:
            module.load_stacked(stacked.group(2) + (stacked.group(3) or ""), tensor)
        return True


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2 / Qwen2.5: bias on q, k and v (not on o_proj or the MLP)."""

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        super().__init__(hf_config, max_position, qkv_bias=True)


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama 2/3, SmolLM, ...: `attention_bias` puts bias on q, k, v and o; `mlp_bias` on the MLP."""

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        super().__init__(
            hf_config, max_position, qkv_bias=attention_bias, o_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        )


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3 (dense): Qwen2's layout with q/k RMSNorm per head, no q/k/v bias unless `attention_bias`."""

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        super().__init__(hf_config, max_position, qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True)


class GraniteForCausalLM(LlamaForCausalLM):
    """IBM Granite 3.x (GraniteForCausalLM): Llama's layout with four scalars from its config: the embeddings times
    embedding_multiplier, attention_multiplier as the attention scale (instead of head_dim^-0.5), each attention and
    MLP output times residual_multiplier before its residual add, and the logits divided by logits_scaling."""

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        super().__init__(hf_config, max_position)
        self.model.embedding_multiplier = _scalar(hf_config, "embedding_multiplier")
        residual = _scalar(hf_config, "residual_multiplier")
        attention = _scalar(hf_config, "attention_multiplier")
        for layer in self.model.layers:
            layer.residual_multiplier = residual
            if attention is not None:
                layer.self_attn.scale = attention
        self.logits_scaling = _scalar(hf_config, "logits_scaling")


def _scalar(hf_config: Any, name: str) -> float | None:
    """A config's multiplier as a float, None where it is absent or 1 (nothing to apply)."""
    value = getattr(hf_config, name, None)
    if value is None or float(value) == 1.0:
        return None
    if not float(value) > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class Olmo2DecoderLayer(nn.Module):
    """OLMo 2's layer: no norm before attention or the MLP; their outputs are normed before each residual add
    (post_attention_layernorm, post_feedforward_layernorm), and q / k normed over all their heads. The stream is
    carried as the layer API expects: it returns (its MLP's normed output, the stream before adding it), so the next
    layer (or the final norm's fused add) completes the sum."""

    def __init__(self, hf_config: Any, layer_idx: int, qkv_bias: bool, o_bias: bool, mlp_bias: bool, qk_norm: bool,
                 moe_renormalize: bool | None, context: int | None) -> None:
        super().__init__()
        self.self_attn = DecoderAttention(hf_config, layer_idx, qkv_bias, o_bias, context=context, qk_norm_full=True)
        self.mlp = DecoderMLP(hf_config.hidden_size, hf_config.intermediate_size, mlp_bias)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RopeStep,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        stream = hidden if residual is None else hidden + residual
        stream = stream + self.post_attention_layernorm(self.self_attn(stream, rope, ctx))
        return self.post_feedforward_layernorm(self.mlp(stream)), stream


class Olmo2ForCausalLM(DecoderForCausalLM):
    """AI2's OLMo 2 (Olmo2ForCausalLM): Llama's projections (biases with `attention_bias`), post-norm layers and
    q / k norms over all heads (Olmo2DecoderLayer). One rank only: a norm over all heads would need them all."""

    layer_cls = Olmo2DecoderLayer

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        if tp_size() > 1:
            raise ValueError("OLMo 2 is not supported with tensor parallelism yet (its q / k norms span every head)")
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        super().__init__(hf_config, max_position, qkv_bias=attention_bias, o_bias=attention_bias)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama's layout; v0.1's sliding window (4,096 tokens) on every layer (v0.2 / v0.3 have none)."""


class Qwen2MoeForCausalLM(DecoderForCausalLM):
    """Qwen1.5-MoE / Qwen2-MoE: Qwen2's attention (q/k/v bias), sparse MLPs (models/moe.py) with a gated shared
    expert, top-k weights renormalized when `norm_topk_prob`."""

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        super().__init__(hf_config, max_position, qkv_bias=True,
                         moe_renormalize=bool(getattr(hf_config, "norm_topk_prob", False)))


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (q/k norms), sparse MLPs without a shared
    expert."""

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        super().__init__(hf_config, max_position, qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True,
                         moe_renormalize=bool(getattr(hf_config, "norm_topk_prob", False)))


class MixtralForCausalLM(DecoderForCausalLM):
    """Mixtral: Mistral's attention, 8 experts a layer, the top 2 renormalized (the softmax over their logits)."""

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        super().__init__(hf_config, max_position, qkv_bias=False, moe_renormalize=True)


class Phi3ForCausalLM(DecoderForCausalLM):
    """Phi-3 / Phi-4 (Phi3ForCausalLM): Llama's layout without biases, its checkpoints holding q|k|v and gate|up
    fused (self_attn.qkv_proj, mlp.gate_up_proj: split here into the parts the loader merges, so tensor parallelism
    slices them as usual); Phi-3-mini's sliding window as Mistral's; LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini: the
    short or long factors by the served context, layers.uses_long_rope) and Phi-4-mini's partial rotary factor."""

    partial_rotary = True

    def __init__(self, hf_config: Any, max_position: int | None = None) -> None:
        super().__init__(hf_config, max_position, qkv_bias=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._unfused(weights))

    def _unfused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        config = self.config
        head_dim = head_dim_of(config)
        q, kv = config.num_attention_heads * head_dim, num_kv_heads_of(config) * head_dim
        for name, tensor in weights:
            if name.endswith(".self_attn.qkv_proj.weight"):
                base = name[: -len("qkv_proj.weight")]
                for part, value in zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]), strict=True):
                    yield f"{base}{part}.weight", value
            elif name.endswith(".mlp.gate_up_proj.weight"):
                base = name[: -len("gate_up_proj.weight")]
                gate, up = tensor.chunk(2)
                yield f"{base}gate_proj.weight", gate
                yield f"{base}up_proj.weight", up
            else:
                yield name, tensor
