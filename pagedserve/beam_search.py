"""Beam search, as vLLM runs it: on top of the engine, one token a step.

Each step extends every live beam of a prompt by one token: the beam's tokens go to the engine as a prompt with
max_tokens=1 and logprobs=2 * beam_width (the automatic prefix cache finds all but the newest tokens), and each of
the 2 * beam_width likeliest next tokens (and the sampled one) makes a candidate. A candidate ending in an EOS token
(unless ignore_eos) is finished; of the rest, the beam_width best by score continue. After max_tokens steps (or when
no beam is left), the beam_width best of the finished and the live beams are the answer. The score is vLLM's (and
Hugging Face's): cumulative logprob / length ** length_penalty, length counting the prompt and not a final EOS.

`BeamSearch` holds one prompt's beams and knows nothing of how a step runs, so the offline API (LLM.beam_search)
and the server (use_beam_search) share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pagedserve.core.outputs import TokenLogprobs
from pagedserve.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each step asks for 2 * beam_width logprobs


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) or not (
                1 <= self.beam_width <= MAX_BEAM_WIDTH):
            raise ValueError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.length_penalty, (int, float)) or not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")

    def step_params(self) -> SamplingParams:
        """What each step asks the engine for: one token and the 2 * beam_width likeliest alternatives."""
        return SamplingParams(temperature=self.temperature, max_tokens=1, logprobs=2 * self.beam_width,
                              ignore_eos=True, skip_special_tokens=False)


@dataclass
class BeamSearchSequence:
    """One beam: the prompt's tokens and the generated ones (`tokens`), each generated token's logprobs (the
    step's TokenLogprobs), their sum, and once decoded the generated text (a final EOS left out)."""

    tokens: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    stop_reason: int | None = None  # the EOS token id that finished it

    def score(self, length_penalty: float) -> float:
        """cum_logprob / length ** length_penalty; the length counts the prompt, not a final EOS (as vLLM's)."""
        length = len(self.tokens) - (1 if self.finish_reason == "stop" else 0)
        try:
            scale = float(length) ** length_penalty
        except OverflowError:  # an extreme penalty: the length's weight beyond floats
            scale = math.inf
        if scale == 0.0:  # (a huge negative penalty underflows)
            return -math.inf if self.cum_logprob < 0 else 0.0
        return self.cum_logprob / scale


@dataclass
class BeamSearchOutput:
    """vLLM's BeamSearchOutput: the best beam_width sequences, best first."""

    sequences: list[BeamSearchSequence]
    # The prompt tokens the first step found in the prefix cache (usage's prompt_tokens_details.cached_tokens).
    num_cached_tokens: int = 0


class BeamSearch:
    """One prompt's beam search. pending() gives the beams to extend; advance() takes each one's step result."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: set[int]) -> None:
        self.params = params
        self.prompt_len = len(prompt_token_ids)
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        self.beams = [BeamSearchSequence(list(prompt_token_ids))]
        self.finished: list[BeamSearchSequence] = []
        self.steps = 0

    @property
    def done(self) -> bool:
        return not self.beams or self.steps >= self.params.max_tokens

    def pending(self) -> list[list[int]]:
        return [] if self.done else [b.tokens for b in self.beams]

    def advance(self, results: list[TokenLogprobs]) -> None:
        """results[i]: the logprobs of the token generated for pending()[i] (its `top` holds the candidates)."""
        if len(results) != len(self.beams):
            raise ValueError(f"{len(results)} step results for {len(self.beams)} beams")
        candidates = []
        for beam, result in zip(self.beams, results, strict=True):
            options = dict(result.top)
            options.setdefault(result.token_id, result.logprob)
            for token_id, logprob in options.items():
                new = BeamSearchSequence(beam.tokens + [token_id], beam.logprobs + [result],
                                         beam.cum_logprob + logprob)
                if token_id in self.eos:
                    new.finish_reason, new.stop_reason = "stop", token_id
                    self.finished.append(new)
                else:
                    candidates.append(new)
        candidates.sort(key=self._key, reverse=True)
        self.beams = candidates[: self.params.beam_width]
        self.steps += 1

    def _key(self, beam: BeamSearchSequence) -> float:
        return beam.score(self.params.length_penalty)

    def result(self, decode: Any) -> BeamSearchOutput:
        """The best beam_width of the finished and live beams, best first, their generated text from
        decode(token_ids)."""
        for beam in self.beams:
            beam.finish_reason = "length"
        best = sorted(self.finished + self.beams, key=self._key, reverse=True)[: self.params.beam_width]
        for beam in best:
            generated = beam.tokens[self.prompt_len:]
            if beam.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                generated = generated[:-1]
            beam.text = decode(generated)
        return BeamSearchOutput(best)


__all__ = ["MAX_BEAM_WIDTH", "BeamSearch", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence"]
