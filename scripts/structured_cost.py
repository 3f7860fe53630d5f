"""What structured outputs cost in throughput, on the 7B shapes with random weights (GPU): the same
batch of requests plain, with one constrained request among them, and all constrained. The constraint is a
JSON array of strings (compact): random weights keep writing string contents, which is where a JSON
answer spends most of its tokens, and rarely close the array, so constrained requests run about as long
as the plain ones. The masks are filled on the host while the device runs each step's forward.

    python scripts/structured_cost.py --model .devcache/qwen2-7b [--requests 64] [--output-len 256]
"""

from __future__ import annotations

import time

from dummy_workload import load_workload, workload_parser

from pagedserve import SamplingParams

STRINGS = {"json": {"type": "array", "items": {"type": "string"}}, "disable_any_whitespace": True}


def main() -> None:
    ap = workload_parser(requests=64, input_len=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--cprofile", action="store_true", help="host functions by own time, plain vs all constrained")
    args = ap.parse_args()
    llm, prompts = load_workload(args)

    def run(name: str, num_constrained: int) -> None:
        params = [SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=i, ignore_eos=True,
                                 structured_outputs=STRINGS if i < num_constrained else None)
                  for i in range(args.requests)]
        llm.engine.step_timing.totals.clear()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"{name}: {args.requests} requests, {num_constrained} constrained: {tokens} tokens in {dt:.2f} s, "
              f"{tokens / dt:,.1f} output tok/s", flush=True)
        # Host vs device: the device's own ms a step against the wall's (schedule + execute + output).
        print(f"  steps: {llm.engine.step_timing.summary()}", flush=True)

    run("warm-up", 1)
    if args.cprofile:  # where the host's time goes, plain against all constrained
        import cProfile
        import io
        import pstats

        for name, k in (("plain", 0), ("all constrained", args.requests)):
            profile = cProfile.Profile()
            profile.enable()
            run(name, k)
            profile.disable()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(22)
            print("\n".join(line[:160] for line in text.getvalue().splitlines()[5:32]), flush=True)
        return
    for name, k in (("plain", 0), ("one constrained", 1), ("all constrained", args.requests), ("plain again", 0)):
        run(name, k)


if __name__ == "__main__":
    main()
