"""StepRouting: which KV rank computes which token of a step (pure tensor math, no communication).

Under owner computes, a token is computed (embedding to final norm) only on the KV rank that owns
its KV slot, i.e. the rank that writes its K/V. Everything the step needs to route tokens is a
function of the scheduler's output alone (logical slot mapping, query offsets and block table), so
every rank derives the same routing with no communication, once per step, before the first layer
runs.

Local and spanning requests. A request whose KV (this step's tokens included) sits on one rank is
*local*: its owner holds all of its context and attends its rows alone. A request with KV on more
than one rank *spans*: its queries must reach the other ranks holding its KV and their partial
outputs must come back. Only spanning rows take part in the per-layer exchanges; a step with no
spanning row exchanges nothing in its attention layers.

Row conventions. vLLM orders a step's T tokens request by request ("vLLM order"). Rank r runs its
model on `rows` rows: the tokens it owns, its local requests' rows first and then its spanning
requests' rows, each group in vLLM order (or one dummy row when it owns none: every rank takes part
in every collective, and a zero-row forward is not something vLLM's kernels promise to handle).
Row exchanges pad each rank's rows to `t_max` and concatenate them by rank ("rank-major"), so row
`j` of rank `o` sits at `o * t_max + j`; the query exchange does the same with each rank's
spanning rows only, padded to `s_max`. Spanning tokens in vLLM order are the "span order" of the
step's S spanning queries: the order in which every rank computes and exchanges their partials.

Whether a step is routed this way or shared (every rank runs every token) is the step policy's
choice (`step_policy.StepPolicy.kind`), made from `counts` and `span_counts`; the ownership fields
keep their meaning either way (a shared step still keeps each token's result from its owner).
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
    span_counts: list[int]  # of those, tokens of spanning requests (host ints)
    rows: int  # rows this rank's model runs in a routed step: max(counts[rank], 1)
    t_max: int  # rows every rank contributes to a row exchange: max over ranks of their `rows`
    row_idx: torch.Tensor  # (rows,) int64 vLLM-order index of each row (0 for a dummy)
    row_slots: torch.Tensor  # (rows,) int64 logical KV slot of each row (-1 for a dummy)
    row_req: torch.Tensor  # (rows,) int64 request of each row (-1 for a dummy)
    row_pos: torch.Tensor  # (rows,) int64 position of each row in its request
    restore_idx: torch.Tensor  # (T,) int64 rank-major row holding each vLLM-order token
    token_req: torch.Tensor  # (T,) int64 request of each token
    token_pos: torch.Tensor  # (T,) int64 position of each token in its request
    # The spanning queries, in span order (S = sum(span_counts)):
    span_restore: torch.Tensor  # (S,) int64 rank-major row (padded to s_max) of each
    span_query_start_loc: torch.Tensor  # (B+1,) int32 offsets of each request's spanning queries
    span_pos: torch.Tensor  # (S,) int32 position of each
    span_merge: torch.Tensor  # (span_counts[rank],) int64 span-order index of this rank's spanning rows
    # This rank's local rows (the first num_own_local rows):
    own_query_start_loc: torch.Tensor  # (B+1,) int32 offsets of each request's local rows
    own_pos: torch.Tensor  # (num_own_local,) int32 position of each
    read_along: list[int] = field(default_factory=list)  # host values of route_step's read_along

    @property
    def num_local(self) -> int:
        """Tokens this rank owns (local and spanning requests')."""
        return self.counts[self.rank]

    @property
    def num_own_local(self) -> int:
        """This rank's rows of local requests (attended here alone): rows[:num_own_local]."""
        return self.counts[self.rank] - self.span_counts[self.rank]

    @property
    def num_spanning(self) -> int:
        """S: the step's spanning queries."""
        return sum(self.span_counts)

    @property
    def s_max(self) -> int:
        """Rows every rank contributes to the query exchange (0: no spanning query, no exchange)."""
        return max(self.span_counts, default=0)


def token_requests(query_start_loc: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """query_start_loc (B+1,) int -> (T,) int64 index of the request each token belongs to."""
    qsl = query_start_loc.to(torch.int64)
    tokens = torch.arange(num_tokens, device=qsl.device)
    # Padding tokens past the last request (a padded step) count as the last request's; they own
    # no slot, so nothing reads what they are assigned.
    return torch.searchsorted(qsl[1:], tokens, right=True).clamp(max=max(qsl.numel() - 2, 0))


def request_holders(block_table: torch.Tensor, seq_lens: torch.Tensor,
                    ranks: RankMap) -> torch.Tensor:
    """(B, N) bool: rank p holds KV of request i (one of its blocks in use, this step's tokens
    included). block_table (B, M) int logical ids (columns past a request's blocks are ignored);
    seq_lens (B,) int tokens of each request, this step's included."""
    b, m = block_table.shape
    if b == 0 or m == 0:
        return torch.zeros((b, ranks.num_ranks), dtype=torch.bool, device=block_table.device)
    cols = torch.arange(m, device=block_table.device).unsqueeze(0)
    used = cols * ranks.block_size < seq_lens.to(torch.int64).unsqueeze(1)  # (B, M)
    rank = torch.div(block_table.to(torch.int64), ranks.blocks_per_rank, rounding_mode="floor")
    rank = rank.clamp(0, ranks.num_ranks - 1)  # unused columns may hold anything
    counts = torch.zeros((b, ranks.num_ranks), dtype=torch.int32, device=block_table.device)
    counts.scatter_add_(1, rank, used.to(torch.int32))
    return counts > 0


def request_spans(block_table: torch.Tensor, seq_lens: torch.Tensor, ranks: RankMap) -> torch.Tensor:
    """(B,) bool: request i holds KV on more than one rank (`request_holders`' arguments)."""
    return request_holders(block_table, seq_lens, ranks).sum(dim=1) > 1


def _per_request_offsets(req: torch.Tensor, keep: torch.Tensor, num_reqs: int) -> torch.Tensor:
    """(B+1,) int32 offsets of each request's kept tokens, from req (n,) int64, keep (n,) bool."""
    per_req = torch.zeros(num_reqs + 1, dtype=torch.int32, device=req.device)
    per_req.scatter_add_(0, torch.where(keep, req + 1, torch.zeros_like(req)), keep.to(torch.int32))
    per_req[0] = 0
    return per_req.cumsum(0, dtype=torch.int32)


def route_step(slot_mapping: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
               rank: int, ranks: RankMap, block_table: torch.Tensor | None = None,
               read_along: torch.Tensor | None = None) -> StepRouting:
    """The routing of one step on `rank`. `read_along`: a small int or bool tensor the caller
    needs on the host too, read in the same transfer as the counts (`StepRouting.read_along`).

    slot_mapping (T,) int64 logical slots of the step's tokens (negative: padding, owned by no
    rank); query_start_loc (B+1,) int; seq_lens (B,) int tokens of each request after this step;
    block_table (B, M) int logical blocks of each request (None: treat every request as
    spanning, so every row takes part in the exchanges).
    """
    t, world = slot_mapping.shape[0], ranks.num_ranks
    n = query_start_loc.shape[0] - 1
    dev = slot_mapping.device
    slots = slot_mapping.to(torch.int64)
    owner = torch.where(slots >= 0,
                        torch.div(slots, ranks.tokens_per_rank, rounding_mode="floor"),
                        torch.full_like(slots, -1))
    req = token_requests(query_start_loc, t)
    if block_table is None:
        tok_span = owner >= 0
    elif n == 0:
        tok_span = torch.zeros_like(owner, dtype=torch.bool)
    else:
        tok_span = (owner >= 0) & request_spans(block_table, seq_lens, ranks)[req]
    mine = owner.unsqueeze(0) == torch.arange(world, device=dev).unsqueeze(1)  # (N, T)
    span_mine = mine & tok_span.unsqueeze(0)
    # The one host read of the step: the exchange sizes must be host ints on every rank.
    counts = torch.cat([mine.sum(dim=1), span_mine.sum(dim=1)])
    if read_along is not None:
        counts = torch.cat([counts, read_along.reshape(-1).to(torch.int64)])
    counts = counts.tolist()
    counts, span_counts, along = counts[:world], counts[world:2 * world], counts[2 * world:]
    rows = max(counts[rank], 1)
    t_max = max(max(counts), 1)
    s_max = max(span_counts)

    qsl = query_start_loc.to(torch.int64)
    q_lens = qsl[1:] - qsl[:-1]
    num_past = seq_lens.to(torch.int64) - q_lens
    pos = num_past[req] + (torch.arange(t, device=dev) - qsl[req])

    # Row of every token among its owner's rows: local requests' first, then spanning ones'.
    local_mine = mine & ~tok_span.unsqueeze(0)
    own_o = owner.clamp(min=0).unsqueeze(0)
    local_idx = (torch.cumsum(local_mine.to(torch.int64), dim=1) - 1).gather(0, own_o).squeeze(0)
    span_idx = (torch.cumsum(span_mine.to(torch.int64), dim=1) - 1).gather(0, own_o).squeeze(0)
    num_local = torch.tensor([c - s for c, s in zip(counts, span_counts)], device=dev)
    row_of = torch.where(tok_span, num_local[owner.clamp(min=0)] + span_idx, local_idx)
    restore_idx = torch.where(owner >= 0, owner * t_max + row_of, torch.zeros_like(owner))

    # Span order: the spanning tokens in vLLM order (a stable sort: no second host read).
    n_span = sum(span_counts)
    span_tok = torch.argsort((~tok_span).to(torch.int32), stable=True)[:n_span]
    span_restore = owner[span_tok] * s_max + span_idx[span_tok]
    span_qsl = _per_request_offsets(req, tok_span, n)
    span_pos = pos[span_tok].to(torch.int32)
    span_order = torch.cumsum(tok_span.to(torch.int64), dim=0) - 1  # (T,) span index of each

    if counts[rank] == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return StepRouting(rank, world, t, counts, span_counts, rows, t_max,
                           row_idx=torch.zeros(1, dtype=torch.int64, device=dev),
                           row_slots=torch.full((1,), -1, dtype=torch.int64, device=dev),
                           row_req=torch.full((1,), -1, dtype=torch.int64, device=dev),
                           row_pos=torch.zeros(1, dtype=torch.int64, device=dev),
                           restore_idx=restore_idx, token_req=req, token_pos=pos,
                           span_restore=span_restore, span_query_start_loc=span_qsl,
                           span_pos=span_pos, span_merge=empty,
                           own_query_start_loc=torch.zeros(n + 1, dtype=torch.int32, device=dev),
                           own_pos=empty.to(torch.int32), read_along=along)
    # A stable sort puts this rank's local tokens first, then its spanning ones, each in vLLM
    # order; unlike `nonzero` it needs no second host read (the size is already on the host).
    key = torch.where(owner == rank, tok_span.to(torch.int32), torch.full_like(owner, 2,
                                                                               dtype=torch.int32))
    row_idx = torch.argsort(key, stable=True)[:rows]
    n_own_local = counts[rank] - span_counts[rank]
    own_local = row_idx[:n_own_local]
    return StepRouting(rank, world, t, counts, span_counts, rows, t_max, row_idx=row_idx,
                       row_slots=slots[row_idx], row_req=req[row_idx], row_pos=pos[row_idx],
                       restore_idx=restore_idx, token_req=req, token_pos=pos,
                       span_restore=span_restore, span_query_start_loc=span_qsl,
                       span_pos=span_pos, span_merge=span_order[row_idx[n_own_local:]],
                       own_query_start_loc=_per_request_offsets(
                           req[own_local], torch.ones_like(own_local, dtype=torch.bool), n),
                       own_pos=pos[own_local].to(torch.int32), read_along=along)


ROUTING_TENSORS = ("row_idx", "row_slots", "row_req", "row_pos", "restore_idx", "token_req",
                   "token_pos", "span_restore", "span_query_start_loc", "span_pos", "span_merge",
                   "own_query_start_loc", "own_pos")


def routing_from_tensors(routed, rank: int, world: int) -> StepRouting:
    """The routing `route_step` makes, from the tensors the C++ pass computes
    (`ops.cpu_kernel.step_routing_cpu`: counts, span_counts, then `ROUTING_TENSORS` in order)."""
    counts_t, span_t, *tensors = routed
    counts, span_counts = counts_t.tolist(), span_t.tolist()
    named = dict(zip(ROUTING_TENSORS, tensors))
    return StepRouting(rank, world, named["token_req"].shape[0], counts, span_counts,
                       max(counts[rank], 1), max(max(counts), 1), **named)
