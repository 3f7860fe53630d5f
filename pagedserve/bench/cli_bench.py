"""Registers `pagedserve bench {throughput,latency}` on the main CLI."""

from __future__ import annotations

from pagedserve.bench import latency, throughput
from pagedserve.bench.common import add_ceiling_args
from pagedserve.entrypoints.args import add_engine_args


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: throughput, latency")
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

