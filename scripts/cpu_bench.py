"""The CPU path's two figures in docs/benchmarks.md ("The CPU path"): a decode-bound run (32 prompts of 16 random
tokens, 48 greedy tokens each) and a prefill-bound one (prompts of 1,500 / 700 / 300 / 900 random tokens, one token
each), on the embedded default model (or MODEL_DIR).

    python scripts/cpu_bench.py [--dtype auto|float32|bfloat16] [MODEL_DIR]
"""

from __future__ import annotations

import argparse
import random
import time

from pagedserve import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    llm = LLM(args.model, max_model_len=2048, dtype=args.dtype, device="cpu")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(16)] for _ in range(32)]
    llm.generate([[5] * 8], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True), use_tqdm=False)
    decode = time.perf_counter() - t
    long = [[rng.randrange(100, 30000) for _ in range(n)] for n in (1500, 700, 300, 900)]
    t = time.perf_counter()
    llm.generate(long, SamplingParams(max_tokens=1), use_tqdm=False)
    prefill = time.perf_counter() - t
    print(f"dtype {args.dtype} ({str(llm.engine.worker.dtype).removeprefix('torch.')}): decode workload "
          f"(32 x 48 tokens) {decode:.1f} s = {32 * 48 / decode:.0f} tok/s; prefill 3,400 tokens {prefill:.1f} s = "
          f"{3400 / prefill:.0f} tok/s")


if __name__ == "__main__":
    main()
