"""Layers, the torch reference attention, and the model registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.executor.attention.base import AttentionMetadata
from pagedserve.executor.attention.torch_ref import TorchAttentionBackend
from pagedserve.executor.layers import (
    RMSNorm,
    SiluAndMul,
    compute_inv_freq,
    rope_attention_factor,
    rope_max_positions,
    rope_parameters,
)
from pagedserve.executor.models import get_model_class
from tests.executor.helpers import (
    hf_logits,
    make_runner,
    max_rel_err,
    save_tiny_model,
    scheduled,
    step,
    tiny_hf_config,
)


def test_rmsnorm_fused_residual_equals_add_then_norm() -> None:
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.randn(8)
    x, residual = torch.randn(3, 8), torch.randn(3, 8)
    normed, new_residual = norm(x, residual)
    torch.testing.assert_close(new_residual, x + residual)
    torch.testing.assert_close(normed, norm(x + residual))
    expected = (x + residual) / torch.sqrt(((x + residual) ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(normed, expected)


def test_silu_and_mul() -> None:
    x = torch.randn(5, 12)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :6]) * x[:, 6:])


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},  # Qwen's model cards' form
    {"type": "yarn", "factor": 2.5, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 0.707,
     "mscale_all_dim": 0.5, "truncate": False},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "attention_factor": 1.3},
    {"rope_type": "yarn", "factor": None},  # the defaults: original = max_position_embeddings, factor their ratio
])
def test_inv_freq_matches_transformers(scaling: dict | None) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = tiny_hf_config("llama", rope_theta=5e5, rope_scaling=scaling, max_position_embeddings=256)
    theta, params = rope_parameters(config)
    ours = compute_inv_freq(16, theta, params)
    if scaling is None:
        expected, factor = 1.0 / (5e5 ** (torch.arange(0, 16, 2).float() / 16)), 1.0
    else:
        kind = scaling.get("rope_type") or scaling["type"]
        expected, factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    torch.testing.assert_close(ours, expected)
    assert rope_attention_factor(params) == pytest.approx(factor)


def test_yarn_extends_the_context_as_vllm_derives_it() -> None:
    config = tiny_hf_config("qwen2", max_position_embeddings=64,
                            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    assert rope_max_positions(config) == 256
    assert rope_max_positions(tiny_hf_config("qwen2", max_position_embeddings=64)) == 64


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.9, 2.6, 3.0, 3.2, 3.3],
            "long_factor": [1.0, 1.5, 2.7, 5.1, 9.0, 14.0, 19.0, 22.0]}


@pytest.mark.parametrize("partial", [1.0, 0.75])
@pytest.mark.parametrize("seq_len", [None, 33, 200])  # short factors up to original_max_position_embeddings (32)
@pytest.mark.parametrize("extra", [{}, {"attention_factor": 1.2}, {"factor": 2.0}])
def test_longrope_inv_freq_matches_transformers(partial, seq_len, extra) -> None:
    """Phi-3-128k / Phi-3.5 / Phi-4-mini's LongRoPE: per-dimension factors, short up to the original context and
    long past it, and its attention factor; with Phi-4-mini's partial rotary factor (12 of 16 dims rotated)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pagedserve.executor.layers import uses_long_rope

    factors = int(16 * partial) // 2
    scaling = {k: (v[:factors] if isinstance(v, list) else v) for k, v in LONGROPE.items()} | extra
    config = tiny_hf_config("phi3", max_position_embeddings=256, original_max_position_embeddings=32,
                            partial_rotary_factor=partial, rope_scaling=scaling)
    theta, params = rope_parameters(config)
    context = seq_len or 32
    ours = compute_inv_freq(int(16 * partial), theta, params, context)
    expected, factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=seq_len)
    assert uses_long_rope(params, context) == (seq_len is not None and seq_len > 32)
    torch.testing.assert_close(ours, expected)
    assert rope_attention_factor(params) == pytest.approx(factor)
    assert params["partial_rotary_factor"] == partial


def test_rotary_embedding_leaves_the_dims_past_the_rotary_width() -> None:
    """A partial rotary factor (StableLM, Phi-4-mini): the first head_dim x factor dims rotate as Transformers
    rotates them, the rest pass through bit for bit."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

    from pagedserve.executor.layers import RotaryEmbedding

    config = tiny_hf_config("phi3", partial_rotary_factor=0.5)
    theta, params = rope_parameters(config)
    rope = RotaryEmbedding(16, 128, theta, params)
    assert rope.rotary_dim == 8 and rope.cos_sin_cache.shape == (128, 8)
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    positions = torch.tensor([0, 3, 17, 64, 127])
    ours_q, ours_k = rope.prepare(positions).rotate(q, k)
    cos, sin = Phi3RotaryEmbedding(config)(q, positions[None])
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(ours_q, hf_q[0].transpose(0, 1))
    torch.testing.assert_close(ours_k, hf_k[0].transpose(0, 1))
    assert torch.equal(ours_q[..., 8:], q[..., 8:])
    with pytest.raises(ValueError, match="rotated width"):
        RotaryEmbedding(16, 128, theta, {"partial_rotary_factor": 0.1})


def test_unsupported_rope_scaling_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="rope scaling type 'dynamic' is not supported"):
        compute_inv_freq(16, 1e4, {"rope_type": "dynamic", "factor": 2.0})


def test_unsupported_architecture_names_supported_ones() -> None:
    with pytest.raises(ValueError, match="Qwen2ForCausalLM.*LlamaForCausalLM") as info:
        get_model_class(["GemmaForCausalLM"])
    assert "GemmaForCausalLM" in str(info.value)
    with pytest.raises(ValueError, match="supported architectures"):
        get_model_class(None)
    assert get_model_class(["Qwen2ForCausalLM"]).__name__ == "Qwen2ForCausalLM"


def _dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA over a contiguous sequence whose last q.shape[0] positions are the queries."""
    q_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    mask = torch.ones(q_len, seq_len, dtype=torch.bool).tril(diagonal=seq_len - q_len)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1),
        v.repeat_interleave(group, 1).transpose(0, 1), attn_mask=mask, scale=scale,
    )
    return out.transpose(0, 1)


def test_torch_backend_matches_dense_attention_with_cache_offsets() -> None:
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 4, 2, 8, 4
    cache = torch.zeros(2, 10, block, kv_heads, dim)
    # seq 0: 6 cached tokens in blocks [3, 7] + 3 new (9 total, blocks [3, 7, 1]); seq 1: a 5-token prefill.
    full_k = [torch.randn(9, kv_heads, dim), torch.randn(5, kv_heads, dim)]
    full_v = [torch.randn(9, kv_heads, dim), torch.randn(5, kv_heads, dim)]
    tables = [[3, 7, 1], [2, 5]]
    for pos in range(6):
        slot = tables[0][pos // block] * block + pos % block
        cache[0].view(-1, kv_heads, dim)[slot] = full_k[0][pos]
        cache[1].view(-1, kv_heads, dim)[slot] = full_v[0][pos]
    q = [torch.randn(3, heads, dim), torch.randn(5, heads, dim)]
    new_positions = [range(6, 9), range(5)]
    slots = [tables[s][p // block] * block + p % block for s in range(2) for p in new_positions[s]]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 3, 8], dtype=torch.int32), seq_lens=torch.tensor([9, 5]),
        block_tables=torch.tensor([[3, 7, 1], [2, 5, 0]], dtype=torch.int32),
        slot_mapping=torch.tensor(slots), max_query_len=5, max_seq_len=9, block_size=block,
    )
    out = TorchAttentionBackend().forward(
        torch.cat(q), torch.cat([full_k[0][6:], full_k[1]]), torch.cat([full_v[0][6:], full_v[1]]),
        cache, meta, 0.3,
    )
    torch.testing.assert_close(out[:3], _dense_reference(q[0], full_k[0], full_v[0], 0.3))
    torch.testing.assert_close(out[3:], _dense_reference(q[1], full_k[1], full_v[1], 0.3))
    torch.testing.assert_close(cache[0, 1, 0], full_k[0][8])  # position 8 -> block 1, offset 0


@pytest.mark.parametrize("heads,kv_heads,dim,block,cache_dtype", [
    (4, 2, 8, 4, torch.float32), (8, 1, 16, 16, torch.float32), (6, 6, 64, 8, torch.float16),
    (4, 2, 8, 4, torch.float8_e4m3fn),
])
@pytest.mark.parametrize("chunk_elements", [None, 300])  # 300: the decodes split over several chunks
def test_batched_decodes_match_the_per_sequence_reference(
    monkeypatch, heads, kv_heads, dim, block, cache_dtype, chunk_elements
) -> None:
    """A mixed step (decodes of different lengths, a prefill, an extend, padding rows) through the backend with its
    decodes batched and its prefills / extends through torch's fused attention equals the same step with every
    sequence through causal_attention: windows, the soft-cap and sinks included. The cache blocks are shuffled,
    every slot not yet written is NaN; padding rows come out zero."""
    from pagedserve.executor.attention import torch_ref

    if chunk_elements is not None:
        monkeypatch.setattr(torch_ref, "DECODE_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(1)
    num_blocks = 128
    query_lens = [1, 1, 5, 1, 3, 1, 1]
    seq_lens = [1, 37, 5, 9, 11, 16, 23]  # one cached token, lengths off the block size, one at it
    tables = torch.randperm(num_blocks)[: len(seq_lens) * 12].view(len(seq_lens), 12).to(torch.int32)
    # Only the cached positions hold values; every other slot (the rest of a last block, unused blocks) is NaN.
    cache = torch.full((2, num_blocks, block, kv_heads, dim), float("nan"))
    for s, (q_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        for p in range(seq_len - q_len):
            cache[:, int(tables[s, p // block]), p % block] = torch.randn(2, kv_heads, dim).clamp(-4, 4)
    cache = cache.to(cache_dtype)
    slots = [int(tables[s, p // block]) * block + p % block
             for s in range(len(seq_lens)) for p in range(seq_lens[s] - query_lens[s], seq_lens[s])]
    tokens = sum(query_lens) + 2  # two padding rows
    q = torch.randn(tokens, heads, dim)
    k, v = torch.randn(tokens, kv_heads, dim), torch.randn(tokens, kv_heads, dim)
    loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(
        query_start_loc=loc, seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        slot_mapping=torch.tensor(slots + [-1, -1]), max_query_len=5, max_seq_len=max(seq_lens), block_size=block,
    )
    sinks = torch.randn(heads)
    for window, softcap, sink in [(None, None, None), (6, None, None), (None, 2.5, None), (8, None, sinks)]:
        outs = []
        for batched in (True, False):
            backend = TorchAttentionBackend(batch_decodes=batched, fused_prefill=batched)
            layer_cache = cache.clone()
            out = backend.forward(q, k, v, layer_cache, meta, 0.35, window=window, softcap=softcap, sinks=sink)
            outs.append(out)
        assert torch.isfinite(outs[0]).all()
        torch.testing.assert_close(outs[0], outs[1], atol=2e-6, rtol=2e-6)
        assert outs[0][-2:].eq(0).all()


@pytest.mark.parametrize("arch,overrides", [
    ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    ("llama", dict(head_dim=32)),  # head_dim != hidden / heads
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen3", dict()),  # q/k norms per head, head_dim 16 != hidden / heads
    ("qwen3", dict(attention_bias=True, tie_word_embeddings=False)),
    ("mistral", dict(sliding_window=128)),  # a window no shorter than the context: plain attention
    ("phi3", dict()),  # q|k|v and gate|up fused in the checkpoint
    ("phi3", dict(sliding_window=6)),  # Phi-3-mini's window (here 6 tokens of the 22)
    ("phi3", dict(partial_rotary_factor=0.75)),  # Phi-4-mini's: 12 of 16 dims rotate
    ("llama", dict(partial_rotary_factor=0.5)),  # Transformers' Llama ignores the factor: so do we
    ("granite", dict()),  # embedding / attention / residual multipliers, logits scaling
    ("olmo2", dict()),  # post-norm layers, q / k norms over all heads
    ("olmo2", dict(attention_bias=True, tie_word_embeddings=False)),
    ("granite", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False, embedding_multiplier=1.0)),
    # gpt-oss: sinks, biases everywhere, sliding + full layers, YaRN without truncation, its experts (4, top 2)
    ("gpt_oss", dict()),
    ("gpt_oss", dict(num_local_experts=6, num_experts_per_tok=3, swiglu_limit=7.0, swiglu_alpha=1.0)),
    # YaRN (Qwen's long-context recipe), positions past original_max_position_embeddings: cos and sin scaled too
    ("qwen2", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
])
def test_model_variants_match_hf(arch: str, overrides: dict, tmp_path) -> None:
    hf = save_tiny_model(arch, tmp_path, **overrides)
    runner, sampler = make_runner(tmp_path)
    tokens = list(range(7, 50, 2))  # 22 tokens: past original_max_position_embeddings of the llama3 case
    runner.execute(step(scheduled("r", tokens, 0, list(range(1, 7)), needs_sample=True)))
    assert max_rel_err(sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]) < 1e-4


def test_yarn_model_serves_past_max_position_embeddings(tmp_path) -> None:
    """A YaRN config (max_position_embeddings 32, factor 4): the engine's default context is 128 tokens, and a
    90-token prompt (past the original 32) answers as Transformers does; a longer --max-model-len is refused."""
    from pagedserve import LLM, SamplingParams
    from tests.executor.test_tensor_parallel import hf_greedy

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    hf = save_tiny_model("qwen2", tmp_path, max_position_embeddings=32, rope_scaling=yarn)
    llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05)
    assert llm.engine.config.max_model_len == 128
    prompt = [(7 * i) % 250 + 3 for i in range(90)]
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=6, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    ids, logprobs = hf_greedy(hf, prompt, 6)
    assert out.token_ids == ids
    assert [lp.logprob for lp in out.logprobs] == pytest.approx(logprobs, abs=1e-4)
    with pytest.raises(ValueError, match="context of 128 tokens"):
        LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, max_model_len=129)


@pytest.mark.parametrize("partial", [1.0, 0.75])
@pytest.mark.parametrize("max_model_len", [None, 32])
def test_phi3_longrope_serves_as_transformers(partial, max_model_len, tmp_path, real_model_dir) -> None:
    """LongRoPE picks its factors once for the engine: long when the served context (max_model_len, else the
    model's 128) passes original_max_position_embeddings (32), short otherwise. Transformers picks per forward by its
    longest position, so 33-40-token prompts (long) and 13-20-token ones (short) agree with it: greedy tokens and
    logprobs through chunked prefills (8 tokens a step), a prefix hit and batched decodes."""
    from pagedserve import LLM
    from tests.executor.test_tensor_parallel import assert_greedy_as_hf, tiny_checkpoint

    factors = int(16 * partial) // 2
    scaling = {k: (v[:factors] if isinstance(v, list) else v) for k, v in LONGROPE.items()}
    hf = tiny_checkpoint(tmp_path, real_model_dir, "phi3", original_max_position_embeddings=32,
                         partial_rotary_factor=partial, rope_scaling=scaling)
    llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, max_model_len=max_model_len,
              max_num_batched_tokens=8, block_size=4, skip_warmup=True)
    rope = llm.engine.worker.runner.model.model.rotary_emb
    assert rope.long_rope == (max_model_len is None) and rope.rotary_dim == int(16 * partial)
    base = [(11 * i) % 250 + 3 for i in range(40 if max_model_len is None else 20)]
    extra = [33, 34, 35, 36] if max_model_len is None else [9, 8]
    assert_greedy_as_hf(llm, hf, [[base[:-7]], [base, base[:-7] + extra, base[5:]]], 5)
    assert llm.engine.get_stats()["prefix_cache_hits"] >= 8
