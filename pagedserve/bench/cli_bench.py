"""Registers `pagedserve bench {throughput,latency,serve,hf}` on the main CLI (docs/bench.md)."""

from __future__ import annotations

from pagedserve.bench import hf_baseline, latency, serve, throughput
from pagedserve.bench.common import add_ceiling_args
from pagedserve.entrypoints.args import add_engine_args


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency, serve, hf")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, module, text in (
        ("throughput", throughput, "offline throughput on a random dataset, with the card's floor"),
        ("latency", latency, "one stream: TTFT, decode tok/s, GB/s and % of the floor"),
    ):
        p = bench_sub.add_parser(name, help=text)
        add_engine_args(p)
        add_ceiling_args(p)
        module.add_args(p)
        p.set_defaults(func=lambda args, m=module: 0 if m.run(args) else 1)

    p = bench_sub.add_parser("serve", help="drive a running server over HTTP: TTFT, TPOT, ITL, E2E, tok/s")
    serve.add_args(p)
    # Failed requests are counted and reported, not fatal; a run where none succeeded exits 1.
    p.set_defaults(func=lambda args: 0 if serve.run(args)["completed"] else 1)

    p = bench_sub.add_parser("hf", help="the throughput workload through Hugging Face Transformers")
    add_engine_args(p)
    hf_baseline.add_bench_args(p)
    p.set_defaults(func=lambda args: 0 if hf_baseline.run_hf_bench(args) else 1)
