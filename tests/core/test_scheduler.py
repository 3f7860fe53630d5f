"""Scheduler: token budget, chunked prefill, FCFS, preemption, prefix sharing, stops. Exact and fast."""

from __future__ import annotations

import pytest

from pagedserve.core.outputs import RunnerOutput, SchedulerOutput, TokenLogprobs
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams


def make_scheduler(**overrides: object) -> Scheduler:
    kwargs: dict = dict(
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=64,
        num_blocks=16,
        block_size=4,
        enable_prefix_caching=True,
    )
    kwargs.update(overrides)
    return Scheduler(**kwargs)


def make_request(
    request_id: str,
    prompt: list[int],
    max_tokens: int = 8,
    eos_token_id: int | None = None,
    cache_salt: str | None = None,
    **params: object,
) -> Request:
    return Request(
        request_id,
        list(prompt),
        SamplingParams(max_tokens=max_tokens, **params),
        max_tokens=max_tokens,
        eos_token_id=eos_token_id,
        cache_salt=cache_salt,
    )


def plan(out: SchedulerOutput) -> list[tuple[str, int, bool]]:
    """(request id, number of tokens, needs_sample) per scheduled request."""
    return [(s.request_id, len(s.token_ids), s.needs_sample) for s in out.scheduled]


def run(sched: Scheduler, out: SchedulerOutput, tokens: dict[str, int] | None = None, default: int = 100):
    """A fake model: every request that needs a sample gets tokens[id] (or `default`)."""
    tokens = tokens or {}
    sampled = [tokens.get(s.request_id, default) if s.needs_sample else None for s in out.scheduled]
    return sched.update(out, RunnerOutput(sampled_token_ids=sampled, logprobs=[None] * len(sampled)))


def test_chunked_prefill_mixes_with_decodes() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    a = make_request("a", [1, 2, 3])
    sched.add_request(a)
    out = sched.schedule()
    assert plan(out) == [("a", 3, True)]
    assert a.num_computed_tokens == 3  # advanced at schedule time
    run(sched, out, {"a": 50})

    b = make_request("b", list(range(10, 20)))
    sched.add_request(b)
    out = sched.schedule()
    # Decode first (1 token), then a 7-token chunk of b's 10-token prompt fills the budget of 8.
    assert plan(out) == [("a", 1, True), ("b", 7, False)]
    assert out.num_batched_tokens == 8
    assert out.scheduled[0].token_ids == [50] and out.scheduled[0].num_computed_tokens == 3
    assert out.scheduled[1].token_ids == list(range(10, 17)) and out.scheduled[1].num_computed_tokens == 0
    updates = run(sched, out, {"a": 51})
    assert [(u.request.request_id, u.new_token_ids) for u in updates] == [("a", [51])]

    out = sched.schedule()
    assert plan(out) == [("a", 1, True), ("b", 3, True)]
    assert out.scheduled[1].token_ids == [17, 18, 19] and out.scheduled[1].num_computed_tokens == 7
    # a's decode crossed into a new block (3) just before b's chunk needed its third one (4).
    assert [s.block_ids for s in out.scheduled] == [[0, 3], [1, 2, 4]]
    run(sched, out)
    assert b.output_token_ids == [100]


def test_long_prefill_token_threshold_caps_chunks() -> None:
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=4)
    sched.add_request(make_request("a", list(range(10))))
    sched.add_request(make_request("b", list(range(20, 23))))
    out = sched.schedule()
    assert plan(out) == [("a", 4, False), ("b", 3, True)]
    run(sched, out)
    assert plan(sched.schedule()) == [("a", 4, False), ("b", 1, True)]


def test_max_num_seqs_and_finished_ids() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for rid in ("a", "b", "c"):
        sched.add_request(make_request(rid, [1, 2], max_tokens=1 if rid == "a" else 4))
    out = sched.schedule()
    assert plan(out) == [("a", 2, True), ("b", 2, True)]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    updates = run(sched, out)
    assert [(u.request.request_id, u.finished) for u in updates] == [("a", True), ("b", False)]
    assert sched.get_request("a") is None
    out = sched.schedule()
    assert plan(out) == [("b", 1, True), ("c", 2, True)]
    assert out.finished_request_ids == ["a"]
    assert sched.schedule().finished_request_ids == []  # reported once


def test_fcfs_head_that_does_not_fit_blocks_admission() -> None:
    sched = make_scheduler(num_blocks=4)
    sched.add_request(make_request("a", list(range(8)), max_tokens=4))  # 2 blocks now
    sched.add_request(make_request("b", list(range(20, 32)), max_tokens=1))  # needs 3 blocks
    sched.add_request(make_request("c", [40, 41], max_tokens=1))  # would fit, but comes after b
    out = sched.schedule()
    assert plan(out) == [("a", 8, True)]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert sched.num_free_blocks() == 2


def test_preemption_by_recompute() -> None:
    # block_size 2, 4 blocks, no prefix caching: exact, deterministic block ids.
    sched = make_scheduler(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3], max_tokens=4)
    b = make_request("b", [4, 5, 6], max_tokens=4)
    c = make_request("c", [7, 8], max_tokens=1)
    for r in (a, b, c):
        sched.add_request(r)

    out = sched.schedule()  # a and b take all 4 blocks; c does not fit
    assert plan(out) == [("a", 3, True), ("b", 3, True)]
    assert [s.block_ids for s in out.scheduled] == [[0, 1], [2, 3]]
    run(sched, out, {"a": 10, "b": 20})
    out = sched.schedule()  # position 3 still fits in each one's second block
    assert plan(out) == [("a", 1, True), ("b", 1, True)]
    run(sched, out, {"a": 11, "b": 21})

    # a needs a third block: the newest running request (b) is preempted and goes to the front.
    out = sched.schedule()
    assert plan(out) == [("a", 1, True)]
    assert out.scheduled[0].block_ids == [0, 1, 3]  # b freed 3 then 2; 2 is left free
    assert out.preempted_request_ids == ["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert sched.get_request("b") is b
    run(sched, out, {"a": 12})

    out = sched.schedule()  # b needs 3 blocks to recompute, 1 is free: it waits, and so does c
    assert plan(out) == [("a", 1, True)] and out.preempted_request_ids == []
    updates = run(sched, out, {"a": 13})
    assert updates[0].finished and a.status is RequestStatus.FINISHED_LENGTH

    # b recomputes prompt + outputs so far from position 0; c fits in the last block.
    out = sched.schedule()
    assert plan(out) == [("b", 5, True), ("c", 2, True)]
    assert out.scheduled[0].token_ids == [4, 5, 6, 20, 21] and out.scheduled[0].num_computed_tokens == 0
    assert [s.block_ids for s in out.scheduled] == [[2, 3, 1], [0]]
    assert out.finished_request_ids == ["a"]
    assert b.status is RequestStatus.RUNNING
    run(sched, out, {"b": 22, "c": 30})
    assert b.output_token_ids == [20, 21, 22]
    sched.abort_requests(["b"])
    assert sched.num_free_blocks() == 4 and not sched.has_unfinished_requests()


def test_last_running_request_preempts_itself() -> None:
    sched = make_scheduler(num_blocks=5, block_size=2, enable_prefix_caching=False)
    a, b = make_request("a", [1, 2, 3]), make_request("b", [4, 5, 6])
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(2):  # prefill, then position 3; 1 block stays free
        run(sched, sched.schedule())
    out = sched.schedule()  # a takes the free block; b can only preempt itself
    assert plan(out) == [("a", 1, True)]
    assert out.preempted_request_ids == ["b"]
    assert list(sched.waiting) == [b] and sched.running == [a]
    run(sched, out)
    sched.abort_requests(["a", "b"])
    assert sched.num_free_blocks() == 5


def test_shared_prompt_prefix_is_computed_once() -> None:
    sched = make_scheduler()
    prompt = list(range(16))
    a = make_request("a", prompt)
    sched.add_request(a)
    out = sched.schedule()
    assert plan(out) == [("a", 16, True)]
    run(sched, out)

    b = make_request("b", prompt[:12] + [90, 91, 92, 93])
    sched.add_request(b)
    out = sched.schedule()
    assert plan(out) == [("a", 1, True), ("b", 4, True)]  # b computes only its 4 new tokens
    assert out.scheduled[1].num_computed_tokens == 12 and out.scheduled[1].token_ids == [90, 91, 92, 93]
    assert out.scheduled[1].block_ids[:3] == out.scheduled[0].block_ids[:3] == [0, 1, 2]
    assert b.num_cached_tokens == 12
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (16 + 16, 12)


def test_same_prompt_in_one_step_hits_blocks_being_computed() -> None:
    sched = make_scheduler()
    prompt = list(range(10))
    sched.add_request(make_request("a", prompt))
    sched.add_request(make_request("b", prompt))
    out = sched.schedule()
    # b hits a's 2 full blocks, registered when a was allocated earlier in this same step.
    assert plan(out) == [("a", 10, True), ("b", 2, True)]
    assert [s.block_ids for s in out.scheduled] == [[0, 1, 2], [0, 1, 3]]
    assert out.scheduled[1].num_computed_tokens == 8


def test_n_siblings_share_prompt_blocks_without_prefix_caching() -> None:
    sched = make_scheduler(enable_prefix_caching=False)
    prompt = list(range(9))
    for rid, salt in (("s1", "group"), ("s2", "group"), ("plain", None)):
        sched.add_request(make_request(rid, prompt, cache_salt=salt))
    out = sched.schedule()
    assert plan(out) == [("s1", 9, True), ("s2", 1, True), ("plain", 9, True)]
    assert [s.block_ids for s in out.scheduled] == [[0, 1, 2], [0, 1, 3], [4, 5, 6]]
    run(sched, out)
    sched.abort_requests(["s1", "s2", "plain"])
    assert sched.num_free_blocks() == 16


def test_abort_frees_blocks_and_is_reported() -> None:
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", list(range(6))), make_request("b", list(range(6)))
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert plan(out) == [("a", 6, True)] and sched.num_waiting == 1
    # Aborted after scheduling, before update: its sampled token is dropped.
    ended = sched.abort_requests(["a", "b", "unknown"])
    assert ended == [a, b] and a.status is b.status is RequestStatus.FINISHED_ABORTED
    assert run(sched, out) == [] and a.output_token_ids == []
    assert sched.abort_requests("a") == []  # already finished: ignored
    assert sched.num_free_blocks() == 16 and sched.kv_cache_usage == 0.0
    assert not sched.has_unfinished_requests()
    out = sched.schedule()
    assert out.is_empty and out.finished_request_ids == ["a", "b"]


def drive(sched: Scheduler, request: Request, tokens: list[int]) -> Request:
    """Runs one request alone, feeding it `tokens` one per sample until it finishes."""
    sched.add_request(request)
    feed = iter(tokens)
    while sched.has_unfinished_requests():
        run(sched, sched.schedule(), {request.request_id: next(feed)})
    assert sched.num_free_blocks() == 16
    return request


@pytest.mark.parametrize(
    ("kwargs", "tokens", "outputs", "status", "stop_reason"),
    [
        (dict(eos_token_id=2), [5, 2, 7], [5, 2], RequestStatus.FINISHED_STOPPED, None),
        (
            dict(eos_token_id=2, ignore_eos=True, max_tokens=3),
            [5, 2, 7],
            [5, 2, 7],
            RequestStatus.FINISHED_LENGTH,
            None,
        ),
        (dict(eos_token_id=2, min_tokens=2), [2, 2, 2], [2, 2, 2], RequestStatus.FINISHED_STOPPED, None),
        (dict(stop_token_ids=[9]), [5, 9, 7], [5, 9], RequestStatus.FINISHED_STOPPED, 9),
        (dict(stop_token_ids=[9], min_tokens=1), [9, 9], [9, 9], RequestStatus.FINISHED_STOPPED, 9),
        (dict(max_tokens=2), [5, 6, 7], [5, 6], RequestStatus.FINISHED_LENGTH, None),
        # A stop token on the last allowed token is a stop, not a length finish.
        (dict(eos_token_id=2, max_tokens=2), [5, 2], [5, 2], RequestStatus.FINISHED_STOPPED, None),
    ],
)
def test_stop_conditions(
    kwargs: dict, tokens: list[int], outputs: list[int], status: RequestStatus, stop_reason
):
    request = drive(make_scheduler(), make_request("r", [1, 2, 3], **kwargs), tokens)
    assert request.output_token_ids == outputs
    assert request.status is status and request.stop_reason == stop_reason


def test_max_model_len_stops() -> None:
    # max_tokens (normally resolved by the engine to fit) is left too large on purpose.
    request = drive(make_scheduler(max_model_len=6), make_request("r", [1, 2, 3, 4], max_tokens=10), [5] * 10)
    assert request.output_token_ids == [5, 5] and request.status is RequestStatus.FINISHED_LENGTH


def test_update_carries_logprobs() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("r", [1, 2], logprobs=1))
    out = sched.schedule()
    lp = TokenLogprobs(token_id=7, logprob=-0.5, rank=1, top=[(7, -0.5)])
    (update,) = sched.update(out, RunnerOutput(sampled_token_ids=[7], logprobs=[lp]))
    assert update.new_token_ids == [7] and update.new_logprobs == [lp] and not update.finished


def test_add_request_rejects_impossible_requests() -> None:
    sched = make_scheduler(max_model_len=16, num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="prompt has 16 tokens.*max_model_len\\) is 16"):
        sched.add_request(make_request("long", list(range(16)), max_tokens=1))
    with pytest.raises(ValueError, match="needs up to 9 tokens of KV cache.*2 blocks x 4 tokens = 8"):
        sched.add_request(make_request("big", list(range(6)), max_tokens=4))
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(make_request("empty", []))
    sched.add_request(make_request("ok", list(range(6)), max_tokens=3))  # 8 tokens of KV: fits
    with pytest.raises(ValueError, match="already"):
        sched.add_request(make_request("ok", [1]))
    with pytest.raises(ValueError, match="max_num_seqs"):
        make_scheduler(max_num_seqs=0)


def check_invariants(sched: Scheduler) -> None:
    """Ref counts equal the number of block tables holding each block; free blocks are exactly the
    blocks at ref 0."""
    pool = sched.kv_cache.pool
    holders = [0] * pool.num_blocks
    for request in sched.running:
        for block_id in sched.kv_cache.get_block_ids(request.request_id):
            holders[block_id] += 1
    assert [b.ref_cnt for b in pool.blocks] == holders
    assert sorted(pool.free_block_ids()) == [i for i, n in enumerate(holders) if n == 0]


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_workload_reads_only_correct_kv(seed: int, enable_prefix_caching: bool) -> None:
    """A fake runner writes, per step, each new token's "K/V" (its whole prefix) into its slot, then
    checks every scheduled request sees exactly its own prefix in all its slots: no shared block,
    preemption or reuse may ever hand a request wrong K/V."""
    import random

    rng = random.Random(seed)
    bs = 4
    sched = make_scheduler(
        max_num_seqs=rng.choice([2, 4, 8]),
        max_num_batched_tokens=rng.choice([5, 16, 64]),
        num_blocks=8,
        block_size=bs,
        enable_prefix_caching=enable_prefix_caching,
        long_prefill_token_threshold=rng.choice([None, 6]),
    )
    slots: dict[int, tuple[int, ...]] = {}
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    next_id = 0
    for _step in range(300):
        if rng.random() < 0.3:
            prompt = rng.choice(prefixes)[: rng.randrange(1, 12)] + [
                rng.randrange(3) for _ in range(rng.randrange(3))
            ]
            n = rng.choice([1, 1, 2, 3])
            for _ in range(n):  # n > 1 siblings share a salt
                sched.add_request(
                    make_request(
                        f"r{next_id}",
                        prompt,
                        max_tokens=rng.randrange(1, 20),
                        eos_token_id=0,
                        cache_salt=f"g{next_id // 100}" if n > 1 else None,
                    )
                )
                next_id += 1
        if rng.random() < 0.05 and sched.requests:
            sched.abort_requests([rng.choice(list(sched.requests))])
        out = sched.schedule()
        for s in out.scheduled:  # write all new K/V first, as each layer does for the batch
            request = sched.get_request(s.request_id)
            for i in range(len(s.token_ids)):
                pos = s.num_computed_tokens + i
                slots[s.block_ids[pos // bs] * bs + pos % bs] = tuple(request.all_token_ids[: pos + 1])
        for s in out.scheduled:  # then attend: every position up to seq_len must be this prefix
            request = sched.get_request(s.request_id)
            for pos in range(s.seq_len):
                assert slots.get(s.block_ids[pos // bs] * bs + pos % bs) == tuple(
                    request.all_token_ids[: pos + 1]
                )
        run(sched, out, default=0 if rng.random() < 0.05 else rng.randrange(1, 3))
        check_invariants(sched)
    while sched.has_unfinished_requests():
        run(sched, sched.schedule(), default=1)
    assert sched.num_free_blocks() == 8
    assert all(b.ref_cnt == 0 for b in sched.kv_cache.pool.blocks)


# ---- async scheduling: schedule() again before update() of the step in flight ----------------------


def test_async_schedule_uses_placeholders_until_the_update_arrives() -> None:
    from pagedserve.core.outputs import PLACEHOLDER_TOKEN_ID

    sched = make_scheduler()
    a = make_request("a", [1, 2, 3], max_tokens=3)
    sched.add_request(a)
    step1 = sched.schedule()  # prefill, samples output 0
    assert plan(step1) == [("a", 3, True)] and step1.scheduled[0].output_index == 0
    step2 = sched.schedule()  # step 1 still running: a decode of the token it is sampling
    assert plan(step2) == [("a", 1, True)]
    assert step2.scheduled[0].token_ids == [PLACEHOLDER_TOKEN_ID]
    assert step2.scheduled[0].num_computed_tokens == 3 and step2.scheduled[0].output_index == 1
    assert a.num_output_placeholders == 2
    run(sched, step1, {"a": 10})
    assert a.output_token_ids == [10] and a.num_output_placeholders == 1
    # Output 2 (index 2) is the last one max_tokens allows: scheduled; after it, nothing more.
    step3 = sched.schedule()
    assert plan(step3) == [("a", 1, True)] and step3.scheduled[0].token_ids == [PLACEHOLDER_TOKEN_ID]
    assert step3.scheduled[0].output_index == 2
    assert sched.schedule().is_empty  # output 3 would pass max_tokens: not computed for nothing
    run(sched, step2, {"a": 11})
    updates = run(sched, step3, {"a": 12})
    assert a.output_token_ids == [10, 11, 12] and updates[0].finished
    assert a.status is RequestStatus.FINISHED_LENGTH and sched.num_free_blocks() == 16


def test_async_step_past_a_stop_is_dropped_and_frees_blocks() -> None:
    sched = make_scheduler()
    a = make_request("a", [1, 2, 3], max_tokens=8, eos_token_id=2)
    sched.add_request(a)
    step1 = sched.schedule()
    step2 = sched.schedule()  # computes past the eos step 1 is about to sample
    updates = run(sched, step1, {"a": 2})
    assert updates[0].finished and a.status is RequestStatus.FINISHED_STOPPED
    assert run(sched, step2, {"a": 50}) == []  # the extra token is dropped
    assert a.output_token_ids == [2] and sched.num_free_blocks() == 16
    assert not sched.has_unfinished_requests()


def test_async_preempted_request_keeps_its_token_in_flight() -> None:
    # Two requests, 3 blocks of 4: b is preempted while its sampled token is still in flight.
    sched = make_scheduler(num_blocks=3, max_num_batched_tokens=64)
    a = make_request("a", [1, 2, 3], max_tokens=6, ignore_eos=True)
    b = make_request("b", [5, 6, 7], max_tokens=6, ignore_eos=True)
    sched.add_request(a)
    sched.add_request(b)
    step1 = sched.schedule()
    assert plan(step1) == [("a", 3, True), ("b", 3, True)]
    step2 = sched.schedule()  # decodes at position 3: both still fit their first block
    run(sched, step1, {"a": 20, "b": 30})
    step3 = sched.schedule()  # position 4 needs a second block each: only one is free -> b preempted
    assert step3.preempted_request_ids == ["b"] and plan(step3) == [("a", 1, True)]
    assert b.status is RequestStatus.PREEMPTED and b.num_output_placeholders == 1
    run(sched, step2, {"a": 21, "b": 31})  # b's token arrives after its preemption: kept
    assert b.output_token_ids == [30, 31] and b.num_output_placeholders == 0
    run(sched, step3, {"a": 22})
    assert a.output_token_ids == [20, 21, 22]
    # Later b recomputes prompt + both outputs from the cache's point of view, then goes on.
    while sched.has_unfinished_requests():
        out = sched.schedule()
        run(sched, out, default=40)
    assert a.output_token_ids[:3] == [20, 21, 22] and len(a.output_token_ids) == 6
    assert b.output_token_ids[:2] == [30, 31] and len(b.output_token_ids) == 6
    assert sched.num_free_blocks() == 3


def _prioritized(request_id: str, prompt: list[int], priority: int, arrival: float, max_tokens: int = 4) -> Request:
    request = make_request(request_id, prompt, max_tokens=max_tokens)
    request.priority, request.arrival_time = priority, arrival
    return request


def test_priority_policy_admits_by_priority_then_arrival() -> None:
    """max_num_seqs 2: of five waiting requests the two lowest priorities run first (ties: earlier arrival); with
    fcfs the same requests run in arrival order."""
    specs = [("a", 5, 1.0), ("b", 1, 2.0), ("c", 3, 3.0), ("d", 1, 4.0), ("e", -2, 5.0)]
    order = {}
    for policy in ("priority", "fcfs"):
        sched = make_scheduler(max_num_seqs=2, policy=policy)
        for rid, priority, arrival in specs:
            sched.add_request(_prioritized(rid, [1, 2, 3], priority, arrival, max_tokens=1))
        admitted = []
        while sched.has_unfinished_requests():
            out = sched.schedule()
            admitted += [s.request_id for s in out.scheduled]
            run(sched, out)
        order[policy] = admitted
    assert order["priority"] == ["e", "b", "d", "c", "a"]
    assert order["fcfs"] == ["a", "b", "c", "d", "e"]


def test_priority_policy_preempts_the_lowest_priority_request() -> None:
    """Three running requests fill the cache; when the highest-priority one needs a block, the lowest-priority one
    (b: priority 9, though not the newest) is preempted, and it goes back to the queue behind a waiting request of
    higher priority. With fcfs the newest (c) would be."""
    for policy, victim in (("priority", "b"), ("fcfs", "c")):
        sched = make_scheduler(num_blocks=6, block_size=2, enable_prefix_caching=False, policy=policy)
        a, b, c = (_prioritized("a", [1, 2, 3], 0, 1.0, 8), _prioritized("b", [4, 5, 6], 9, 2.0, 8),
                   _prioritized("c", [7, 8, 9], 1, 3.0, 8))
        for r in (a, b, c):
            sched.add_request(r)
        out = sched.schedule()
        assert sorted(s.request_id for s in out.scheduled) == ["a", "b", "c"]
        run(sched, out)
        run(sched, sched.schedule())  # position 3: still in each one's second block
        d = _prioritized("d", [9, 9], 5, 4.0, 1)
        sched.add_request(d)
        out = sched.schedule()  # a needs a third block: none free
        assert out.preempted_request_ids == [victim]
        assert sched.get_request(victim).status is RequestStatus.PREEMPTED
        queue = [r.request_id for r in sched.waiting]
        assert queue == (["d", "b"] if policy == "priority" else ["c", "d"])
        run(sched, out)
        sched.abort_requests(["a", "b", "c", "d"])
        assert sched.num_free_blocks() == 6


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy must be 'fcfs' or 'priority'"):
        make_scheduler(policy="lifo")


def test_hybrid_capacity_counts_the_window_groups() -> None:
    """A hybrid model's request holds its tokens in the full-attention group and up to the window (plus a step's
    budget and a block of slack at either end) in each window group, all from one pool: 40 blocks of 4 with two
    window groups of window 6 and an 8-token budget (22 tokens, 6 blocks each) hold one request of 112 tokens."""
    from pagedserve.core.scheduler import request_capacity_tokens

    assert request_capacity_tokens(40, 4) == 160
    assert request_capacity_tokens(40, 4, 2, 22) == (40 - 2 * 6) * 4
    assert request_capacity_tokens(12, 4, 2, 22) == 4 * 4  # short of the windows: every group the same
    s = make_scheduler(num_blocks=40, max_num_batched_tokens=8, max_model_len=128, hybrid_window=6,
                       num_window_groups=2)
    assert s.request_capacity == 112
    s.add_request(make_request("fits", list(range(20)), max_tokens=93))  # 112 tokens of KV
    with pytest.raises(ValueError, match="more than the whole cache holds .112 tokens: 40 blocks of 4 tokens"):
        s.add_request(make_request("long", list(range(20)), max_tokens=94))
    # it runs to the end (a decode's blocks come from the same pool), holding its window in both window groups
    request = s.get_request("fits")
    while s.has_unfinished_requests():
        out = s.schedule()
        s.update(out, RunnerOutput(sampled_token_ids=[5] * len(out.scheduled), logprobs=[]))
        assert s.kv_cache.num_free_blocks >= 0
    assert request.num_output_tokens == 93 and s.kv_cache.num_free_blocks == 40


def test_kv_occupancy_counts_the_empty_tail_of_each_last_block_and_shared_blocks_once() -> None:
    sched = make_scheduler()  # blocks of 4 tokens
    sched.add_request(make_request("a", [1, 2, 3, 4, 5]))  # 2 blocks, 3 slots empty after its prefill
    sched.add_request(make_request("b", [9, 9, 9, 9, 9, 9, 9, 9]))  # 2 full blocks
    out = sched.schedule()
    assert sched.kv_occupancy() == (16, 3)
    run(sched, out)
    out = sched.schedule()  # a decode each: a's 6th token fills its last block further, b's 9th takes a new one
    assert sched.kv_occupancy() == (20, 2 + 3)
    run(sched, out)
    # A request sharing a's first (full, cached) block: counted once in the slots held
    sched.add_request(make_request("c", [1, 2, 3, 4, 7]))
    sched.schedule()  # a's 7th token, b's 10th, c's prefill past the hit
    held, empty = sched.kv_occupancy()
    assert held == 20 + 4 and empty == 1 + 2 + 3  # c: its own second block only, 3 of its slots empty
    assert sched.kv_cache.num_blocks - sched.num_free_blocks() == 6


def test_kv_occupancy_of_a_hybrid_layout_counts_every_groups_tail() -> None:
    """A hybrid model (one window group, window 6, blocks of 4): the full group's and the window group's blocks both
    count as held, and each group's last block's unfilled tail as empty; the window group gives back the blocks behind
    its window. After the 10-token prefill: 3 full blocks (2 slots empty) + 3 window blocks (2 empty) = (24, 4); with
    token 11 the window's first block goes: 3 + 2 blocks, 1 + 1 empty = (20, 2); with 12: (20, 0); 13 takes a new
    block in each group: 4 + 3 blocks, 3 + 3 empty = (28, 6); ..."""
    sched = make_scheduler(hybrid_window=6, num_window_groups=1, num_blocks=40)
    sched.add_request(make_request("a", list(range(1, 11)), max_tokens=20))
    seen = []
    for _ in range(8):
        out = sched.schedule()
        seen.append(sched.kv_occupancy())
        run(sched, out)
    assert seen == [(24, 4), (20, 2), (20, 0), (28, 6), (24, 4), (24, 2), (24, 0), (32, 6)]
