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


def test_compiles_while_serving_are_warnings_naming_the_variant(caplog) -> None:
    def kernel(x_ptr, n, eps, BLOCK):  # only its argument names are read
        pass

    kernel.arg_names = ["x_ptr", "n", "eps", "BLOCK"]
    src = SimpleNamespace(name="_norm", fn=kernel, constants={(3,): 4096, (1,): 1},
                          attrs={(0,): [["tt.divisibility", 16]], (1,): []})
    log = CompileLog()
    with caplog.at_level("WARNING", logger="pagedserve.executor.compile_log"):
        log(src=src, metadata={}, metadata_group={}, times=SimpleNamespace(total=900_000), cache_hit=False)
        assert not caplog.records  # start-up: counted, not a warning
        log.serving = True
        log(src=src, metadata={}, metadata_group={}, times=SimpleNamespace(total=1_200_000), cache_hit=True)
        assert not caplog.records and log.serving_compiles == 0  # a cache hit costs no compile
        log(src=src, metadata={}, metadata_group={}, times=SimpleNamespace(total=1_200_000), cache_hit=False)
    assert log.serving_compiles == 1
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelname == "WARNING" and "_norm while serving (1.20 s" in message
    assert "BLOCK=4096" in message and "n=1" in message and "multiples of 16: x_ptr" in message


def test_describe_without_names() -> None:
    from pagedserve.executor.compile_log import describe

    assert describe(SimpleNamespace()) == "(no specialization recorded)"
    assert describe(SimpleNamespace(constants={(2,): True}, attrs={})) == "(2,)=True"


def test_engine_stats_count_compiles_while_serving(monkeypatch, tiny_model_dir) -> None:
    """The engine's stats (and so /metrics' pagedserve:kernel_compiles_while_serving_total) carry the count."""
    from pagedserve import engine as engine_module
    from pagedserve.config import EngineConfig
    from pagedserve.executor import compile_log

    log = CompileLog()
    monkeypatch.setattr(compile_log, "_LOG", log)
    engine = engine_module.LLMEngine(EngineConfig(model=tiny_model_dir, load_format="dummy", max_model_len=256,
                                                  num_kv_blocks=64))
    assert engine.get_stats()["kernel_compiles_while_serving"] == 0
    compile_log.mark_serving()
    _event(log, "_prefill", 640_000)
    _event(log, "_prefill", 1_000, hit=True)
    assert engine.get_stats()["kernel_compiles_while_serving"] == 1
