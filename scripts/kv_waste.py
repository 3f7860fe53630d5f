"""The KV cache's waste on a workload, computed by the engine's own scheduler and block manager (no model, no GPU):
each step is scheduled as the engine schedules it, every sample is a fixed token (ignore_eos: the lengths are the
workload's), and `Scheduler.kv_occupancy` is read after each schedule as `bench throughput` reads it.

    python scripts/kv_waste.py [--num-prompts 256] [--input-len 100-1024] [--output-len 100-1024]
                               [--num-blocks 58000] [--block-size 16]

Prints the steps, the share of the slots held by requests that hold no token (PagedAttention's waste: the tail of each
request's last block), and what a contiguous cache that reserves the workload's longest request for each request
(Transformers' static batches, pre-paging servers) leaves empty of what it reserves, step by step.
"""

from __future__ import annotations

import argparse

from pagedserve.bench.datasets import random_requests
from pagedserve.core.outputs import RunnerOutput
from pagedserve.core.request import Request
from pagedserve.core.scheduler import Scheduler
from pagedserve.engine import KVOccupancy
from pagedserve.sampling_params import SamplingParams


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=span, default=(100, 1024))
    parser.add_argument("--output-len", type=span, default=(100, 1024))
    parser.add_argument("--num-blocks", type=int, default=58_000, help="~the 7B shapes' cache on an 80 GB card")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    requests = random_requests(args.num_prompts, args.input_len, args.output_len, vocab_size=151_936, seed=args.seed)
    reserve = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    scheduler = Scheduler(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=reserve, num_blocks=args.num_blocks, block_size=args.block_size,
                          enable_prefix_caching=True)
    for i, r in enumerate(requests):
        params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
        scheduler.add_request(Request(str(i), list(r.prompt_token_ids), params, max_tokens=r.output_len))
    occupancy = KVOccupancy(args.num_blocks * args.block_size)
    steps, contiguous_empty, contiguous_reserved = 0, 0, 0
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        occupancy.add(scheduler)
        steps += 1
        tokens = sum(r.num_computed_tokens for r in scheduler.running)
        contiguous_reserved += len(scheduler.running) * reserve
        contiguous_empty += len(scheduler.running) * reserve - tokens
        sampled = [7 if s.needs_sample else None for s in out.scheduled]
        scheduler.update(out, RunnerOutput(sampled_token_ids=sampled, logprobs=[None] * len(sampled)))
    kv = occupancy.summary()
    print(f"kv-waste: {args.num_prompts} requests, input {args.input_len}, output {args.output_len}, blocks of "
          f"{args.block_size}: {steps} steps, {kv['mean_running']:.1f} requests at once on average "
          f"({kv['peak_running']} at peak), {kv['mean_used_pct']:.1f}% of {kv['total_slots']:,} slots in use")
    print(f"kv-waste: paged: {kv['empty_pct']:.2f}% of the slots held hold no token (worst step "
          f"{kv['worst_step_empty_pct']:.2f}%)")
    empty_pct = 100 * contiguous_empty / contiguous_reserved
    print(f"kv-waste: contiguous, {reserve:,} tokens reserved a request: {empty_pct:.1f}% of the reserved slots hold "
          f"no token; it fits {kv['total_slots'] // reserve:,} requests in the same memory")


if __name__ == "__main__":
    main()
