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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=600)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", enforce_eager=args.enforce_eager)
    engine = llm.engine
    rng = random.Random(0)
    for i in range(args.batch):
        engine.add_request(str(i), [rng.randint(100, 100000) for _ in range(args.context)],
                           SamplingParams(max_tokens=64, ignore_eos=True, temperature=1.0), final_only=True)
    mixed_times, steps = [], 0
    while engine.scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                               for r in engine.scheduler.running):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        mixed_times.append(time.perf_counter() - t0)
        steps += 1
    print(f"prefill phase: {steps} steps, {sum(mixed_times):.3f} s, "
          f"{args.batch * args.context / sum(mixed_times):.0f} prompt tok/s")
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    print(f"decode at batch {args.batch}, context ~{args.context}: {(time.perf_counter() - t0) * 100:.2f} ms/step")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
