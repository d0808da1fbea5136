"""Logical -> local KV addressing for one KV rank (pure tensor math, no communication).

The scheduler's block ids are logical over N ranks of P blocks: logical block b is physical block
b - r*P on rank r = b // P. Each rank turns a step's logical block table and slot mapping into its
own view: which of a request's *past* tokens (those computed before this step) it holds, and where
this step's new tokens are written, if at all.
"""

from __future__ import annotations

import torch


def local_slots(slot_mapping: torch.Tensor, block_size: int, rank: int,
                blocks_per_rank: int) -> torch.Tensor:
    """slot_mapping (T,) int64 logical slots (negative = padding) -> local slots, -1 elsewhere."""
    per_rank = blocks_per_rank * block_size
    owner = torch.div(slot_mapping, per_rank, rounding_mode="floor")
    keep = (slot_mapping >= 0) & (owner == rank)
    return torch.where(keep, slot_mapping - rank * per_rank, torch.full_like(slot_mapping, -1))


def local_blocks(block_table: torch.Tensor, num_past: torch.Tensor, block_size: int, rank: int,
                 blocks_per_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The part of each request's past context held by `rank`.

    block_table (B, M) int logical block ids (entries past a request's blocks are ignored);
    num_past (B,) int tokens of each request to cover (those computed before this step, or all
    of them including this step's, whose K/V the owners have written before attending).
    Returns local_table (B, M) int32 local block ids, the held blocks first in logical order,
    shard_lens (B,) int32: request i's shard is the first shard_lens[i] tokens of
    local_table[i]'s blocks, and block_pos (B, M) int32: the position in its request of the first
    token of each local_table block. Only the last past block can be partly filled, and it is the last one
    this rank holds if it holds it, so the held tokens always form a prefix of those blocks.
    """
    b, m = block_table.shape
    idx = torch.arange(m, device=block_table.device)
    start = idx.unsqueeze(0) * block_size                                   # (1, M)
    past = num_past.to(torch.int64).unsqueeze(1)                            # (B, 1)
    tokens = (past - start).clamp(min=0, max=block_size)                    # past tokens per block
    owner = torch.div(block_table.to(torch.int64), blocks_per_rank, rounding_mode="floor")
    held = (tokens > 0) & (owner == rank)
    # Stable order: held blocks first, each group in logical order.
    order = torch.argsort((~held).to(torch.int64) * m + idx.unsqueeze(0), dim=1)
    local = (block_table.to(torch.int64) - rank * blocks_per_rank).gather(1, order)
    local = torch.where(held.gather(1, order), local, torch.zeros_like(local))
    shard_lens = (tokens * held).sum(dim=1)
    return local.to(torch.int32), shard_lens.to(torch.int32), (order * block_size).to(torch.int32)
