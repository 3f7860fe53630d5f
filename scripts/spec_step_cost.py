"""What a drafted step costs (speculative decoding), measured through the engine on the model given (e.g. the 7B
shapes with random weights, whose greedy answers give the n-gram lookup nothing to find):

  for each batch B and draft count k: B greedy streams (input --input-len, --output-len tokens each) where every
  decode step carries exactly k drafts (a forced proposer: the last token repeated; the random model keeps none of
  them, so every step is a drafted step and gives one token), against the same streams with no drafts.

It prints ms a step of each and, from them, the tokens a second a drafted engine would reach if a fraction `a` of
drafts were kept, each position independently (tokens a step (1 - a**(k+1)) / (1 - a)): a projection from measured
step times, not a measured speed-up. The back-off (drafting paused after failed drafts) is off here.

    python scripts/spec_step_cost.py .devcache/qwen2-7b --load-format dummy --batches 1,16,64 --ks 0,2,4,8
"""

from __future__ import annotations

import argparse
import json
import random
import time


class ForcedProposer:
    """k drafts every step: the last known token, repeated."""

    def __init__(self) -> None:
        self.k = 0
        self.only: str | None = None  # drafts for this request id only (one drafting stream among many)

    def propose(self, request_id: str, token_ids: list[int], k: int) -> list[int]:
        if self.only is not None and request_id != self.only:
            return []
        return [token_ids[-1]] * min(k, self.k)

    def release(self, request_id: str) -> None:
        pass


def run(engine, prompts: list[list[int]], output_len: int, proposer: ForcedProposer | None = None,
        one_drafting: bool = False, profile_steps: int = 0) -> tuple[float, int, int, int]:
    """(seconds, tokens, drafted steps, drafts kept) from the first decode step on (the admission step left out).
    one_drafting: only the first stream drafts. profile_steps: that many steps under torch.profiler first (their
    kernels' device time printed), then the rest timed."""
    from pagedserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [f"r{time.monotonic_ns()}-{i:04d}" for i in range(len(prompts))]
    if proposer is not None:
        proposer.only = ids[0] if one_drafting else None
    for request_id, p in zip(ids, prompts):
        engine.add_request(request_id, p, params)
    started: set[str] = set()
    while started != set(ids):  # the prefill steps: every stream has its first token before the clock starts
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    import torch

    if profile_steps and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(profile_steps):
                engine.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60),
              flush=True)
    t0 = time.perf_counter()
    stats = engine.scheduler.spec_stats
    tokens0, drafts0, kept0 = engine.generation_tokens_total, stats.num_drafts, stats.num_accepted_tokens
    while engine.has_unfinished_requests():
        engine.step()
    return (time.perf_counter() - t0, engine.generation_tokens_total - tokens0, stats.num_drafts - drafts0,
            stats.num_accepted_tokens - kept0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--ks", default="0,2,4,8")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--one-drafting", action="store_true",
                        help="also time each batch with only one stream drafting (and profile a few such steps)")
    args = parser.parse_args()
    from pagedserve import LLM
    from pagedserve.core import scheduler as sched_mod

    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    sched_mod.DRAFT_BACKOFF_AFTER = 10**9  # every step drafts
    llm = LLM(args.model, load_format=args.load_format, max_num_seqs=max(256, max(batches)),
              speculative_config={"method": "ngram", "num_speculative_tokens": max(ks)})
    engine = llm.engine
    proposer = ForcedProposer()
    proposer.config = engine.scheduler.proposer.config  # (its disable_by_batch_size: None)
    engine.scheduler.proposer = proposer
    rng = random.Random(0)
    results = []
    for b in batches:
        prompts = [[rng.randrange(100, engine.vocab_size - 100) for _ in range(args.input_len)] for _ in range(b)]
        proposer.k = 0
        run(engine, prompts[:1], 8)  # warm
        base = None
        for k in ks:
            proposer.k = k
            elapsed, tokens, drafted, kept = run(engine, prompts, args.output_len, proposer)
            ms = 1e3 * elapsed * b / (tokens - kept)  # a stream's time a step (each step gives 1 + kept tokens)
            base = ms if k == 0 else base
            row = {"batch": b, "k": k, "ms_per_step": ms, "tokens": tokens, "drafted_steps": drafted, "kept": kept,
                   "tok_per_s_no_drafts_kept": tokens / elapsed}
            if k and base:
                row["cost_vs_plain"] = ms / base
                row["projected_tok_per_s"] = {a: b * ((1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1) / (ms / 1e3)
                                              for a in (0.5, 0.7, 0.9)}
                row["projected_speedup"] = {a: v / (b * 1e3 / base) for a, v in row["projected_tok_per_s"].items()}
            results.append(row)
            proj = "" if not k else "  if kept: " + ", ".join(
                f"{a:.0%} -> {v:.0f} tok/s ({row['projected_speedup'][a]:.2f}x)"
                for a, v in row["projected_tok_per_s"].items())
            print(f"batch {b:3d} k {k}: {ms:6.2f} ms a step ({tokens} tokens, {drafted} drafted steps, {kept} drafts "
                  f"kept){proj}", flush=True)
            if k and args.one_drafting and b > 1:
                # One drafting stream among b: its drafted steps are mixed steps (the drafter sits out the step after
                # each), the others decode-only; the engine's step timing gives each kind's device time.
                engine.step_timing.totals.clear()
                run(engine, prompts, args.output_len, proposer, one_drafting=True,
                    profile_steps=6 if k == max(ks) else 0)
                summary = engine.step_timing.summary()
                results.append({"batch": b, "k": k, "one_drafting": True, "step_timing": summary})
                print(f"batch {b:3d} k {k}, one stream drafting: {summary}", flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
