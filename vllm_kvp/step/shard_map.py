"""Logical -> local KV addressing for one KV rank (pure tensor math, no communication).

The scheduler's block ids are logical over all ranks (`rank_map.RankMap`). Each rank turns a
step's logical block table and slot mapping into its own view: which of a request's tokens it
holds, and where this step's new tokens are written, if at all.
"""

from __future__ import annotations

import torch

from vllm_kvp.rank_map import RankMap


def local_slots(slot_mapping: torch.Tensor, rank: int, ranks: RankMap) -> torch.Tensor:
    """slot_mapping (T,) int64 logical slots (negative = padding) -> local slots, -1 elsewhere."""
    base = ranks.first_slot(rank)
    keep = (slot_mapping >= base) & (slot_mapping < base + ranks.tokens_per_rank)
    return torch.where(keep, slot_mapping - base, torch.full_like(slot_mapping, -1))


def local_blocks(block_table: torch.Tensor, num_past: torch.Tensor, rank: int,
                 ranks: RankMap) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The part of each request's context held by `rank`.

    block_table (B, M) int logical block ids (entries past a request's blocks are ignored);
    num_past (B,) int tokens of each request to cover (all of them including this step's, whose
    K/V the owners write before attending).
    Returns local_table (B, M) int32 local block ids, the held blocks first in logical order,
    shard_lens (B,) int32: request i's shard is the first shard_lens[i] tokens of
    local_table[i]'s blocks, and block_pos (B, M) int32: the position in its request of the first
    token of each local_table block. Only the last block can be partly filled, and it is the last
    one this rank holds if it holds it, so the held tokens always form a prefix of those blocks.
    """
    b, m = block_table.shape
    bs = ranks.block_size
    dev = block_table.device
    idx = torch.arange(m, device=dev, dtype=torch.int32).unsqueeze(0)         # (1, M)
    tokens = (num_past.to(torch.int32).unsqueeze(1) - idx * bs).clamp(min=0, max=bs)
    local = block_table.to(torch.int32) - ranks.first_block(rank)
    held = (tokens > 0) & (local >= 0) & (local < ranks.blocks_per_rank)
    # Destination column of each block: held ones first, then the rest, each group in logical
    # order (a scatter by running counts: no sort).
    held_i = held.to(torch.int32)
    n_held = held_i.sum(dim=1, keepdim=True)
    dest = torch.where(held, held_i.cumsum(dim=1) - 1, n_held + (1 - held_i).cumsum(dim=1) - 1)
    dest = dest.to(torch.int64)
    table = torch.zeros((b, m), dtype=torch.int32, device=dev)
    table.scatter_(1, dest, torch.where(held, local, torch.zeros_like(local)))
    block_pos = torch.empty((b, m), dtype=torch.int32, device=dev)
    block_pos.scatter_(1, dest, (idx * bs).expand(b, m).contiguous())
    shard_lens = (tokens * held_i).sum(dim=1, dtype=torch.int32)
    return table, shard_lens, block_pos
