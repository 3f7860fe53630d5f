"""CPU benchmark of the engine's host work per decode step at 256 running requests, the model replaced
by a stub that returns tokens at once: schedule + step inputs + update + detokenize + outputs + the
engine process's delta encoding. This is what async scheduling must hide behind each device step.

    python scripts/bench_host_step.py MODEL_DIR [--no-copy] [--engine-process] [--offline] [--prof]

MODEL_DIR: any Qwen2/Llama config.json folder with tokenizer files (dummy weights are used).
--no-copy: outputs without copies, as the engine process runs (LLMEngine.copy_outputs = False).
--offline: as `LLM.generate` (and `bench throughput`) runs: outputs only for finished requests (final_only).
"""

from __future__ import annotations

import argparse
import cProfile
import pickle
import pstats
import random
import time

import torch

from pagedserve.config import EngineConfig
from pagedserve.core.outputs import RunnerOutput
from pagedserve.engine import LLMEngine
from pagedserve.engine_process import DeltaEncoder
from pagedserve.sampling_params import SamplingParams


class _Done:
    def __init__(self, output: RunnerOutput) -> None:
        self.output = output

    def result(self) -> RunnerOutput:
        return self.output


class StubWorker:
    """The real worker's host-side input building, then random tokens instead of a forward."""

    def __init__(self, worker, seed: int = 0) -> None:
        self.worker = worker
        self.rng = random.Random(seed)

    def __getattr__(self, name):
        return getattr(self.worker, name)

    def execute_async(self, sched) -> _Done:
        runner = self.worker.runner
        runner.prepare_inputs(sched)
        ids = [self.rng.randrange(1000, 30000) if r.needs_sample else None for r in sched.scheduled]
        sampled = [r for r in sched.scheduled if r.needs_sample]
        runner._last_sample_rows = {r.request_id: i for i, r in enumerate(sampled)}
        runner._last_sampled = torch.tensor([t for t in ids if t is not None])
        return _Done(RunnerOutput(ids, [None] * len(ids)))

    def execute(self, sched) -> RunnerOutput:
        return self.execute_async(sched).result()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--no-copy", action="store_true")
    p.add_argument("--prof", action="store_true")
    p.add_argument("--engine-process", action="store_true",
                   help="as the engine process runs: no copies, no text (LLMEngine.detokenize=False), pickled deltas")
    p.add_argument("--offline", action="store_true",
                   help="as LLM.generate runs: each request reported once, when it finishes (final_only)")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, load_format="dummy", max_model_len=2048, num_kv_blocks=20000,
                                    max_num_seqs=256, max_num_batched_tokens=8192, async_scheduling=True))
    engine.worker = StubWorker(engine.worker)
    engine.copy_outputs = not (args.no_copy or args.engine_process)
    engine.detokenize = not args.engine_process
    rng = random.Random(0)
    for i in range(256):
        prompt = [rng.randrange(100, 30000) for _ in range(rng.randrange(50, 200))]
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=1024, ignore_eos=True, temperature=1.0),
                           final_only=args.offline)
    encoder = DeltaEncoder()
    for _ in range(5):  # the prefill steps
        encoder.encode(engine.step())
    engine.step_timing.totals.clear()
    profiler = cProfile.Profile()
    if args.prof:
        profiler.enable()
    step_s = encode_s = 0.0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        outputs = engine.step()
        t1 = time.perf_counter()
        deltas = encoder.encode(outputs) if not args.offline else None
        if args.engine_process:
            pickle.dumps(("out", [], deltas, engine.get_stats()), protocol=pickle.HIGHEST_PROTOCOL)
        step_s += t1 - t0
        encode_s += time.perf_counter() - t1
    if args.prof:
        profiler.disable()
    print(f"host work per decode step at 256 requests: step {1e3 * step_s / args.steps:.2f} ms, "
          f"delta encoding {1e3 * encode_s / args.steps:.2f} ms (copy_outputs={engine.copy_outputs}); "
          f"{engine.step_timing.summary()}")
    if args.prof:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
