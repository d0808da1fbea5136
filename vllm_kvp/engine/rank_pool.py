"""RankedFreeQueue: vLLM's free-block queue split into one queue per KV rank.

The scheduler sees one logical block space over all KV ranks (`rank_map.RankMap`). vLLM's
BlockPool takes new blocks from a single free queue that knows no request; this drop-in
replacement keeps one `FreeKVCacheBlockQueue` per rank and pops from the ranks that the placement
policy chooses for the request being allocated. Everything else (prefix caching, eviction order within a
rank, freeing) keeps vLLM's semantics.
"""

from __future__ import annotations

from typing import Callable, Sequence

from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock

from vllm_kvp.rank_map import RankMap

# A chooser receives (number of blocks, free blocks per rank) and returns a rank per block.
Chooser = Callable[[int, Sequence[int]], list[int]]


class RankedFreeQueue:
    def __init__(self, free_blocks: list[KVCacheBlock], ranks: RankMap):
        self.ranks = ranks
        self.num_ranks = ranks.num_ranks
        per_rank: list[list[KVCacheBlock]] = [[] for _ in range(self.num_ranks)]
        for block in free_blocks:
            per_rank[self.rank_of(block.block_id)].append(block)
        self.queues = [FreeKVCacheBlockQueue(blocks) for blocks in per_rank]
        self.chooser: Chooser | None = None

    def rank_of(self, block_id: int) -> int:
        return self.ranks.rank_of_block(block_id)

    @property
    def num_free_blocks(self) -> int:
        return sum(q.num_free_blocks for q in self.queues)

    def free_per_rank(self) -> list[int]:
        return [q.num_free_blocks for q in self.queues]

    def popleft(self) -> KVCacheBlock:
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        if n == 0:
            return []
        free = self.free_per_rank()
        ranks = self.chooser(n, free) if self.chooser is not None else None
        if ranks is None:
            ranks = most_free_first(n, free)
        counts = [0] * self.num_ranks
        for r in ranks:
            counts[r] += 1
        popped = {r: iter(self.queues[r].popleft_n(c)) for r, c in enumerate(counts) if c}
        # Keep the chosen order: block i of the allocation comes from ranks[i].
        return [next(popped[r]) for r in ranks]

    def remove(self, block: KVCacheBlock) -> None:
        self.queues[self.rank_of(block.block_id)].remove(block)

    def append(self, block: KVCacheBlock) -> None:
        self.queues[self.rank_of(block.block_id)].append(block)

    def append_n(self, blocks: list[KVCacheBlock]) -> None:
        for rank, group in self._by_rank(blocks):
            self.queues[rank].append_n(group)

    def prepend_n(self, blocks: list[KVCacheBlock]) -> None:
        for rank, group in self._by_rank(blocks):
            self.queues[rank].prepend_n(group)

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        return [b for q in self.queues for b in q.get_all_free_blocks()]

    def _by_rank(self, blocks: list[KVCacheBlock]):
        groups: dict[int, list[KVCacheBlock]] = {}
        for block in blocks:  # order within a rank is vLLM's eviction order: keep it
            groups.setdefault(self.rank_of(block.block_id), []).append(block)
        return groups.items()


def most_free_first(n: int, free: Sequence[int]) -> list[int]:
    """Fallback when no choice applies (e.g. the null block at start-up): take from the ranks with
    the most free blocks. Correctness never depends on placement, only balance does."""
    free = list(free)
    ranks = []
    for _ in range(n):
        r = max(range(len(free)), key=lambda i: (free[i], -i))
        if free[r] == 0:
            raise ValueError(f"cannot take {n} free blocks from ranks holding {sum(free)}")
        free[r] -= 1
        ranks.append(r)
    return ranks
