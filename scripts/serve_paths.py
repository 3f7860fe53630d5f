"""Sends one request down each sampling path the server has (greedy, temperature, n > 1, top-p / top-k / min-p,
penalties, seeds, logprobs, stop strings, chat, streaming, echo-free completions) and then reads
`pagedserve:kernel_compiles_while_serving_total` from /metrics: on a GPU any path the warm-up left uncompiled shows
up there (and as a warning in the server's log). Diagnostics for gpu_check.sh serve-paths.

    python scripts/serve_paths.py --base-url http://localhost:8000/v1
"""

from __future__ import annotations

import argparse
import re
import time

import httpx
from openai import OpenAI

PATHS: list[tuple[str, dict]] = [
    ("greedy", {"temperature": 0.0}),
    ("temperature", {"temperature": 0.8}),
    ("n=3", {"temperature": 1.0, "n": 3}),
    ("top_p", {"temperature": 0.7, "top_p": 0.9}),
    ("top_k", {"temperature": 0.7, "extra_body": {"top_k": 20}}),
    ("min_p", {"temperature": 0.7, "extra_body": {"min_p": 0.05}}),
    ("penalties", {"temperature": 0.7, "presence_penalty": 0.5, "frequency_penalty": 0.3,
                   "extra_body": {"repetition_penalty": 1.1}}),
    ("seed", {"temperature": 1.0, "seed": 1234}),
    ("logprobs", {"temperature": 0.0, "logprobs": 5}),
    ("stop", {"temperature": 0.0, "stop": ["\n", " the"]}),
]


def metric(base_url: str, name: str) -> float | None:
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="calls per path after the first")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")
    model = client.models.list().data[0].id
    name = "pagedserve:kernel_compiles_while_serving_total"
    print(f"model {model}; {name} before: {metric(args.base_url, name)}")
    for label, extra in PATHS:
        times = []
        for _ in range(1 + args.repeats):  # the first call may pay a first use; the repeats show steady state
            t0 = time.perf_counter()
            out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=args.max_tokens,
                                            **extra)  # fmt: skip
            times.append(1e3 * (time.perf_counter() - t0))
        again = f", then {min(times[1:]):7.1f} ms (best of {args.repeats})" if args.repeats else ""
        print(f"{label:12s} {times[0]:7.1f} ms{again}, {len(out.choices)} choice(s), "
              f"{out.usage.completion_tokens} tokens")
    t0 = time.perf_counter()
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=args.max_tokens, logprobs=True, top_logprobs=3)
    print(f"{'chat':12s} {1e3 * (time.perf_counter() - t0):7.1f} ms, {chat.usage.completion_tokens} tokens")
    t0 = time.perf_counter()
    chunks = sum(1 for _ in client.completions.create(model=model, prompt="Hello", max_tokens=args.max_tokens,
                                                      stream=True, temperature=0.5))
    print(f"{'stream':12s} {1e3 * (time.perf_counter() - t0):7.1f} ms, {chunks} chunks")
    print(f"{name} after: {metric(args.base_url, name)}")


if __name__ == "__main__":
    main()
