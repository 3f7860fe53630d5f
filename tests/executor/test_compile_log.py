"""The start-up compile log (PAGEDSERVE_LOG_COMPILES=1): counts, seconds and the slowest kernels per phase."""

from __future__ import annotations

from types import SimpleNamespace

from pagedserve.executor.compile_log import CompileLog


def _event(log: CompileLog, name: str, micros: int, hit: bool = False) -> None:
    log(src=SimpleNamespace(name=name), metadata={}, metadata_group={}, times=SimpleNamespace(total=micros),
        cache_hit=hit)


def test_summary_counts_compiles_since_the_last_one() -> None:
    log = CompileLog()
    _event(log, "_prefill", 2_000_000)
    _event(log, "_norm", 300_000)
    _event(log, "_prefill", 1_500_000)
    _event(log, "_norm", 1_000, hit=True)
    first = log.summary()
    assert first.startswith("Triton: 3 compiles, 3.8 s, 1 cache hits")
    assert "_prefill x2 3.5 s, _norm x1 0.3 s" in first
    assert log.summary() == "Triton: 0 compiles, 0.0 s, 0 cache hits"  # the next phase starts empty
    _event(log, "_decode", 700_000)
    assert log.summary() == "Triton: 1 compiles, 0.7 s, 0 cache hits (_decode x1 0.7 s)"
