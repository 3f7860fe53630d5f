"""KV cache manager: exact block ids, prefix hits, LRU eviction, ref counts, collision safety."""

from __future__ import annotations

import pytest

from pagedserve.core import kv_cache
from pagedserve.core.kv_cache import KVCacheManager, hash_block_tokens
from pagedserve.core.request import Request
from pagedserve.sampling_params import SamplingParams

BS = 4  # block size of every test here


def make_request(request_id: str, token_ids: list[int], cache_salt: str | None = None) -> Request:
    return Request(request_id, list(token_ids), SamplingParams(), max_tokens=16, cache_salt=cache_salt)


def admit(manager: KVCacheManager, request: Request) -> list[int] | None:
    """What the scheduler does on admission: lookup, allocate the rest, mark it computed."""
    hit_ids, num_cached = manager.get_computed_blocks(request)
    block_ids = manager.allocate_slots(request, request.num_tokens - num_cached, hit_ids)
    if block_ids is not None:
        request.num_computed_tokens = request.num_tokens
    return block_ids


def decode(manager: KVCacheManager, request: Request, token_id: int) -> list[int] | None:
    """One decode step: the sampled token is appended, then computed next step."""
    request.append_output_token(token_id)
    block_ids = manager.allocate_slots(request, 1)
    if block_ids is not None:
        request.num_computed_tokens += 1
    return block_ids


def refs(manager: KVCacheManager, block_ids: list[int]) -> list[int]:
    return [manager.pool.blocks[i].ref_cnt for i in block_ids]


def test_allocates_from_the_head_in_order() -> None:
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(10)))  # 3 blocks, the last partial
    assert admit(m, a) == [0, 1, 2]
    b = make_request("b", list(range(100, 105)))
    assert admit(m, b) == [3, 4]
    assert m.num_free_blocks == 5
    assert m.usage == pytest.approx(0.5)
    assert m.get_block_ids("a") == [0, 1, 2]
    # Decoding fills a's block 2 (tokens 8..11), then needs a new block for token 12.
    assert decode(m, a, 10) == [0, 1, 2]
    assert decode(m, a, 11) == [0, 1, 2]
    assert decode(m, a, 12) == [0, 1, 2, 5]
    m.free(a)
    m.free(b)
    m.free(b)  # double free is a no-op
    assert m.num_free_blocks == 10
    assert m.usage == 0.0
    assert m.get_block_ids("a") == []


def test_prefix_hit_ids_tokens_and_ref_counts() -> None:
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    prompt = list(range(12))  # exactly 3 full blocks
    a = make_request("a", prompt)
    assert admit(m, a) == [0, 1, 2]

    # Same 12 tokens: the last token is never a hit, so only 2 blocks (8 tokens) are.
    b = make_request("b", prompt)
    assert m.get_computed_blocks(b) == ([0, 1], 8)
    assert admit(m, b) == [0, 1, 3]

    # One more token: all 3 blocks hit.
    c = make_request("c", prompt + [99])
    assert m.get_computed_blocks(c) == ([0, 1, 2], 12)
    assert admit(m, c) == [0, 1, 2, 4]
    assert refs(m, [0, 1, 2, 3, 4]) == [3, 3, 2, 1, 1]

    # A diverging block stops the chain even though later blocks equal cached ones.
    d = make_request("d", prompt[:4] + [7, 7, 7, 7] + prompt[8:] + [5])
    assert m.get_computed_blocks(d) == ([0], 4)

    # Stats count admissions only (a, b, c), in tokens.
    assert m.prefix_cache_queries == 12 + 12 + 13
    assert m.prefix_cache_hits == 0 + 8 + 12
    for r in (a, b, c):
        m.free(r)
    assert m.num_free_blocks == 10
    assert refs(m, list(range(10))) == [0] * 10


def test_block_hashes_are_chained_and_incremental() -> None:
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(6)), cache_salt="s")
    admit(m, a)
    assert len(a.block_hashes) == 1
    h0 = hash_block_tokens(None, (0, 1, 2, 3), "s")
    assert a.block_hashes == [h0]
    decode(m, a, 6)
    decode(m, a, 7)  # tokens 4..7 now fill block 1
    assert a.block_hashes == [h0, hash_block_tokens(h0, (4, 5, 6, 7), "s")]
    # Block 1 became full and computed through decode: it is registered and can be hit.
    b = make_request("b", list(range(8)) + [8], cache_salt="s")
    assert m.get_computed_blocks(b) == ([0, 1], 8)
    m.free(a)
    assert m.num_free_blocks == 10


def test_lru_eviction_order() -> None:
    m = KVCacheManager(num_blocks=6, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))  # blocks 0, 1
    b = make_request("b", list(range(100, 108)))  # blocks 2, 3
    assert admit(m, a) == [0, 1]
    assert admit(m, b) == [2, 3]
    m.free(a)
    m.free(b)
    # Never-used blocks first, then each request's blocks tail first, in the order freed.
    assert m.pool.free_block_ids() == [4, 5, 1, 0, 3, 2]

    # 3 new blocks: 4, 5, then 1 (a's tail block) is evicted; a's first block is still cached.
    c = make_request("c", list(range(200, 212)))
    assert admit(m, c) == [4, 5, 1]
    a2 = make_request("a2", list(range(8)) + [9])
    assert m.get_computed_blocks(a2) == ([0], 4)
    b2 = make_request("b2", list(range(100, 108)) + [9])
    assert m.get_computed_blocks(b2) == ([2, 3], 8)

    # A hit lifts the block off the free list; a block used again goes to the tail when freed.
    assert admit(m, b2) == [2, 3, 0]  # 0 was the head of the free list: a's first block evicted
    assert m.get_computed_blocks(make_request("a3", list(range(8)) + [9])) == ([], 0)
    m.free(c)
    m.free(b2)
    assert m.pool.free_block_ids() == [1, 5, 4, 0, 3, 2]
    assert m.num_free_blocks == 6


def test_free_hit_block_is_not_counted_twice() -> None:
    m = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))
    assert admit(m, a) == [0, 1]
    m.free(a)
    assert m.pool.free_block_ids() == [2, 3, 1, 0]
    # 17 tokens need 5 blocks: 2 cached (free) + 3 new, but only 2 others are free.
    big = make_request("big", list(range(8)) + list(range(50, 59)))
    assert m.get_computed_blocks(big) == ([0, 1], 8)
    assert admit(m, big) is None
    assert m.num_free_blocks == 4 and m.get_block_ids("big") == []  # nothing changed
    assert m.pool.free_block_ids() == [2, 3, 1, 0]
    assert m.prefix_cache_queries == 8  # the failed admission is not counted
    # 16 tokens need 4 blocks: 2 cached + 2 new fits exactly, and the new ones are not the hits.
    fits = make_request("fits", list(range(8)) + list(range(50, 58)))
    assert admit(m, fits) == [0, 1, 2, 3]
    assert m.num_free_blocks == 0 and m.usage == 1.0
    m.free(fits)
    assert m.num_free_blocks == 4


def test_hash_collision_never_gives_a_false_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache, "hash_block_tokens", lambda parent, token_ids, salt: 0)
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    x, y, z, w = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3], [4, 4, 4, 4]
    a = make_request("a", x + y)  # cached: x, then y after x
    d = make_request("d", z + w)  # cached: z, then w after z
    assert admit(m, a) == [0, 1]
    assert admit(m, d) == [2, 3]
    assert a.block_hashes == [0, 0] and d.block_hashes == [0, 0]
    # Every block has hash 0, yet only exact prefixes hit: "x then w" hits x only (w is cached,
    # but after z), "y ..." hits nothing.
    assert m.get_computed_blocks(make_request("q1", x + w + [0])) == ([0], 4)
    assert m.get_computed_blocks(make_request("q2", y + [0])) == ([], 0)
    assert m.get_computed_blocks(make_request("q3", z + w + [0])) == ([2, 3], 8)
    m.free(a)
    m.free(d)
    assert m.num_free_blocks == 10


def test_copies_of_one_prefix_continue_the_chain() -> None:
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    prompt = list(range(8))
    a = make_request("a", prompt)
    assert admit(m, a) == [0, 1]
    b = make_request("b", prompt)  # hits block 0 only; block 1 is computed again as a copy
    assert admit(m, b) == [0, 2]
    for t in (8, 9, 10, 11):
        decode(m, b, t)
    assert m.get_block_ids("b") == [0, 2, 3]
    # b's block 3 follows the copy (2); the chain is found through either copy.
    c = make_request("c", prompt + [8, 9, 10, 11, 12])
    assert m.get_computed_blocks(c) == ([0, 1, 3], 12)
    m.free(a)
    m.free(b)
    assert m.num_free_blocks == 10


def test_cache_salt_isolates() -> None:
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True)
    prompt = list(range(9))
    s1 = make_request("s1", prompt, cache_salt="one")
    assert admit(m, s1) == [0, 1, 2]
    assert m.get_computed_blocks(make_request("s2", prompt, cache_salt="two")) == ([], 0)
    assert m.get_computed_blocks(make_request("none", prompt)) == ([], 0)
    assert m.get_computed_blocks(make_request("s1b", prompt, cache_salt="one")) == ([0, 1], 8)
    m.free(s1)
    assert m.num_free_blocks == 10


def test_disabled_prefix_caching_shares_only_salted_siblings() -> None:
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(9))
    a = make_request("a", prompt)
    assert admit(m, a) == [0, 1, 2]
    b = make_request("b", prompt)
    assert m.get_computed_blocks(b) == ([], 0)
    assert admit(m, b) == [3, 4, 5]
    assert a.block_hashes == []  # no hashing at all for unsalted requests

    # n > 1 siblings share their prompt blocks through their common salt.
    s1 = make_request("s1", prompt, cache_salt="group")
    s2 = make_request("s2", prompt, cache_salt="group")
    assert admit(m, s1) == [6, 7, 8]
    assert m.get_computed_blocks(s2) == ([6, 7], 8)
    assert admit(m, s2) == [6, 7, 9]
    assert refs(m, [6, 7, 8, 9]) == [2, 2, 1, 1]
    for r in (a, b, s1):
        m.free(r)
    # s2 still holds 6 and 7, so they stay cached; freed at ref 0 they forget their hash at once.
    assert m.get_computed_blocks(make_request("s3", prompt, cache_salt="group")) == ([6, 7], 8)
    m.free(s2)
    assert m.get_computed_blocks(make_request("s4", prompt, cache_salt="group")) == ([], 0)
    assert m.pool.num_cached_blocks == 0
    assert m.num_free_blocks == 10


def test_reset_prefix_cache() -> None:
    m = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(8)))
    admit(m, a)
    assert m.reset_prefix_cache() is False  # refused while blocks are in use
    m.free(a)
    assert m.get_computed_blocks(make_request("b", list(range(9)))) == ([0, 1], 8)
    assert m.reset_prefix_cache() is True
    assert m.get_computed_blocks(make_request("c", list(range(9)))) == ([], 0)
    assert m.num_free_blocks == 4


def test_sliding_window_gives_back_blocks_behind_it_and_keeps_the_chain() -> None:
    """free_outside_window: blocks wholly before keep_from go back to the pool (still cached while free), the table
    keeps their ids, free() does not free them twice; the next full block's parent in the prefix chain is the
    given-back block's content, even after another request reused (and re-registered) that block."""
    m = KVCacheManager(num_blocks=6, block_size=BS, enable_prefix_caching=True)
    a = make_request("a", list(range(10)))
    assert admit(m, a) == [0, 1, 2]
    content_1 = m.pool.blocks[1].content_id
    assert m.free_outside_window(a, 3) == 0  # position 3 still in block 0
    assert m.free_outside_window(a, 8) == 2 and m.num_free_blocks == 5
    assert m.get_block_ids("a") == [0, 1, 2] and refs(m, [0, 1]) == [0, 0]
    assert m.free_outside_window(a, 8) == 0  # nothing twice
    # another request takes every free block, 0 and 1 last (the free list's order: 3, 4, 5, 0, 1)
    c = make_request("c", list(range(500, 520)))
    assert admit(m, c) == [3, 4, 5, 0, 1] and m.num_free_blocks == 0
    assert m.pool.blocks[1].content_id != content_1  # re-registered as c's
    for t in (10, 11):  # a fills block 2 (tokens 8..11): registered under block 1's old content
        assert decode(m, a, t) == [0, 1, 2]
    block2 = m.pool.blocks[2]
    assert block2.block_hash is not None and block2.parent_content_id == content_1
    assert decode(m, a, 12) is None  # a new block for token 12: none free
    m.free(a)
    m.free(c)
    assert m.num_free_blocks == 6 and refs(m, range(6)) == [0] * 6


def test_sliding_window_without_prefix_caching_frees_computed_blocks() -> None:
    m = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(13)))
    assert admit(m, a) == [0, 1, 2, 3]
    assert m.free_outside_window(a, 12) == 3 and m.num_free_blocks == 3
    m.free(a)
    assert m.num_free_blocks == 4


def test_cpu_tier_keeps_evicted_blocks_and_gives_them_back() -> None:
    """KV offloading: a cached block handed out again is first listed to copy to a CPU slot; a later lookup that
    misses on the device goes on in the CPU tier, and the admission copies those blocks into new device blocks (and
    registers them); copies come out in order with take_copies."""
    m = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=True, num_cpu_blocks=3)
    a = make_request("a", list(range(9)))  # blocks 0, 1 full (registered), 2 partial
    assert admit(m, a) == [0, 1, 2]
    m.free(a)
    assert m.take_copies() == ([], [])
    b = make_request("b", list(range(100, 116)))  # 4 blocks: reuses a's cached 0 and 1 (and 2, not cached)
    assert admit(m, b) == [3, 2, 1, 0]  # the free list: 3, then a's blocks tail first
    out, into = m.take_copies()
    assert out == [(1, 0), (0, 1)] and into == []  # a's two full blocks saved as they are reused (slots 0, 1)
    m.free(b)
    a2 = make_request("a2", list(range(9)) + [50, 51, 52])
    hit_ids, num_cached = m.get_computed_blocks(a2)
    assert hit_ids == [] and num_cached == 8  # both found in the CPU tier
    block_ids = m.allocate_slots(a2, a2.num_tokens - num_cached, hit_ids)
    assert len(block_ids) == 3
    out, into = m.take_copies()
    assert into == [(1, block_ids[0]), (0, block_ids[1])]  # a's block 0 from slot 1, block 1 from slot 0
    assert m.cpu_prefix_cache_hits == 8 and m.prefix_cache_hits == 8
    # the copied-in blocks are registered again: a device hit for the next request with that prefix
    m.free(a2)
    assert m.get_computed_blocks(make_request("a3", list(range(9))))[1] == 8
    # a different block 1 after the same block 0: the CPU tier checks the chain (parent hash, tokens)
    other = make_request("o", [0, 1, 2, 3, 9, 9, 9, 9, 1])
    assert m.get_computed_blocks(other)[1] == 4


def test_cpu_tier_is_lru_and_keeps_a_steps_blocks() -> None:
    from pagedserve.core.kv_cache import CpuTier

    tier = CpuTier(2)
    blocks = []
    for i in range(3):
        block = kv_cache.Block(10 + i)
        block.block_hash, block.token_ids, block.parent_hash = 1000 + i, (i,), None
        blocks.append(block)
    assert tier.save(blocks[0]) == 0 and tier.save(blocks[1]) == 1
    assert tier.save(blocks[0]) is None  # held already
    assert tier.save(blocks[2]) is None  # full and both pinned this step
    tier.unpin_all()
    assert tier.find(1000, (0,), None, None) is not None  # 0 used: 1 is the least recent
    assert tier.save(blocks[2]) == 1 and tier.find(1001, (1,), None, None) is None
    assert tier.find(1000, (0,), "salt", None) is None and len(tier) == 2
    collide = kv_cache.Block(20)  # the hash of block 0 for other tokens: replaces it in its own slot, no leak
    collide.block_hash, collide.token_ids, collide.parent_hash = 1000, (9,), None
    tier.unpin_all()
    assert tier.save(collide) == 0 and len(tier) == 2 and tier.find(1000, (0,), None, None) is None
    assert tier.find(1000, (9,), None, None) is not None and tier._free == []


def window_ids(m: KVCacheManager, request_id: str) -> list[list[int]]:
    return [list(ids) for ids in m.get_window_block_ids(request_id)]


def test_window_groups_give_back_only_the_windowed_layers_blocks() -> None:
    """A hybrid model (window 6, one window group): its table grows with the full one, block for block, from the same
    pool; what falls behind the window goes back while the full-attention group keeps everything; free() frees the
    rest. A request that needs more blocks than are free (both groups counted) changes nothing."""
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=True, window=6, num_window_groups=1)
    assert m.get_window_block_ids("a") == [] and KVCacheManager(4, BS, True).get_window_block_ids("a") is None
    a = make_request("a", list(range(10)))
    assert admit(m, a) == [0, 1, 2] and window_ids(m, "a") == [[3, 4, 5]]
    assert m.num_free_blocks == 4 and m.usage == pytest.approx(0.6)
    assert m.free_outside_window(a, 10 - 6 + 1) == 1  # position 10 attends to 5..10: block index 0 is behind
    assert m.num_free_blocks == 5 and m.get_blocks("a") == m.pool.blocks[:3]
    assert [b.block_id for b in m.get_window_blocks("a")] == [4, 5]
    for t in (10, 11):
        assert decode(m, a, t) == [0, 1, 2] and window_ids(m, "a") == [[3, 4, 5]]
    assert decode(m, a, 12) == [0, 1, 2, 6] and window_ids(m, "a") == [[3, 4, 5, 7]]
    assert m.free_outside_window(a, 13 - 6 + 1) == 1 and m.num_free_blocks == 4
    b = make_request("b", list(range(100, 112)))  # 3 blocks in each group: 6 > 4 free
    assert m.get_computed_blocks(b) == ([], 0)
    assert m.allocate_slots(b, 12, []) is None
    assert m.num_free_blocks == 4 and m.get_block_ids("b") == []
    m.free(a)
    assert m.num_free_blocks == 10 and refs(m, range(10)) == [0] * 10


def test_window_prefix_hit_needs_the_keys_its_window_reaches() -> None:
    """A prefix hit of a hybrid model (two window groups) is the longest cached full prefix whose last `window` keys
    are cached in every window group (their blocks registered under the full blocks' content ids); the tables'
    entries below that window are 0 and hold nothing, the others are shared (ref counts)."""
    m = KVCacheManager(num_blocks=40, block_size=BS, enable_prefix_caching=True, window=6, num_window_groups=2)
    prompt = list(range(17))  # 4 full blocks and one token
    a = make_request("a", prompt)
    assert admit(m, a) == [0, 1, 2, 3, 4] and window_ids(m, "a") == [[5, 7, 9, 11, 13], [6, 8, 10, 12, 14]]
    assert m.free_outside_window(a, 17 - 6 + 1) == 6  # position 17 attends to 12..17: indices 0-2 of both groups
    b = make_request("b", prompt)
    hit, num_cached = m.get_computed_blocks(b)
    assert (hit, num_cached) == ([0, 1, 2, 3], 16)  # position 16 attends to 11..16: indices 2, 3 (2 still cached)
    assert m.allocate_slots(b, 1, hit) == [0, 1, 2, 3, 15]
    assert window_ids(m, "b") == [[0, 0, 9, 11, 16], [0, 0, 10, 12, 17]]
    assert refs(m, [9, 10, 11, 12, 13, 14, 16, 17]) == [1, 1, 2, 2, 1, 1, 1, 1]
    m.free(a)
    m.free(b)
    # group 1's block at index 3 evicted: position 16 can no longer start; position 12 attends to 7..12 (indices 1, 2)
    m.pool.evict(m.pool.blocks[12])
    c = make_request("c", prompt)
    hit, num_cached = m.get_computed_blocks(c)
    assert (hit, num_cached) == ([0, 1, 2], 12)
    assert m.allocate_slots(c, 5, hit) is not None
    wc = window_ids(m, "c")
    assert [ids[:3] for ids in wc] == [[0, 7, 9], [0, 8, 10]]
    # a different first block: no hit at all (content ids chain the whole prefix)
    assert m.get_computed_blocks(make_request("d", [99] + prompt[1:])) == ([], 0)
    m.free(c)
    assert m.num_free_blocks == 40 and refs(m, range(40)) == [0] * 40
    assert m.reset_prefix_cache() and m.pool.num_cached_blocks == 0


def test_window_hit_is_exact_whatever_the_window_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Window blocks of two prefixes that share their tokens from index 1 on, every window key colliding: a request
    whose own window block is gone must not take the other prefix's (its keys were computed after other tokens)."""
    monkeypatch.setattr(kv_cache, "_window_key", lambda group, content_id: 0)
    m = KVCacheManager(num_blocks=40, block_size=BS, enable_prefix_caching=True, window=4, num_window_groups=1)
    tail = [9, 9, 9, 9, 5]
    a, b0 = make_request("a", [1, 2, 3, 4] + tail), make_request("b0", [7, 7, 7, 7] + tail)
    admit(m, a)
    admit(m, b0)
    evicted = m.get_window_block_ids("b0")[0][1]
    m.free(a)
    m.free(b0)
    m.pool.evict(m.pool.blocks[evicted])  # b0's window block at index 1 (a's, same tokens, stays cached)
    b = make_request("b", [7, 7, 7, 7] + tail)
    # position 8 attends to 5..8: index 1's window block is needed and gone; position 4 attends to 1..4: index 0's
    hit, num_cached = m.get_computed_blocks(b)
    assert num_cached == 4
    assert m.allocate_slots(b, 9 - num_cached, hit) is not None
    m.free(b)
    assert m.num_free_blocks == 40


def test_window_groups_without_prefix_caching_and_their_arguments() -> None:
    m = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False, window=4, num_window_groups=1)
    a = make_request("a", list(range(12)))
    assert admit(m, a) == [0, 1, 2] and m.free_outside_window(a, 12 - 4 + 1) == 2
    assert m.num_free_blocks == 4 and m.pool.num_cached_blocks == 0
    m.free(a)
    assert m.num_free_blocks == 8
    with pytest.raises(ValueError, match="window groups"):
        KVCacheManager(4, BS, True, window=4, num_window_groups=0)
    with pytest.raises(ValueError, match="CPU tier"):
        KVCacheManager(4, BS, True, num_cpu_blocks=2, window=4, num_window_groups=1)
