"""quantization="fp8": the engine on the real embedded model against Transformers loaded with the same weights rounded
to fp8 (per output row, as executor/quantization.py does), token for token; against the unquantized model, how
close; the flag's plumbing and its errors."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.executor.quantization import dequantize_rows_fp8, quantize_rows_fp8

CHATS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "List three prime numbers."}],
]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def fp8_llm(real_model_dir: str) -> LLM:
    return LLM(real_model_dir, quantization="fp8", max_model_len=512, cpu_kv_cache_gib=0.25)


def round_projections_to_fp8(hf) -> None:
    """Each projection's weight of a HF model replaced by its fp8 rows times their scales (in place)."""
    count = 0
    with torch.no_grad():
        for name, module in hf.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                q, scale = quantize_rows_fp8(module.weight)
                module.weight.copy_(dequantize_rows_fp8(q, scale, module.weight.dtype))
                count += 1
    assert count == 7 * hf.config.num_hidden_layers


def hf_with_fp8_weights(real_model_dir: str):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    hf.eval()
    round_projections_to_fp8(hf)
    return hf


def test_fp8_engine_equals_transformers_on_fp8_weights(fp8_llm: LLM, real_model_dir: str) -> None:
    """Greedy 24 tokens of two chats equal HF generate on the fp8-rounded weights; the logprobs of those tokens
    agree to fp32 rounding (the CPU path computes with the dequantized weights, as the reference does)."""
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=0)
    outputs = fp8_llm.chat(CHATS, params, use_tqdm=False)
    hf = hf_with_fp8_weights(real_model_dir)
    for out in outputs:
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              pad_token_id=151643, output_logits=True, return_dict_in_generate=True)
        ref_new = ref.sequences[0, ids.shape[1]:].tolist()
        got = out.outputs[0]
        assert got.token_ids == ref_new, (got.text, fp8_llm.get_tokenizer().decode(ref_new))
        assert len(got.logprobs) == len(ref_new) >= 8
        for step, token in enumerate(ref_new):  # raw logits on both sides
            ref_lp = torch.log_softmax(ref.logits[step][0].float(), dim=-1)[token].item()
            assert got.logprobs[step].token_id == token
            assert abs(got.logprobs[step].logprob - ref_lp) < 2e-3, (step, token, got.logprobs[step].logprob, ref_lp)


def test_fp8_stays_close_to_the_unquantized_model(fp8_llm: LLM, real_model_dir: str) -> None:
    """Teacher-forced over the same prompts: the fp8 model's next-token argmax agrees with the fp32 model's at
    >= 90% of positions, and its logits differ by a few percent (e4m3 rounds each weight by <= 2^-4 of its
    row's largest, ~2-3% in norm)."""
    from transformers import AutoModelForCausalLM

    tokenizer = fp8_llm.get_tokenizer()
    text = ("def reverse(s):\n    return s[::-1]\n\nprint(reverse('hello world'))\n# A GPU runs many threads at once; "
            "it is fast at matrix products. Primes: 2, 3, 5, 7, 11, 13.")
    ids = torch.tensor([tokenizer.encode(text)])
    exact = AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    rounded = hf_with_fp8_weights(real_model_dir)
    with torch.no_grad():
        a = exact(ids).logits[0]
        b = rounded(ids).logits[0]
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    rel = ((a - b).norm() / a.norm()).item()
    print(f"fp8 vs fp32 model, teacher-forced over {ids.shape[1]} positions: argmax agreement {agree:.3f}, "
          f"logits rel err {rel:.2e}")
    assert agree >= 0.9, agree
    assert 1e-3 < rel < 0.1, rel  # changed, but not by much
    # and the engine's prompt logprobs on the fp8 model are the rounded model's
    out = fp8_llm.generate([{"prompt_token_ids": ids[0].tolist()}],
                           SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ref_lp = torch.log_softmax(b, dim=-1)
    for pos in range(1, ids.shape[1]):
        token = ids[0, pos].item()
        entry = out.prompt_logprobs[pos]
        assert entry.token_id == token and abs(entry.logprob - ref_lp[pos - 1, token].item()) < 2e-3, pos


def test_quantization_flag_validation_and_cli() -> None:
    from pagedserve.entrypoints.args import add_engine_args, config_from_args

    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(load_format="dummy", quantization="awq")
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser, model_positional=True)
    assert config_from_args(parser.parse_args(["m", "-q", "fp8"])).quantization == "fp8"
    assert config_from_args(parser.parse_args(["m"])).quantization is None
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--quantization", "gptq"])


def test_mixed_batch_with_fp8_matches_hf_on_fp8_weights(tmp_path) -> None:
    """The model runner's mixed step (chunked prefill, prefix hit, decodes) on CPU with quantization="fp8" gives
    HF's logits on the fp8-rounded weights."""
    from tests.executor.test_model_runner import run_mixed_batch_against_hf

    run_mixed_batch_against_hf("qwen2", tmp_path, "cpu", "torch", tolerance=1e-4, quantization="fp8")


def test_load_model_quantizes_the_projections_only(tmp_path) -> None:
    """load_model with quantization="fp8" on CPU: every decoder projection holds its fp8-rounded values (the
    dequantized rows; no fp8 tensor is kept on CPU), the embedding, norms and LM head are the checkpoint's."""
    from pagedserve.executor.layers import Linear
    from pagedserve.executor.loader import load_model
    from tests.executor.helpers import save_tiny_model, tiny_hf_config

    save_tiny_model("qwen2", tmp_path)
    plain, _ = load_model(EngineConfig(model=str(tmp_path), device="cpu"), str(tmp_path), torch.device("cpu"),
                          torch.float32)
    fp8, _ = load_model(EngineConfig(model=str(tmp_path), device="cpu", quantization="fp8"), str(tmp_path),
                        torch.device("cpu"), torch.float32)
    projections = {n for n, m in fp8.named_modules() if isinstance(m, Linear) and not n.endswith("lm_head")}
    assert len(projections) == 4 * tiny_hf_config("qwen2").num_hidden_layers
    quantized = {name: p for name, p in fp8.named_parameters()}
    for name, ref in plain.named_parameters():
        got = quantized[name].detach()
        if name.endswith(".weight") and name[: -len(".weight")] in projections:
            q, scale = quantize_rows_fp8(ref.detach())
            assert torch.equal(got, dequantize_rows_fp8(q, scale, torch.float32)), name
            assert not torch.equal(got, ref.detach()), name
        else:
            assert torch.equal(got, ref.detach()), name


# --- fp8 checkpoints ------------------------------------------------------------------------------


def write_fp8_checkpoint(hf, folder, fmt: str) -> None:
    """`hf` saved as an fp8 checkpoint: "autofp8" (quant_method fp8, one scale per tensor, static input scales
    beside them, as AutoFP8 writes) or "compressed" (compressed-tensors FP8_DYNAMIC, one scale per output row).
    hf's projections are replaced by what the file holds, so both sides compute with the same numbers."""
    hf.save_pretrained(folder)

    def quantize(name: str, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
        saved = {}
        if fmt == "autofp8":
            scale = (w.abs().max() / 448.0).reshape(())
            saved[name[: -len("weight")] + "input_scale"] = torch.tensor(0.05)
        else:
            scale = w.abs().amax(dim=1, keepdim=True) / 448.0
        q = (w / scale).to(torch.float8_e4m3fn)
        return q.float() * scale, {**saved, name: q, name + "_scale": scale.float()}

    state = _rewrite_projections(hf, quantize)
    if fmt == "autofp8":
        qc = {"quant_method": "fp8", "activation_scheme": "static"}
    else:
        qc = _compressed_fp8({"strategy": "channel"}, {"strategy": "token"})
    _save_quantized(folder, state, qc)


def _rewrite_projections(hf, quantize) -> dict:
    """hf's state dict with each decoder projection's weight replaced by the tensors `quantize(name, w)` gives to save
    (and hf's weight, in place, by the dequantized values it gives first)."""
    state = {}
    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
            if module in PROJECTIONS and name.endswith(".weight"):
                dequantized, saved = quantize(name, tensor.float())
                tensor.copy_(dequantized)
                state.update(saved)
            else:
                state[name] = tensor.contiguous()
    return state


def _compressed_fp8(weights: dict, activations: dict) -> dict:
    """A compressed-tensors FP8 quantization_config with these weight / activation fields."""
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "dynamic": False, "symmetric": True, **weights},
            "input_activations": {"num_bits": 8, "type": "float", "dynamic": True, **activations},
        }},
    }


def _save_quantized(folder, state: dict, quantization_config: dict) -> None:
    """The folder's safetensors replaced by `state`, and its config.json given `quantization_config`."""
    import json

    from safetensors.torch import save_file

    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(state, folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fmt", ["autofp8", "compressed"])
def test_fp8_checkpoint_matches_hf_on_its_dequantized_weights(fmt, tmp_path) -> None:
    """An fp8 checkpoint (no flag needed) through the model runner's mixed step: HF's logits on the weights the file
    holds (fp8 values times their scales); the engine reports quantization fp8."""
    from tests.executor.helpers import hf_logits, make_runner, scheduled, step, tiny_hf_model

    hf = tiny_hf_model("qwen2")
    write_fp8_checkpoint(hf, tmp_path, fmt)
    runner, sampler = make_runner(tmp_path)
    tokens = [3, 17, 101, 5, 250, 64, 9, 33, 12, 200, 7]
    runner.execute(step(scheduled("r", tokens, 0, [1, 2, 3], needs_sample=True)))
    got, want = sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert runner.model.quantization == "fp8"


def write_block_fp8_checkpoint(hf, folder, fmt: str, block: tuple[int, int]) -> None:
    """`hf` saved as a block-wise fp8 checkpoint: "fp8" (quant_method fp8 with weight_block_size and
    weight_scale_inv, as Qwen3's and DeepSeek's FP8 releases) or "compressed" (compressed-tensors' block scheme,
    weight_scale). hf's projections are replaced by what the file holds (each block's fp8 values times its scale)."""
    hf.save_pretrained(folder)
    rows, cols = block

    def quantize(name: str, w: torch.Tensor) -> tuple[torch.Tensor, dict]:
        out_f, in_f = w.shape
        br, bc = -(-out_f // rows), -(-in_f // cols)
        padded = torch.zeros(br * rows, bc * cols)
        padded[:out_f, :in_f] = w
        scale = (padded.view(br, rows, bc, cols).abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
        full = scale.repeat_interleave(rows, 0)[:out_f].repeat_interleave(cols, 1)[:, :in_f]
        q = (w / full).to(torch.float8_e4m3fn)
        return q.float() * full, {name: q, name + ("_scale_inv" if fmt == "fp8" else "_scale"): scale.float()}

    state = _rewrite_projections(hf, quantize)
    if fmt == "fp8":
        qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(block)}
    else:
        qc = _compressed_fp8({"strategy": "block", "block_structure": list(block)},
                             {"strategy": "group", "group_size": 128})
    _save_quantized(folder, state, qc)


@pytest.mark.parametrize("fmt,block", [("fp8", (32, 32)), ("compressed", (48, 40))])  # (48, 40): ragged blocks
def test_block_fp8_checkpoint_loads_as_fp8_rows(fmt, block, tmp_path) -> None:
    """A block-wise fp8 checkpoint: its blocks dequantized at load, then fp8 again with a scale per row (the fp8
    kernels' layout): HF's logits on those weights (the file's blocks, then rounded per row); reports fp8."""
    from tests.executor.helpers import hf_logits, make_runner, scheduled, step, tiny_hf_model

    hf = tiny_hf_model("qwen2")
    write_block_fp8_checkpoint(hf, tmp_path, fmt, block)
    round_projections_to_fp8(hf)
    runner, sampler = make_runner(tmp_path)
    assert runner.model.quantization == "fp8"
    tokens = [3, 17, 101, 5, 250, 64, 9, 33, 12, 200, 7]
    runner.execute(step(scheduled("r", tokens, 0, [1, 2, 3], needs_sample=True)))
    got, want = sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_block_fp8_checkpoint_errors_are_named(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from pagedserve.executor.loader import load_model
    from tests.executor.helpers import tiny_hf_model

    write_block_fp8_checkpoint(tiny_hf_model("qwen2"), tmp_path, "fp8", (32, 32))
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight_scale_inv"] = state["model.layers.0.mlp.up_proj.weight_scale_inv"][:1]
    del state["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"up_proj's scales \(1, 2\) do not fit its weight \(96, 64\)"):
        load_model(EngineConfig(model=str(tmp_path)), str(tmp_path), "cpu", torch.float32)
    state["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(3, 2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"o_proj lacks its scales"):
        load_model(EngineConfig(model=str(tmp_path)), str(tmp_path), "cpu", torch.float32)


def test_fp8_checkpoint_with_the_fp8_flag_is_not_rounded_again(tmp_path) -> None:
    """A per-tensor checkpoint (AutoFP8) loaded with quantization="fp8" too: its projections stay as stored, on the
    CPU as on CUDA. Re-quantizing their dequantized values per row rounded them a second time on the CPU (logits
    0.116 off, relative to the largest, before session 21's fix)."""
    from tests.executor.helpers import hf_logits, make_runner, scheduled, step, tiny_hf_model

    hf = tiny_hf_model("qwen2")
    write_fp8_checkpoint(hf, tmp_path, "autofp8")
    runner, sampler = make_runner(tmp_path, quantization="fp8")
    tokens = [3, 17, 101, 5, 250, 64, 9, 33, 12, 200, 7]
    runner.execute(step(scheduled("r", tokens, 0, [1, 2, 3], needs_sample=True)))
    got, want = sampler.logits[-1]["r"], hf_logits(hf, tokens)[-1]
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_fp8_checkpoint_through_llm_and_two_ranks(tmp_path, real_model_dir) -> None:
    """The per-channel checkpoint through LLM (config reports fp8) and over two ranks (gloo): each rank takes its
    rows' scales for q/k/v/gate/up and the whole scale vector for o/down; greedy tokens and logprobs equal HF's."""
    from tests.executor.test_tensor_parallel import PROMPTS, hf_greedy, tiny_checkpoint

    hf = tiny_checkpoint(tmp_path, real_model_dir, "qwen2")  # with the real tokenizer's files
    write_fp8_checkpoint(hf, tmp_path, "compressed")
    for tp in (1, 2):
        llm = LLM(str(tmp_path), tensor_parallel_size=tp, max_model_len=64, cpu_kv_cache_gib=0.05, device="cpu",
                  dtype="float32", skip_warmup=True)
        try:
            assert llm.engine.config.quantization == "fp8"
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                                SamplingParams(temperature=0, max_tokens=5, logprobs=0), use_tqdm=False)
            for prompt, out in zip(PROMPTS, outs, strict=True):
                ref_ids, ref_logprobs = hf_greedy(hf, prompt, 5)
                assert out.outputs[0].token_ids == ref_ids, tp
                assert [lp.logprob for lp in out.outputs[0].logprobs] == pytest.approx(ref_logprobs, abs=1e-4)
        finally:
            llm.engine.worker.close()


def test_unsupported_checkpoint_quantization_is_a_clear_error(tmp_path) -> None:
    import json

    from pagedserve.executor.loader import load_model
    from tests.executor.helpers import save_tiny_model, tiny_hf_model

    save_tiny_model("qwen2", tmp_path)
    config_path = tmp_path / "config.json"
    base = json.loads(config_path.read_text())
    for qc, match in [
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ checkpoints of version 'gemv'"),
        ({"quant_method": "bitsandbytes"}, "checkpoint quantization 'bitsandbytes' is not supported"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "two positive integers"),
        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
         "scheme 'g'"),
    ]:
        config_path.write_text(json.dumps({**base, "quantization_config": qc}))
        with pytest.raises(ValueError, match=match):
            load_model(EngineConfig(model=str(tmp_path)), str(tmp_path), "cpu", torch.float32)
    # an fp8 weight without its scale
    folder = tmp_path / "noscale"
    write_fp8_checkpoint(tiny_hf_model("qwen2"), folder, "compressed")
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.self_attn.o_proj.weight_scale"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"o_proj: the checkpoint holds this projection in fp8 but not its weight"):
        load_model(EngineConfig(model=str(folder)), str(folder), "cpu", torch.float32)
    # an LM head stored in fp8 (this model keeps it 16-bit): refused, not cast without its scale
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"].to(torch.float8_e4m3fn)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"lm_head.weight: a torch.float8_e4m3fn tensor for a torch.float32 param"):
        load_model(EngineConfig(model=str(folder)), str(folder), "cpu", torch.float32)


def test_quantization_module_does_not_import_triton() -> None:
    """CPU runs and test collection import executor/quantization.py; Triton must come later (the kernel tests switch
    it to its interpreter before importing it: imported earlier, its library functions stay compiled-only)."""
    import subprocess
    import sys

    code = ("import sys, pagedserve.executor.quantization, pagedserve.executor.loader, pagedserve.executor.layers; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
