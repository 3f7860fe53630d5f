"""Paged KV cache bookkeeping: physical blocks, ref counts, an LRU free list, automatic prefix caching.

Pure Python: this module only decides which physical block holds which tokens; the tensors live in
the executor. A request's block table maps its token positions to blocks:

    position p  ->  block_table[p // block_size], offset p % block_size

Prefix caching (vLLM v1 style). Every FULL block of a request gets a chained hash

    block_hashes[i] = hash_block_tokens(block_hashes[i - 1], tokens of block i, cache_salt)

and a block whose tokens are being computed is registered in the cache map at allocation time, so a
request scheduled later in the same step can already share it (the model writes a layer's K/V for
the whole batch before that layer's attention reads it).

Collision safety: the hash only narrows the search. A cached block also keeps its exact token ids,
its salt and a `content_id`, an integer naming the exact token content of the whole prefix that
ends with it. A lookup accepts a candidate only if its tokens and salt equal the request's and its
parent content id is the content id of the block matched just before it, so by induction a hit
covers exactly the request's prefix, whatever the hash function returns. Copies of the same content
(the same prefix computed twice) share one content id, so either copy continues the chain.

CPU tier (kv_offloading_size, vLLM's KV offloading): when a cached block is handed out again (its eviction), its K/V
are first copied to a CPU block (CpuTier, LRU) and the copy is listed for the step (take_copies: "out" copies run
before the step's forward, in order), so a later lookup that misses on the device goes on in the CPU tier: those
blocks get new device blocks, copied in before the step's forward ("in" copies), and count as cached. A CPU block
keeps its block's hash, tokens, salt and parent hash, and a lookup checks them all.

Hybrid models (some layers windowed, the others full attention: Gemma 2 / 3, gpt-oss, Qwen2 with max_window_layers),
as vLLM's hybrid allocator: the layers are cut into groups of one size, the full-attention layers one group and the
windowed ones `num_window_groups` more; every layer of a group reads its group's block table, and a block of the one
pool holds one group's layers (the executor keeps a KV tensor per slot of a group, each shared by the groups). A
request holds a table for the full-attention group and one for each window group, block i of each for the same
positions; the window groups' blocks behind the window go back each step (free_outside_window). So memory goes where
it is needed: a long request holds only its window on the windowed layers, a short one the same blocks in every group.
Prefix caching covers every group: a window group's block is registered under its group and the content id of the
full block at its index (that id names the exact prefix: no chain of its own is needed), and a hit is the longest
cached full prefix whose last `window` keys are cached in every window group too. Entries of a window table behind the
window are never read (the kernels start at the window): they hold the ids of blocks given back, or 0 where a prefix
hit never needed one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from pagedserve.core.request import Request

_NO_PARENT = -1  # parent content id of a request's first block
def _window_key(group: int, content_id: int) -> int:
    """The cache map key of window group `group`'s block at the index of the full block with `content_id`."""
    return hash(("window", group, content_id))


def _window_parent(group: int, content_id: int, num_groups: int) -> int:
    """What a window block stores as its "parent content id", which every lookup compares exactly: its group and the
    content id it was registered under, below -1 (never a chain's), so a hit is exact whatever the hash returns."""
    return -2 - (content_id * num_groups + group)


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...], cache_salt: str | None) -> int:
    """The chained hash of one full block. Python's tuple hash: fast, and lookups verify contents,
    so a collision only costs a wasted comparison, never wrong K/V. Tests monkeypatch this."""
    return hash((parent_hash, token_ids, cache_salt))


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    # Set while the block is in the prefix-cache map (in use or on the free list), else None.
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None
    cache_salt: str | None = None
    content_id: int = _NO_PARENT
    parent_content_id: int = _NO_PARENT
    parent_hash: int | None = None  # the previous block's hash in its chain (the CPU tier checks it)


class BlockPool:
    """All physical blocks, the LRU free list and the prefix-cache map (hash -> cached blocks)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Head = next to be handed out (least recently freed). Fresh pool: 0, 1, 2, ...
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        # Usually one block per hash; more for copies of one prefix or for hash collisions.
        self._cached: dict[int, list[Block]] = {}
        self._next_content_id = 0
        # Called with a cached block about to be handed out again (its K/V still intact): the CPU tier's save.
        self.on_reuse = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return sum(len(v) for v in self._cached.values())

    def free_block_ids(self) -> list[int]:
        """The free list from head (next to be reused) to tail; for tests and debugging."""
        return list(self._free)

    def get_new_blocks(self, num_blocks: int) -> list[Block]:
        """Takes `num_blocks` from the head of the free list (caller checked there are enough),
        evicting whatever prefix they cached. Each comes back with ref_cnt 1."""
        blocks = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                if self.on_reuse is not None:
                    self.on_reuse(block)
                self.evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: list[Block]) -> None:
        """Takes a reference on cached blocks found by a lookup, lifting free ones off the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: list[Block], keep_cached: bool) -> None:
        """Drops one reference from each block, in the given order; blocks that reach 0 go to the
        tail of the free list, still cached unless `keep_cached` is False."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if not keep_cached and block.block_hash is not None:
                    self.evict(block)
                self._free[block.block_id] = block

    def lookup(
        self, block_hash: int, token_ids: tuple[int, ...], cache_salt: str | None, parent_content_id: int
    ) -> Block | None:
        for block in self._cached.get(block_hash, ()):
            if (
                block.parent_content_id == parent_content_id
                and block.cache_salt == cache_salt
                and block.token_ids == token_ids
            ):
                return block
        return None

    def register(
        self,
        block: Block,
        block_hash: int,
        token_ids: tuple[int, ...],
        cache_salt: str | None,
        parent_content_id: int,
        parent_hash: int | None = None,
    ) -> None:
        """Puts a full block into the cache map. A copy of an already cached prefix reuses its
        content id, so children registered under either copy are found from both."""
        same = self.lookup(block_hash, token_ids, cache_salt, parent_content_id)
        if same is not None:
            block.content_id = same.content_id
        else:
            block.content_id = self._next_content_id
            self._next_content_id += 1
        block.block_hash = block_hash
        block.token_ids = token_ids
        block.cache_salt = cache_salt
        block.parent_content_id = parent_content_id
        block.parent_hash = parent_hash
        self._cached.setdefault(block_hash, []).append(block)

    def evict(self, block: Block) -> None:
        """Removes a block from the cache map (its K/V may now be overwritten)."""
        assert block.block_hash is not None  # internal invariant, not a user error
        candidates = self._cached[block.block_hash]
        candidates.remove(block)  # by identity: Block has eq=False
        if not candidates:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.token_ids = None
        block.cache_salt = None
        block.content_id = _NO_PARENT
        block.parent_content_id = _NO_PARENT
        block.parent_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached prefix; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            if block.block_hash is not None:
                self.evict(block)
        return True


@dataclass(slots=True)
class _CpuBlock:
    slot: int
    token_ids: tuple[int, ...]
    cache_salt: str | None
    parent_hash: int | None


class CpuTier:
    """Blocks of K/V kept in CPU memory by hash (the executor holds the tensors; this names which slot holds what):
    LRU, a block used by a step pinned until the step's copies are taken."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._entries: OrderedDict[int, _CpuBlock] = OrderedDict()  # block hash -> block, least recent first
        self._free = list(range(num_blocks - 1, -1, -1))
        self._pinned: set[int] = set()  # slots a copy of this step reads or writes

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, block_hash: int, token_ids: tuple[int, ...], cache_salt: str | None,
             parent_hash: int | None) -> _CpuBlock | None:
        entry = self._entries.get(block_hash)
        if entry is None or entry.token_ids != token_ids or entry.cache_salt != cache_salt \
                or entry.parent_hash != parent_hash:
            return None
        self._entries.move_to_end(block_hash)
        return entry

    def save(self, block: Block) -> int | None:
        """A slot for a cached device block's K/V (the least recently used unpinned one when full), or None when it
        is already held (or nothing can make room)."""
        assert block.block_hash is not None and block.token_ids is not None
        if self.find(block.block_hash, block.token_ids, block.cache_salt, block.parent_hash) is not None:
            return None
        colliding = self._entries.get(block.block_hash)  # the same hash for other content: the newer block wins
        if colliding is not None:
            if colliding.slot in self._pinned:
                return None
            del self._entries[block.block_hash]
            self._free.append(colliding.slot)
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((h for h, e in self._entries.items() if e.slot not in self._pinned), None)
            if victim is None:
                return None
            slot = self._entries.pop(victim).slot
        self._entries[block.block_hash] = _CpuBlock(slot, block.token_ids, block.cache_salt, block.parent_hash)
        self._pinned.add(slot)
        return slot

    def pin(self, slot: int) -> None:
        self._pinned.add(slot)

    def unpin_all(self) -> None:
        self._pinned.clear()


@dataclass(slots=True)
class _RequestBlocks:
    blocks: list[Block] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)  # mirrors `blocks`; handed to the runner
    num_registered: int = 0  # blocks[:num_registered] are in the cache map (full and computed)
    last_content_id: int = _NO_PARENT  # content id of blocks[num_registered - 1]: the next block's parent
    # Sliding windows (free_outside_window): blocks[:num_freed] are given back (the table keeps their ids: no
    # attention reads them again)
    num_freed: int = 0
    # Hybrid models: the window groups' blocks at each index (one a group, for the positions of blocks[i]; None where
    # a prefix hit never needed them), each group's table of ids, and how many indices lie behind the window
    wblocks: list[list[Block] | None] = field(default_factory=list)
    wblock_ids: list[list[int]] = field(default_factory=list)
    w_num_freed: int = 0


class KVCacheManager:
    """Block tables of the running requests on top of a BlockPool.

    Prefix sharing applies to a request when `enable_prefix_caching` is on (any salt; requests share
    only with requests of the same `cache_salt`), or, with it off, when the request has a salt (the
    n > 1 siblings of one request share their prompt). With it off, freed blocks forget their hash.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, num_cpu_blocks: int = 0,
                 window: int | None = None, num_window_groups: int = 0) -> None:
        """window / num_window_groups: a hybrid model's window and how many window groups its windowed layers make
        (see the module docstring); None: one block table for every layer."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if window is not None and (window < 1 or num_window_groups < 1 or num_cpu_blocks):
            raise ValueError("window groups need window >= 1 and num_window_groups >= 1, and no CPU tier")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.window = window
        self.num_window_groups = num_window_groups if window is not None else 0
        # request id -> its lookup's window blocks by index, for its admission
        self._window_hits: dict[str, list[list[Block] | None]] = {}
        self._requests: dict[str, _RequestBlocks] = {}
        # KV offloading (the CPU tier): slots by hash, and this step's copies (device block, CPU slot)
        self.cpu = CpuTier(num_cpu_blocks) if num_cpu_blocks > 0 and enable_prefix_caching else None
        self._copies_out: list[tuple[int, int]] = []
        self._copies_in: list[tuple[int, int]] = []  # (CPU slot, device block)
        self._cpu_hits: dict[str, list] = {}  # request id -> its lookup's CPU blocks, for allocate_slots
        self.cpu_prefix_cache_hits = 0  # tokens found in the CPU tier
        if self.cpu is not None:
            self.pool.on_reuse = self._offload
        # Token counters, counted once per admission (a successful allocate_slots after a lookup),
        # so a request that waits for blocks over many steps is not counted many times.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached blocks on the free list count as free)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def _shares_prefix(self, request: Request) -> bool:
        return self.enable_prefix_caching or request.cache_salt is not None

    def _update_block_hashes(self, request: Request) -> None:
        """Extends request.block_hashes to every full block of its known tokens (incremental)."""
        hashes = request.block_hashes
        num_full = request.num_tokens // self.block_size
        bs = self.block_size
        tokens = request.all_token_ids
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_full):
            parent = hash_block_tokens(parent, tuple(tokens[i * bs : (i + 1) * bs]), request.cache_salt)
            hashes.append(parent)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Block ids of the longest cached prefix of the request and the number of tokens they
        cover. Never covers the last token: the model must compute at least one to sample. None for a
        request that asks for prompt logprobs and has none yet: its every prompt position must be computed."""
        if not self._shares_prefix(request) or (request.sampling_params.prompt_logprobs is not None
                                                and request.num_output_tokens == 0):
            return [], 0
        self._update_block_hashes(request)
        bs = self.block_size
        tokens = request.all_token_ids
        max_hit_blocks = (request.num_tokens - 1) // bs
        hit_ids: list[int] = []
        parent_content_id = _NO_PARENT
        for i in range(max_hit_blocks):
            block = self.pool.lookup(
                request.block_hashes[i],
                tuple(tokens[i * bs : (i + 1) * bs]),
                request.cache_salt,
                parent_content_id,
            )
            if block is None:
                break
            hit_ids.append(block.block_id)
            parent_content_id = block.content_id
        if self.window is not None:
            return self._window_prefix(request, hit_ids)
        cpu_hits = []
        if self.cpu is not None:  # the chain goes on in the CPU tier
            for i in range(len(hit_ids), max_hit_blocks):
                entry = self.cpu.find(request.block_hashes[i], tuple(tokens[i * bs: (i + 1) * bs]),
                                      request.cache_salt, request.block_hashes[i - 1] if i else None)
                if entry is None:
                    break
                cpu_hits.append(entry)
            self._cpu_hits[request.request_id] = cpu_hits
        return hit_ids, (len(hit_ids) + len(cpu_hits)) * bs

    def _window_prefix(self, request: Request, hit_ids: list[int]) -> tuple[list[int], int]:
        """A hybrid model's hit: the longest prefix of the full group's hit whose last `window` keys (those the next
        token attends to) are cached in every window group too; its window blocks are kept for allocate_slots. From
        the longest candidate down: a missing index m rules out every length from m + 1 up (their windows reach it),
        so only the window behind each candidate is looked up."""
        bs, window, groups = self.block_size, self.window, self.num_window_groups
        found: dict[int, list[Block] | None] = {}

        def window_blocks(i: int) -> list[Block] | None:  # index i's blocks in every window group, or None
            if i not in found:
                full = self.pool.blocks[hit_ids[i]]
                blocks = [self.pool.lookup(_window_key(k, full.content_id), full.token_ids, request.cache_salt,
                                           _window_parent(k, full.content_id, groups)) for k in range(groups)]
                found[i] = blocks if all(b is not None for b in blocks) else None
            return found[i]

        best = len(hit_ids)
        while best > 0:
            # the first token computed, at position best * bs, attends to keys from best * bs - window + 1 on
            keep_from = max(0, best * bs - window + 1) // bs
            missing = next((i for i in range(best - 1, keep_from - 1, -1) if window_blocks(i) is None), None)
            if missing is None:
                break
            best = missing
        keep_from = max(0, best * bs - window + 1) // bs
        self._window_hits[request.request_id] = [None] * keep_from + [found[i] for i in range(keep_from, best)]
        return hit_ids[:best], best * bs

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: list[int] | None = None
    ) -> list[int] | None:
        """Grows the request's block table to cover

            [0, num_computed_tokens) + new_computed_blocks (cached prefix) + num_new_tokens

        and registers the full blocks among them. `new_computed_blocks` (from get_computed_blocks)
        is only for a request with no blocks yet, i.e. on admission. Returns the whole block table
        (a live list: read it, don't keep or mutate it) or None, changing nothing, when there are
        not enough free blocks.
        """
        state = self._requests.get(request.request_id)
        if state is None:
            state = _RequestBlocks()
        elif not new_computed_blocks:
            # The common decode step: its tokens fit in the blocks it has and no block filled up
            # since the last registration. Nothing changes (the slow path below would do nothing).
            num_tokens = request.num_computed_tokens + num_new_tokens
            if (-(-num_tokens // self.block_size) <= len(state.blocks)
                    and (num_tokens // self.block_size <= state.num_registered or not self._shares_prefix(request))
                    and (self.window is None or -(-num_tokens // self.block_size) <= len(state.wblocks))):
                return state.block_ids
        else:
            raise RuntimeError(
                f"request {request.request_id} already has blocks; prefix hits are for admission"
            )
        hits = [self.pool.blocks[i] for i in new_computed_blocks or ()]
        # the CPU blocks this admission's lookup found after the device hits (KV offloading): new device blocks,
        # copied in before the step's forward
        cpu_hits = self._cpu_hits.pop(request.request_id, []) if new_computed_blocks is not None else []
        bs = self.block_size
        num_tokens = request.num_computed_tokens + (len(hits) + len(cpu_hits)) * bs + num_new_tokens
        num_new_blocks = -(-num_tokens // bs) - len(state.blocks) - len(hits)
        # A hit block on the free list costs no new block, but it is no longer free for others.
        num_free_hits = sum(1 for b in hits if b.ref_cnt == 0)
        # Hybrid models: the window groups' blocks of the new indices (from the same pool), and their hits
        whits: list[list[Block] | None] = []
        num_new_indices = 0
        if self.window is not None:
            if new_computed_blocks is not None:
                whits = self._window_hits.pop(request.request_id, [])
            if new_computed_blocks and len(whits) != len(hits):
                raise RuntimeError(f"request {request.request_id}: a prefix hit without its window lookup")
            num_new_indices = max(0, -(-num_tokens // bs) - len(state.wblocks) - len(whits))
            num_free_hits += sum(1 for group in whits if group for b in group if b.ref_cnt == 0)
        num_new_wblocks = num_new_indices * self.num_window_groups
        if max(num_new_blocks, 0) + num_new_wblocks > self.pool.num_free_blocks - num_free_hits:
            return None

        self._requests[request.request_id] = state
        if new_computed_blocks is not None and self._shares_prefix(request):
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += (len(hits) + len(cpu_hits)) * bs
            self.cpu_prefix_cache_hits += len(cpu_hits) * bs
        for entry in cpu_hits:  # (pinned before new blocks are taken: their offloads must not reuse these slots)
            self.cpu.pin(entry.slot)
        # Touch hits before taking new blocks, so the head of the free list can't hand one out.
        self.pool.touch(hits)
        self.pool.touch([b for group in whits if group for b in group])
        state.blocks.extend(hits)
        if num_new_blocks > 0:
            new_blocks = self.pool.get_new_blocks(num_new_blocks)
            state.blocks.extend(new_blocks)
            self._copies_in.extend((entry.slot, block.block_id) for entry, block in zip(cpu_hits, new_blocks))
        state.block_ids.extend(b.block_id for b in state.blocks[len(state.block_ids) :])
        if self.window is not None:
            groups = self.num_window_groups
            if not state.wblock_ids:
                state.wblock_ids = [[] for _ in range(groups)]
            if whits:  # (a hit's indices below its window: nothing to give back)
                state.w_num_freed = next((i for i, group in enumerate(whits) if group is not None), len(whits))
            state.wblocks.extend(whits)
            if num_new_wblocks:
                new_wblocks = self.pool.get_new_blocks(num_new_wblocks)
                state.wblocks.extend(new_wblocks[i * groups:(i + 1) * groups] for i in range(num_new_indices))
            start = len(state.wblock_ids[0])
            for k, ids in enumerate(state.wblock_ids):
                ids.extend(0 if group is None else group[k].block_id for group in state.wblocks[start:])
        if self._shares_prefix(request):
            self._register_full_blocks(request, state, num_tokens // bs)
        return state.block_ids

    def _register_full_blocks(self, request: Request, state: _RequestBlocks, num_full_blocks: int) -> None:
        """Registers blocks [num_registered, num_full_blocks): full, and computed by the end of this
        step. Hit blocks are already registered; their content id continues the chain."""
        self._update_block_hashes(request)
        num_full_blocks = min(num_full_blocks, len(request.block_hashes))
        bs = self.block_size
        tokens = request.all_token_ids
        # (the chain's parent from the state, not from blocks[i - 1]: a sliding window may have given that back)
        parent_content_id = state.last_content_id
        for i in range(state.num_registered, num_full_blocks):
            block = state.blocks[i]
            if block.block_hash is None:
                self.pool.register(
                    block,
                    request.block_hashes[i],
                    tuple(tokens[i * bs : (i + 1) * bs]),
                    request.cache_salt,
                    parent_content_id,
                    request.block_hashes[i - 1] if i else None,
                )
            parent_content_id = block.content_id
            if self.window is not None and (group := state.wblocks[i]) is not None:
                # (under the full block's content id, which names this exact prefix: see the module docstring)
                for k, wblock in enumerate(group):
                    if wblock.block_hash is None:
                        self.pool.register(wblock, _window_key(k, block.content_id), block.token_ids,
                                           request.cache_salt, _window_parent(k, block.content_id, len(group)))
        if num_full_blocks > state.num_registered:
            state.num_registered = num_full_blocks
            state.last_content_id = parent_content_id

    def _offload(self, block: Block) -> None:
        """A cached block about to be reused: its K/V go to a CPU slot first (this step's "out" copies)."""
        slot = self.cpu.save(block)
        if slot is not None:
            self._copies_out.append((block.block_id, slot))

    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """This step's KV copies: (device block, CPU slot) out, then (CPU slot, device block) in, for the executor to
        run in that order before the step's forward. Unpins the CPU tier."""
        out, into = self._copies_out, self._copies_in
        self._copies_out, self._copies_in = [], []
        self._cpu_hits.clear()
        self._window_hits.clear()
        if self.cpu is not None:
            self.cpu.unpin_all()
        return out, into

    def free_outside_window(self, request: Request, keep_from: int) -> int:
        """Sliding-window attention on every layer: gives back the request's blocks whose every position is below
        `keep_from` (the first key any of its later tokens attends to), keeping their ids in its table (nothing
        reads them again; cached prefixes stay cached while free). Returns how many it gave back now. A hybrid model:
        the window groups' blocks only (the full-attention group keeps its own)."""
        state = self._requests.get(request.request_id)
        if state is None or keep_from <= 0:
            return 0
        if self.window is not None:
            limit = min(keep_from // self.block_size, len(state.wblocks))
            if self._shares_prefix(request):
                limit = min(limit, state.num_registered)
            if limit <= state.w_num_freed:
                return 0
            given = [b for group in state.wblocks[state.w_num_freed:limit] if group for b in group]
            self.pool.free_blocks(given, keep_cached=self.enable_prefix_caching)
            state.w_num_freed = limit
            return len(given)
        limit = min(keep_from // self.block_size, len(state.blocks))
        if self._shares_prefix(request):  # (blocks behind the window are computed, full and registered)
            limit = min(limit, state.num_registered)
        if limit <= state.num_freed:
            return 0
        self.pool.free_blocks(state.blocks[state.num_freed:limit], keep_cached=self.enable_prefix_caching)
        freed, state.num_freed = limit - state.num_freed, limit
        return freed

    def free(self, request: Request) -> None:
        """Releases the request's blocks, tail first. Unknown or already freed requests: no-op."""
        state = self._requests.pop(request.request_id, None)
        if state is not None:
            self.pool.free_blocks(state.blocks[state.num_freed:][::-1], keep_cached=self.enable_prefix_caching)
            if self.window is not None:
                self.pool.free_blocks([b for group in state.wblocks[state.w_num_freed:][::-1] if group
                                       for b in group], keep_cached=self.enable_prefix_caching)

    def get_block_ids(self, request_id: str) -> list[int]:
        state = self._requests.get(request_id)
        return state.block_ids if state is not None else []

    def empty_slots(self, request_id: str, num_tokens: int) -> int:
        """Of the slots of the blocks the request holds, those that hold no token once its first `num_tokens`
        tokens are in the cache: the unfilled tail of its last block, in the full group and in each window group of
        a hybrid model (a window block's positions behind the window hold their tokens; blocks wholly behind it are
        given back, not held). Blocks a sliding window gave back hold no slot of the request."""
        state = self._requests.get(request_id)
        if state is None:
            return 0
        bs = self.block_size
        empty = (len(state.blocks) - state.num_freed) * bs - max(0, num_tokens - state.num_freed * bs)
        for i in range(state.w_num_freed, len(state.wblocks)):
            group = state.wblocks[i]
            if group:
                empty += len(group) * (bs - min(bs, max(0, num_tokens - i * bs)))
        return empty

    def get_window_block_ids(self, request_id: str) -> list[list[int]] | None:
        """A hybrid model's window tables, one a window group (live lists, as get_block_ids'); None for other models."""
        if self.window is None:
            return None
        state = self._requests.get(request_id)
        return state.wblock_ids if state is not None else []

    def get_window_blocks(self, request_id: str) -> list[Block]:
        """The window groups' blocks the request holds (those behind its window given back)."""
        state = self._requests.get(request_id)
        if state is None:
            return []
        return [b for group in state.wblocks[state.w_num_freed:] if group for b in group]

    def get_blocks(self, request_id: str) -> list[Block]:
        """The blocks the request holds (not those a sliding window gave back)."""
        state = self._requests.get(request_id)
        return list(state.blocks[state.num_freed:]) if state is not None else []

    def reset_prefix_cache(self) -> bool:
        """Forgets all cached prefixes (e.g. after new weights), the CPU tier's too. False, doing nothing, while any
        request holds blocks."""
        if not self.pool.reset_prefix_cache():
            return False
        if self.cpu is not None:
            self.cpu = CpuTier(self.cpu.num_blocks)
        return True
