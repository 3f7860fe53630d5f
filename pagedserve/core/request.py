"""A request as the scheduler sees it: token ids, progress, and its place in the KV cache."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from pagedserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were taken; recomputed from scratch
    FINISHED_STOPPED = "finished_stopped"  # eos, a stop token or a stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or the context length
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


_SERIALS = itertools.count()


@dataclass(slots=True, eq=False)
class Request:
    """One sequence to generate. For n > 1 the engine makes n Requests that share `group_id`.

    Invariant: all_token_ids == prompt_token_ids + output_token_ids, and
    0 <= num_computed_tokens <= len(all_token_ids). Tokens [0, num_computed_tokens) have their
    K/V in the cache blocks listed by the KV cache manager for this request.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: min(params.max_tokens, max_model_len - prompt length)
    eos_token_id: int | None = None
    group_id: str | None = None  # parent id for n > 1 siblings
    cache_salt: str | None = None  # prefix-cache namespace; None: shared with every request
    lora_request: Any = None  # its LoRA adapter (pagedserve/lora.py's LoRARequest), or None
    lora_slot: int = 0  # the adapter's device slot, given at each admission (executor/lora.py); 0: none
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # scheduling_policy "priority": lower runs first (ties: earlier arrival)
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens sampled on the device whose ids have not reached the host yet (async scheduling: the
    # next step is scheduled while the previous one runs). 0 or 1; counted in num_computed_tokens
    # once scheduled, but not in all_token_ids until Scheduler.update appends them.
    num_output_placeholders: int = 0
    # Speculative decoding (spec_decode.py): drafts of the step in flight (the request sits out the steps scheduled
    # before it returns: its token count is unknown till then); drafted steps in a row that kept no draft, and the
    # output count before which it drafts no more (a back-off that doubles with each such step).
    num_drafts_in_flight: int = 0
    num_failed_drafts: int = 0
    draft_resume_at: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit on first schedule; -1 before then
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    # Chained hashes of this request's full blocks, filled by the KV cache manager.
    block_hashes: list = field(default_factory=list)
    # Unique to this object: a step scheduled for an aborted request whose id was then given to a new one (async
    # scheduling lets a step run while its request goes) must not hand its token to the new request.
    serial: int = field(default_factory=lambda: next(_SERIALS))

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return self.status.finished
