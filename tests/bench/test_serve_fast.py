"""`bench serve` pieces without a model: the metrics from synthetic timings, the plot, and the HTTP
driver (SSE parsing, rate and concurrency limits) against the in-thread server on the fake engine."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest

from pagedserve.bench.serve import RequestResult, build_payloads, plot, run_requests, summarize
from tests.entrypoints.conftest import start_fake_server  # noqa: F401 - a fixture, used by name


def _result(ttft: float, chunk_gaps: list[float], output_tokens: int, start: float = 0.0) -> RequestResult:
    times, t = [], start + ttft
    for gap in [0.0, *chunk_gaps]:
        t += gap
        times.append(t)
    return RequestResult(prompt_tokens=10, output_tokens=output_tokens, start_s=start, ttft_s=ttft,
                         e2e_s=times[-1] - start, itls_s=list(chunk_gaps), chunk_times_s=times)


def test_summarize_synthetic() -> None:
    results = [
        _result(0.1, [0.02, 0.02, 0.02], 4),
        _result(0.3, [0.04, 0.04, 0.04], 4, start=0.5),
        _result(0.2, [0.05], 5, start=1.2),  # 2 chunks for 5 tokens: the last chunk carries 4
        RequestResult(prompt_tokens=10, error="HTTP 400: bad"),
    ]
    s = summarize(results, duration_s=2.0)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["errors"] == ["HTTP 400: bad"]
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 13)
    assert s["requests_per_s"] == pytest.approx(1.5) and s["output_tok_per_s"] == pytest.approx(6.5)
    assert s["total_tok_per_s"] == pytest.approx(21.5)
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["median_ttft_ms"] == pytest.approx(200.0)
    # TPOT = (e2e - ttft) / (output_tokens - 1): 60/3, 120/3, 50/4 ms
    assert s["mean_tpot_ms"] == pytest.approx((20 + 40 + 12.5) / 3)
    assert s["mean_itl_ms"] == pytest.approx((3 * 20 + 3 * 40 + 50) / 7)
    for name in ("ttft", "tpot", "itl", "e2e"):
        assert 0 < s[f"median_{name}_ms"] <= s[f"p90_{name}_ms"] <= s[f"p99_{name}_ms"]
    assert sum(s["output_tokens_per_second_bucket"]) == 13 and len(s["output_tokens_per_second_bucket"]) == 2
    assert s["peak_output_tok_per_s"] == max(s["output_tokens_per_second_bucket"])


def test_summarize_all_failed_and_plot(tmp_path) -> None:
    s = summarize([RequestResult(prompt_tokens=5, error="boom")], duration_s=0.5)
    assert s["completed"] == 0 and s["median_ttft_ms"] is None and s["output_tok_per_s"] == 0
    ok = summarize([_result(0.1, [0.02] * 5, 6), _result(0.2, [0.03] * 5, 6)], duration_s=1.5)
    for summary, name in ((s, "empty.png"), (ok, "ok.png")):
        plot(summary, str(tmp_path / name), "synthetic")
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("endpoint_type", ["completions", "chat"])
def test_driver_against_fake_server(start_fake_server, endpoint_type) -> None:  # noqa: F811
    server = start_fake_server()
    model = httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"]

    class ByteTokenizer:  # the fake engine's tokenizer: one token per byte
        @staticmethod
        def decode(ids: list[int]) -> str:
            return bytes(ids).decode("latin-1")

    from pagedserve.bench.datasets import random_requests

    requests = random_requests(6, (8, 16), (5, 5), vocab_size=257, seed=0, token_range=(97, 122))
    payloads = build_payloads(requests, endpoint_type, model, 1.0, ByteTokenizer())
    url = f"{server.base_url}/v1/{'chat/completions' if endpoint_type == 'chat' else 'completions'}"
    results, duration, max_in_flight = asyncio.run(
        run_requests(url, payloads, [len(r.prompt_token_ids) for r in requests], request_rate=50.0,
                     max_concurrency=2, seed=1))
    assert [r.error for r in results] == [None] * 6
    assert max_in_flight <= 2 and duration > 0
    assert all(r.output_tokens == 5 and r.ttft_s > 0 and len(r.itls_s) == len(r.chunk_times_s) - 1 for r in results)
    if endpoint_type == "completions":  # token-id prompts: usage counts exactly what was sent
        assert [r.prompt_tokens for r in results] == [len(r.prompt_token_ids) for r in requests]
    s = summarize(results, duration)
    assert s["total_output_tokens"] == 30 and sum(s["output_tokens_per_second_bucket"]) == 30


def test_driver_counts_failures(start_fake_server) -> None:  # noqa: F811
    server = start_fake_server()
    payloads = [{"prompt": [97, 98], "max_tokens": 4, "stream": True},
                {"prompt": [97, 98], "max_tokens": 100_000, "stream": True}]  # past max_model_len: 400
    results, _, _ = asyncio.run(run_requests(server.base_url + "/v1/completions", payloads, [2, 2], math.inf))
    assert results[0].error is None and results[0].output_tokens == 4
    assert results[1].error.startswith("HTTP 400")
    unreachable, _, _ = asyncio.run(run_requests("http://127.0.0.1:9/v1/completions", payloads[:1], [2]))
    assert unreachable[0].error and "Connect" in unreachable[0].error
