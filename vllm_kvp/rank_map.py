"""RankMap: where a logical KV block lives (pure Python: no torch, no vLLM).

The scheduler hands out block ids from one logical space of `num_ranks x blocks_per_rank` blocks;
each KV rank allocates only its own `blocks_per_rank` physical blocks. Logical block `b` lives on
rank `b // blocks_per_rank` at local block `b % blocks_per_rank`; a logical slot (block id x
block size + offset) follows its block. This is the one place that fact is written: the scheduler
(per-rank free queues), the step routing, the backends' shard maps, the executor and the cost
model ask a RankMap, and the C++ kernels receive its numbers (`blocks_per_rank`, `block_size`).

Two block counts, never confused: `pooled_blocks` (all ranks: what the engine core's scheduler
sees) and `blocks_per_rank` (one rank: what each worker allocates).
"""

from __future__ import annotations

from dataclasses import dataclass

NULL_BLOCK = 0  # vLLM's null block: logical id 0, on rank 0, never handed out


@dataclass(frozen=True)
class RankMap:
    num_ranks: int
    blocks_per_rank: int
    block_size: int

    def __post_init__(self) -> None:
        for name in ("num_ranks", "blocks_per_rank", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RankMap.{name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_pooled(cls, pooled_blocks: int, num_ranks: int, block_size: int) -> "RankMap":
        """The map of a pool vLLM sized for all ranks together (any remainder is dropped: every
        rank allocates the same count)."""
        return cls(num_ranks, pooled_blocks // num_ranks, block_size)

    @property
    def pooled_blocks(self) -> int:
        """Logical blocks over all ranks (the engine core's block pool)."""
        return self.num_ranks * self.blocks_per_rank

    @property
    def tokens_per_rank(self) -> int:
        """KV slots of one rank."""
        return self.blocks_per_rank * self.block_size

    def rank_of_block(self, block_id: int) -> int:
        return block_id // self.blocks_per_rank

    def local_block(self, block_id: int) -> int:
        return block_id - self.rank_of_block(block_id) * self.blocks_per_rank

    def rank_of_slot(self, slot: int) -> int:
        """Rank holding a logical slot; -1 for a negative (padding) slot."""
        return -1 if slot < 0 else slot // self.tokens_per_rank

    def first_block(self, rank: int) -> int:
        """Logical id of `rank`'s local block 0."""
        return rank * self.blocks_per_rank

    def first_slot(self, rank: int) -> int:
        """Logical slot of `rank`'s local slot 0."""
        return rank * self.tokens_per_rank

    def usable_blocks(self) -> list[int]:
        """Blocks each rank can hand out: rank 0 holds the null block."""
        return [self.blocks_per_rank - (1 if self.rank_of_block(NULL_BLOCK) == r else 0)
                for r in range(self.num_ranks)]

    def largest_context(self) -> int:
        """Tokens one request can hold when it spans every rank (the null block excluded)."""
        return (self.pooled_blocks - 1) * self.block_size
