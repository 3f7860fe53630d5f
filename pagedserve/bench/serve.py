"""`pagedserve bench serve`: drives a running OpenAI-compatible server over HTTP, streaming, and reports
what `vllm bench serve` reports: request and token throughput, TTFT / TPOT / ITL / E2E percentiles.

Timeline of one request (all times from `time.perf_counter()` on the client):

    sent ── first content chunk ── chunk ── chunk ── ... ── last chunk, [DONE]
    |<-------- TTFT -------->|<- ITL ->|<- ITL ->|
    |<------------------------------ E2E ------------------------------------->|
    TPOT = (E2E - TTFT) / (output_tokens - 1)

A chunk may carry more than one token (the server sends bigger deltas to a slow reader and holds back
half characters), so ITLs are between content chunks, as vLLM measures them, and output tokens come
from the `usage` of the last chunk (stream_options.include_usage), else from the chunk count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pagedserve.bench.common import finish
from pagedserve.bench.datasets import (
    FILE_DATASETS,
    BenchRequest,
    file_requests,
    parse_range,
    random_requests,
    shared_prefix_requests,
)

REQUEST_TIMEOUT_S = 6 * 3600.0
METRICS = (("ttft", "Time to First Token", "TTFT"), ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
           ("itl", "Inter-token Latency", "ITL"), ("e2e", "End-to-end Latency", "E2E"))


@dataclass(slots=True)
class RequestResult:
    prompt_tokens: int
    output_tokens: int = 0
    start_s: float = 0.0  # since the benchmark began
    ttft_s: float | None = None
    e2e_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    chunk_times_s: list[float] = field(default_factory=list)  # content chunks, since the benchmark began
    error: str | None = None


# --------------------------------------------------------------------------- one streamed request
async def send_request(client, url: str, payload: dict[str, Any], prompt_tokens: int, bench_start: float,
                       headers: dict[str, str]) -> RequestResult:
    """POSTs one streaming request and times every content chunk; never raises."""
    result = RequestResult(prompt_tokens=prompt_tokens)
    chat = "messages" in payload
    sent = time.perf_counter()
    result.start_s = sent - bench_start
    last = sent
    num_chunks = 0
    done = False
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"stream error: {event['error']}"
                    return result
                usage = event.get("usage")
                if usage:
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
                    result.prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
                for choice in event.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue  # role chunks, finish-only chunks
                    now = time.perf_counter()
                    if result.ttft_s is None:
                        result.ttft_s = now - sent
                    else:
                        result.itls_s.append(now - last)
                    last = now
                    num_chunks += 1
                    result.chunk_times_s.append(now - bench_start)
    except Exception as e:  # connection refused, reset, timeout, bad JSON: a failed request, not a crash
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.e2e_s = time.perf_counter() - sent
    if not done:
        result.error = "stream ended without [DONE]"
    elif result.ttft_s is None:
        result.error = "no content in the stream"
    result.output_tokens = result.output_tokens or num_chunks
    return result


def build_payloads(requests: list[BenchRequest], endpoint_type: str, model: str, temperature: float,
                   tokenizer=None) -> list[dict[str, Any]]:
    """Completions get token-id prompts (exact lengths); chat gets the ids decoded to text."""
    payloads = []
    for r in requests:
        body: dict[str, Any] = {
            "model": model, "max_tokens": r.output_len, "temperature": temperature, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if endpoint_type == "chat":
            body["messages"] = [{"role": "user", "content": tokenizer.decode(r.prompt_token_ids)}]
        else:
            body["prompt"] = r.prompt_token_ids
        payloads.append(body)
    return payloads


async def run_requests(url: str, payloads: list[dict[str, Any]], prompt_lens: list[int],
                       request_rate: float = math.inf, max_concurrency: int | None = None, seed: int = 0,
                       headers: dict[str, str] | None = None, progress: bool = False) -> tuple[list[RequestResult],
                                                                                              float, int]:
    """Sends every payload: all at once (rate inf) or with Poisson arrivals (exponential gaps of mean
    1/rate, drawn from random.Random(seed)); at most max_concurrency in flight (arrivals past it wait).
    Returns (results in payload order, duration in s, most requests seen in flight at once)."""
    import httpx

    num_connections = max_concurrency or len(payloads) or 1
    limits = httpx.Limits(max_connections=num_connections, max_keepalive_connections=num_connections)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    rng = random.Random(seed)
    in_flight = max_in_flight = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(payloads), unit="req")

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one(payload: dict[str, Any], prompt_len: int) -> RequestResult:
            nonlocal in_flight, max_in_flight
            if semaphore is not None:
                await semaphore.acquire()
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            try:
                return await send_request(client, url, payload, prompt_len, start, headers or {})
            finally:
                in_flight -= 1
                if semaphore is not None:
                    semaphore.release()
                if bar is not None:
                    bar.update(1)

        start = time.perf_counter()
        tasks = []
        for i, (payload, prompt_len) in enumerate(zip(payloads, prompt_lens)):
            tasks.append(asyncio.create_task(one(payload, prompt_len)))
            if not math.isinf(request_rate) and i + 1 < len(payloads):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return list(results), duration, max_in_flight


# --------------------------------------------------------------------------- metrics
def _stats(values_ms: list[float]) -> dict[str, float | None]:
    if not values_ms:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    arr = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"mean": float(arr.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """The aggregate numbers; latencies in ms, over successful requests only."""
    ok = [r for r in results if r.error is None]
    num_in = sum(r.prompt_tokens for r in ok)
    num_out = sum(r.output_tokens for r in ok)
    values = {
        "ttft": [r.ttft_s * 1e3 for r in ok],
        "tpot": [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) * 1e3 for r in ok if r.output_tokens > 1],
        "itl": [x * 1e3 for r in ok for x in r.itls_s],
        "e2e": [r.e2e_s * 1e3 for r in ok],
    }
    timeline = output_timeline(ok, duration_s)
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration_s,
        "total_input_tokens": num_in, "total_output_tokens": num_out,
        "requests_per_s": len(ok) / duration_s, "output_tok_per_s": num_out / duration_s,
        "total_tok_per_s": (num_in + num_out) / duration_s,
        "peak_output_tok_per_s": max(timeline, default=0),
    }
    for name, _, _ in METRICS:
        for stat, value in _stats(values[name]).items():
            summary[f"{stat}_{name}_ms"] = value
    summary["output_tokens_per_second_bucket"] = timeline
    summary["errors"] = sorted({r.error for r in results if r.error})[:10]
    return summary


def output_timeline(results: list[RequestResult], duration_s: float) -> list[int]:
    """Output tokens per 1-s bucket since the start: one per content chunk, a request's tokens beyond
    its chunk count (multi-token chunks) counted at its last chunk."""
    buckets = [0] * max(1, math.ceil(duration_s))
    for r in results:
        for t in r.chunk_times_s:
            buckets[min(int(t), len(buckets) - 1)] += 1
        if r.chunk_times_s and r.output_tokens > len(r.chunk_times_s):
            buckets[min(int(r.chunk_times_s[-1]), len(buckets) - 1)] += r.output_tokens - len(r.chunk_times_s)
    return buckets


def print_table(s: dict[str, Any], max_concurrency: int | None) -> None:
    def row(label: str, value: Any, fmt: str = "") -> None:
        text = "n/a" if value is None else format(value, fmt)
        print(f"{label:<40} {text:<10}")

    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Maximum request concurrency:", max_concurrency)
    row("Peak concurrent requests:", s["max_concurrent_requests"])
    row("Benchmark duration (s):", s["duration_s"], ".2f")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", s["requests_per_s"], ".2f")
    row("Output token throughput (tok/s):", s["output_tok_per_s"], ".2f")
    row("Peak output token throughput (tok/s):", s["peak_output_tok_per_s"], ".2f")
    row("Total token throughput (tok/s):", s["total_tok_per_s"], ".2f")
    for name, title, short in METRICS:
        print("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{label} {short} (ms):", s[f"{stat}_{name}_ms"], ".2f")
    print("=" * 50)
    for error in s["errors"]:
        print(f"error: {error}")


def plot(summary: dict[str, Any], path: str, title: str) -> None:
    """Left: median / p90 / p99 of each latency (log scale); right: output tokens per 1-s bucket."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tput) = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    width = 0.27
    for k, stat in enumerate(("median", "p90", "p99")):
        heights = [summary[f"{stat}_{name}_ms"] or 0.0 for name, _, _ in METRICS]
        ax_lat.bar([i + (k - 1) * width for i in range(len(METRICS))], heights, width, label=stat)
    ax_lat.set_xticks(range(len(METRICS)), [short for _, _, short in METRICS])
    ax_lat.set_ylabel("ms")
    if any(summary[f"p99_{name}_ms"] for name, _, _ in METRICS):
        ax_lat.set_yscale("log")
    ax_lat.set_title("latency percentiles")
    ax_lat.legend(fontsize=8)
    timeline = summary["output_tokens_per_second_bucket"]
    ax_tput.bar(range(len(timeline)), timeline, width=1.0, align="edge")
    ax_tput.set_xlabel("time since start (s)")
    ax_tput.set_ylabel("output tok/s (1-s buckets)")
    ax_tput.set_title("output throughput")
    ax_tput.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the command
def _server_model(base_url: str, headers: dict[str, str], wanted: str | None) -> tuple[str, str | None, int | None]:
    """(model id, its root path, max_model_len) from GET /v1/models."""
    import httpx

    try:
        response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise ValueError(f"could not reach the server at {base_url} ({type(e).__name__}: {e}); start it with "
                         "`pagedserve serve` or pass --base-url") from e
    if response.status_code != 200:
        raise ValueError(f"GET {base_url}/v1/models answered {response.status_code}: {response.text[:200]} "
                         "(wrong --api-key?)")
    models = response.json().get("data") or []
    if not models and wanted is None:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    entry = next((m for m in models if m.get("id") == wanted), models[0] if models else {})
    return wanted or entry["id"], entry.get("root"), entry.get("max_model_len")


def _load_client_tokenizer(args: argparse.Namespace, root: str | None):
    """The tokenizer to size random ids and decode chat prompts: --tokenizer, else the served model's
    root (a folder, .gguf or Hub id), else the embedded default model (what the server runs without one)."""
    from pagedserve.tokenizer import load_tokenizer

    source = args.tokenizer or root
    if source is None:
        from pagedserve.default_model import ensure_default_model

        source = ensure_default_model()
    try:
        return load_tokenizer(source)
    except ValueError as e:
        raise ValueError(f"{e}; pass --tokenizer (a folder or Hub id with the served model's tokenizer)") from e


def _dataset(args: argparse.Namespace, vocab_size: int, seed: int, num: int, tokenizer=None) -> list[BenchRequest]:
    if args.dataset in FILE_DATASETS:
        if not args.dataset_path:
            raise ValueError(f"--dataset {args.dataset} needs --dataset-path")
        fixed = None
        if args.output_len is not None:
            fixed, hi = parse_range(args.output_len)
            if fixed != hi:
                raise ValueError("with a file dataset --output-len is one length N (every request's), not a range")
        return file_requests(args.dataset, args.dataset_path, num, tokenizer, seed, output_len=fixed)
    out_lo, out_hi = parse_range(args.output_len or "128")
    if args.dataset == "shared-prefix":
        if out_lo != out_hi:
            raise ValueError("--dataset shared-prefix takes one --output-len N, not a range")
        return shared_prefix_requests(num, args.prefix_len, args.suffix_len, out_lo, vocab_size, seed=seed)
    return random_requests(num, parse_range(args.input_len), (out_lo, out_hi), vocab_size, seed=seed)


def run(args: argparse.Namespace) -> dict[str, Any]:
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model, root, max_model_len = _server_model(base_url, headers, args.model)
    tokenizer = _load_client_tokenizer(args, root)
    if args.num_prompts is None:
        args.num_prompts = 500 if args.dataset == "shared-prefix" else 1000
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    requests = _dataset(args, tokenizer.vocab_size, args.seed, args.num_prompts, tokenizer)
    longest = max((len(r.prompt_token_ids) + r.output_len for r in requests), default=0)
    if max_model_len and longest > max_model_len:
        raise ValueError(f"a request needs {longest} tokens (prompt + output) but the server's max_model_len is "
                         f"{max_model_len}; lower --input-len/--output-len or raise the server's --max-model-len")
    url = f"{base_url}/v1/{'chat/completions' if args.endpoint_type == 'chat' else 'completions'}"

    def payloads_of(reqs: list[BenchRequest]) -> list[dict[str, Any]]:
        return build_payloads(reqs, args.endpoint_type, model, args.temperature, tokenizer)

    if args.num_warmups > 0:
        # Fresh random prompts of the first request's lengths: they warm the server without putting the
        # benchmark's own prompts (or a shared prefix) into its prefix cache.
        first = requests[0]
        warm = random_requests(args.num_warmups, (len(first.prompt_token_ids),) * 2, (first.output_len,) * 2,
                               tokenizer.vocab_size, seed=args.seed + 1_000_003)
        warm_results, _, _ = asyncio.run(run_requests(url, payloads_of(warm), [len(first.prompt_token_ids)] *
                                                      len(warm), headers=headers))
        errors = [r.error for r in warm_results if r.error]
        if errors:
            raise ValueError(f"warm-up request to {url} failed: {errors[0]}")
    print(f"bench serve: {len(requests)} {args.dataset} requests to {url} (model {model}), request rate "
          f"{args.request_rate}, max concurrency {args.max_concurrency}", flush=True)
    results, duration, max_in_flight = asyncio.run(run_requests(
        url, payloads_of(requests), [len(r.prompt_token_ids) for r in requests], args.request_rate,
        args.max_concurrency, args.seed, headers, progress=not args.disable_tqdm))
    summary = summarize(results, duration)
    summary["max_concurrent_requests"] = max_in_flight
    result: dict[str, Any] = {
        "bench": "serve", "base_url": base_url, "endpoint_type": args.endpoint_type, "model": model,
        "dataset": args.dataset, "num_prompts": len(requests),
        "input_len": args.input_len if args.dataset == "random" else None,
        "prefix_len": args.prefix_len if args.dataset == "shared-prefix" else None,
        "suffix_len": args.suffix_len if args.dataset == "shared-prefix" else None,
        "output_len": args.output_len if args.output_len is not None or args.dataset in FILE_DATASETS else "128",
        "dataset_path": args.dataset_path if args.dataset in FILE_DATASETS else None,
        "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency, "seed": args.seed, "num_warmups": args.num_warmups,
        **summary,
    }
    if args.save_detailed:
        result["requests"] = [
            {"prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens, "start_s": r.start_s,
             "ttft_ms": None if r.ttft_s is None else r.ttft_s * 1e3, "e2e_ms": r.e2e_s * 1e3,
             "itl_ms": [x * 1e3 for x in r.itls_s], "error": r.error}
            for r in results
        ]
    finish(result, args)
    print_table(result, args.max_concurrency)
    if args.plot:
        rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}/s"
        concurrency = f", max concurrency {args.max_concurrency}" if args.max_concurrency else ""
        plot(result, args.plot, f"{os.path.basename(model.rstrip('/'))}, {args.endpoint_type}: {len(requests)} "
                                f"{args.dataset} requests, rate {rate}{concurrency}")
        print(f"plot written to {args.plot}")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (with or without /v1)")
    p.add_argument("--endpoint-type", default="completions", choices=["completions", "chat"],
                   help="completions: prompts as token ids (exact lengths); chat: random ids decoded to text")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first in /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                   help="bearer key for the server (default: $PAGEDSERVE_API_KEY)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer for the prompts (default: the served model's root from /v1/models)")
    p.add_argument("--dataset", default="random", choices=["random", "shared-prefix", *FILE_DATASETS],
                   help="shared-prefix: every request starts with the same --prefix-len tokens; sharegpt / custom: "
                        "real text from --dataset-path (ShareGPT's JSON of conversations; JSONL of {\"prompt\": "
                        "..., \"output_tokens\": N})")
    p.add_argument("--dataset-path", default=None, help="the file of --dataset sharegpt / custom")
    p.add_argument("--num-prompts", type=int, default=None, help="default 1000 (random), 500 (shared-prefix)")
    p.add_argument("--input-len", default="1024", help="random dataset: N or LO-HI (uniform) prompt tokens")
    p.add_argument("--output-len", default=None,
                   help="N or LO-HI (uniform) output tokens, default 128; ignore_eos is sent. With a file dataset: N "
                        "for every request (default: each reply's own length)")
    p.add_argument("--prefix-len", type=int, default=2000, help="shared-prefix dataset: shared prompt tokens")
    p.add_argument("--suffix-len", type=int, default=32, help="shared-prefix dataset: tokens after the prefix")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--num-warmups", type=int, default=1, help="requests sent (concurrently) before the timed run")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and of the arrival times")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--output-json", default=None, help="write the results to this JSON file")
    p.add_argument("--save-detailed", action="store_true", help="also put every request's numbers in the JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw latency percentiles and output throughput over time (matplotlib)")
    p.add_argument("--disable-tqdm", action="store_true")
