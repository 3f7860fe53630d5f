"""What structured outputs cost in throughput, on the 7B shapes with random weights (GPU): the same
batch of requests plain, all constrained, and with one constrained request among plain ones (which makes
every step of its life run one at a time). The regex admits ~every lowercase run, so constrained requests
run to max_tokens like the plain ones: the figure is the cost of the masks and of the lost async overlap.

    python scripts/structured_cost.py --model .devcache/qwen2-7b [--requests 64] [--output-len 256]
"""

from __future__ import annotations

import argparse
import time

from pagedserve import LLM, SamplingParams

ANY_TEXT = r"[a-z ]{1,4000}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", max_model_len=2048)
    prompts = [{"prompt_token_ids": [(i * 7919 + j * 104729) % 150000 + 100 for j in range(args.input_len)]}
               for i in range(args.requests)]

    def run(name: str, num_constrained: int) -> None:
        params = [SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=i, ignore_eos=True,
                                 structured_outputs={"regex": ANY_TEXT} if i < num_constrained else None)
                  for i in range(args.requests)]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"{name}: {args.requests} requests, {num_constrained} constrained: {tokens} tokens in {dt:.2f} s, "
              f"{tokens / dt:,.1f} output tok/s", flush=True)

    run("warm-up", 1)
    for name, k in (("plain", 0), ("one constrained", 1), ("all constrained", args.requests), ("plain again", 0)):
        run(name, k)


if __name__ == "__main__":
    main()
