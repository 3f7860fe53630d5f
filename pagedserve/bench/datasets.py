"""Benchmark request sets: random token prompts with lengths drawn from ranges, a shared-prefix set, and real text
from a file (ShareGPT conversations, or a JSONL of prompts), as vLLM's benchmarks read them."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

FILE_DATASETS = ("sharegpt", "custom")


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


def file_requests(kind: str, path: str, num: int, tokenizer: Any, seed: int = 0, output_len: int | None = None,
                  max_prompt_len: int = 1024, max_total_len: int = 2048) -> list[BenchRequest]:
    """`num` requests from a file, in a seeded random order:

    sharegpt: a JSON list of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}
        (ShareGPT_V3_unfiltered_cleaned_split.json): the first turn is the prompt, the second's token count the
        output length (output_len instead when given). As vLLM's benchmark: pairs with a prompt or reply under 4
        tokens, a prompt over max_prompt_len or both over max_total_len are skipped.
    custom: JSONL, one {"prompt": text} a line, with an optional "output_tokens" (else output_len, default 256).

    ValueError for a missing file, a malformed one, or fewer usable entries than `num`."""
    if kind not in FILE_DATASETS:
        raise ValueError(f"unknown dataset {kind!r}; file datasets: {FILE_DATASETS}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"--dataset-path {path!r}: {e.strerror or e}") from None
    try:
        entries = json.loads(text) if kind == "sharegpt" else [json.loads(line) for line in text.splitlines()
                                                                if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"--dataset-path {path!r} is not {'JSON' if kind == 'sharegpt' else 'JSONL'}: {e}") from None
    if not isinstance(entries, list):
        raise ValueError(f"--dataset-path {path!r}: a {kind} file holds a list of entries")
    order = list(range(len(entries)))
    random.Random(seed).shuffle(order)
    out: list[BenchRequest] = []
    for index in order:
        if len(out) == num:
            break
        entry = entries[index]
        if kind == "sharegpt":
            turns = entry.get("conversations") if isinstance(entry, dict) else None
            if not isinstance(turns, list) or len(turns) < 2 or not all(
                    isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
                continue
            prompt_ids = tokenizer.encode(turns[0]["value"])
            n_out = output_len or len(tokenizer.encode(turns[1]["value"], add_special_tokens=False))
            if len(prompt_ids) < 4 or n_out < 4 or len(prompt_ids) > max_prompt_len \
                    or len(prompt_ids) + n_out > max_total_len:
                continue
        else:
            if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
                raise ValueError(f"--dataset-path {path!r}: line {index + 1} has no \"prompt\" string")
            prompt_ids = tokenizer.encode(entry["prompt"])
            n_out = entry["output_tokens"] if entry.get("output_tokens") is not None else output_len or 256
            if isinstance(n_out, bool) or not isinstance(n_out, int) or n_out < 1 or not prompt_ids:
                raise ValueError(f"--dataset-path {path!r}: line {index + 1} needs a non-empty prompt and "
                                 f"output_tokens >= 1")
        out.append(BenchRequest(prompt_ids, n_out))
    if len(out) < num:
        raise ValueError(f"--dataset-path {path!r} has {len(out)} usable {kind} entries; --num-prompts asks for {num}")
    return out
