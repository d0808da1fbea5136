"""Fresh requests in a shared step: their attention split over the ranks by rows (pure tensor math).

A request is *fresh* in a step when it has no KV before the step: its whole context is the step's
own tokens (a new prompt that fits in one chunk, or a long prompt's first chunk). In a shared step
every rank computes the K/V of every token (the qkv projection's columns are gathered), so every
rank holds all of a fresh request's keys and values without reading any cache. Left to the usual
path, the rank that owns the request's slots attends all of its queries while the others, which
hold none of its KV, wait for it: measured on the bench model's 1k-token one-owner prompt, the
owner's attention was 12% of the step and the other rank idled for as long. Here each rank attends
a stripe of the fresh queries (rows in runs of `STRIPE` positions, dealt round robin, so the causal
work is even) over the step's K/V, laid out in a scratch cache; every other query's partial comes
from the caches as before, and a fresh query's partial is exact on the rank that computes it and
empty (out = 0, lse = -inf) on the others, so the usual merge gives its attention unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRIPE = 16  # consecutive positions one rank attends: short runs keep the causal work even


@dataclass
class FreshSplit:
    """This rank's share of the fresh requests' attention in one shared step (B_f fresh
    requests, T_f fresh tokens, n of their queries attended here)."""

    cache_lens: torch.Tensor  # (B,) int32 KV of each request read from the cache (fresh: 0)
    token_idx: torch.Tensor  # (T_f,) int64 step index of each fresh token
    scratch_rows: torch.Tensor  # (T_f,) int64 its row in the scratch cache (block-major)
    num_blocks: int  # scratch cache blocks
    block_size: int  # tokens per scratch block
    block_table: torch.Tensor  # (B_f, M_f) int32 scratch blocks of each fresh request
    lens: torch.Tensor  # (B_f,) int32 tokens of each fresh request
    block_pos: torch.Tensor  # (B_f, M_f) int32 position of each scratch block's first token
    rows: torch.Tensor  # (n,) int64 step index of each query attended here
    query_start_loc: torch.Tensor  # (B_f + 1,) int32 offsets of each request's queries here
    pos: torch.Tensor  # (n,) int32 position of each


def fresh_split(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, shard_lens: torch.Tensor,
                rank: int, world: int, block_size: int) -> FreshSplit | None:
    """The split of a shared step's fresh requests (None when it has none, or one rank).
    query_start_loc (B+1,) int offsets of each request's tokens; seq_lens (B,) int tokens of each
    after the step; shard_lens (B,) int KV of each this rank reads from its cache."""
    qsl = query_start_loc.to(torch.int64)
    q_lens = qsl[1:] - qsl[:-1]
    fresh = (seq_lens.to(torch.int64) == q_lens) & (q_lens > 1)
    if world < 2 or not bool(fresh.any()):
        return None
    dev = qsl.device
    f_lens = q_lens[fresh]
    f_start = qsl[:-1][fresh]
    b_f = f_lens.shape[0]
    blocks = (f_lens + block_size - 1) // block_size
    first_block = torch.cumsum(blocks, 0) - blocks
    m_f = int(blocks.max())
    cols = torch.arange(m_f, device=dev)
    # Every fresh token, request by request, and its position within the request.
    req = torch.repeat_interleave(torch.arange(b_f, device=dev), f_lens)
    pos = torch.arange(req.shape[0], device=dev) - (torch.cumsum(f_lens, 0) - f_lens)[req]
    token_idx = f_start[req] + pos
    scratch_rows = first_block[req] * block_size + pos
    mine = (pos // STRIPE) % world == rank
    per_req = torch.zeros(b_f + 1, dtype=torch.int64, device=dev)
    per_req[1:] = torch.bincount(req[mine], minlength=b_f)
    return FreshSplit(
        cache_lens=torch.where(fresh, torch.zeros_like(shard_lens), shard_lens),
        token_idx=token_idx, scratch_rows=scratch_rows, num_blocks=int(blocks.sum()),
        block_size=block_size,
        block_table=(first_block.unsqueeze(1) + cols).to(torch.int32),
        lens=f_lens.to(torch.int32),
        block_pos=(cols * block_size).unsqueeze(0).expand(b_f, m_f).to(torch.int32).contiguous(),
        rows=token_idx[mine], query_start_loc=torch.cumsum(per_req, 0).to(torch.int32),
        pos=pos[mine].to(torch.int32))


def scratch_cache(split: FreshSplit, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The fresh tokens' K/V (key, value: (T, Hkv, D) of every token of the step) in the CPU cache
    layout (num_blocks, Hkv, block_size, 2D); slots past a request's tokens are zero."""
    hkv, d, block_size = key.shape[1], key.shape[2], split.block_size
    flat = key.new_zeros((split.num_blocks * block_size, hkv, 2 * d))
    idx = split.token_idx
    flat[split.scratch_rows] = torch.cat([key[idx], value[idx]], dim=-1)
    return flat.view(split.num_blocks, block_size, hkv, 2 * d).transpose(1, 2).contiguous()
