"""LLM.load_weights: new weights between generations (an RL loop's policy update). After an update the engine
answers as Transformers with the new weights (greedy tokens and logprobs), for a whole state dict, a subset, and a
saved folder; the prefix cache of the old weights is forgotten; bad updates are refused with ValueError."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from tests.executor.helpers import tiny_hf_model
from tests.executor.test_tensor_parallel import hf_greedy, tiny_checkpoint

PROMPT = [(7 * i) % 250 + 3 for i in range(21)]
KW = dict(dtype="float32", num_kv_blocks=32, block_size=4, max_model_len=64, skip_warmup=True)


def answer(llm: LLM, prompt: list[int] = PROMPT):
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=6, logprobs=0),
                       use_tqdm=False)[0]
    return out.outputs[0].token_ids, [lp.logprob for lp in out.outputs[0].logprobs], out.num_cached_tokens


def assert_as_hf(llm: LLM, hf, prompt: list[int] = PROMPT) -> int:
    ids, logprobs, cached = answer(llm, prompt)
    expected_ids, expected_logprobs = hf_greedy(hf, prompt, 6)
    assert ids == expected_ids
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)
    return cached


@pytest.mark.parametrize("arch", ["qwen2", "llama"])  # qwen2: biases, untied LM head; llama: tied embeddings
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_whole_state_dict_then_a_subset_then_a_folder(arch, async_scheduling, tmp_path, real_model_dir) -> None:
    old = tiny_checkpoint(tmp_path / "old", real_model_dir, arch)
    llm = LLM(str(tmp_path / "old"), async_scheduling=async_scheduling, **KW)
    assert_as_hf(llm, old)
    assert assert_as_hf(llm, old) >= 16  # the prompt's blocks now cached

    new = tiny_hf_model(arch, seed=1)
    assert llm.load_weights(new.state_dict()) == len(new.state_dict())
    assert assert_as_hf(llm, new) == 0  # the old weights' cached blocks were forgotten

    # A subset (layer 1's attention and the final norm), as (name, tensor) pairs in bf16 on the CPU.
    mixed = tiny_hf_model(arch, seed=1)
    donor = tiny_hf_model(arch, seed=2)
    names = [n for n in donor.state_dict() if n.startswith("model.layers.1.self_attn.") or n == "model.norm.weight"]
    with torch.no_grad():
        for name in names:
            mixed.get_parameter(name).copy_(donor.get_parameter(name).to(torch.bfloat16))
    assert llm.load_weights([(n, donor.get_parameter(n).detach().to(torch.bfloat16)) for n in names]) == len(names)
    assert_as_hf(llm, mixed)

    donor.save_pretrained(tmp_path / "donor")
    assert llm.load_weights(str(tmp_path / "donor")) >= len(names)
    assert_as_hf(llm, donor)


def test_bad_updates_are_refused(tmp_path, real_model_dir) -> None:
    old = tiny_checkpoint(tmp_path, real_model_dir, "qwen2")
    llm = LLM(str(tmp_path), **KW)
    weight = old.state_dict()["model.layers.0.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="no weight named 'model.layers.9.mlp.down_proj.weight'"):
        llm.load_weights({"model.layers.9.mlp.down_proj.weight": weight})
    with pytest.raises(ValueError, match="does not match"):
        llm.load_weights({"model.layers.0.mlp.down_proj.weight": weight[:, :3]})
    with pytest.raises(ValueError, match="not a torch.Tensor"):
        llm.load_weights({"model.norm.weight": [1.0] * 64})
    llm.engine.add_request("busy", PROMPT, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="unfinished"):
        llm.load_weights({"model.layers.0.mlp.down_proj.weight": weight})
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    assert_as_hf(llm, old)  # nothing was changed by the refused updates
    quantized = LLM(str(tmp_path), quantization="fp8", **KW)
    with pytest.raises(ValueError, match="fp8"):
        quantized.load_weights({"model.layers.0.mlp.down_proj.weight": weight})
