"""The contract between the scheduler (what to compute) and the model runner (how).

Index picture for one request in one step:

    all_token_ids:  [0 ............ num_computed_tokens ........ +len(token_ids) ...... num_tokens)
                     K/V already cached  | computed this step (token_ids) | not yet
    positions of token_ids: num_computed_tokens + i
    seq_len after the step = num_computed_tokens + len(token_ids)

`needs_sample` is true when the chunk ends at the last token (a decode step, or the final chunk
of a prefill): the runner samples one new token for it (speculative decoding: one at each of the
last 1 + len(draft_token_ids) positions, and the scheduler keeps those its drafts confirm).

Async scheduling: step N+1 is scheduled while step N still runs, so a decode's one token may be the
one step N is sampling. Its id is then PLACEHOLDER_TOKEN_ID; the runner takes the real id from step
N's sampled tokens on the device (never via the host).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pagedserve.sampling_params import SamplingParams

PLACEHOLDER_TOKEN_ID = -1  # a token sampled by the step still running; the runner fills it in


@dataclass(slots=True)
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # tokens to compute this step
    num_computed_tokens: int  # tokens already in the cache; position of token_ids[0]
    block_ids: list[int]  # the request's whole block table (covers num_computed + len(token_ids))
    needs_sample: bool
    sampling_params: SamplingParams
    # Read-only views for penalties; the runner must not mutate them. With async scheduling
    # output_token_ids may lack the token still being sampled: use output_index for positions.
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    output_index: int = 0  # index among the request's outputs of the token sampled this step
    # Structured outputs: the tokens this row may sample, one bit each (an int32 row on the host, from
    # the engine's grammar matcher; structured_output.py). None: any token.
    allowed_token_bitmask: Any = None
    lora_slot: int = 0  # its LoRA adapter's device slot (executor/lora.py); 0: none
    # Speculative decoding (spec_decode.py): the draft tokens at the end of token_ids (a decode's last token,
    # then these). The runner samples at each of the len + 1 last positions; empty: a plain step.
    draft_token_ids: list[int] = field(default_factory=list)
    serial: int = -1  # the scheduled Request's serial (core/request.py): whose result this row is; -1: unchecked
    # A hybrid model's window groups' block tables (core/kv_cache.py), one a group: entry i of each for the same
    # positions as block_ids[i] (entries behind the window are never read); None: one table for every layer.
    window_block_ids: list[list[int]] | None = None
    # the block index of window_block_ids' first entries (those before it, behind the window, left out)
    window_first: int = 0

    @property
    def seq_len(self) -> int:
        return self.num_computed_tokens + len(self.token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """It asks for prompt logprobs and has no output yet (a recompute after a preemption asks nothing)."""
        return self.sampling_params.prompt_logprobs is not None and self.output_index == 0


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    # Requests that ended or were preempted since the last step: the runner drops any state it keeps.
    finished_request_ids: list[str] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    # Tensor parallelism with LoRA: (slot, LoRARequest) pairs rank 0 loaded for this step; the other ranks load
    # their slices into the same slots before its forward (executor/lora.py).
    lora_loads: list = field(default_factory=list)
    # KV offloading (core/kv_cache.py's CPU tier): copies the executor runs before the step's forward, in this order:
    # (device block, CPU slot) out, then (CPU slot, device block) in.
    kv_copies_out: list = field(default_factory=list)
    kv_copies_in: list = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class Logprob:
    """One token's entry in a position's logprobs, as vLLM's `Logprob`: its logprob under the model's raw
    distribution, its rank there (1 = the most likely) and its text (None until the offline API fills it)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass(slots=True)
class TokenLogprobs(Mapping):
    """Log-probabilities (of the model's raw distribution) for one sampled (or prompt) token.

    Read either through the fields below, or as vLLM's `dict[int, Logprob]`: keys are the token itself
    first, then its requested alternatives most likely first (the token once, where it is one of them),
    so code written for vLLM's `output.logprobs[i][token_id].logprob` runs unchanged. The Logprob values
    are made on access; `decoded` gives their texts (LLM attaches a table that decodes each when first read)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # the N most likely (token_id, logprob), most likely first
    decoded: dict[int, str] | None = field(default=None, compare=False, repr=False)

    def __getitem__(self, token_id: int) -> Logprob:
        text = None
        if self.decoded is not None:
            try:
                text = self.decoded[token_id]  # (LLM's table decodes a token when first read)
            except KeyError:
                pass
        if token_id == self.token_id:
            return Logprob(self.logprob, self.rank, text)
        for rank, (tid, value) in enumerate(self.top, start=1):
            if tid == token_id:
                return Logprob(value, rank, text)
        raise KeyError(token_id)

    def __iter__(self) -> Iterator[int]:
        yield self.token_id
        for tid, _ in self.top:
            if tid != self.token_id:
                yield tid

    def __len__(self) -> int:
        return 1 + sum(1 for tid, _ in self.top if tid != self.token_id)

    def __contains__(self, token_id: object) -> bool:
        return token_id == self.token_id or any(tid == token_id for tid, _ in self.top)


@dataclass(slots=True)
class RunnerOutput:
    # Aligned with SchedulerOutput.scheduled; None where needs_sample was false.
    sampled_token_ids: list[int | None] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    # Prompt logprobs (requests with SamplingParams.prompt_logprobs), aligned with SchedulerOutput.scheduled:
    # None, or (first, entries): entries[j] is the logprob of prompt token first + j under the distribution
    # the model gave at the position before it (first >= 1: the first prompt token has none). None: no row asked.
    prompt_logprobs: list[tuple[int, list[TokenLogprobs]] | None] | None = None
    # Embedding requests (sampling_params.pooling), aligned with SchedulerOutput.scheduled: the pooled vector (its
    # PoolingParams applied) where such a request computed its last prompt token; None: no row pooled.
    embeddings: list[list[float] | None] | None = None
    # Speculative decoding, aligned with SchedulerOutput.scheduled: for a row with draft tokens, the (token id,
    # logprobs or None) sampled at each draft's position (sampled_token_ids holds the one at the position before
    # the first draft); None for rows without drafts. None: no row drafted.
    draft_samples: list[list[tuple[int, TokenLogprobs | None]] | None] | None = None
