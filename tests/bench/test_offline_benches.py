"""`bench throughput`, `bench latency` and `bench hf` through the CLI on CPU, on the real embedded model
with tiny workloads: each exits 0, prints, and writes a JSON file whose fields are present and sane."""

from __future__ import annotations

import gc
import json

import pytest

from pagedserve.bench.datasets import random_requests
from pagedserve.entrypoints.cli import main

pytestmark = pytest.mark.slow

ENGINE_FLAGS = ["--device", "cpu", "--max-model-len", "128", "--cpu-kv-cache-gib", "0.25"]


def _bench(tmp_path, real_model_dir, *argv: str) -> dict:
    out = tmp_path / "result.json"
    assert main(["bench", *argv, "--model", real_model_dir, "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["date"] and result["commit"] and result["command"]
    return result


def test_bench_throughput(tmp_path, real_model_dir, capsys) -> None:
    result = _bench(tmp_path, real_model_dir, "throughput", *ENGINE_FLAGS, "--num-prompts", "4",
                    "--input-len", "8-16", "--output-len", "4-8", "--no-tqdm", "--temperature", "0.7",
                    "--top-p", "0.9", "--top-k", "20", "--repetition-penalty", "1.05", "--frequency-penalty", "0.1")
    requests = random_requests(4, (8, 16), (4, 8), vocab_size=151_936, seed=0)
    assert result["bench"] == "throughput" and result["card"] == "cpu" and result["num_prompts"] == 4
    assert result["input_tokens"] == sum(len(r.prompt_token_ids) for r in requests)
    assert result["output_tokens"] == sum(r.output_len for r in requests)
    assert result["elapsed_s"] > 0 and result["startup_s"] > 0 and result["warmup_s"] > 0
    assert result["requests_per_s"] > 0 and 0 < result["output_tok_per_s"] < result["total_tok_per_s"]
    assert result["output_tok_per_s"] == pytest.approx(result["output_tokens"] / result["elapsed_s"])
    assert result["kv_blocks"] > 0 and result["num_preemptions"] >= 0
    kv = result["kv_cache"]  # the KV cache's use over the run's steps
    assert kv["total_slots"] == result["kv_blocks"] * kv["block_size"] and kv["block_size"] == 16
    assert kv["peak_running"] == 4 and 0 < kv["mean_running"] <= 4
    assert 0 < kv["mean_used_pct"] <= kv["peak_used_pct"] <= 100
    assert 0 <= kv["empty_pct"] <= kv["worst_step_empty_pct"] < 100
    reserve = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    assert kv["contiguous_reserve_tokens"] == reserve and kv["contiguous_max_running"] == kv["total_slots"] // reserve
    assert result["sampling"] == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.0,
                                  "repetition_penalty": 1.05, "frequency_penalty": 0.1, "presence_penalty": 0.0}
    assert "floor_s" not in result  # no GPU, no --peak-*: no floor
    # The timed run had the start-up objects frozen out of the collector; the bench gave them back after.
    assert result["gc_frozen_objects"] > 10_000 and len(result["gc_collections"]) == 3
    assert result["gc_pause_ms"] >= result["gc_max_pause_ms"] >= 0
    assert gc.get_freeze_count() == 0
    out = capsys.readouterr().out
    assert "output tok/s" in out and "gc: " in out and "KV cache: " in out and "held no token" in out


def test_bench_throughput_counts_a_hybrid_layouts_groups(tmp_path, real_model_dir, capsys) -> None:
    """A hybrid model (tiny Gemma 3: windowed and full-attention layers, one block table a group of layers): the KV
    line and JSON count every group's blocks and last-block tails; a contiguous cache would reserve the longest request
    in every group."""
    from tests.executor.test_tensor_parallel import tiny_checkpoint

    tiny_checkpoint(tmp_path / "g", real_model_dir, "gemma3")
    result = _bench(tmp_path, str(tmp_path / "g"), "throughput", *ENGINE_FLAGS, "--num-prompts", "4",
                    "--input-len", "8-16", "--output-len", "12-16", "--no-tqdm")
    kv = result["kv_cache"]
    requests = random_requests(4, (8, 16), (12, 16), vocab_size=151_936, seed=0)  # (the lengths only)
    reserve = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    assert kv["kv_groups"] > 1 and kv["contiguous_reserve_tokens"] == reserve
    assert kv["contiguous_max_running"] == kv["total_slots"] // (reserve * kv["kv_groups"])
    assert kv["peak_running"] == 4 and 0 < kv["mean_used_pct"] <= kv["peak_used_pct"] <= 100
    assert 0 < kv["empty_pct"] <= kv["worst_step_empty_pct"] < 100
    assert f"{kv['kv_groups']} groups of layers (hybrid layout)" in capsys.readouterr().out


def test_bench_latency(tmp_path, real_model_dir, capsys) -> None:
    result = _bench(tmp_path, real_model_dir, "latency", *ENGINE_FLAGS, "--input-len", "16", "--output-len", "8",
                    "--num-iters", "1")
    assert result["bench"] == "latency" and (result["input_len"], result["output_len"]) == (16, 8)
    assert result["ttft_ms"] > 0 and result["ms_per_step"] > 0 and result["achieved_gb_per_s"] > 0
    assert result["decode_tok_per_s"] == pytest.approx(1e3 / result["ms_per_step"])
    assert result["e2e_s"] * 1e3 > result["ttft_ms"]
    assert result["graph_replay_ms"] is None  # no CUDA graphs on CPU
    assert "TTFT" in capsys.readouterr().out


def test_bench_throughput_and_latency_with_speculative_decoding(tmp_path, real_model_dir, capsys) -> None:
    """--speculative-config: the timed run's drafting counters (not the warm-up's) in the JSON and the output."""
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}'
    result = _bench(tmp_path, real_model_dir, "throughput", *ENGINE_FLAGS, "--num-prompts", "4", "--input-len",
                    "8-16", "--output-len", "16-24", "--no-tqdm", "--speculative-config", spec)
    latency = _bench(tmp_path, real_model_dir, "latency", *ENGINE_FLAGS, "--input-len", "16", "--output-len", "24",
                     "--num-iters", "2", "--speculative-config", spec)
    assert result["output_tokens"] == sum(r.output_len for r in random_requests(4, (8, 16), (16, 24), 151_936, seed=0))
    for d in (result["spec_decode"], latency["spec_decode"]):
        assert d["config"] == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
                               "prompt_lookup_min": 1}
        assert d["num_drafts"] > 0 and 0 <= d["num_accepted_tokens"] <= d["num_draft_tokens"] <= 3 * d["num_drafts"]
        assert d["acceptance_rate"] == pytest.approx(d["num_accepted_tokens"] / d["num_draft_tokens"])
        assert 1 <= d["mean_acceptance_length"] <= 4
    # Two streams of 24 tokens: at most 23 decode steps each draft (the first token comes from the prefill).
    assert latency["spec_decode"]["num_drafts"] <= 2 * 23
    assert "speculative decoding:" in capsys.readouterr().out


def test_bench_throughput_and_latency_with_random_lora_adapters(tmp_path, real_model_dir, capsys) -> None:
    """--num-loras K: every request runs with one of K random adapters of the model's shapes."""
    result = _bench(tmp_path, real_model_dir, "throughput", *ENGINE_FLAGS, "--num-prompts", "4",
                    "--input-len", "8-16", "--output-len", "4-8", "--no-tqdm", "--num-loras", "2", "--lora-rank", "4")
    assert (result["num_loras"], result["lora_rank"]) == (2, 4)
    assert result["output_tokens"] == sum(r.output_len for r in random_requests(4, (8, 16), (4, 8), 151_936, seed=0))
    latency = _bench(tmp_path, real_model_dir, "latency", *ENGINE_FLAGS, "--input-len", "16", "--output-len", "4",
                     "--num-iters", "1", "--num-loras", "1", "--lora-rank", "4")
    assert latency["lora_rank"] == 4 and latency["ms_per_step"] > 0
    assert "output tok/s" in capsys.readouterr().out


def test_bench_hf(tmp_path, real_model_dir, capsys) -> None:
    result = _bench(tmp_path, real_model_dir, "hf", "--device", "cpu", "--num-prompts", "2", "--input-len", "8-12",
                    "--output-len", "4", "--hf-modes", "generate", "--hf-batch-sizes", "2")
    assert result["bench"] == "hf" and result["card"] == "cpu" and result["dtype"] == "float32"
    assert result["num_prompts"] == 2 and result["output_tokens"] == 8 and result["input_tokens"] >= 16
    mode = result["modes"]["generate_bs2"]
    assert set(result["modes"]) == {"generate_bs2"} and result["best_mode"] == "generate_bs2"
    assert mode["elapsed_s"] > 0 and mode["output_tok_per_s"] == pytest.approx(8 / mode["elapsed_s"])
    assert 0 < mode["output_tok_per_s"] < mode["total_tok_per_s"] and mode["requests_per_s"] > 0
    assert result["best_output_tok_per_s"] == mode["output_tok_per_s"]
    assert result["decoding"] == "greedy"
    assert "static batches of 2, greedy" in capsys.readouterr().out


def test_bench_hf_samples_like_the_engine_when_asked(tmp_path, real_model_dir, capsys) -> None:
    """--temperature T > 0: Transformers samples at T with no top-k/top-p (its top_k=50 default off)."""
    from pagedserve.bench.hf_baseline import decoding_kwargs

    assert decoding_kwargs(0.0) == {"do_sample": False}
    assert decoding_kwargs(0.7) == {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0}
    result = _bench(tmp_path, real_model_dir, "hf", "--device", "cpu", "--num-prompts", "2", "--input-len", "8-12",
                    "--output-len", "4", "--hf-modes", "generate", "--hf-batch-sizes", "2", "--temperature", "0.7")
    assert result["decoding"] == "sampling at temperature 0.7" and result["output_tokens"] == 8
    assert result["modes"]["generate_bs2"]["output_tok_per_s"] > 0
    assert "sampling at temperature 0.7" in capsys.readouterr().out


def test_bench_throughput_compare_hf_runs_both_with_the_same_decoding(tmp_path, real_model_dir, capsys) -> None:
    result = _bench(tmp_path, real_model_dir, "throughput", *ENGINE_FLAGS, "--num-prompts", "2",
                    "--input-len", "8-12", "--output-len", "4", "--no-tqdm", "--temperature", "0",
                    "--compare-hf", "--hf-modes", "generate", "--hf-batch-sizes", "2")
    assert result["decoding"] == "greedy" and set(result["hf"]) == {"generate_bs2"}
    assert result["hf_best_mode"] == "generate_bs2" and result["hf"]["generate_bs2"] > 0
    assert result["ratio_to_hf"] == pytest.approx(result["output_tok_per_s"] / result["hf"]["generate_bs2"])
    out = capsys.readouterr().out
    assert "static batches of 2, greedy" in out and "both greedy" in out


def test_bench_throughput_on_a_sharegpt_file(tmp_path, real_model_dir) -> None:
    """Real text: the prompts are the first turns tokenized, the outputs the replies' token counts."""
    from pagedserve.tokenizer import load_tokenizer

    data = [{"conversations": [{"from": "human", "value": f"Question {i}: what is {i} plus {i}? Say why."},
                               {"from": "gpt", "value": f"{i} plus {i} is {2 * i}, because adding works so."}]}
            for i in range(6)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    result = _bench(tmp_path, real_model_dir, "throughput", *ENGINE_FLAGS, "--num-prompts", "3", "--dataset",
                    "sharegpt", "--dataset-path", str(path), "--no-tqdm", "--temperature", "0")
    tokenizer = load_tokenizer(real_model_dir)
    from pagedserve.bench.datasets import file_requests

    want = file_requests("sharegpt", str(path), 3, tokenizer, seed=0)
    assert result["dataset"] == "sharegpt" and result["num_prompts"] == 3
    assert result["input_tokens"] == sum(len(r.prompt_token_ids) for r in want)
    assert result["output_tokens"] == sum(r.output_len for r in want) > 3 * 10
