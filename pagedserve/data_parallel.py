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
requests of one long shared prompt land where their prefix is cached, and load stays balanced. Control messages
(ResetPrefixCache) go to every replica and are acknowledged once all have answered (refused if any refused). The
merged stats sum the replicas' counts, so /metrics and the stats line read as one engine's; "data_parallel" keeps
each replica's own snapshot. A replica that dies takes the server down with it (as one engine would), and its
requests fail with the engine-dead error.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from pagedserve.engine_core import AbortRequests, AddRequest, ResetPrefixCache

logger = logging.getLogger(__name__)

# Stats fields the replicas' snapshots add up into (the rest: equal on every replica, or merged below).
_SUMMED = ("num_running", "num_waiting", "num_free_blocks", "num_total_blocks", "prefix_cache_queries",
           "prefix_cache_hits", "cpu_prefix_cache_hits", "num_cpu_kv_blocks", "num_preemptions",
           "prompt_tokens_total", "generation_tokens_total", "kernel_compiles_while_serving")


def merge_stats(snapshots: list[dict]) -> dict:
    """One engine's stats dict from the replicas' (each EngineCore's get_stats()): counts summed, the KV cache
    usage weighted by each replica's blocks, LoRA adapter names united, drafting counters summed."""
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
    merged["data_parallel"] = [{k: v for k, v in s.items() if k != "data_parallel"} for s in snapshots]
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
    without waiting (ProcessBackend(..., wait=False)); it is called once per replica with the environment that
    replica's process must see."""

    def __init__(self, config: Any, make_backend: Callable[[Any], Any], *, cuda: bool | None = None,
                 routing: str = "cache-aware") -> None:
        size = config.data_parallel_size
        if size < 2:
            raise ValueError(f"DataParallelBackend needs data_parallel_size >= 2, got {size}")
        if routing not in ROUTING:
            raise ValueError(f"data-parallel routing must be one of {ROUTING}, got {routing!r}")
        self.routing = routing
        self.block_size = config.block_size
        self._prefixes: list[_ReplicaPrefixes] = []
        cuda = check_gpu_count(config) if cuda is None else cuda
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.replicas: list[Any] = []
        try:
            for i in range(size):
                env = {"CUDA_VISIBLE_DEVICES": replica_devices(i, config.tensor_parallel_size, visible)} if cuda \
                    else {}
                with _environ(**env):
                    self.replicas.append(make_backend(config))
                logger.info("data parallelism: replica %d of %d started%s", i, size,
                            f" on GPUs {env['CUDA_VISIBLE_DEVICES']}" if cuda else "")
        except BaseException:
            self._stop_all(5.0)
            raise
        self.info: dict | None = None
        self._lock = threading.Lock()
        self._owner: dict[str, int] = {}  # unfinished request -> its replica
        self._load = [0] * size  # unfinished requests a replica holds
        self._last = -1  # the replica chosen last: ties go to the next one after it
        self._stats: list[dict] = []
        self._controls: dict[str, list] = {}  # control token -> [answers still due, first refusal]
        self._dead = False

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
        self.info = {**infos[0], "stats": merge_stats(self._stats), "data_parallel_size": len(self.replicas)}

    def start(self, post: Callable[..., None]) -> None:
        self._post = post
        for i, replica in enumerate(self.replicas):
            replica.start(self._poster(i))

    # ------------------------------------------------------------------ requests
    def submit(self, item: Any) -> None:
        if isinstance(item, AddRequest):
            hashes = []
            if self.routing == "cache-aware" and isinstance(item.prompt, list):
                lora = getattr(item.lora_request, "lora_name", None)
                hashes = block_hashes(item.prompt, self.block_size, (item.cache_salt, lora))
            with self._lock:
                i = self._route(hashes)
                self._owner[item.request_id] = i
                self._load[i] += 1
            self.replicas[i].submit(item)
        elif isinstance(item, AbortRequests):
            by_replica: dict[int, list[str]] = {}
            with self._lock:
                for rid in item.request_ids:
                    i = self._owner.pop(rid, None)
                    if i is not None:
                        self._load[i] -= 1
                        by_replica.setdefault(i, []).append(rid)
            for i, ids in by_replica.items():
                self.replicas[i].submit(AbortRequests(ids))
        elif isinstance(item, ResetPrefixCache):
            with self._lock:
                self._controls[item.token] = [len(self.replicas), None]
            for replica in self.replicas:
                replica.submit(item)
        else:  # Stop, and any other message every replica must see
            for replica in self.replicas:
                replica.submit(item)

    def _route(self, hashes: list[int]) -> int:
        """The replica for a request whose prompt's block hashes are `hashes` (see the module's docstring)."""
        least, n = min(self._load), len(self._load)
        chosen = None
        if hashes and self._prefixes:
            matched = [p.matched(hashes) for p in self._prefixes]
            best = max(range(n), key=lambda j: (matched[j], -self._load[j]))
            if matched[best] > 0 and self._load[best] <= least + max(2, least // 4):
                chosen = best
        if chosen is None:
            chosen = next(j % n for j in range(self._last + 1, self._last + 1 + n) if self._load[j % n] == least)
            self._last = chosen
        if hashes and self._prefixes:
            self._prefixes[chosen].add(hashes)
        return chosen

    def decode(self, outputs: tuple[int, Any]) -> list:
        i, deltas = outputs
        return self.replicas[i].decode(deltas)

    def forget(self, request_ids: list[str]) -> None:
        for replica in self.replicas:
            replica.forget(request_ids)

    def stop(self, timeout: float) -> None:
        self._stop_all(timeout)

    def _stop_all(self, timeout: float) -> None:
        if not self.replicas:
            return
        with ThreadPoolExecutor(len(self.replicas)) as pool:  # in parallel: each waits for its process
            list(pool.map(lambda r: r.stop(timeout), self.replicas))

    # ------------------------------------------------------------------ replica -> server
    def _poster(self, i: int) -> Callable[..., None]:
        def post(kind: str, *args: Any) -> None:  # runs in replica i's reader thread
            if kind == "out":
                acks, deltas, stats = args
                acks = self._account(i, acks, deltas)
                with self._lock:
                    self._stats[i] = stats
                    merged = merge_stats(self._stats)
                self._post("out", acks, (i, deltas), merged)
            elif kind == "dead":
                with self._lock:
                    first, self._dead = not self._dead, True
                if first:
                    error = args[0]
                    self._post("dead", type(error)(f"data-parallel replica {i}: {error}"))
            else:
                self._post(kind, *args)
        return post

    def _account(self, i: int, acks: list, deltas: list) -> list:
        """Frees the load of finished and refused requests; holds back control acks until every replica's."""
        out = []
        with self._lock:
            for ack in acks:
                rid, refusal = ack
                control = self._controls.get(rid)
                if control is not None:
                    control[0] -= 1
                    control[1] = control[1] or refusal
                    if control[0] == 0:
                        del self._controls[rid]
                        out.append((rid, control[1]))
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

    @property
    def loads(self) -> list[int]:
        with self._lock:
            return list(self._load)
