"""Speculative decoding by n-gram lookup in the sequence itself (vLLM's `"method": "ngram"`, prompt lookup).

Each decode step of a request may carry up to k draft tokens guessed from its own text: the longest suffix
of its tokens (prompt_lookup_max down to prompt_lookup_min tokens long) that also occurs earlier, and the
tokens that followed that earlier occurrence. The step computes the request's last token and the k drafts
at once (each of the k + 1 tokens its own one-token attention sequence: executor/model_runner.py, prepare_inputs)
and samples a token at each of the k + 1 positions; the scheduler keeps the samples up to and including the
first that differs from its draft (core/scheduler.py, Scheduler.update).

Why that is exact, for greedy and random sampling alike: the draft is a point mass, so the rejection
test of speculative sampling (accept d with probability min(1, p(d) / q(d)) = p(d), else sample from the
residual p without d, renormalized) is the same as drawing x from p and accepting d when x == d, with x
the emitted token either way. The sample at position j is drawn from the model's distribution given the
real tokens before it whenever it is kept (every earlier draft was accepted), with that position's own
seed (sampler.position_seed), so a seeded request's tokens equal those of a run without drafts.

Which requests draft (Scheduler._drafts): decode steps of requests without penalties (their history would have
to include the drafts), structured outputs (the grammar would have to advance through them) or pooling.

Async scheduling stays on. A step is scheduled while the one before runs, so a decode's input is often the token
that step is still sampling (a placeholder): the lookup then guesses that token as well and drafts what would
follow it; the check is exact whatever the drafts are, a wrong guess only wastes them. A request whose drafted step
is in flight sits out the steps scheduled meanwhile (how many tokens it gets is known only when the step returns),
so a drafting request advances every other step at most, while requests without drafts keep the overlap. A request
whose drafts are not kept backs off: after n >= 3 drafted steps in a row that kept none it drafts no more for
2**(n - 2) tokens (at most 64), so text that does not repeat soon stops paying for the lookups, the longer steps and
the sitting out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

METHODS = ("ngram", "draft_model")
# vLLM's other methods: named in the error, so a user sees what is not there yet.
_NOT_SUPPORTED = ("eagle", "eagle3", "medusa", "mlp_speculator", "deepseek_mtp", "mtp", "suffix")
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 5
    # No drafts in steps while more requests than this run (vLLM's field): a drafted step of a large batch costs more
    # than its drafts save unless most are kept (docs/benchmarks.md, session 23). None: always draft.
    disable_by_batch_size: int | None = None
    # "draft_model": the smaller model that drafts (a folder, a .gguf or a Hub id; it must share the target's
    # tokenizer), run greedily by executor/draft_model.py.
    model: str | None = None

    @classmethod
    def parse(cls, value: object) -> SpeculativeConfig | None:
        """From vLLM's --speculative-config (a JSON object, or its dict): method ("ngram" or "draft_model"),
        num_speculative_tokens, prompt_lookup_max / prompt_lookup_min (ngram: one of them stands for both; neither:
        5), model (draft_model: the drafting model; a model without a method means draft_model, as in vLLM).
        None stays None. ValueError for anything else."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {value!r}")
        known = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model",
                 "disable_by_batch_size", "draft_tensor_parallel_size"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown or unsupported fields {unknown}; supported: "
                             f"{sorted(known)}")
        if value.get("draft_tensor_parallel_size") not in (None, 1):
            raise ValueError("speculative_config: draft_tensor_parallel_size must be 1 (the draft model runs on one "
                             f"device), got {value['draft_tensor_parallel_size']!r}")
        method = value.get("method")
        if method is None and value.get("model") is not None:
            method = "ngram" if value["model"] in ("ngram", "[ngram]") else "draft_model"
        method = "ngram" if method == "[ngram]" else method
        if method is None:
            raise ValueError('speculative_config needs "method" (supported: "ngram")')
        if method not in METHODS:
            known_later = " (not yet supported by pagedserve)" if method in _NOT_SUPPORTED else ""
            raise ValueError(f"speculative_config: method {method!r}{known_later}; supported: {list(METHODS)}")
        model = value.get("model")
        if method == "draft_model":
            if not isinstance(model, str) or not model:
                raise ValueError('speculative_config: method "draft_model" needs "model" (the drafting model\'s '
                                 "folder, .gguf file or Hub id)")
        elif model not in (None, "ngram", "[ngram]"):
            raise ValueError(f"speculative_config: method {method!r} takes no model, got {model!r}")
        else:
            model = None
        k = value.get("num_speculative_tokens")
        if k is None:
            raise ValueError("speculative_config needs num_speculative_tokens (the drafts a step, e.g. 4)")
        lookup_max, lookup_min = value.get("prompt_lookup_max"), value.get("prompt_lookup_min")
        if lookup_max is None and lookup_min is None:
            lookup_max = lookup_min = 5  # vLLM's defaults
        elif lookup_max is None:
            lookup_max = lookup_min
        elif lookup_min is None:
            lookup_min = lookup_max
        for name, v in (("num_speculative_tokens", k), ("prompt_lookup_max", lookup_max),
                        ("prompt_lookup_min", lookup_min)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"speculative_config: {name} must be an integer, got {v!r}")
        if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config: num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {k}")
        if lookup_min < 1 or lookup_max < lookup_min:
            raise ValueError(f"speculative_config: need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{lookup_min} and {lookup_max}")
        limit = value.get("disable_by_batch_size")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"speculative_config: disable_by_batch_size must be an integer >= 1, got {limit!r}")
        return cls(method, k, lookup_max, lookup_min, limit, model)

    def as_dict(self) -> dict:
        out = {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens,
               "prompt_lookup_max": self.prompt_lookup_max, "prompt_lookup_min": self.prompt_lookup_min}
        if self.disable_by_batch_size is not None:
            out["disable_by_batch_size"] = self.disable_by_batch_size
        if self.model is not None:
            out["model"] = self.model
        return out


def ngram_propose(tokens: np.ndarray, k: int, lookup_min: int, lookup_max: int) -> list[int]:
    """Up to k tokens guessed to follow `tokens`: for n = lookup_max .. lookup_min, the most recent earlier
    occurrence of the last n tokens, and what followed it (copied on, period by period, when that runs into
    the end: a loop of period p < k drafts k tokens). [] when no suffix of those lengths occurs before."""
    length = len(tokens)
    if k < 1 or length < lookup_min + 1:
        return []
    # Ends j (< length - 1) of earlier occurrences of the last token; extended backwards one token at a time.
    ends = np.flatnonzero(tokens[: length - 1] == tokens[length - 1])
    if not len(ends):
        return []
    best = -1
    matched = 1
    for n in range(1, lookup_max + 1):
        if n > 1:
            ends = ends[ends >= n - 1]
            ends = ends[tokens[ends - (n - 1)] == tokens[length - n]]
            if not len(ends):
                break
            matched = n
        if n >= lookup_min:
            best = int(ends[-1])
    if best < 0 or matched < lookup_min:
        return []
    period = length - 1 - best
    out: list[int] = tokens[best + 1: best + 1 + k].tolist()
    while len(out) < k:
        out.append(out[len(out) - period])
    return out


class NgramProposer:
    """Drafts for the scheduler's requests. Keeps each request's tokens in a growing numpy buffer (appends
    only the new ones each step), so a step costs a few vectorized passes over each drafting sequence."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self._buffers: dict[str, tuple[np.ndarray, int]] = {}

    def propose(self, request_id: str, token_ids: list[int], k: int) -> list[int]:
        buf, n = self._buffers.get(request_id, (None, 0))
        length = len(token_ids)
        if buf is None or length > len(buf) or length < n:
            grown = np.empty(max(2 * length, 256), dtype=np.int64)
            grown[:length] = token_ids
            buf = grown
        elif length > n:
            buf[n:length] = token_ids[n:length]
        self._buffers[request_id] = (buf, length)
        c = self.config
        return ngram_propose(buf[:length], min(k, c.num_speculative_tokens), c.prompt_lookup_min, c.prompt_lookup_max)

    def propose_many(self, items: list[tuple[str, list[int], int]]) -> list[list[int]]:
        """propose() for each (request id, its tokens, k), in order (the scheduler's one call a step)."""
        return [self.propose(request_id, token_ids, k) for request_id, token_ids, k in items]

    def release(self, request_id: str) -> None:
        self._buffers.pop(request_id, None)


@dataclass(slots=True)
class SpecDecodeStats:
    """Counters of drafting, as vLLM's spec_decode metrics: steps with drafts, draft tokens, accepted ones, and
    accepted drafts by position (how often the j-th draft of a step was kept)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] | None = None

    def add(self, num_draft: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        per = self.accepted_per_position
        if per is None or len(per) < num_draft:
            per = self.accepted_per_position = (per or []) + [0] * (num_draft - len(per or []))
        for j in range(num_accepted):
            per[j] += 1

    def as_dict(self) -> dict:
        counts = {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                  "num_accepted_tokens": self.num_accepted_tokens}
        return {**since(counts), "accepted_per_position": list(self.accepted_per_position or [])}


def since(now: dict, before: dict | None = None) -> dict:
    """The drafting counters of `now` (SpecDecodeStats.as_dict's) minus those of `before` (None: zero), with the
    acceptance rate (drafts kept / proposed) and the mean acceptance length (tokens a drafted step)."""
    before = before or {}
    d = {k: now[k] - before.get(k, 0) for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    d["acceptance_rate"] = d["num_accepted_tokens"] / d["num_draft_tokens"] if d["num_draft_tokens"] else 0.0
    d["mean_acceptance_length"] = 1 + d["num_accepted_tokens"] / d["num_drafts"] if d["num_drafts"] else 0.0
    return d
