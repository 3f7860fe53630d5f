"""DataParallelBackend's routing, accounting and merging against fake replicas (the real thing, two engine
processes behind a server, is tests/entrypoints/test_server_dp.py)."""

from __future__ import annotations

import argparse

import pytest

from pagedserve.config import EngineConfig
from pagedserve.data_parallel import DataParallelBackend, merge_stats, replica_devices
from pagedserve.engine_core import AbortRequests, AddRequest, EngineCall, Refusal, Stop
from pagedserve.sampling_params import SamplingParams


class FakeReplica:
    def __init__(self, index: int, env: dict, fail: bool = False) -> None:
        self.index, self.env, self.fail = index, env, fail
        self.submitted: list = []
        self.forgotten: list = []
        self.stopped = False
        self.info = None
        self.post = None

    def wait_ready(self) -> None:
        if self.fail:
            raise ValueError(f"replica {self.index} refused its config")
        self.info = {"model_name": "m", "max_model_len": 64, "vocab_size": 10, "tokenizer": None,
                     "stats": stats(running=0, total=10 + self.index, free=10 + self.index)}

    def start(self, post) -> None:
        self.post = post

    def submit(self, item) -> None:
        self.submitted.append(item)

    def decode(self, deltas):
        return [("decoded by", self.index, d) for d in deltas]

    def forget(self, ids) -> None:
        self.forgotten.extend(ids)

    def stop(self, timeout: float) -> None:
        self.stopped = True


def stats(running: int = 0, total: int = 10, free: int = 10, gen: int = 0, **extra) -> dict:
    return {"num_running": running, "num_waiting": 0, "kv_cache_usage": 1 - free / total, "num_free_blocks": free,
            "num_total_blocks": total, "prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0,
            "prompt_tokens_total": 0, "generation_tokens_total": gen, "kernel_compiles_while_serving": 0, **extra}


def make(n: int = 2, fail: set[int] = frozenset(), monkeypatch=None, visible: str | None = None):
    import os

    replicas: list[FakeReplica] = []

    def factory(config):
        replicas.append(FakeReplica(len(replicas), dict(os.environ), fail=len(replicas) in fail))
        return replicas[-1]

    backend = DataParallelBackend(EngineConfig(data_parallel_size=n, tensor_parallel_size=2), factory,
                                  cuda=visible is not None)
    return backend, replicas


def add(rid: str) -> AddRequest:
    return AddRequest(rid, [1, 2, 3], SamplingParams(max_tokens=2), 0.0, None)


def delta(rid: str, finished: bool) -> tuple:
    return (rid, None, None, finished, 0, None, [], None, None)


def started(n: int = 2):
    backend, replicas = make(n)
    backend.wait_ready()
    posted: list = []
    backend.start(lambda *args: posted.append(args))
    return backend, replicas, posted


def test_requests_go_to_the_least_loaded_replica_in_turn() -> None:
    backend, replicas, posted = started(3)
    for i in range(6):
        backend.submit(add(f"r{i}"))
    assert [[x.request_id for x in r.submitted] for r in replicas] == [["r0", "r3"], ["r1", "r4"], ["r2", "r5"]]
    assert backend.loads == [2, 2, 2]
    # r1 finishes on replica 1, r5 is refused by replica 2: those two now have room, and take the next two.
    replicas[1].post("out", [], [delta("r1", True)], stats())
    replicas[2].post("out", [("r5", Refusal("queue_full", "full", 1))], [], stats())
    assert backend.loads == [2, 1, 1]
    backend.submit(add("r6"))
    backend.submit(add("r7"))
    assert backend.loads == [2, 2, 2]
    assert replicas[1].submitted[-1].request_id == "r6" and replicas[2].submitted[-1].request_id == "r7"
    # An unfinished delta keeps the load; the delta reaches the server tagged with its replica, decoded by it.
    replicas[0].post("out", [("r0", None)], [delta("r0", False)], stats())
    kind, acks, outputs, _ = posted[-1]
    assert (kind, acks, outputs) == ("out", [("r0", None)], (replicas[0], [delta("r0", False)]))
    assert backend.decode(outputs) == [("decoded by", 0, delta("r0", False))]
    assert backend.loads == [2, 2, 2]


def test_aborts_go_to_each_request_s_replica_and_free_its_load() -> None:
    backend, replicas, _ = started(2)
    for i in range(4):
        backend.submit(add(f"r{i}"))
    backend.forget(["r0", "r1", "zz"])
    backend.submit(AbortRequests(["r0", "r1", "r3", "unknown"]))
    assert [x.request_ids for x in replicas[0].submitted if isinstance(x, AbortRequests)] == [["r0"]]
    assert [x.request_ids for x in replicas[1].submitted if isinstance(x, AbortRequests)] == [["r1", "r3"]]
    assert backend.loads == [1, 0]
    assert all(r.forgotten == ["r0", "r1", "zz"] for r in replicas)
    # A late finished delta of an aborted request does not free the load twice.
    replicas[1].post("out", [], [delta("r3", True)], stats())
    assert backend.loads == [1, 0]


def test_control_messages_reach_every_replica_and_are_acked_once_all_answered() -> None:
    backend, replicas, posted = started(3)
    backend.submit(EngineCall("t1", "reset_prefix_cache"))
    assert all(isinstance(r.submitted[-1], EngineCall) for r in replicas)
    replicas[0].post("out", [("t1", None)], [], stats())
    replicas[2].post("out", [("t1", None)], [], stats())
    assert all(p[1] == [] for p in posted)  # held back
    replicas[1].post("out", [("t1", None)], [], stats())
    assert posted[-1][1] == [("t1", None)]
    backend.submit(EngineCall("t2", "reset_prefix_cache"))
    no = Refusal("invalid", "busy")
    for i, refusal in ((0, None), (1, no), (2, None)):
        replicas[i].post("out", [("t2", refusal)], [], stats())
    assert posted[-1][1] == [("t2", no)]
    assert backend.loads == [0, 0, 0]
    backend.submit(Stop())
    assert all(isinstance(r.submitted[-1], Stop) for r in replicas)


def test_stats_are_merged_and_kept_per_replica() -> None:
    backend, replicas, posted = started(2)
    assert backend.info["stats"]["num_total_blocks"] == 21 and len(backend.info["stats"]["data_parallel"]) == 2
    replicas[0].post("out", [], [], stats(running=3, total=10, free=2, gen=7))
    replicas[1].post("out", [], [], stats(running=1, total=30, free=30, gen=5))
    merged = posted[-1][3]
    assert (merged["num_running"], merged["num_total_blocks"], merged["num_free_blocks"]) == (4, 40, 32)
    assert merged["generation_tokens_total"] == 12
    assert merged["kv_cache_usage"] == pytest.approx(8 / 40)
    assert [s["generation_tokens_total"] for s in merged["data_parallel"]] == [7, 5]


def test_merge_stats_sums_drafting_counters_and_unites_adapter_names() -> None:
    a = stats(running_lora_adapters=["x"], waiting_lora_adapters=[], max_loras=4,
              spec_decode={"num_drafts": 2, "num_draft_tokens": 8, "num_accepted_tokens": 6,
                           "accepted_per_position": [2, 2, 1, 1]})
    b = stats(running_lora_adapters=["y", "x"], waiting_lora_adapters=["z"], max_loras=4,
              spec_decode={"num_drafts": 2, "num_draft_tokens": 4, "num_accepted_tokens": 0,
                           "accepted_per_position": [0, 0]})
    m = merge_stats([a, b])
    assert m["running_lora_adapters"] == ["x", "y"] and m["waiting_lora_adapters"] == ["z"]
    spec = m["spec_decode"]
    assert (spec["num_drafts"], spec["num_draft_tokens"], spec["num_accepted_tokens"]) == (4, 12, 6)
    assert spec["acceptance_rate"] == pytest.approx(0.5) and spec["mean_acceptance_length"] == pytest.approx(2.5)
    assert spec["accepted_per_position"] == [2, 2, 1, 1]


def wait_for(condition, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_dead_replica_fails_its_requests_only_and_comes_back(monkeypatch) -> None:
    import threading

    from pagedserve.async_engine import EngineUnavailableError

    backend, replicas, posted = started(2)
    hold = threading.Event()
    real_spawn = backend._spawn
    monkeypatch.setattr(backend, "_spawn", lambda i: hold.wait(5) and real_spawn(i))
    for i in range(4):
        backend.submit(add(f"r{i}"))  # r0, r2 on replica 0; r1, r3 on replica 1
    backend.submit(EngineCall("t", "reset_prefix_cache"))
    replicas[0].post("out", [("t", None)], [], stats())
    old = replicas[1]
    old.post("dead", RuntimeError("the engine process exited (exit code -9)"))
    fail = [p for p in posted if p[0] == "fail"]
    assert len(fail) == 1 and fail[0][1] == ["r1", "r3"]
    assert isinstance(fail[0][2], EngineUnavailableError) and "replica 1 died" in str(fail[0][2])
    assert fail[0][2].code == "replica_lost"
    assert not [p for p in posted if p[0] == "dead"]
    assert posted[-1][1] == [("t", None)]  # the reset waited only for the replica that is gone
    assert posted[-1][3]["data_parallel_replicas_up"] == 1
    backend.submit(add("r4"))
    backend.submit(add("r5"))
    assert [x.request_id for x in replicas[0].submitted if isinstance(x, AddRequest)] == ["r0", "r2", "r4", "r5"]
    backend.submit(AbortRequests(["r3"]))  # lost already: nothing to send
    assert not any(isinstance(x, AbortRequests) for x in old.submitted)
    # The restart: a third replica object for index 1, spawned and started in the background.
    hold.set()
    wait_for(lambda: len(replicas) == 3 and replicas[2].post is not None)
    assert old.stopped and backend.replicas[1] is replicas[2]
    backend.submit(add("r6"))
    assert replicas[2].submitted[-1].request_id == "r6"  # the least loaded again
    replicas[2].post("out", [], [], stats(gen=3))
    assert posted[-1][3]["data_parallel_replicas_up"] == 2
    old.post("out", [], [delta("r1", True)], stats(gen=99))  # a late message of the replaced replica: dropped
    assert posted[-1][3]["generation_tokens_total"] == 3


def test_a_replica_that_keeps_dying_stays_down_and_the_last_one_kills_the_engine(monkeypatch) -> None:
    import pagedserve.data_parallel as dp

    monkeypatch.setattr(dp, "MAX_RESTARTS", 1)
    backend, replicas, posted = started(2)
    replicas[1].post("dead", RuntimeError("first"))
    wait_for(lambda: len(replicas) == 3 and replicas[2].post is not None)
    replicas[2].post("dead", RuntimeError("second"))  # twice within the window: stays down
    assert backend.loads == [0, 0] and backend.replicas[1] is replicas[2]
    for rid in ("a", "b"):
        backend.submit(add(rid))
    assert len([x for x in replicas[0].submitted if isinstance(x, AddRequest)]) == 2
    assert not [p for p in posted if p[0] == "dead"]
    replicas[0].post("dead", RuntimeError("exit code -9"))
    replicas[0].post("dead", RuntimeError("again"))
    wait_for(lambda: len(replicas) == 4 and replicas[3].post is not None)  # replica 0 restarts (its first death)
    replicas[3].post("dead", RuntimeError("exit code 1"))
    dead = [p for p in posted if p[0] == "dead"]
    assert len(dead) == 1 and "replica 0" in str(dead[0][1]) and "exit code 1" in str(dead[0][1])


def test_while_every_replica_restarts_requests_are_refused_for_a_retry(monkeypatch) -> None:
    import threading

    backend, replicas, posted = started(2)
    hold = threading.Event()
    real_spawn = backend._spawn

    def slow_spawn(i):
        hold.wait(5)
        return real_spawn(i)

    monkeypatch.setattr(backend, "_spawn", slow_spawn)
    replicas[0].post("dead", RuntimeError("x"))
    replicas[1].post("dead", RuntimeError("y"))
    backend.submit(add("r"))
    assert posted[-1][1][0][0] == "r" and posted[-1][1][0][1].kind == "queue_full"
    assert "restarting" in posted[-1][1][0][1].message and backend.decode(posted[-1][2]) == []
    backend.submit(EngineCall("t", "reset_prefix_cache"))  # nothing cached anywhere: acknowledged at once
    assert posted[-1][1] == [("t", None)]
    hold.set()
    wait_for(lambda: backend.loads == [0, 0] and all(r.post is not None for r in backend.replicas[:2])
             and len(replicas) == 4)


def test_a_replica_that_fails_to_start_stops_the_others() -> None:
    backend, replicas = make(3, fail={1})
    with pytest.raises(ValueError, match="replica 1 refused"):
        backend.wait_ready()
    assert all(r.stopped for r in replicas)


def test_each_replica_sees_its_own_gpus() -> None:
    assert replica_devices(0, 2, None) == "0,1" and replica_devices(1, 2, None) == "2,3"
    assert replica_devices(1, 1, "4,5,6") == "5" and replica_devices(1, 2, "3, 7,1,2") == "1,2"
    _, replicas = make(2, visible="")
    assert [r.env["CUDA_VISIBLE_DEVICES"] for r in replicas] == ["0,1", "2,3"]


def test_configuration_errors() -> None:
    from pagedserve.entrypoints.openai.cli_serve import add_serve_args, serve_config_from_args
    from pagedserve.executor.tp_worker import cpu_threads

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="data_parallel_size"):
            EngineConfig(data_parallel_size=bad)
    with pytest.raises(ValueError, match="needs data_parallel_size >= 2"):
        DataParallelBackend(EngineConfig(), lambda c: None, cuda=False)
    parser = add_serve_args(argparse.ArgumentParser())
    args = parser.parse_args(["m", "-dp", "2", "--no-engine-process"])
    with pytest.raises(ValueError, match="--no-engine-process"):
        serve_config_from_args(args)
    config = serve_config_from_args(parser.parse_args(["m", "--data-parallel-size", "3"]))
    assert config.data_parallel_size == 3
    import os

    assert cpu_threads(EngineConfig(data_parallel_size=2, tensor_parallel_size=2)) == max(1, (os.cpu_count() or 1) // 4)


def test_llm_refuses_data_parallelism() -> None:
    from pagedserve.entrypoints.llm import LLM

    with pytest.raises(ValueError, match="--data-parallel-size"):
        LLM("unused", data_parallel_size=2)


def test_cache_aware_routing_follows_prompt_prefixes_within_the_load_slack() -> None:
    backend, replicas, posted = started(2)  # block_size 16 (EngineConfig's default)
    system = list(range(100, 148))  # three full blocks

    def send(rid: str, prompt: list[int], salt: str | None = None) -> int:
        backend.submit(AddRequest(rid, prompt, SamplingParams(max_tokens=2), 0.0, None, cache_salt=salt))
        return next(i for i, r in enumerate(replicas) if r.submitted and r.submitted[-1].request_id == rid)

    first = send("a", system + [1, 2])
    other = 1 - first
    assert send("b", list(range(500, 540))) == other  # no shared prefix: the least loaded
    assert send("c", system + [3]) == first  # two turns of one conversation: where its blocks are
    assert send("d", system[:32] + [7] * 20) == first  # its first two blocks match
    assert send("e", system, salt="tenant-2") == other  # another salt's blocks are not shared
    # Loads now 3 / 2: while the matching replica is at most 2 above the least loaded, it wins; beyond, the least
    # loaded takes the request.
    assert send("f", system) == first and backend.loads == [4, 2][::1 if first == 0 else -1]
    assert send("g", system) == first  # 4 <= 2 + 2
    assert send("h", system) == other  # 5 > 2 + 2
    # Both replicas now hold the system prompt: the equal match goes to the less loaded one.
    assert send("i", system + [9]) == other


def test_least_loaded_routing_ignores_prefixes() -> None:
    backend, replicas = make(2)
    backend.routing = "least-loaded"
    backend.wait_ready()
    backend.start(lambda *args: None)
    prompt = list(range(100, 148))
    for rid in "abcd":
        backend.submit(AddRequest(rid, prompt, SamplingParams(max_tokens=2), 0.0, None))
    assert [len(r.submitted) for r in replicas] == [2, 2]
    with pytest.raises(ValueError, match="routing"):
        DataParallelBackend(EngineConfig(data_parallel_size=2), lambda c: None, cuda=False, routing="random")


def test_a_replica_remembers_at_most_its_cache_s_blocks() -> None:
    from pagedserve.data_parallel import _ReplicaPrefixes, block_hashes

    prefixes = _ReplicaPrefixes(capacity=3)
    a, b = block_hashes(list(range(64)), 16), block_hashes(list(range(64, 96)), 16)
    assert len(a) == 4 and block_hashes(list(range(63)), 16) == a[:3]
    prefixes.add(a)
    assert prefixes.matched(a) == 0  # its first block was evicted (4 > 3): no run from the start
    prefixes.add(a[:1])
    assert prefixes.matched(a) == 1 and prefixes.matched(b) == 0
    assert block_hashes(list(range(64)), 16, root=("salt", None)) != a


def test_state_calls_need_every_replica_idle_and_a_dead_replica_refuses_its_share(monkeypatch) -> None:
    """Found by stress-testing: a sleep one busy replica refused left the idle one asleep; a load_weights whose replica
    died before answering, or sent while none was up, was acknowledged as done."""
    import threading

    backend, replicas, posted = started(2)
    backend.submit(add("r0"))  # replica 0 busy
    backend.submit(EngineCall("s", "sleep", {"level": 1}))
    assert posted[-1][1][0][0] == "s" and "unfinished" in posted[-1][1][0][1].message
    assert not any(isinstance(x, EngineCall) for r in replicas for x in r.submitted)  # none went ahead
    replicas[0].post("out", [], [delta("r0", True)], stats())
    backend.submit(EngineCall("s2", "sleep", {"level": 1}))  # idle now: sent to both
    assert all(isinstance(r.submitted[-1], EngineCall) for r in replicas)
    hold = threading.Event()
    monkeypatch.setattr(backend, "_spawn", lambda i: hold.wait(5) and None)
    replicas[0].post("out", [("s2", None)], [], stats())
    replicas[1].post("dead", RuntimeError("killed"))  # before it answered
    ack = posted[-1][1]
    assert ack[0][0] == "s2" and ack[0][1].kind == "replica_lost"
    replicas[0].post("dead", RuntimeError("killed"))  # none up now (both restarting, held)
    backend.submit(EngineCall("w", "load_weights", {"weights": "/x"}))
    assert posted[-1][1][0][0] == "w" and posted[-1][1][0][1].kind == "queue_full"
    backend.submit(EngineCall("r", "reset_prefix_cache"))  # a reset is fine: restarted caches start empty
    assert posted[-1][1] == [("r", None)]
    hold.set()


def _replays(replica) -> list:
    return [x for x in replica.submitted if isinstance(x, EngineCall)]


def test_a_restarted_replica_gets_the_state_calls_replayed_before_it_serves() -> None:
    """A replica that died after a sleep and a weight update comes back with the checkpoint's weights and awake: it
    must not serve until the same calls, in order, have been replayed to it (it served the old weights before)."""
    backend, replicas, posted = started(2)
    calls = [EngineCall("s", "sleep", {"level": 2}), EngineCall("w", "load_weights", {"weights": "/new"}),
             EngineCall("u", "wake_up", {"tags": None}), EngineCall("r", "reset_prefix_cache")]
    for call in calls:
        backend.submit(call)
        for r in replicas:
            r.post("out", [(call.token, None)], [], stats())
    replicas[1].post("dead", RuntimeError("killed"))
    wait_for(lambda: len(replicas) == 3 and _replays(replicas[2]))
    new = replicas[2]
    for k, (method, kwargs) in enumerate([("sleep", {"level": 2}), ("load_weights", {"weights": "/new"}),
                                          ("wake_up", {"tags": None})]):
        wait_for(lambda k=k: len(_replays(new)) == k + 1)
        call = _replays(new)[-1]
        assert (call.method, call.kwargs) == (method, kwargs)
        backend.submit(add(f"during{k}"))  # not routed to it while its state is replayed
        assert all(x.request_id != f"during{k}" for x in new.submitted if isinstance(x, AddRequest))
        assert backend._merged()["data_parallel_replicas_up"] == 1
        new.post("out", [(call.token, None)], [], stats())
        assert all(ack[0] != call.token for p in posted if p[0] == "out" for ack in p[1])  # not the server's
    wait_for(lambda: backend._up[1])
    assert len(_replays(new)) == 3  # the prefix-cache reset is not replayed
    backend.submit(add("after"))
    assert new.submitted[-1].request_id == "after"  # the least loaded now


def test_a_restarted_replica_whose_replay_is_refused_stays_down() -> None:
    backend, replicas, posted = started(2)
    backend.submit(EngineCall("w", "load_weights", {"weights": "/gone"}))
    for r in replicas:
        r.post("out", [("w", None)], [], stats())
    replicas[0].post("dead", RuntimeError("killed"))
    wait_for(lambda: len(replicas) == 3 and _replays(replicas[2]))
    replicas[2].post("out", [(_replays(replicas[2])[0].token, Refusal("invalid", "no folder /gone"))], [], stats())
    wait_for(lambda: replicas[2].stopped)
    assert not backend._up[0] and not backend._restarting[0]
    assert not [p for p in posted if p[0] == "dead"]  # replica 1 serves on
    backend.submit(add("x"))
    assert replicas[1].submitted[-1].request_id == "x"


def _replaying_a_sleep() -> tuple:
    """Two replicas asleep, replica 1 killed: its new process (replicas[2]) has been sent the sleep's replay."""
    backend, replicas, posted = started(2)
    backend.submit(EngineCall("s", "sleep", {"level": 1}))
    for r in replicas:
        r.post("out", [("s", None)], [], stats())
    replicas[1].post("dead", RuntimeError("killed"))
    wait_for(lambda: len(replicas) == 3 and _replays(replicas[2]))
    return backend, replicas


def test_a_restarted_replica_that_dies_during_its_replay_stays_down() -> None:
    backend, replicas = _replaying_a_sleep()
    replicas[2].post("dead", RuntimeError("killed again"))  # before answering its replay
    wait_for(lambda: replicas[2].stopped)
    assert not backend._up[1]


def test_a_restarted_replica_that_dies_while_waiting_for_a_call_in_flight_stays_down() -> None:
    """Its replay waits while a state call is in flight (it would miss it); a death meanwhile ends the wait."""
    backend, replicas = _replaying_a_sleep()
    backend.submit(EngineCall("u", "wake_up", {}))  # in flight at replica 0: the replay waits for it after the sleep
    replicas[2].post("out", [(_replays(replicas[2])[0].token, None)], [], stats())
    replicas[2].post("dead", RuntimeError("killed while waiting"))
    wait_for(lambda: replicas[2].stopped)
    assert not backend._up[1] and not backend._restarting[1]


def test_a_call_that_succeeds_during_a_replay_is_replayed_too() -> None:
    backend, replicas = _replaying_a_sleep()
    backend.submit(EngineCall("u", "wake_up", {}))  # replica 0 alone (replica 1 is not up yet)
    assert _replays(replicas[0])[-1].token == "u" and len(_replays(replicas[2])) == 1
    replicas[2].post("out", [(_replays(replicas[2])[0].token, None)], [], stats())  # the sleep replayed
    replicas[0].post("out", [("u", None)], [], stats())
    wait_for(lambda: len(_replays(replicas[2])) == 2)
    assert _replays(replicas[2])[1].method == "wake_up"
    replicas[2].post("out", [(_replays(replicas[2])[1].token, None)], [], stats())
    wait_for(lambda: backend._up[1])


def test_weights_from_a_trainer_are_refused_with_data_parallelism() -> None:
    backend, replicas, posted = started(2)
    for method in ("init_weights_update_group", "update_weights_from_distributed"):
        backend.submit(EngineCall("t", method, {}))
        assert posted[-1][1][0][0] == "t" and posted[-1][1][0][1].kind == "invalid"
        assert "data-parallel" in posted[-1][1][0][1].message
    assert not any(_replays(r) for r in replicas)


def test_a_replica_that_dies_while_the_server_drains_is_not_restarted() -> None:
    """After the server's graceful shutdown began (AsyncEngine.begin_shutdown -> the backend's), a replica that dies
    fails its requests and stays down: restarting it would load a whole model for nothing."""
    import time

    backend, replicas, posted = started(2)
    backend.submit(add("r0"))
    backend.submit(add("r1"))  # on replica 1
    backend.begin_shutdown()
    replicas[1].post("dead", RuntimeError("the engine process exited (exit code -9)"))
    fail = [p for p in posted if p[0] == "fail"]
    assert len(fail) == 1 and fail[0][1] == ["r1"]
    time.sleep(0.5)
    assert len(replicas) == 2  # nothing spawned
    assert not [p for p in posted if p[0] == "dead"]  # replica 0 still serves the drain
    replicas[0].post("out", [], [delta("r0", True)], stats())
    assert backend.loads == [0, 0]
