"""CPU benchmark of the serving pipeline's host side: the engine process (scheduler, step inputs,
outputs, delta encoding, pipe) and the server side's AsyncEngine (pipe reader, delta decoding, one
stream per request), with the model replaced by a stub that "runs" each step for --device-ms on a
pretend device (a sleep, so the host work overlaps it as with async scheduling on a GPU).

    python scripts/bench_engine_process.py MODEL_DIR [--device-ms 12] [--requests 256] [--output-len 512]

Prints output tokens/s, the ideal (one step per --device-ms), and the engine's step-timing lines.
With --device-ms 0 it measures the host pipeline alone. MODEL_DIR: any Qwen2/Llama config.json
folder with tokenizer files (dummy weights are used).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


class _Pending:
    def __init__(self, output, ready_at: float) -> None:
        self.output, self.ready_at = output, ready_at

    def result(self):
        delay = self.ready_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return self.output


def build_engine(model: str, device_ms: float, max_num_seqs: int):
    from bench_host_step import StubWorker

    from pagedserve.config import EngineConfig
    from pagedserve.engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(
            model=model,
            load_format="dummy",
            max_model_len=4096,
            num_kv_blocks=40000,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=8192,
            async_scheduling=True,
        )
    )
    stub = StubWorker(engine.worker)
    execute_async = stub.execute_async

    def timed_execute_async(sched):
        done = execute_async(sched)
        return _Pending(done.output, time.perf_counter() + device_ms / 1e3)

    stub.execute_async = timed_execute_async
    engine.worker = stub
    return engine


async def drive(args) -> None:
    from pagedserve.async_engine import AsyncEngine
    from pagedserve.sampling_params import SamplingParams

    factory = functools.partial(build_engine, args.model, args.device_ms, args.requests)
    engine = AsyncEngine.in_process(factory, log_stats_interval=2.0)
    engine.start()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(rng.randrange(100, 1024))] for _ in range(args.requests)]
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=1.0)
        stream = await engine.add_request(str(i), prompts[i], params)
        async for out in stream:
            text = out.outputs[0].text  # what a server reads per chunk
            del text
        tokens += len(out.outputs[0].token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.requests)))
    elapsed = time.perf_counter() - t0
    await engine.shutdown()
    ideal = args.requests / (args.device_ms / 1e3) if args.device_ms else float("inf")
    print(
        f"{args.requests} requests x {args.output_len} tokens: {tokens / elapsed:,.0f} output tok/s in {elapsed:.2f} s "
        f"(one step per {args.device_ms} ms would give {ideal:,.0f} in the decode phase)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--device-ms", type=float, default=12.0)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=512)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    asyncio.run(drive(args))


if __name__ == "__main__":
    main()
