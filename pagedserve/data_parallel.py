"""Data parallelism: N whole replicas of the engine behind one server (vLLM's --data-parallel-size).

    AsyncEngine ── submit ──► DataParallelBackend ──► replica 0: ProcessBackend ─► engine process (GPUs 0..tp-1)
                                     │ routes        ──► replica 1: ProcessBackend ─► engine process (GPUs tp..2tp-1)
    AsyncEngine ◄── post("out", acks, (replica, deltas), merged stats) ◄── each replica's reader thread

Each replica is an engine process of its own (engine_process.py) with its own KV cache, scheduler and, with
--tensor-parallel-size, its own tensor-parallel ranks; on CUDA it sees only its slice of the GPUs
(CUDA_VISIBLE_DEVICES set while it is spawned), on the CPU it takes its share of the cores. A replica serves a
whole request (every choice of n > 1 with it, so they share their prompt's blocks).

Routing (cache-aware, the default): the router remembers, per replica, the block hashes of the prompts it sent
there (a chain over full blocks of block_size tokens, rooted in the request's cache salt and LoRA adapter, as the
engines' prefix caches key theirs; an LRU of as many blocks as that replica's cache holds). A new request goes to the
replica holding the longest run of its leading blocks, unless that replica has more than `slack` unfinished requests
beyond the least loaded one (slack: a quarter of the least load, at least 2); then, as with `least-loaded` routing,
to the replica with the fewest unfinished requests (counted here: added, not yet finished, refused or aborted), ties
to the next one after the replica chosen last. So a conversation's next turn, the beams of a beam search and the
requests of one long shared prompt land where their prefix is cached, and load stays balanced. Control calls
(EngineCall: reset_prefix_cache, sleep, wake_up, load_weights) go to every replica and are acknowledged once all have
answered (refused if any refused); weights broadcast by a trainer are refused (each replica would join its group as
the same rank). The merged stats sum the live replicas' counts, so /metrics and the stats line
read as one engine's; "data_parallel" keeps each replica's own snapshot.

A replica that dies (its process killed, a CUDA error, an out-of-memory) does not take the server with it: its
unfinished requests fail (a 503 naming the replica: ReplicaLostError), the others go on, new requests go to the live
replicas, and a new process for it starts in the background (the same GPUs), joining once loaded and once the sleep
calls and weight updates the others took since start have been replayed to it in order (a replay refused, e.g. a
weights folder since removed, keeps it down: it must not serve other weights than its peers). A replica that dies
more than MAX_RESTARTS times within RESTART_WINDOW_S stays down; when no replica is up or starting, the engine is dead
(every request fails, /health says 503), as one engine's death would be.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from pagedserve.async_engine import EngineUnavailableError
from pagedserve.engine_core import AbortRequests, AddRequest, EngineCall, Refusal

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3  # a replica that dies more often than this within RESTART_WINDOW_S stays down
RESTART_WINDOW_S = 600.0


class ReplicaLostError(EngineUnavailableError):
    """The replica serving the request died; the server goes on (the client may retry)."""

    code = "replica_lost"

# Stats fields the replicas' snapshots add up into (the rest: equal on every replica, or merged below).
_SUMMED = ("num_running", "num_waiting", "num_free_blocks", "num_total_blocks", "prefix_cache_queries",
           "prefix_cache_hits", "cpu_prefix_cache_hits", "num_cpu_kv_blocks", "num_preemptions",
           "prompt_tokens_total", "generation_tokens_total", "kernel_compiles_while_serving")


def merge_stats(snapshots: list[dict]) -> dict:
    """One engine's stats dict from the replicas' (each EngineCore's get_stats(); None for a replica that is down):
    the live ones' counts summed, the KV cache usage weighted by each one's blocks, LoRA adapter names united,
    drafting counters summed; each replica's own under "data_parallel" ({"down": True} for one that is down)."""
    every = snapshots
    snapshots = [s for s in every if s is not None] or [{}]
    merged = dict(snapshots[0])
    for key in _SUMMED:
        if key in merged:
            merged[key] = sum(s.get(key, 0) for s in snapshots)
    total = sum(s.get("num_total_blocks", 0) for s in snapshots)
    if total:
        merged["kv_cache_usage"] = sum(s.get("kv_cache_usage", 0.0) * s.get("num_total_blocks", 0)
                                       for s in snapshots) / total
    for key in ("running_lora_adapters", "waiting_lora_adapters"):
        if key in merged:
            merged[key] = sorted({name for s in snapshots for name in s.get(key, [])})
    if "spec_decode" in merged:
        from pagedserve.spec_decode import since

        specs = [s["spec_decode"] for s in snapshots if "spec_decode" in s]
        counts = {k: sum(spec[k] for spec in specs) for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
        width = max(len(spec["accepted_per_position"]) for spec in specs)
        per_position = [sum(spec["accepted_per_position"][i] for spec in specs
                            if i < len(spec["accepted_per_position"])) for i in range(width)]
        merged["spec_decode"] = {**since(counts), "accepted_per_position": per_position}
    merged["data_parallel"] = [{"down": True} if s is None else s for s in every]  # (engines' snapshots: shared)
    merged["data_parallel_replicas_up"] = sum(s is not None for s in every)
    return merged


ROUTING = ("cache-aware", "least-loaded")


def block_hashes(prompt: list[int], block_size: int, root: object = None) -> list[int]:
    """Chained hashes of the prompt's full blocks (each over the one before and its block's tokens)."""
    out, h = [], hash(("pagedserve-dp", root))
    for start in range(0, len(prompt) - block_size + 1, block_size):
        h = hash((h, tuple(prompt[start:start + block_size])))
        out.append(h)
    return out


class _ReplicaPrefixes:
    """The block hashes a replica was last sent, least recently sent first, at most `capacity` of them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.hashes: OrderedDict[int, None] = OrderedDict()

    def matched(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.hashes:
                break
            n += 1
        return n

    def add(self, hashes: list[int]) -> None:
        for h in hashes:
            self.hashes[h] = None
            self.hashes.move_to_end(h)
        while len(self.hashes) > self.capacity:
            self.hashes.popitem(last=False)


def replica_devices(replica: int, tensor_parallel_size: int, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for one replica: its tensor_parallel_size GPUs, in order, out of those this process
    may use (`visible`: its own CUDA_VISIBLE_DEVICES, None for all)."""
    first = replica * tensor_parallel_size
    if visible is None:
        ids = [str(i) for i in range(first, first + tensor_parallel_size)]
    else:
        ids = [v.strip() for v in visible.split(",") if v.strip()][first:first + tensor_parallel_size]
    return ",".join(ids)


@contextmanager
def _environ(**values: str):
    """os.environ with `values` set while a replica is spawned (the child copies the environment at start)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_gpu_count(config: Any) -> bool:
    """True when the replicas run on CUDA; ValueError when there are fewer GPUs than dp x tp."""
    import torch

    from pagedserve.executor.worker import resolve_device

    if resolve_device(config).type != "cuda":
        return False
    need = config.data_parallel_size * config.tensor_parallel_size
    have = torch.cuda.device_count()
    if have < need:
        raise ValueError(f"data_parallel_size {config.data_parallel_size} x tensor_parallel_size "
                         f"{config.tensor_parallel_size} needs {need} GPUs; torch sees {have}")
    return True


class DataParallelBackend:
    """AsyncEngine's backend over several engine processes (replicas). `make_backend(config)` spawns one replica
    without waiting (ProcessBackend(..., wait=False)); it is called once per replica, and again for a replica that
    died, with the environment that replica's process must see."""

    def __init__(self, config: Any, make_backend: Callable[[Any], Any], *, cuda: bool | None = None,
                 routing: str = "cache-aware") -> None:
        size = config.data_parallel_size
        if size < 2:
            raise ValueError(f"DataParallelBackend needs data_parallel_size >= 2, got {size}")
        if routing not in ROUTING:
            raise ValueError(f"data-parallel routing must be one of {ROUTING}, got {routing!r}")
        self.routing = routing
        self.config = config
        self.block_size = config.block_size
        self._make_backend = make_backend
        self._prefixes: list[_ReplicaPrefixes] = []
        cuda = check_gpu_count(config) if cuda is None else cuda
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._envs = [{"CUDA_VISIBLE_DEVICES": replica_devices(i, config.tensor_parallel_size, visible)} if cuda
                      else {} for i in range(size)]
        self.replicas: list[Any] = []
        try:
            for i in range(size):
                self.replicas.append(self._spawn(i))
        except BaseException:
            self._stop_all(5.0)
            raise
        self.info: dict | None = None
        self._lock = threading.Lock()
        self._owner: dict[str, int] = {}  # unfinished request -> its replica
        self._load = [0] * size  # unfinished requests a replica holds
        self._up = [True] * size  # False while a replica is down (restarting, or given up on)
        self._restarting = [False] * size
        self._deaths: list[list[float]] = [[] for _ in range(size)]  # when each replica died (monotonic)
        self._last = -1  # the replica chosen last: ties go to the next one after it
        self._stats: list[dict | None] = []
        # control token -> [replicas yet to answer, first refusal, method, the EngineCall]
        self._controls: dict[str, list] = {}
        # Weight updates and sleep calls that succeeded, in order: replayed to a replica that restarts (_replay_state).
        self._state_calls: list[EngineCall] = []
        self._replays: dict[str, tuple[int, threading.Event, list]] = {}  # replay token -> (replica, done, [refusal])
        self._died_replaying: set[int] = set()  # id() of restarted replicas that died before their replay ended
        self._dead = False
        self._stopping = False
        self._draining = False  # the server is shutting down (begin_shutdown): a replica that dies stays down

    def _spawn(self, i: int) -> Any:
        env = self._envs[i]
        with _environ(**env):
            replica = self._make_backend(self.config)
        logger.info("data parallelism: replica %d of %d started%s", i, self.config.data_parallel_size,
                    f" on GPUs {env['CUDA_VISIBLE_DEVICES']}" if env else "")
        return replica

    # ------------------------------------------------------------------ start-up
    def wait_ready(self) -> None:
        """Blocks until every replica is loaded; if one fails, stops the others and raises its error."""
        if self.info is not None:
            return
        try:
            for replica in self.replicas:
                replica.wait_ready()
        except BaseException:
            self._stop_all(10.0)
            raise
        infos = [replica.info for replica in self.replicas]
        self._stats = [info["stats"] for info in infos]
        self._prefixes = [_ReplicaPrefixes(int(s.get("num_total_blocks", 0))) for s in self._stats]
        self.info = {**infos[0], "stats": merge_stats(self._stats)}

    def start(self, post: Callable[..., None]) -> None:
        self._post = post
        for i, replica in enumerate(self.replicas):
            replica.start(self._poster(i, replica))

    # ------------------------------------------------------------------ requests
    def submit(self, item: Any) -> None:
        if isinstance(item, AddRequest):
            hashes = []
            if self.routing == "cache-aware" and isinstance(item.prompt, list):
                lora = getattr(item.lora_request, "lora_name", None)
                hashes = block_hashes(item.prompt, self.block_size, (item.cache_salt, lora))
            with self._lock:
                i = self._route(hashes)
                if i is None:  # every replica down, one restarting: refused as a full queue is (retry later)
                    replica = None
                else:
                    self._owner[item.request_id] = i
                    self._load[i] += 1
                    replica = self.replicas[i]
            if replica is None:
                self._post("out", [(item.request_id, _unavailable())], (None, []), self._merged())
            else:
                replica.submit(item)
        elif isinstance(item, AbortRequests):
            by_replica: dict[int, list[str]] = {}
            with self._lock:
                for rid in item.request_ids:
                    i = self._owner.pop(rid, None)
                    if i is not None:
                        self._load[i] -= 1
                        by_replica.setdefault(i, []).append(rid)
                targets = [(self.replicas[i], AbortRequests(ids)) for i, ids in by_replica.items()]
            for replica, abort in targets:
                replica.submit(abort)
        elif isinstance(item, EngineCall):
            refusal = None
            with self._lock:
                up = [i for i in range(len(self.replicas)) if self._up[i]]
                if item.method in _TRAINER_CALLS:
                    refusal = Refusal("invalid", f"{item.method}: weights broadcast by a trainer are not taken with "
                                                 "--data-parallel-size > 1 (every replica would join the group as the "
                                                 "same rank); use /update_weights_from_disk, or one server a replica")
                elif item.method in _IDLE_CALLS and any(self._load[i] for i in up):
                    # (refused here, not by the busy replica alone: the idle ones would have gone ahead)
                    refusal = Refusal("invalid", f"{item.method}: requests are unfinished; call it between "
                                                 "generations")
                elif up:
                    self._controls[item.token] = [set(up), None, item.method, item]
                elif item.method != "reset_prefix_cache":  # (a restarting replica starts with an empty cache anyway)
                    refusal = _unavailable()
                targets = [self.replicas[i] for i in up] if refusal is None else []
            if not targets:
                self._post("out", [(item.token, refusal)], (None, []), self._merged())
            for replica in targets:
                replica.submit(item)
        else:  # Stop, and any other message every replica must see
            with self._lock:
                targets = [r for i, r in enumerate(self.replicas) if self._up[i]]
            for replica in targets:
                replica.submit(item)

    def _route(self, hashes: list[int]) -> int | None:
        """The replica for a request whose prompt's block hashes are `hashes` (see the module's docstring); None
        when no replica is up."""
        n = len(self._load)
        up = [j for j in range(n) if self._up[j]]
        if not up:
            return None
        least = min(self._load[j] for j in up)
        chosen = None
        if hashes and self._prefixes:
            matched = {j: self._prefixes[j].matched(hashes) for j in up}
            best = max(up, key=lambda j: (matched[j], -self._load[j]))
            if matched[best] > 0 and self._load[best] <= least + max(2, least // 4):
                chosen = best
        if chosen is None:
            chosen = next(j % n for j in range(self._last + 1, self._last + 1 + n)
                          if self._up[j % n] and self._load[j % n] == least)
            self._last = chosen
        if hashes and self._prefixes:
            self._prefixes[chosen].add(hashes)
        return chosen

    def decode(self, outputs: tuple[Any, Any]) -> list:
        replica, deltas = outputs
        return replica.decode(deltas) if deltas else []

    def forget(self, request_ids: list[str]) -> None:
        for replica in list(self.replicas):
            replica.forget(request_ids)

    def begin_shutdown(self) -> None:
        """The server's graceful shutdown began: the running requests drain; a replica that dies meanwhile is not
        restarted (it would load a whole model for nothing)."""
        with self._lock:
            self._draining = True

    def stop(self, timeout: float) -> None:
        self._stopping = True
        self._stop_all(timeout)

    def _stop_all(self, timeout: float) -> None:
        if not self.replicas:
            return
        with ThreadPoolExecutor(len(self.replicas)) as pool:  # in parallel: each waits for its process
            list(pool.map(lambda r: r.stop(timeout), list(self.replicas)))

    @property
    def loads(self) -> list[int]:
        with self._lock:
            return list(self._load)

    def _merged(self) -> dict:
        with self._lock:
            return merge_stats(self._stats)

    # ------------------------------------------------------------------ replica -> server
    def _poster(self, i: int, replica: Any) -> Callable[..., None]:
        """What replica i's reader thread posts through. Outputs carry the replica object itself, so a late output
        of a replica that has since been replaced is still decoded by its own decoder."""
        def post(kind: str, *args: Any) -> None:
            if kind == "out":
                acks, deltas, stats = args
                with self._lock:
                    if self.replicas[i] is not replica:  # a stale message of a replica already replaced
                        return
                    acks = self._account(i, acks, deltas)
                    if self._up[i]:  # (a restarted replica counts once its state is replayed)
                        self._stats[i] = stats
                    merged = merge_stats(self._stats)
                self._post("out", acks, (replica, deltas), merged)
            elif kind == "dead":
                self._replica_died(i, replica, args[0])
            else:
                self._post(kind, *args)
        return post

    def _account(self, i: int, acks: list, deltas: list) -> list:
        """(Under the lock.) Frees the load of finished and refused requests; holds back control acks until every
        live replica's."""
        out = []
        for ack in acks:
            rid, refusal = ack
            replay = self._replays.get(rid)
            if replay is not None:  # a state call replayed to a restarted replica: the restart thread waits for it
                replay[2].append(refusal)
                replay[1].set()
                continue
            control = self._controls.get(rid)
            if control is not None:
                control[0].discard(i)
                control[1] = control[1] or refusal
                if not control[0]:
                    del self._controls[rid]
                    out.append((rid, control[1]))
                    if control[1] is None and control[2] in _STATE_CALLS:
                        self._state_calls.append(control[3])
                continue
            if refusal is not None and self._owner.get(rid) == i:
                del self._owner[rid]
                self._load[i] -= 1
            out.append(ack)
        for delta in deltas:
            if delta[3] and self._owner.get(delta[0]) == i:  # (request_id, ..., finished, ...)
                del self._owner[delta[0]]
                self._load[i] -= 1
        return out

    def _replica_died(self, i: int, replica: Any, error: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            if self.replicas[i] is replica and not self._up[i]:  # died while its state was replayed: the restart fails
                self._died_replaying.add(id(replica))
                for j, done, box in self._replays.values():
                    if j == i:
                        box.append(Refusal("replica_lost", f"the engine process died ({error})"))
                        done.set()
            if self.replicas[i] is not replica or not self._up[i] or self._dead:
                return
            self._up[i] = False
            lost = [rid for rid, j in self._owner.items() if j == i]
            for rid in lost:
                del self._owner[rid]
            self._load[i] = 0
            self._stats[i] = None
            if self._prefixes:
                self._prefixes[i] = _ReplicaPrefixes(self._prefixes[i].capacity)
            # Controls this replica had not answered: refused (the caller must not take them as done), but a reset
            # of the prefix cache (a restarted replica's cache starts empty).
            acks = []
            for token, control in list(self._controls.items()):
                if i in control[0]:
                    control[0].discard(i)
                    if control[2] != "reset_prefix_cache":
                        control[1] = control[1] or Refusal("replica_lost", f"data-parallel replica {i} died before "
                                                                           f"it answered ({error}); call it again")
                if not control[0]:
                    del self._controls[token]
                    acks.append((token, control[1]))
            deaths = self._deaths[i] = [t for t in self._deaths[i] if now - t < RESTART_WINDOW_S] + [now]
            restart = not self._stopping and not self._draining and len(deaths) <= MAX_RESTARTS
            self._restarting[i] = restart
            if not restart and self._none_left():
                self._dead = True
            dead = self._dead
            merged = merge_stats(self._stats)
        if dead:
            self._post("dead", type(error)(f"data-parallel replica {i}: {error}"))
            return
        logger.error("data parallelism: replica %d died (%s); %d unfinished request(s) fail; %s", i, error, len(lost),
                     "restarting it" if restart else "the server is shutting down: it stays down" if self._draining
                     else f"it died {len(deaths)} times in {RESTART_WINDOW_S:.0f} s: it stays down")
        if lost:
            self._post("fail", lost, ReplicaLostError(f"data-parallel replica {i} died while serving this request "
                                                      f"({error}); the server goes on: retry"))
        if acks:
            self._post("out", acks, (replica, []), merged)
        if restart:
            threading.Thread(target=self._restart, args=(i, replica), name=f"pagedserve-dp-restart-{i}",
                             daemon=True).start()

    def _none_left(self) -> bool:
        """(Under the lock.) No replica is up or starting."""
        return not any(self._up) and not any(self._restarting)

    def _restart(self, i: int, old: Any) -> None:
        try:
            old.stop(2.0)
        except Exception:  # noqa: BLE001 - the old process is gone; its pipes may complain
            logger.debug("data parallelism: stopping replica %d's old process failed", i, exc_info=True)
        replica = None
        try:
            replica = self._spawn(i)
            replica.wait_ready()
            with self._lock:
                stopping = self._stopping
                if not stopping:
                    self.replicas[i] = replica  # (still down: no request is routed to it until _replay_state)
            if stopping:
                replica.stop(5.0)
                return
            replica.start(self._poster(i, replica))
            replayed = self._replay_state(i, replica)
        except Exception as e:  # noqa: BLE001 - a replica that cannot come back stays down
            if replica is not None:
                try:
                    replica.stop(5.0)
                except Exception:  # noqa: BLE001
                    logger.debug("data parallelism: stopping replica %d failed", i, exc_info=True)
            logger.error("data parallelism: replica %d could not restart (%s); it stays down", i, e)
            with self._lock:
                self._restarting[i] = False
                dead = self._none_left() and not self._dead
                self._dead = self._dead or dead
            if dead:
                self._post("dead", RuntimeError(f"every data-parallel replica is down (replica {i}: {e})"))
            return
        if replayed is None:  # stopping
            return
        self._post("out", [], (replica, []), self._merged())  # /metrics sees it back at once
        logger.info("data parallelism: replica %d is back%s", i, f" ({replayed} weight update / sleep call(s) "
                    "replayed to it)" if replayed else "")

    def _replay_state(self, i: int, replica: Any) -> int | None:
        """Brings restarted replica i to the others' state: the weight updates and sleep calls that succeeded since
        start, sent in order, each awaited; then it is up. Calls that succeed meanwhile are replayed too, and it
        joins only while no such call is in flight (it would miss that one). Raises RuntimeError when one is refused
        or the replica dies; returns how many calls were replayed, or None when the backend stops meanwhile."""
        done = 0
        while True:
            with self._lock:
                if self._stopping:
                    return None
                if id(replica) in self._died_replaying:
                    self._died_replaying.discard(id(replica))
                    raise RuntimeError("it died before its state was replayed")
                calls = self._state_calls[done:]
                in_flight = any(control[2] in _STATE_CALLS for control in self._controls.values())
                if not calls and not in_flight:
                    self._stats[i] = replica.info["stats"]
                    self._restarting[i] = False
                    self._up[i] = True
                    return done
            if not calls:
                time.sleep(0.02)
                continue
            for call in calls:
                token = f"dp-replay-{i}-{done}-{call.token}"
                finished, box = threading.Event(), []
                with self._lock:
                    self._replays[token] = (i, finished, box)
                try:
                    replica.submit(EngineCall(token, call.method, call.kwargs))
                    while not finished.wait(0.5):
                        if self._stopping:
                            return None
                        if id(replica) in self._died_replaying:  # (it died before this replay was registered)
                            self._died_replaying.discard(id(replica))
                            raise RuntimeError("it died before its state was replayed")
                finally:
                    with self._lock:
                        self._replays.pop(token, None)
                if box[0] is not None:
                    raise RuntimeError(f"replaying {call.method} to it failed: {box[0].message}")
                done += 1


# Calls that change a replica's state (replayed, in order, to one that restarts: _replay_state).
_STATE_CALLS = ("sleep", "wake_up", "load_weights")
# Calls that need every replica idle: refused at once while any holds unfinished requests, so that none goes ahead
# alone (a sleep that one replica refused left the others asleep).
_IDLE_CALLS = ("sleep", "load_weights")
_TRAINER_CALLS = ("init_weights_update_group", "update_weights_from_distributed")  # refused: see submit


def _unavailable() -> Any:
    from pagedserve.engine_core import Refusal

    return Refusal("queue_full", "every data-parallel replica is restarting; retry shortly", 5)
