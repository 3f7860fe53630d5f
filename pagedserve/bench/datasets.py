"""Benchmark request sets: random token prompts with lengths drawn from ranges, and a shared-prefix set."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def parse_range(text: str) -> tuple[int, int]:
    """'512' -> (512, 512); '100-1024' or '100,1024' -> (100, 1024)."""
    for sep in ("-", ","):
        if sep in text:
            lo, hi = (int(x) for x in text.split(sep, 1))
            break
    else:
        lo = hi = int(text)
    if lo < 1 or hi < lo:
        raise ValueError(f"bad length range {text!r}: want N or LO-HI with 1 <= LO <= HI")
    return lo, hi


def random_requests(num: int, input_range: tuple[int, int], output_range: tuple[int, int],
                    vocab_size: int, seed: int = 0, token_range: tuple[int, int] | None = None) -> list[BenchRequest]:
    """Lengths drawn as ../shared/tools/roofline.py draws them (all input lengths, then all output
    lengths, from one random.Random(seed)), so the floor it prints is of this very workload."""
    rng = random.Random(seed)
    ins = [rng.randint(*input_range) for _ in range(num)]
    outs = [rng.randint(*output_range) for _ in range(num)]
    lo, hi = token_range or (100, min(vocab_size, 100_000) - 1)
    return [BenchRequest([rng.randint(lo, hi) for _ in range(i)], o) for i, o in zip(ins, outs)]


def shared_prefix_requests(num: int, prefix_len: int, suffix_len: int, output_len: int,
                           vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    """num requests that share one prefix_len-token system prompt, each with its own suffix."""
    rng = random.Random(seed)
    hi = min(vocab_size, 100_000) - 1
    prefix = [rng.randint(100, hi) for _ in range(prefix_len)]
    return [BenchRequest(prefix + [rng.randint(100, hi) for _ in range(suffix_len)], output_len)
            for _ in range(num)]
