"""vLLM's engine flags beyond the core ones: --hf-overrides / --rope-scaling / --rope-theta (config fields on top at
load: YaRN without editing the checkpoint, checked against Transformers built with the same fields), --revision and
--download-dir (Hub downloads), --max-logprobs, and the flags accepted for compatibility."""

from __future__ import annotations

import argparse

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.entrypoints.args import add_engine_args, config_from_args
from pagedserve.executor.layers import rope_parameters
from pagedserve.executor.loader import apply_hf_overrides
from tests.executor.helpers import tiny_hf_config, tiny_hf_model
from tests.executor.test_tensor_parallel import hf_greedy, tiny_checkpoint

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def parse(*flags: str):
    parser = argparse.ArgumentParser()
    add_engine_args(parser, model_positional=True)
    return config_from_args(parser.parse_args(["some/model", *flags]))


def test_flags_map_onto_the_engine_config() -> None:
    config = parse("--hf-overrides", '{"max_position_embeddings": 64, "rope_scaling": {"factor": 2.0}}',
                   "--rope-scaling", '{"type": "yarn", "factor": 4.0}', "--rope-theta", "5e5", "--revision", "v1.1",
                   "--download-dir", "/tmp/hub", "--max-logprobs", "5", "--trust-remote-code",
                   "--enable-chunked-prefill", "--disable-log-requests", "--swap-space", "4", "-pp", "1",
                   "--disable-custom-all-reduce", "--max-seq-len-to-capture", "8192", "--disable-sliding-window")
    assert config.hf_overrides == {"max_position_embeddings": 64, "rope_scaling": {"type": "yarn", "factor": 4.0},
                                   "rope_theta": 5e5}
    assert (config.revision, config.download_dir, config.max_logprobs) == ("v1.1", "/tmp/hub", 5)
    assert config.disable_sliding_window and not parse().disable_sliding_window
    assert parse().hf_overrides is None and parse().max_logprobs == 20
    parse("--distributed-executor-backend", "mp")
    for flags, words in ((["--no-enable-chunked-prefill"], "always chunks"), (["-pp", "2"], "pipeline"),
                         (["--distributed-executor-backend", "ray"], "multi-node"),
                         (["--max-logprobs", "21"], "max_logprobs")):
        with pytest.raises(ValueError, match=words):
            parse(*flags)


@pytest.mark.parametrize("form", ["4.x", "5.x"])
def test_rope_overrides_reach_either_config_form(form) -> None:
    """transformers 5 keeps rope fields in rope_parameters, 4.x in rope_scaling + rope_theta (and our plain reader of
    config.json the same): an override of either name lands where rope_parameters() reads it."""
    config = tiny_hf_config("qwen2")
    if form == "4.x":
        config = argparse.Namespace(max_position_embeddings=32, rope_theta=1e4, rope_scaling=None)
    apply_hf_overrides(config, {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 32},
                                "rope_theta": 2e5, "max_position_embeddings": 32})
    theta, scaling = rope_parameters(config)
    assert theta == 2e5 and scaling["rope_type"] == "yarn" and scaling["factor"] == 4.0
    with pytest.raises(ValueError, match="JSON object"):
        apply_hf_overrides(config, {"rope_scaling": 4})
    with pytest.raises(ValueError, match="positive number"):
        apply_hf_overrides(config, {"rope_theta": "big"})


def test_yarn_through_hf_overrides_answers_as_transformers(tmp_path, real_model_dir) -> None:
    """A checkpoint without rope scaling (max_position_embeddings 32), served with YaRN x4 by --hf-overrides: the
    context is 128 and a 90-token prompt answers as Transformers built with that rope_scaling (same weights); with
    --rope-theta too, as Transformers with both."""
    tiny_checkpoint(tmp_path, real_model_dir, "qwen2", max_position_embeddings=32)
    prompt = [(7 * i) % 250 + 3 for i in range(90)]
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    # (transformers 5 reads the base from the rope dict when one is given)
    for overrides, hf_scaling in (({"rope_scaling": YARN}, YARN),
                                  ({"rope_scaling": YARN, "rope_theta": 3e4}, {**YARN, "rope_theta": 3e4})):
        llm = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, hf_overrides=overrides, skip_warmup=True)
        assert llm.engine.config.max_model_len == 128
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
        hf = tiny_hf_model("qwen2", max_position_embeddings=32, rope_scaling=hf_scaling)
        assert rope_parameters(hf.config)[0] == overrides.get("rope_theta", 1e4)
        ids, logprobs = hf_greedy(hf, prompt, 6)
        assert out.token_ids == ids
        assert [lp.logprob for lp in out.logprobs] == pytest.approx(logprobs, abs=1e-4)
    plain = LLM(str(tmp_path), dtype="float32", cpu_kv_cache_gib=0.05, skip_warmup=True)
    assert plain.engine.config.max_model_len == 32


def test_revision_and_download_dir_reach_the_hub_download(monkeypatch, tmp_path) -> None:
    import huggingface_hub

    from pagedserve.executor.loader import fetch_model_source

    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    source = fetch_model_source("Qwen/Qwen2-7B-Instruct", "auto", "refs/pr/1", "/data/hub")
    assert source.path == str(tmp_path)
    assert seen["repo_id"] == "Qwen/Qwen2-7B-Instruct"
    assert (seen["revision"], seen["cache_dir"]) == ("refs/pr/1", "/data/hub")
    # --hf-token (vLLM's): the token reaches the download; the config never prints it
    fetch_model_source("meta-llama/Llama-3.1-8B-Instruct", "auto", None, None, "hf_secret")
    assert seen["token"] == "hf_secret" and seen["repo_id"] == "meta-llama/Llama-3.1-8B-Instruct"
    config = parse("--hf-token", "hf_secret")
    assert config.hf_token == "hf_secret" and "hf_secret" not in repr(config)
    assert parse("--hf-token").hf_token is True and parse().hf_token is None
    with pytest.raises(ValueError, match="hf_token"):
        EngineConfig(hf_token="")


def test_max_logprobs_bounds_requests(real_model_dir) -> None:
    llm = LLM(real_model_dir, max_model_len=256, cpu_kv_cache_gib=0.1, max_logprobs=2)
    out = llm.generate(["Hello"], SamplingParams(max_tokens=2, logprobs=2), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs[0].top) == 2
    for params in (SamplingParams(max_tokens=2, logprobs=3), SamplingParams(max_tokens=2, prompt_logprobs=5)):
        with pytest.raises(ValueError, match="max_logprobs"):
            llm.generate(["Hello"], params, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_total_blocks"]


def test_config_file_gives_defaults_the_command_line_overrides(tmp_path) -> None:
    """vLLM's --config FILE.yaml: keys with dashes or underscores, booleans (a --no- flag too), lists, mappings for
    JSON flags; a flag on the command line wins over the file."""
    from pagedserve.entrypoints.args import apply_config_file
    from pagedserve.entrypoints.openai.cli_serve import serve_config_from_args
    from pagedserve.entrypoints.openai.server import build_parser

    path = tmp_path / "serve.yaml"
    path.write_text("model: some/model\nmax-model-len: 4096\nenable_prefix_caching: false\nport: 9000\n"
                    "speculative-config: {method: ngram, num_speculative_tokens: 3}\nserved-model-name: [a, b]\n"
                    "dtype: float32\ntrust-remote-code: true\ngpu_memory_utilization: 0.5\n")

    def parse(*argv: str):
        parser = build_parser()
        apply_config_file(parser, list(argv))
        return parser.parse_args(list(argv))

    args = parse("--config", str(path), "--max-model-len", "2048")
    config = serve_config_from_args(args)
    assert (config.model, config.max_model_len, config.enable_prefix_caching, config.dtype) == \
        ("some/model", 2048, False, "float32")
    assert config.speculative_config["num_speculative_tokens"] == 3 and config.gpu_memory_utilization == 0.5
    assert args.port == 9000 and args.served_model_name == ["a", "b"] and args.trust_remote_code
    args = parse(f"--config={path}", "--enable-prefix-caching", "--port", "9001")
    assert serve_config_from_args(args).enable_prefix_caching and args.port == 9001
    assert parse("--port", "9002").port == 9002  # no file: nothing changes
    for text, words in (("max_modle_len: 3\n", "unknown flag 'max_modle_len'"), ("dtype: float64\n", "one of"),
                        ("enforce-eager: 'yes'\n", "true or false"), ("- a\n- b\n", "mapping"),
                        ("max-model-len: [\n", "not valid YAML"), ("max-model-len: lots\n", "max-model-len"),
                        ("speculative-config: {method: bogus}\n", "speculative-config")):
        path.write_text(text)
        with pytest.raises(ValueError, match=words) as info:
            parse("--config", str(path))
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        parse("--config", str(tmp_path / "missing.yaml"))


def test_config_file_reaches_nested_commands(tmp_path) -> None:
    """`pagedserve bench throughput --config FILE`: the file sets throughput's own flags (its parser, two levels
    down)."""
    from pagedserve.entrypoints.args import apply_config_file
    from pagedserve.entrypoints.cli import build_parser

    path = tmp_path / "bench.yaml"
    path.write_text("max-model-len: 1024\nenforce-eager: true\n")
    parser = build_parser()
    argv = ["bench", "throughput", "--config", str(path)]
    apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    assert args.max_model_len == 1024 and args.enforce_eager
