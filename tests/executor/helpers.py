"""Shared pieces of the executor tests: tiny random HF models, a logits-capturing sampler, and
hand-built scheduler steps."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import ScheduledRequest, SchedulerOutput
from pagedserve.executor.loader import load_model
from pagedserve.executor.model_runner import ModelRunner
from pagedserve.executor.sampler import SampleResult
from pagedserve.sampling_params import SamplingParams

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
)


def _hf_classes(arch: str) -> tuple[Any, Any]:
    import transformers

    name = {"qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "llama": "Llama", "qwen2_moe": "Qwen2Moe",
            "qwen3_moe": "Qwen3Moe", "mixtral": "Mixtral", "gemma3": "Gemma3", "phi3": "Phi3", "gemma2": "Gemma2",
            "granite": "Granite", "olmo2": "Olmo2", "gpt_oss": "GptOss"}[arch]
    config = getattr(transformers, name + ("TextConfig" if arch == "gemma3" else "Config"))
    return config, getattr(transformers, name + "ForCausalLM")


def tiny_hf_config(arch: str, **overrides: Any) -> Any:
    defaults = dict(rope_theta=10000.0, tie_word_embeddings=arch != "qwen2")
    if arch == "qwen3":
        defaults["head_dim"] = 16  # Qwen3Config's default is 128
    if arch in ("mistral", "mixtral"):
        defaults["sliding_window"] = None
    if arch in ("qwen2_moe", "qwen3_moe"):  # 6 experts of 32 columns, the top 2 a token, every layer sparse
        defaults |= dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                         mlp_only_layers=[], norm_topk_prob=arch == "qwen3_moe")
    if arch == "qwen2_moe":
        defaults["shared_expert_intermediate_size"] = 48
    if arch == "qwen3_moe":
        defaults["head_dim"] = 16
    if arch == "gemma3":  # two sliding layers (window 6) then a full one; its own local rope base; linear x2 scaling
        defaults |= dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24, tie_word_embeddings=True,
                         rope_theta=1e6, rope_local_base_freq=1e4,
                         layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                         num_hidden_layers=3, rope_scaling={"rope_type": "linear", "factor": 2.0})
    if arch == "gemma2":  # sliding (window 6), full, sliding; caps small enough to matter at these scales
        defaults |= dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24, tie_word_embeddings=True,
                         num_hidden_layers=3, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    if arch == "phi3":  # (its config's default ids lie past the tiny vocabulary)
        defaults |= dict(pad_token_id=None, bos_token_id=1, eos_token_id=2, sliding_window=None)
    if arch == "granite":  # Granite 3's four scalars, far enough from 1 to matter (its defaults are all 1)
        defaults |= dict(embedding_multiplier=12.0, attention_multiplier=0.0625, residual_multiplier=0.22,
                         logits_scaling=8.0)
    if arch == "gpt_oss":  # 4 experts, the top 2; sliding (window 6) then full layers; a clamp that bites at 0.1 std
        defaults |= dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=48,
                         sliding_window=6, swiglu_limit=0.5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                                          "original_max_position_embeddings": 32, "beta_fast": 32.0,
                                          "beta_slow": 1.0, "truncate": False})
    if arch == "mixtral":  # 4 experts of intermediate_size columns, the top 2
        defaults |= dict(num_local_experts=4, num_experts_per_tok=2)
    kwargs = {**TINY, **defaults, **overrides}
    return _hf_classes(arch)[0](**kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Every parameter random (HF zero-inits biases; we want them to matter); norms near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            param.copy_(1.0 + noise if "norm" in name else noise)


def tiny_hf_model(arch: str, seed: int = 0, **overrides: Any) -> Any:
    config = tiny_hf_config(arch, **overrides)
    if arch in ("gemma2", "gpt_oss"):
        # Eager attention, the one that soft-caps (Gemma 2) and has sinks (gpt-oss) in every Transformers version:
        # the GPU machine's 5.17 picked SDPA for Gemma 2, which drops the cap (seen: errors of 0.8, session 29).
        config._attn_implementation = "eager"
    model = _hf_classes(arch)[1](config)
    if arch == "gpt_oss":  # Transformers before 5.2x hard-codes the gate's 1.702 and 7.0, ignoring the config's
        for layer in model.model.layers:
            layer.mlp.experts.alpha = getattr(config, "swiglu_alpha", 1.702)
            layer.mlp.experts.limit = getattr(config, "swiglu_limit", 7.0)
    randomize_(model, seed)
    return model.eval()


def save_tiny_model(arch: str, folder: Path, seed: int = 0, **overrides: Any) -> Any:
    model = tiny_hf_model(arch, seed, **overrides)
    model.save_pretrained(folder)
    return model


def hf_logits(model: Any, token_ids: Sequence[int]) -> torch.Tensor:
    """HF's logits for every position of one full sequence, [len, V] fp32."""
    with torch.no_grad():
        return model(torch.tensor([list(token_ids)])).logits[0].float()


def as_fp8_kv(t: torch.Tensor) -> torch.Tensor:
    """t as an fp8 KV cache holds it (clamped to +-448, rounded to e4m3), back in t's dtype."""
    return t.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(t.dtype)


@contextlib.contextmanager
def kv_rounded_to_fp8(model: Any, scales: Sequence[tuple[float, float]] | None = None):
    """Transformers computing with an fp8 KV cache: each layer's keys rounded after rotary (where the engine stores
    them) and its values after v_proj, before attention sees either (forward hooks and the model module's
    apply_rotary_pos_emb, restored on exit). scales: per layer (k, v), each value stored as round(x / s) * s."""
    layers = model.model.layers
    scales = list(scales) if scales is not None else [(1.0, 1.0)] * len(layers)
    module = sys.modules[type(layers[0].self_attn).__module__]
    original = module.apply_rotary_pos_emb
    current = [0]  # the layer whose attention runs (set by a pre-hook; rotary is called inside it)

    def rotary_then_round(q, k, *args, **kwargs):
        q, k = original(q, k, *args, **kwargs)
        s = scales[current[0]][0]
        return q, as_fp8_kv(k / s) * s

    def enter(index):
        return lambda mod, args, kwargs: current.__setitem__(0, index)

    def round_v(index):
        return lambda mod, args, out: as_fp8_kv(out / scales[index][1]) * scales[index][1]

    hooks = [layer.self_attn.register_forward_pre_hook(enter(i), with_kwargs=True) for i, layer in enumerate(layers)]
    hooks += [layer.self_attn.v_proj.register_forward_hook(round_v(i)) for i, layer in enumerate(layers)]
    module.apply_rotary_pos_emb = rotary_then_round
    try:
        yield model
    finally:
        module.apply_rotary_pos_emb = original
        for hook in hooks:
            hook.remove()


def write_kv_scales(folder: Path, scales: Sequence[tuple[float, float]], style: str = "llm-compressor") -> None:
    """Per-layer (k, v) KV-cache scales as an fp8 checkpoint names them, in an extra safetensors file of the folder:
    llm-compressor's self_attn.k_scale / v_scale, AutoFP8's k_proj / v_proj .output_scale, or one kv_scale (k's)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, (k, v) in enumerate(scales):
        prefix = f"model.layers.{i}.self_attn"
        if style == "llm-compressor":
            tensors |= {f"{prefix}.k_scale": torch.tensor(k), f"{prefix}.v_scale": torch.tensor(v)}
        elif style == "autofp8":
            tensors |= {f"{prefix}.k_proj.output_scale": torch.tensor([k]),
                        f"{prefix}.v_proj.output_scale": torch.tensor([v])}
        else:
            tensors[f"{prefix}.kv_scale"] = torch.tensor(k)
    save_file(tensors, str(Path(folder) / "kv_scales.safetensors"))


class CapturingSampler:
    """Greedy stand-in sampler that keeps every logits row it is given, by request id."""

    def __init__(self) -> None:
        self.logits: list[dict[str, torch.Tensor]] = []

    def sample(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest], history=None) -> SampleResult:
        assert logits.shape[0] == len(requests) and logits.dtype == torch.float32
        self.logits.append({r.request_id: logits[i].cpu() for i, r in enumerate(requests)})
        ids = logits.argmax(dim=-1)
        return SampleResult(ids, ids, lambda values: (values, [None] * len(values)))


def make_runner(
    model_path: str | Path, *, block_size: int = 4, num_blocks: int = 32, device: str = "cpu",
    dtype: torch.dtype = torch.float32, attention_backend: str = "torch", layout: Any = None, **config_kwargs: Any,
) -> tuple[ModelRunner, CapturingSampler]:
    """layout: a hybrid model's KV layout (model_runner.KVLayout; core/kv_cache.py)."""
    config = EngineConfig(model=str(model_path), device=device, block_size=block_size,
                          attention_backend=attention_backend, **config_kwargs)
    model, hf_config = load_model(config, str(model_path), torch.device(device), dtype)
    sampler = CapturingSampler()
    runner = ModelRunner(config, model, hf_config, device, dtype, num_blocks, block_size, sampler, layout=layout)
    return runner, sampler


def scheduled(
    request_id: str, token_ids: list[int], num_computed: int, block_ids: list[int], needs_sample: bool,
    all_token_ids: list[int] | None = None,
) -> ScheduledRequest:
    all_ids = all_token_ids or token_ids
    return ScheduledRequest(
        request_id=request_id, token_ids=list(token_ids), num_computed_tokens=num_computed,
        block_ids=list(block_ids), needs_sample=needs_sample, sampling_params=SamplingParams(temperature=0.0),
        prompt_token_ids=list(all_ids), output_token_ids=[],
    )


def step(*requests: ScheduledRequest) -> SchedulerOutput:
    num_tokens = sum(len(r.token_ids) for r in requests)
    return SchedulerOutput(scheduled=list(requests), num_batched_tokens=num_tokens)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())
