"""The `pagedserve` command line, in subprocesses, on the embedded model: generate, chat (driven through
stdin as a person would type), and a clear error for bad flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedserve.entrypoints.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_generate_tells_the_joke(real_model_dir: str) -> None:
    r = _cli("generate", "--model", real_model_dir, "--max-tokens", "40", "Tell me a joke.")
    assert r.returncode == 0, r.stderr
    assert "tomato" in r.stdout.lower()


def test_chat_keeps_the_conversation(real_model_dir: str) -> None:
    typed = "My name is Ada. Reply with one word: OK.\nWhat is my name? Answer with the name only.\n/exit\n"
    r = _cli("chat", "--model", real_model_dir, "--max-tokens", "16", stdin=typed)
    assert r.returncode == 0, r.stderr
    # Each reply follows the "> " prompt that input() printed (stdin is not echoed).
    replies = [line[2:].strip() for line in r.stdout.splitlines() if line.startswith("> ") and line[2:].strip()]
    assert len(replies) == 2, r.stdout
    assert "ada" in replies[1].lower()  # the second answer needs the first turn


def test_bad_value_is_a_clear_error(real_model_dir: str) -> None:
    r = _cli("generate", "--model", real_model_dir, "--temperature", "-1", "hi")
    assert r.returncode == 2
    assert "temperature" in r.stderr and "Traceback" not in r.stderr


def test_config_file(real_model_dir: str, tmp_path) -> None:
    """vLLM's --config: the model and the sampling flags from a YAML file; a bad file is a clear error."""
    config = tmp_path / "generate.yaml"
    config.write_text(f"model: {real_model_dir}\nmax_tokens: 40\nmax-model-len: 512\n")
    r = _cli("generate", "--config", str(config), "Tell me a joke.")
    assert r.returncode == 0, r.stderr
    assert "tomato" in r.stdout.lower()
    config.write_text("max-tokens: many\n")
    r = _cli("generate", "--config", str(config), "hi")
    assert r.returncode == 2 and "max-tokens" in r.stderr and "Traceback" not in r.stderr
