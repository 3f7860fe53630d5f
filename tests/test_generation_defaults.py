"""Default sampling from the model's generation_config.json (vLLM's --generation-config): loading and
checking, the offline API, and the request-building rule (a request's own values win)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.entrypoints.openai.protocol import CompletionRequest
from pagedserve.entrypoints.openai.serving_base import APIError, build_sampling_params
from pagedserve.generation_defaults import load_generation_defaults

QWEN2_7B_INSTRUCT = {  # the file as Qwen/Qwen2-7B-Instruct ships it
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0",
}


def folder_with(tmp_path: Path, config: dict | str) -> str:
    (tmp_path / "generation_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(tmp_path)


def test_modes_and_override(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, QWEN2_7B_INSTRUCT)
    qwen = {"repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    assert load_generation_defaults(folder) == qwen
    assert load_generation_defaults(folder, "vllm") == {} == load_generation_defaults(folder, "none")
    assert load_generation_defaults(None, folder) == qwen  # a folder named explicitly
    assert load_generation_defaults(str(tmp_path / "nowhere")) == {}  # auto without a file: nothing
    assert load_generation_defaults(folder, override={"temperature": 0.0, "top_k": -1}) == {
        "repetition_penalty": 1.05, "temperature": 0.0, "top_p": 0.8}  # top_k -1 = off = the built-in
    assert load_generation_defaults(folder, "vllm", {"min_p": 0.1}) == {"min_p": 0.1}
    # max_new_tokens (the file's name, and the override's as vLLM's) is the default max_tokens
    folder = folder_with(tmp_path, {**QWEN2_7B_INSTRUCT, "max_new_tokens": 512})
    assert load_generation_defaults(folder) == {**qwen, "max_tokens": 512}
    assert load_generation_defaults(folder, override={"max_new_tokens": 64})["max_tokens"] == 64
    assert load_generation_defaults(folder_with(tmp_path, {"max_new_tokens": 16})) == {"max_tokens": 16}


@pytest.mark.parametrize(("config", "mode", "override", "message"), [
    ({"top_p": 1.5}, "auto", None, "top_p must be in"),
    ({"temperature": "hot"}, "auto", None, "temperature must be in"),
    ("{not json", "auto", None, "cannot read"),
    ("[1, 2]", "auto", None, "is not a JSON object"),
    ({}, "auto", {"max_tokens": 5}, "unknown field"),
    ({}, "auto", {"top_k": 2.5}, "top_k must be"),
    ({}, "/no/such/folder", None, "no generation_config.json there"),
])
def test_bad_configs_raise_value_error(tmp_path: Path, config, mode, override, message) -> None:
    folder = folder_with(tmp_path, config)
    with pytest.raises(ValueError, match=message):
        load_generation_defaults(folder, mode, override)


def test_request_values_win_over_defaults() -> None:
    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    unset = build_sampling_params(CompletionRequest(prompt="x"), 16, None, defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty, unset.min_p) == (
        0.7, 0.8, 20, 1.05, 0.0)
    own = build_sampling_params(CompletionRequest(prompt="x", temperature=0.0, top_p=1.0, top_k=-1,
                                                  repetition_penalty=1.0), 16, None, defaults)
    assert (own.temperature, own.top_p, own.top_k, own.repetition_penalty) == (0.0, 1.0, 0, 1.0)
    plain = build_sampling_params(CompletionRequest(prompt="x"), 16, None, None)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (1.0, 1.0, 0, 1.0)
    with pytest.raises(APIError):  # a bad request value is still the request's 400
        build_sampling_params(CompletionRequest(prompt="x", min_tokens=50), 16, None, defaults)


def test_offline_api_uses_the_models_defaults(real_model_dir: str, tmp_path: Path) -> None:
    """A model folder whose generation_config.json asks for greedy decoding with a strong repetition
    penalty: generate() without sampling parameters decodes exactly so; vllm mode ignores the file."""
    for name in os.listdir(real_model_dir):
        if name != "generation_config.json":
            os.symlink(os.path.join(real_model_dir, name), tmp_path / name)
    base = json.loads(Path(real_model_dir, "generation_config.json").read_text())
    folder = folder_with(tmp_path, {**base, "temperature": 0.0, "repetition_penalty": 1.8})
    llm = LLM(folder, max_model_len=256, cpu_kv_cache_gib=0.1)
    assert llm.get_default_sampling_params().repetition_penalty == 1.8
    prompt = "Count to ten:"
    got = llm.generate(prompt, use_tqdm=False)[0].outputs[0].token_ids
    explicit = SamplingParams(temperature=0.0, repetition_penalty=1.8)
    assert got == llm.generate(prompt, explicit, use_tqdm=False)[0].outputs[0].token_ids
    assert got != llm.generate(prompt, SamplingParams(temperature=0.0), use_tqdm=False)[0].outputs[0].token_ids
    assert len(got) == 16  # the built-in max_tokens stays
    capped = LLM(folder_with(tmp_path, {**base, "max_new_tokens": 5}), max_model_len=256, cpu_kv_cache_gib=0.1)
    assert capped.get_default_sampling_params().max_tokens == 5
    assert len(capped.generate("Count: 1, 2, 3,", use_tqdm=False)[0].outputs[0].token_ids) == 5
    plain = LLM(folder, max_model_len=256, cpu_kv_cache_gib=0.1, generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
    with pytest.raises(ValueError, match="unknown field"):
        LLM(folder, max_model_len=256, cpu_kv_cache_gib=0.1, override_generation_config={"max_tokens": 3})


@pytest.mark.slow
def test_server_applies_the_models_defaults(real_model_dir: str, tmp_path: Path) -> None:
    """`pagedserve serve --generation-config FOLDER` in a subprocess, through the official openai client:
    fields a request leaves unset take the folder's values, fields it sets keep its own."""
    import openai

    from tests.entrypoints.conftest import RealServer

    folder = folder_with(tmp_path, {"temperature": 0.0, "repetition_penalty": 1.8})
    server = RealServer(real_model_dir, "--max-model-len", "512", "--cpu-kv-cache-gib", "0.2",
                        "--generation-config", folder, "--override-generation-config", '{"top_p": 0.9}')
    try:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id

        def tokens(**kw) -> str:
            return client.completions.create(model=model, prompt="Count to ten:", max_tokens=12, **kw
                                             ).choices[0].text

        by_default = tokens()
        assert by_default == tokens(temperature=0.0, top_p=0.9, extra_body={"repetition_penalty": 1.8})
        assert by_default != tokens(temperature=0.0, extra_body={"repetition_penalty": 1.0})
        assert "default sampling parameters from" in server.output()
    finally:
        server.stop()
