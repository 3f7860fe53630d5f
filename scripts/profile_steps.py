"""Profiles engine steps on the GPU: where device time goes in decode steps of a full batch and in
mixed prefill steps. Usage (GPU machine, repo root):
    python scripts/profile_steps.py --model .devcache/qwen2-7b --batch 256 --context 600
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pagedserve import LLM, SamplingParams


def _sync() -> None:
    if torch.cuda.is_available():  # the script also runs on CPU, as a smoke test
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--workload", choices=["uniform", "throughput"], default="uniform",
                   help="uniform: every prompt --context tokens; throughput: the bench's U[100,1024] prompts, "
                        "with every mixed step timed on its own (a first-compile spike shows as one slow step)")
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", enforce_eager=args.enforce_eager)
    engine = llm.engine
    rng = random.Random(0)
    if args.workload == "throughput":
        profile_throughput_mixed_steps(engine, args.batch)
        return
    for i in range(args.batch):
        engine.add_request(str(i), [rng.randint(100, 100000) for _ in range(args.context)],
                           SamplingParams(max_tokens=64, ignore_eos=True, temperature=1.0), final_only=True)
    mixed_times, steps = [], 0
    while engine.scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                               for r in engine.scheduler.running):
        _sync()
        t0 = time.perf_counter()
        engine.step()
        _sync()
        mixed_times.append(time.perf_counter() - t0)
        steps += 1
    print(f"prefill phase: {steps} steps, {sum(mixed_times):.3f} s, "
          f"{args.batch * args.context / sum(mixed_times):.0f} prompt tok/s")
    for _ in range(3):
        engine.step()
    _sync()
    t0 = time.perf_counter()
    for _ in range(10):
        engine.step()
    _sync()
    print(f"decode at batch {args.batch}, context ~{args.context}: {(time.perf_counter() - t0) * 100:.2f} ms/step")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        _sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=28, max_name_column_width=60))


def profile_throughput_mixed_steps(engine, num_requests: int) -> None:
    """The first mixed steps of the throughput workload, each timed; then one profiled mixed step."""
    from pagedserve.bench.datasets import random_requests

    requests = random_requests(num_requests, (100, 1024), (100, 1024), engine.vocab_size, seed=0)
    for i, r in enumerate(requests):
        engine.add_request(str(i), r.prompt_token_ids, SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                           final_only=True)
    for step in range(12 if num_requests > 32 else 3):
        _sync()
        t0 = time.perf_counter()
        engine.step()
        _sync()
        running = engine.scheduler.running
        decodes = sum(1 for r in running if r.num_computed_tokens >= r.num_tokens - 1)
        print(f"step {step}: {1e3 * (time.perf_counter() - t0):.1f} ms, running {len(running)}, ~decodes {decodes}")
    # Requests again, so the next steps are mixed ones with many decodes; profile one of them.
    for i, r in enumerate(random_requests(max(1, num_requests // 8), (100, 1024), (8, 8), engine.vocab_size, seed=1)):
        engine.add_request(f"late{i}", r.prompt_token_ids, SamplingParams(max_tokens=8, ignore_eos=True),
                           final_only=True)
    engine.step()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        _sync()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=28, max_name_column_width=60))


if __name__ == "__main__":
    main()
