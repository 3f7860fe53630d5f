"""Mixture-of-experts models (Qwen2-MoE, Qwen3-MoE, Mixtral; models/moe.py) against Transformers in fp32 on CPU:
routing, the torch experts, loading (per-expert checkpoints, Mixtral's names, Transformers 5's stacked tensors),
the engine end to end (chunked prefill, prefix hits, decodes), and what is refused."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM
from pagedserve.executor.models.moe import experts_torch, is_moe_layer, route
from tests.executor.helpers import (
    hf_logits,
    make_runner,
    max_rel_err,
    save_tiny_model,
    scheduled,
    step,
    tiny_hf_config,
    tiny_hf_model,
)
from tests.executor.test_tensor_parallel import assert_greedy_as_hf, tiny_checkpoint

MOE_CASES = [
    ("qwen3_moe", {}),  # q/k norms, top-2 of 6 renormalized
    ("qwen2_moe", {}),  # q/k/v bias, a gated shared expert, top-2 not renormalized
    ("qwen2_moe", dict(mlp_only_layers=[0], norm_topk_prob=True)),  # a dense layer among the sparse ones
    ("qwen3_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, num_experts_per_tok=1)),  # every 2nd layer sparse
    ("mixtral", {}),  # block_sparse_moe.experts.{e}.w1 / w3 / w2 in the checkpoint
]
MOE_IDS = ["qwen3-moe", "qwen2-moe-shared", "qwen2-moe-dense-layer", "qwen3-moe-sparse-step", "mixtral"]


@pytest.mark.parametrize("arch,overrides", MOE_CASES, ids=MOE_IDS)
def test_moe_models_match_transformers(arch: str, overrides: dict, tmp_path) -> None:
    hf = save_tiny_model(arch, tmp_path, **overrides)
    runner, sampler = make_runner(tmp_path)
    sparse = [type(layer.mlp).__name__ == "SparseMoeBlock" for layer in runner.model.model.layers]
    assert sparse == [is_moe_layer(hf.config, i) for i in range(hf.config.num_hidden_layers)]
    assert any(sparse)
    tokens = list(range(7, 50, 2))
    runner.execute(step(scheduled("r", tokens, 0, list(range(1, 7)), needs_sample=True)))
    assert max_rel_err(sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]) < 1e-4


def test_routing_matches_transformers() -> None:
    """route() against Transformers' routers: Qwen's softmax-then-top-k with and without renormalizing, Mixtral's."""
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    x = torch.randn(13, 64)
    for norm in (False, True):
        config = tiny_hf_config("qwen3_moe", norm_topk_prob=norm, num_experts=8, num_experts_per_tok=3)
        router = Qwen3MoeTopKRouter(config)
        router.weight.data.normal_()
        _, ref_weights, ref_ids = router(x)
        weights, ids = route(x @ router.weight.t(), 3, norm)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights.float())
        assert torch.allclose(weights.sum(-1), torch.ones(13)) == norm
    router = MixtralTopKRouter(tiny_hf_config("mixtral"))
    router.weight.data.normal_()
    _, ref_weights, ref_ids = router(x)
    weights, ids = route(x @ router.weight.t(), 2, True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)


def test_experts_torch_equals_a_loop_over_tokens() -> None:
    """The reference experts against the definition, token by token (a token may pick the same expert as another
    token; an expert may get none)."""
    torch.manual_seed(1)
    experts, hidden, inter = 5, 16, 12
    w13, w2 = torch.randn(experts, 2 * inter, hidden), torch.randn(experts, hidden, inter)
    x = torch.randn(7, hidden)
    ids = torch.tensor([[0, 3], [3, 0], [3, 1], [1, 0], [0, 3], [3, 1], [1, 3]])  # expert 2 and 4 idle
    weights = torch.rand(7, 2)
    out = experts_torch(x, w13, w2, ids, weights)
    for t in range(7):
        expected = torch.zeros(hidden)
        for j in range(2):
            gate, up = (w13[ids[t, j]] @ x[t]).split(inter)
            expected += weights[t, j] * (w2[ids[t, j]] @ (torch.nn.functional.silu(gate) * up))
        torch.testing.assert_close(out[t], expected)


def test_stacked_experts_load_as_the_per_expert_checkpoint(tmp_path) -> None:
    """Transformers 5's in-memory names (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) fill the same
    weights as the saved per-expert tensors."""
    hf = save_tiny_model("qwen2_moe", tmp_path)
    runner, _ = make_runner(tmp_path)
    model = runner.model
    assert "model.layers.0.mlp.experts.gate_up_proj" in dict(hf.named_parameters())
    before = {name: p.clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.data.fill_(float("nan"))
    loaded = model.load_weights(hf.state_dict().items())
    assert loaded == set(before)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_a_missing_expert_is_named(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    save_tiny_model("mixtral", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights for model\.layers\.1\.mlp\.experts\.w13"):
        make_runner(tmp_path)


def test_a_bad_expert_shape_is_an_error(tmp_path) -> None:
    hf = tiny_hf_model("qwen3_moe")
    hf.config.moe_intermediate_size = 16  # the checkpoint's experts have 32 columns
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"expert 0 (gate|up|down)_proj: checkpoint shape \((32, 64|64, 32)\) "):
        make_runner(tmp_path)


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_llm_generates_as_transformers(arch: str, tmp_path, real_model_dir) -> None:
    """Through the engine: chunked prefills (16-token chunks), a prefix hit (the second call's first prompt repeats
    the first call's start), decodes of three requests in one batch; greedy tokens and logprobs as Transformers'."""
    hf = tiny_checkpoint(tmp_path, real_model_dir, arch)
    llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, max_num_batched_tokens=16, block_size=4,
              skip_warmup=True)
    base = [(11 * i) % 250 + 3 for i in range(40)]
    assert_greedy_as_hf(llm, hf, [[base], [base[:24] + [9, 8, 7, 6], [5, 17, 99], base[5:30]]], 8)
    assert llm.engine.get_stats()["prefix_cache_hits"] >= 24


def test_lora_leaves_the_sparse_mlps_alone(tmp_path, real_model_dir) -> None:
    """enable_lora on an MoE model: adapters on the attention projections and the dense MLPs, none on the experts."""
    tiny_checkpoint(tmp_path, real_model_dir, "qwen2_moe", mlp_only_layers=[1])
    llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, enable_lora=True, skip_warmup=True)
    layers = llm.engine.worker.runner.model.model.layers
    assert layers[0].self_attn.qkv_proj.lora is not None
    assert layers[1].mlp.gate_up_proj.lora is not None
    assert layers[0].mlp.shared_expert.gate_up_proj.lora is None
