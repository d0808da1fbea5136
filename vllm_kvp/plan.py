"""StepPlan: which KV rank computes which token of a step (pure tensor math, no communication).

Under owner computes, a token is computed (embedding to final norm) only on the KV rank that owns
its KV slot, i.e. the rank that writes its K/V. Everything the step needs to route tokens is a
function of the scheduler's output alone (logical slot mapping and query offsets), so every rank
derives the same plan with no communication, once per step, before the first layer runs.

Row conventions. vLLM orders a step's T tokens request by request ("vLLM order"). Rank r runs its
model on `rows` rows: the tokens it owns, in vLLM order, or one dummy row when it owns none (every
rank takes part in every collective; a zero-row forward is not something vLLM's kernels promise to
handle). Exchanges pad each rank's rows to `t_max` and concatenate them by rank ("rank-major"),
so row `j` of rank `o` sits at `o * t_max + j`.

Replicated steps. When one rank owns every token of the step (a batch-1 decode, a prompt chunk that
lands on one rank) and the config allows it, the plan is `replicated`: every rank runs all T tokens
(no rank runs more rows than the owner would), so the queries are already everywhere and the
per-layer query exchange is skipped; K/V is still written only by the owner, and the final hidden
states still come from the owners (`row_idx`, `restore_idx` keep their meaning). When the model
has linear layers split by columns over the ranks (`split_linear`), small steps and uneven ones
replicate too: each rank then computes its share of every large layer's columns for all T rows,
which reads 1/N of the weights (small steps are bound by that) and shares an uneven step's work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class StepPlan:
    rank: int
    world: int
    num_tokens: int  # T: tokens of the step (vLLM order)
    counts: list[int]  # tokens owned by each rank (host ints)
    rows: int  # rows this rank's model runs: max(counts[rank], 1)
    t_max: int  # rows every rank contributes to an exchange: max over ranks of their `rows`
    row_idx: torch.Tensor  # (rows,) int64 vLLM-order index of each local row (0 for a dummy)
    row_slots: torch.Tensor  # (rows,) int64 logical KV slot of each local row (-1 for a dummy)
    row_req: torch.Tensor  # (rows,) int64 request of each local row (-1 for a dummy)
    row_pos: torch.Tensor  # (rows,) int64 position of each local row in its request
    restore_idx: torch.Tensor  # (T,) int64 rank-major row holding each vLLM-order token
    token_req: torch.Tensor  # (T,) int64 request of each token
    token_pos: torch.Tensor  # (T,) int64 position of each token in its request
    replicated: bool = False  # every rank runs all T tokens (one rank owns them all)

    @property
    def out_rows(self) -> int:
        """Rows this rank's layers run and its attention outputs: every token in a replicated
        step, else its own `rows`."""
        return self.num_tokens if self.replicated else self.rows

    @functools.cached_property
    def merge_idx(self) -> torch.Tensor:
        """(out_rows,) int64 vLLM-order query of each output row (the rows whose partials this
        rank merges)."""
        if self.replicated:
            return torch.arange(self.num_tokens, device=self.restore_idx.device)
        return self.row_idx

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


def replicates(counts: list[int], allow_replicated: bool, split: bool,
               split_step_tokens: int) -> bool:
    """Whether a step whose ranks own `counts` tokens runs on every rank.

    One owner: always (nobody runs more rows than it would). With split linear layers (each rank
    computes 1/N of their columns for every row) also a step of at most `split_step_tokens` tokens,
    and one whose busiest rank owns at least 1.5x its share: routed, that rank alone would set the
    step's time."""
    world, total, busiest = len(counts), sum(counts), max(counts)
    if not allow_replicated or world < 2 or total == 0:
        return False
    if busiest == total:
        return True
    return split and (total <= split_step_tokens or 2 * busiest * world >= 3 * total)


def build_step_plan(slot_mapping: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, rank: int, world: int,
                    tokens_per_rank: int, allow_replicated: bool = False, split: bool = False,
                    split_step_tokens: int = 0) -> StepPlan:
    """The routing of one step.

    slot_mapping (T,) int64 logical slots of the step's tokens (negative: padding, owned by no
    rank); query_start_loc (B+1,) int; seq_lens (B,) int tokens of each request after this step;
    tokens_per_rank: KV slots per rank (blocks_per_rank * block_size), so slot s lives on rank
    s // tokens_per_rank. allow_replicated: make the plan `replicated` when one rank owns every
    token of the step, and, when `split` (the model has column-split linear layers), when the step
    is small or uneven (see `replicates`).
    """
    t = slot_mapping.shape[0]
    dev = slot_mapping.device
    slots = slot_mapping.to(torch.int64)
    owner = torch.where(slots >= 0, torch.div(slots, tokens_per_rank, rounding_mode="floor"),
                        torch.full_like(slots, -1))
    mine = owner.unsqueeze(0) == torch.arange(world, device=dev).unsqueeze(1)  # (N, T)
    # The one host read of the step: the exchange sizes must be host ints on every rank.
    counts = mine.sum(dim=1).tolist()
    rows = max(counts[rank], 1)
    t_max = max(max(counts), 1)
    replicated = replicates(counts, allow_replicated, split, split_step_tokens)

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
        return StepPlan(rank, world, t, counts, rows, t_max,
                        row_idx=torch.zeros(1, dtype=torch.int64, device=dev),
                        row_slots=torch.full((1,), -1, dtype=torch.int64, device=dev),
                        row_req=torch.full((1,), -1, dtype=torch.int64, device=dev),
                        row_pos=torch.zeros(1, dtype=torch.int64, device=dev),
                        restore_idx=restore_idx, token_req=req, token_pos=pos,
                        replicated=replicated)
    # A stable sort puts this rank's tokens first, in vLLM order; unlike `nonzero` it needs no
    # second host read (the size is counts[rank], already on the host).
    row_idx = torch.argsort((owner != rank).to(torch.int32), stable=True)[:rows]
    return StepPlan(rank, world, t, counts, rows, t_max, row_idx=row_idx,
                    row_slots=slots[row_idx], row_req=req[row_idx], row_pos=pos[row_idx],
                    restore_idx=restore_idx, token_req=req, token_pos=pos, replicated=replicated)


def step_plan_from_routing(routing, rank: int, world: int, allow_replicated: bool = False,
                           split: bool = False, split_step_tokens: int = 0) -> StepPlan:
    """The plan `build_step_plan` makes, from the routing tensors the C++ kernel computes in one
    pass (`ops.cpu_kernel.step_routing_cpu`: counts, row_idx, row_slots, row_req, row_pos,
    restore_idx, token_req, token_pos)."""
    counts_t, row_idx, row_slots, row_req, row_pos, restore_idx, token_req, token_pos = routing
    counts = counts_t.tolist()
    return StepPlan(rank, world, token_req.shape[0], counts, max(counts[rank], 1),
                    max(max(counts), 1), row_idx=row_idx, row_slots=row_slots, row_req=row_req,
                    row_pos=row_pos, restore_idx=restore_idx, token_req=token_req,
                    token_pos=token_pos,
                    replicated=replicates(counts, allow_replicated, split, split_step_tokens))
