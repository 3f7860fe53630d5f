"""The classic client load test: 100 threads send 100 chat requests with the official openai client.

Every answer is --max-tokens long (the `ignore_eos` extension that vLLM's server also takes), so the total
time measures the same work on every run; --stop-at-eos lets answers end early instead.

    pagedserve serve &                              # or any OpenAI-compatible server
    python examples/load_test.py                    # --base-url, --model, --max-tokens, ...

Base URL and model also come from OPENAI_BASE_URL / MODEL (the model defaults to the server's first).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from openai import OpenAI

TOPICS = [
    "a lighthouse keeper",
    "a robot that paints",
    "a lost cat",
    "a chess prodigy",
    "an old bridge",
    "a desert caravan",
    "a tiny dragon",
    "a rainy city",
    "a time traveler",
    "a village baker",
]


def prompt_for(i: int) -> str:
    # About 30 tokens with the chat template's user turn.
    return (
        f"Request {i}: write a short, vivid story about {TOPICS[i % len(TOPICS)]} who finds "
        f"something unexpected on an ordinary morning. Keep it simple."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="default: the server's first model")
    parser.add_argument("--num-requests", type=int, default=100)
    parser.add_argument("--num-threads", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="let answers end at the end-of-sequence token (default: every answer is exactly "
                             "--max-tokens long, sent as the server's ignore_eos extension)")
    args = parser.parse_args()
    extra_body = None if args.stop_at_eos else {"ignore_eos": True}

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=3600)
    model = args.model or client.models.list().data[0].id

    # Every thread is created first and waits at a barrier; then all send at once. Creating threads while
    # the first ones already build requests made the sends straggle over ~0.25 s (each thread start
    # waits for the GIL held by the busy ones). The clock starts before the first thread is created.
    ready = threading.Barrier(args.num_threads + 1)
    results: list[tuple[int, float, float]] = []
    lock = threading.Lock()
    next_index = iter(range(args.num_requests))

    def worker() -> None:
        ready.wait()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            sent = time.perf_counter()
            r = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt_for(i)}],
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                extra_body=extra_body,
            )
            with lock:
                results.append((r.usage.completion_tokens, sent, time.perf_counter()))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.num_threads)]
    for t in threads:
        t.start()
    ready.wait()
    released = time.perf_counter() - start
    for t in threads:
        t.join()
    total = time.perf_counter() - start
    if len(results) != args.num_requests:
        raise SystemExit(f"only {len(results)} of {args.num_requests} requests answered")
    num_tokens = sum(r[0] for r in results)
    sent = sorted(r[1] - start for r in results)
    done = sorted(r[2] - start for r in results)
    print(f"model: {model}")
    print(f"requests: {args.num_requests} ({args.num_threads} threads, all started {released:.3f} s after the "
          f"clock), completion tokens: {num_tokens}")
    print(f"throughput: {args.num_requests / total:.2f} requests/s, {num_tokens / total:.1f} tokens/s")
    print(f"requests started between {sent[0]:.3f} and {sent[-1]:.3f} s; "
          f"answers between {done[0]:.3f} and {done[-1]:.3f} s")
    print(f"total time: {total:.2f} s")


if __name__ == "__main__":
    main()
