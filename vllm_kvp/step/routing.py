"""StepRouting: which KV rank computes which token of a step (pure tensor math, no communication).

Under owner computes, a token is computed (embedding to final norm) only on the KV rank that owns
its KV slot, i.e. the rank that writes its K/V. Everything the step needs to route tokens is a
function of the scheduler's output alone (logical slot mapping and query offsets), so every rank
derives the same routing with no communication, once per step, before the first layer runs.

Row conventions. vLLM orders a step's T tokens request by request ("vLLM order"). Rank r runs its
model on `rows` rows: the tokens it owns, in vLLM order, or one dummy row when it owns none (every
rank takes part in every collective; a zero-row forward is not something vLLM's kernels promise to
handle). Exchanges pad each rank's rows to `t_max` and concatenate them by rank ("rank-major"),
so row `j` of rank `o` sits at `o * t_max + j`.

Whether a step is routed this way or shared (every rank runs every token) is the step policy's
choice (`step_policy.StepPolicy.kind`), made from `counts`; the ownership fields keep their meaning
either way (a shared step still keeps each token's result from its owner).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvp.rank_map import RankMap


@dataclass
class StepRouting:
    rank: int
    world: int
    num_tokens: int  # T: tokens of the step (vLLM order)
    counts: list[int]  # tokens owned by each rank (host ints)
    rows: int  # rows this rank's model runs in a routed step: max(counts[rank], 1)
    t_max: int  # rows every rank contributes to a row exchange: max over ranks of their `rows`
    row_idx: torch.Tensor  # (rows,) int64 vLLM-order index of each local row (0 for a dummy)
    row_slots: torch.Tensor  # (rows,) int64 logical KV slot of each local row (-1 for a dummy)
    row_req: torch.Tensor  # (rows,) int64 request of each local row (-1 for a dummy)
    row_pos: torch.Tensor  # (rows,) int64 position of each local row in its request
    restore_idx: torch.Tensor  # (T,) int64 rank-major row holding each vLLM-order token
    token_req: torch.Tensor  # (T,) int64 request of each token
    token_pos: torch.Tensor  # (T,) int64 position of each token in its request
    read_along: list[int] = field(default_factory=list)  # host values of route_step's read_along

    @property
    def num_local(self) -> int:
        return self.counts[self.rank]


def token_requests(query_start_loc: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """query_start_loc (B+1,) int -> (T,) int64 index of the request each token belongs to."""
    qsl = query_start_loc.to(torch.int64)
    tokens = torch.arange(num_tokens, device=qsl.device)
    # Padding tokens past the last request (a padded step) count as the last request's; they own
    # no slot, so nothing reads what they are assigned.
    return torch.searchsorted(qsl[1:], tokens, right=True).clamp(max=max(qsl.numel() - 2, 0))


def route_step(slot_mapping: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
               rank: int, ranks: RankMap, read_along: torch.Tensor | None = None) -> StepRouting:
    """The routing of one step on `rank`. `read_along`: a small int or bool tensor the caller
    needs on the host too, read in the same transfer as the counts (`StepRouting.read_along`).

    slot_mapping (T,) int64 logical slots of the step's tokens (negative: padding, owned by no
    rank); query_start_loc (B+1,) int; seq_lens (B,) int tokens of each request after this step.
    """
    t, world = slot_mapping.shape[0], ranks.num_ranks
    dev = slot_mapping.device
    slots = slot_mapping.to(torch.int64)
    owner = torch.where(slots >= 0,
                        torch.div(slots, ranks.tokens_per_rank, rounding_mode="floor"),
                        torch.full_like(slots, -1))
    mine = owner.unsqueeze(0) == torch.arange(world, device=dev).unsqueeze(1)  # (N, T)
    # The one host read of the step: the exchange sizes must be host ints on every rank.
    counts = mine.sum(dim=1)
    if read_along is not None:
        counts = torch.cat([counts, read_along.reshape(-1).to(torch.int64)])
    counts = counts.tolist()
    counts, along = counts[:world], counts[world:]
    rows = max(counts[rank], 1)
    t_max = max(max(counts), 1)

    req = token_requests(query_start_loc, t)
    qsl = query_start_loc.to(torch.int64)
    q_lens = qsl[1:] - qsl[:-1]
    num_past = seq_lens.to(torch.int64) - q_lens
    pos = num_past[req] + (torch.arange(t, device=dev) - qsl[req])

    # Rank-local index of every token among the tokens its owner computes.
    local_pos = (torch.cumsum(mine.to(torch.int64), dim=1) - 1).gather(
        0, owner.clamp(min=0).unsqueeze(0)).squeeze(0)
    restore_idx = torch.where(owner >= 0, owner * t_max + local_pos, torch.zeros_like(owner))

    if counts[rank] == 0:
        return StepRouting(rank, world, t, counts, rows, t_max,
                           row_idx=torch.zeros(1, dtype=torch.int64, device=dev),
                           row_slots=torch.full((1,), -1, dtype=torch.int64, device=dev),
                           row_req=torch.full((1,), -1, dtype=torch.int64, device=dev),
                           row_pos=torch.zeros(1, dtype=torch.int64, device=dev),
                           restore_idx=restore_idx, token_req=req, token_pos=pos,
                           read_along=along)
    # A stable sort puts this rank's tokens first, in vLLM order; unlike `nonzero` it needs no
    # second host read (the size is counts[rank], already on the host).
    row_idx = torch.argsort((owner != rank).to(torch.int32), stable=True)[:rows]
    return StepRouting(rank, world, t, counts, rows, t_max, row_idx=row_idx,
                       row_slots=slots[row_idx], row_req=req[row_idx], row_pos=pos[row_idx],
                       restore_idx=restore_idx, token_req=req, token_pos=pos,
                           read_along=along)


def routing_from_tensors(routed, rank: int, world: int) -> StepRouting:
    """The routing `route_step` makes, from the tensors the C++ pass computes
    (`ops.cpu_kernel.step_routing_cpu`: counts, row_idx, row_slots, row_req, row_pos,
    restore_idx, token_req, token_pos)."""
    counts_t, row_idx, row_slots, row_req, row_pos, restore_idx, token_req, token_pos = routed
    counts = counts_t.tolist()
    return StepRouting(rank, world, token_req.shape[0], counts, max(counts[rank], 1),
                       max(max(counts), 1), row_idx=row_idx, row_slots=row_slots,
                       row_req=row_req, row_pos=row_pos, restore_idx=restore_idx,
                       token_req=token_req, token_pos=token_pos)
