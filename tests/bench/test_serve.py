"""`bench serve` through the CLI against the real server in a subprocess (the embedded model on CPU):
rate inf on completions with a plot, a Poisson rate with max concurrency 2 on chat, and the
shared-prefix dataset. Tiny sizes: the numbers are checked for shape and sanity, not speed."""

from __future__ import annotations

import json

import httpx
import pytest

from pagedserve.entrypoints.cli import main
from tests.entrypoints.conftest import RealServer

pytestmark = pytest.mark.slow

METRICS = ("ttft", "tpot", "itl", "e2e")


@pytest.fixture(scope="module")
def server(real_model_dir):
    s = RealServer(real_model_dir, "--max-model-len", "256", "--cpu-kv-cache-gib", "0.25",
                   "--disable-log-stats")
    yield s
    s.stop()


def _bench_serve(server, tmp_path, *argv: str) -> dict:
    out = tmp_path / "serve.json"
    code = main(["bench", "serve", "--base-url", server.base_url, "--output-json", str(out), "--disable-tqdm", *argv])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["bench"] == "serve" and result["date"] and result["commit"]
    assert result["failed"] == 0 and result["errors"] == [] and result["completed"] == result["num_prompts"]
    assert result["duration_s"] > 0 and result["requests_per_s"] > 0
    assert 0 < result["output_tok_per_s"] < result["total_tok_per_s"]
    assert result["output_tok_per_s"] == pytest.approx(result["total_output_tokens"] / result["duration_s"])
    assert sum(result["output_tokens_per_second_bucket"]) == result["total_output_tokens"]
    for name in METRICS:
        assert result[f"mean_{name}_ms"] > 0
        assert result[f"median_{name}_ms"] <= result[f"p90_{name}_ms"] <= result[f"p99_{name}_ms"]
    assert result["median_ttft_ms"] <= result["median_e2e_ms"]
    return result


def test_serve_rate_inf_completions_with_plot(server, tmp_path, capsys) -> None:
    png = tmp_path / "serve.png"
    result = _bench_serve(server, tmp_path, "--num-prompts", "8", "--input-len", "32", "--output-len", "8",
                          "--plot", str(png), "--save-detailed")
    assert result["endpoint_type"] == "completions" and result["request_rate"] is None
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (8 * 32, 8 * 8)  # exact: token ids
    assert result["max_concurrent_requests"] == 8  # rate inf: all in flight at once
    assert [r["output_tokens"] for r in result["requests"]] == [8] * 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "Median TPOT (ms):" in out


def test_serve_poisson_rate_max_concurrency_chat(server, tmp_path) -> None:
    result = _bench_serve(server, tmp_path, "--endpoint-type", "chat", "--num-prompts", "6", "--input-len", "24",
                          "--output-len", "6", "--request-rate", "20", "--max-concurrency", "2", "--seed", "3")
    assert result["endpoint_type"] == "chat" and result["request_rate"] == 20 and result["max_concurrency"] == 2
    assert result["max_concurrent_requests"] <= 2
    assert result["total_output_tokens"] == 6 * 6
    assert result["total_input_tokens"] > 6 * 10  # decoded text through the chat template: not exact


def _prefix_cache_hits(server) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith("pagedserve:prefix_cache_hits_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no prefix cache hits counter in /metrics")


def test_serve_shared_prefix(server, tmp_path) -> None:
    hits_before = _prefix_cache_hits(server)
    # One at a time, so each request finds the prefix the one before it computed.
    result = _bench_serve(server, tmp_path, "--dataset", "shared-prefix", "--num-prompts", "4", "--prefix-len", "64",
                          "--suffix-len", "8", "--output-len", "4", "--max-concurrency", "1")
    assert result["dataset"] == "shared-prefix" and (result["prefix_len"], result["suffix_len"]) == (64, 8)
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (4 * 72, 4 * 4)
    assert _prefix_cache_hits(server) - hits_before >= 3 * 64  # the 4 full blocks of the prefix, 3 times


def test_serve_custom_prompts_file(server, tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Write a haiku about the number {i}.", "output_tokens": 3 + i})
                              for i in range(4)))
    result = _bench_serve(server, tmp_path, "--dataset", "custom", "--dataset-path", str(path), "--num-prompts", "4",
                          "--endpoint-type", "chat")
    assert result["dataset"] == "custom" and result["dataset_path"] == str(path) and result["output_len"] is None
    assert result["total_output_tokens"] == 3 + 4 + 5 + 6
