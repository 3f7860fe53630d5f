"""LoRA through the engine with the Triton shrink / expand kernels (kernels/lora_sgmv.py; the interpreter on CPU):
tests/executor/test_lora.py's mixed batch (two adapters and the base model, chunked prefill, slot reuse) and its eager
steps without adapters, with PAGEDSERVE_LORA_KERNELS=1, against Transformers with the adapters merged."""

from __future__ import annotations

import pytest

from pagedserve.executor.kernels import lora_sgmv
from tests.executor import test_lora as torch_path
from tests.executor.test_lora import setup  # noqa: F401  (the module's fixture: base checkpoint and adapters)


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    monkeypatch.setenv("PAGEDSERVE_LORA_KERNELS", "1")
    calls: list[int] = []
    shrink = lora_sgmv.lora_shrink

    def counted(x, *args, **kwargs):
        calls.append(x.shape[0])
        return shrink(x, *args, **kwargs)

    monkeypatch.setattr(lora_sgmv, "lora_shrink", counted)
    return calls


def test_mixed_batch_through_the_kernels(setup, kernel_calls) -> None:  # noqa: F811
    torch_path.test_adapters_and_the_base_model_in_one_batch_match_merged_transformers(setup)
    assert kernel_calls and max(kernel_calls) > 1  # the kernels ran, on prefill chunks and decodes


def test_eager_steps_without_adapters_skip_the_kernels(setup, kernel_calls) -> None:  # noqa: F811
    torch_path.test_eager_steps_without_adapters_skip_the_lora_kernels(setup)
    assert kernel_calls


def test_larger_forwards_take_the_torch_path(setup, kernel_calls, monkeypatch) -> None:  # noqa: F811
    """PAGEDSERVE_LORA_KERNEL_MAX_TOKENS: forwards of more tokens (the prefill chunks here) run the torch path's
    masked products, smaller ones the kernels, in the same engine; answers as merged Transformers'."""
    monkeypatch.setenv("PAGEDSERVE_LORA_KERNEL_MAX_TOKENS", "4")
    torch_path.test_adapters_and_the_base_model_in_one_batch_match_merged_transformers(setup)
    assert kernel_calls and max(kernel_calls) <= 4
