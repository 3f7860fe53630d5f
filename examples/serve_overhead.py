"""How much does serving over HTTP cost the step loop? Same requests, same engine flags, twice:

  1. offline: LLMEngine.step() in a loop, nothing else in the process;
  2. server:  `python -m pagedserve.entrypoints.openai` in a subprocess, N concurrent streaming
              (or non-streaming) completions from client processes.

    python examples/serve_overhead.py [MODEL] --num-requests 256 --max-tokens 128 [-- engine flags]

Prints generation tokens/s of both and their ratio. A ratio near 1 says the engine thread is not
starved by HTTP handling in the same process; a low one says a separate engine process would pay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def make_prompts(num: int, length: int, vocab: int = 30000, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(num)]


def run_offline(args: argparse.Namespace, engine_flags: list[str]) -> dict:
    from pagedserve.engine import LLMEngine
    from pagedserve.entrypoints.args import add_engine_args, config_from_args
    from pagedserve.sampling_params import SamplingParams

    parser = argparse.ArgumentParser()
    add_engine_args(parser, model_positional=True)
    config = config_from_args(parser.parse_args(([args.model] if args.model else []) + engine_flags))
    engine = LLMEngine(config)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    # Warm-up at full batch size (allocator, kernels, CUDA graphs), with other prompts.
    for i, p in enumerate(make_prompts(args.num_requests, args.prompt_len, seed=1)):
        engine.add_request(f"w{i}", p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    start_tokens = engine.generation_tokens_total
    t0 = time.perf_counter()
    for i, p in enumerate(make_prompts(args.num_requests, args.prompt_len)):
        engine.add_request(f"r{i}", p, params)
    num_steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        num_steps += 1
    elapsed = time.perf_counter() - t0
    tokens = engine.generation_tokens_total - start_tokens
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "ms_per_step": 1000 * elapsed / max(num_steps, 1),
    }


async def _client(base_url: str, prompts: list[list[int]], max_tokens: int, stream: bool) -> int:
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=3600, limits=limits) as client:

        async def one(prompt: list[int]) -> int:
            body = {
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
            }
            if not stream:
                r = await client.post("/v1/completions", json=body)
                return r.json()["usage"]["completion_tokens"]
            tokens = 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens = usage["completion_tokens"]
            return tokens

        return sum(await asyncio.gather(*(one(p) for p in prompts)))


def _client_process(
    base_url: str, prompts: list[list[int]], max_tokens: int, stream: bool, start_at: float, out: mp.Queue
) -> None:
    time.sleep(max(0.0, start_at - time.time()))
    out.put(asyncio.run(_client(base_url, prompts, max_tokens, stream)))


def run_server(args: argparse.Namespace, engine_flags: list[str], stream: bool, base_url: str) -> dict:
    prompts = make_prompts(args.num_requests, args.prompt_len)
    shards = [prompts[i :: args.client_procs] for i in range(args.client_procs)]
    out: mp.Queue = mp.Queue()
    start_at = time.time() + 0.5
    procs = [
        mp.Process(target=_client_process, args=(base_url, s, args.max_tokens, stream, start_at, out))
        for s in shards
        if s
    ]
    for p in procs:
        p.start()
    tokens = sum(out.get() for _ in procs)
    elapsed = time.time() - start_at
    for p in procs:
        p.join()
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--compare-thread", action="store_true", help="also run the server with --no-engine-process")
    parser.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)
    args, engine_flags = parser.parse_known_args()
    engine_flags = [f for f in engine_flags if f != "--"]

    if args.offline_only:
        print(json.dumps(run_offline(args, engine_flags)))
        return

    here = os.path.abspath(__file__)
    repo_root = os.path.dirname(os.path.dirname(here))
    # The engine may not be pip-installed: let the children import it from this checkout.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])),
    }
    offline_cmd = [
        sys.executable,
        here,
        *([args.model] if args.model else []),
        "--offline-only",
        "--num-requests",
        str(args.num_requests),
        "--max-tokens",
        str(args.max_tokens),
        "--prompt-len",
        str(args.prompt_len),
        *engine_flags,
    ]
    out = subprocess.run(offline_cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"offline run failed:\n{out.stderr[-3000:]}")
    offline = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"offline: {offline['tokens']} tokens in {offline['seconds']:.2f} s = "
        f"{offline['tokens_per_s']:.0f} tokens/s ({offline['ms_per_step']:.1f} ms/step)",
        flush=True,
    )

    modes = [["--engine-process"]] + ([["--no-engine-process"]] if args.compare_thread else [])
    for server_flags in modes:
        measure_server(args, engine_flags, server_flags, offline, env)


def measure_server(
    args: argparse.Namespace, engine_flags: list[str], server_flags: list[str], offline: dict, env: dict
) -> None:
    print(f"server {' '.join(server_flags)}:", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pagedserve.entrypoints.openai",
            *([args.model] if args.model else []),
            "--port",
            str(port),
            "--disable-access-log",
            *engine_flags,
            *server_flags,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        while True:
            try:
                if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                log.seek(0)
                raise SystemExit(f"server failed to start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        # Warm-up at full batch size, with other prompts.
        asyncio.run(_client(base_url, make_prompts(args.num_requests, args.prompt_len, seed=1), 16, True))
        for stream in (True, False):
            r = run_server(args, engine_flags, stream, base_url)
            kind = "  streaming" if stream else "  non-streaming"
            print(
                f"{kind}: {r['tokens']} tokens in {r['seconds']:.2f} s = {r['tokens_per_s']:.0f} tokens/s "
                f"({100 * r['tokens_per_s'] / offline['tokens_per_s']:.0f}% of offline)",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(60)
        log.seek(0)
        stats = [line.rstrip() for line in log if "tokens/s" in line]
        print("  server stats lines (last 3):", *stats[-3:], sep="\n    ")


if __name__ == "__main__":
    main()
