"""gpt-oss (models/gpt_oss.py) beyond the shared model tests (tests/executor/test_models.py, test_model_runner.py,
test_tensor_parallel.py): its MXFP4 checkpoints (the experts' *_blocks / *_scales, dequantized at load) against
Transformers on the same dequantized weights, the engine end to end, and what is refused."""

from __future__ import annotations

import json

import pytest
import torch

from tests.executor.helpers import hf_logits, make_runner, max_rel_err, save_tiny_model, scheduled, step

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def mxfp4(rows: int, cols: int, experts: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random MXFP4 (blocks [E, rows, cols / 32, 16] uint8, scales [E, rows, cols / 32] uint8) and what they stand for,
    [E, rows, cols] fp32, decoded here by the format's definition: two e2m1 codes a byte (the low nibble first),
    times 2 ** (scale - 127) for each 32 values."""
    blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(121, 126, (experts, rows, cols // 32), generator=g, dtype=torch.uint8)
    table = torch.tensor(E2M1)
    low, high = table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]
    values = torch.stack([low, high], dim=-1).reshape(experts, rows, cols // 32, 32)
    values = values * torch.pow(2.0, scales.float() - 127)[..., None]
    return blocks, scales, values.reshape(experts, rows, cols)


def write_mxfp4_checkpoint(folder, hf, seed: int = 0) -> None:
    """hf's experts replaced by random MXFP4 ones (in hf too, dequantized), saved as gpt-oss's releases store them."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    cfg = hf.config
    tensors = load_file(str(folder / "model.safetensors"))
    for i, layer in enumerate(hf.model.layers):
        experts = layer.mlp.experts
        for name, rows, cols in (("gate_up_proj", 2 * cfg.intermediate_size, cfg.hidden_size),
                                 ("down_proj", cfg.hidden_size, cfg.intermediate_size)):
            blocks, scales, values = mxfp4(rows, cols, cfg.num_local_experts, g)
            with torch.no_grad():
                getattr(experts, name).copy_(values.transpose(1, 2))  # Transformers holds [E, cols, rows]
            key = f"model.layers.{i}.mlp.experts.{name}"
            del tensors[key]
            tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                        "model.layers.*.mlp.router"]}
    (folder / "config.json").write_text(json.dumps(config))


def test_mxfp4_checkpoint_matches_transformers_on_the_dequantized_experts(tmp_path) -> None:
    hf = save_tiny_model("gpt_oss", tmp_path, intermediate_size=64)  # (MXFP4 packs 32 values a scale)
    write_mxfp4_checkpoint(tmp_path, hf)
    runner, sampler = make_runner(tmp_path)
    tokens = list(range(7, 50, 2))
    runner.execute(step(scheduled("r", tokens, 0, list(range(1, 7)), needs_sample=True)))
    expected = hf_logits(hf, tokens)[-1]
    assert max_rel_err(sampler.logits[-1]["r"], expected) < 1e-4
    experts = runner.model.model.layers[1].mlp.experts
    ref = hf.model.layers[1].mlp.experts
    inter = hf.config.intermediate_size
    assert torch.equal(experts.w13[:, :inter], ref.gate_up_proj[..., 0::2].transpose(1, 2))  # gate rows
    assert torch.equal(experts.w2, ref.down_proj.transpose(1, 2))


def test_mxfp4_blocks_without_scales_are_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    hf = save_tiny_model("gpt_oss", tmp_path, intermediate_size=64)
    write_mxfp4_checkpoint(tmp_path, hf)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.0.mlp.experts.down_proj_scales"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts.down_proj lacks its scales"):
        make_runner(tmp_path)


def test_gpt_oss_through_the_engine_matches_transformers_greedy(tmp_path, real_model_dir) -> None:
    """LLM end to end (chunked prefills, prefix hits, batched decodes, the sliding layers' window): greedy tokens and
    logprobs equal Transformers' generate on the same weights."""
    from pagedserve import LLM, SamplingParams
    from tests.executor.test_tensor_parallel import hf_greedy, tiny_checkpoint

    hf = tiny_checkpoint(tmp_path, real_model_dir, "gpt_oss")
    llm = LLM(str(tmp_path), max_model_len=64, cpu_kv_cache_gib=0.05, dtype="float32", skip_warmup=True,
              max_num_batched_tokens=16, block_size=4)
    prompts = [[5, 9, 2, 7, 1, 3, 8, 6, 4, 10, 11, 12], [5, 9, 2, 7, 1, 3, 8, 6, 20, 21], [30, 31, 32]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, logprobs=0))
    for prompt, out in zip(prompts, outs, strict=True):
        ref_ids, ref_logprobs = hf_greedy(hf, prompt, 8)
        assert out.outputs[0].token_ids == ref_ids
        assert [lp.logprob for lp in out.outputs[0].logprobs] == pytest.approx(ref_logprobs, abs=1e-4)
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
