"""Exchange scope: which ranks a spanning query goes to, and where its partials come back from
(pure tensor math, no communication).

A routed step's spanning queries are all-gathered by default: every rank receives every spanning
query and returns a partial for each, empty (out = 0, lse = -inf) where it holds nothing of the
query's request. With two ranks that is exactly the ranks holding the KV (a spanning request is
on both); with more it is not: a request on ranks {0, 1} of 3 still sends its queries to rank 2
and merges rank 2's empty partials. A *scoped* step sends each query only to the other ranks
holding KV of its request and brings back only their partials, with two all-to-alls of variable
sizes per attention layer instead of two all-gathers (`comm.exchange_scoped`). Whether a step is
scoped is the step policy's choice (`StepPolicy.scoped`: the all-to-all's latency against the
bytes it saves; `kvp.exchange_scope`).

Conventions (every rank derives the same from the step alone). The step's S spanning queries in
span order (`routing.StepRouting`); `send[o][p]` (host ints, o != p): queries owner o sends to p,
i.e. o's spanning queries whose request p holds; `send[r][r]`: r's own spanning queries. On rank
r:
  - its *exchanged* queries X_r are the spanning queries whose request r holds, in span order
    (its own spanning rows among them): the queries its kernel attends;
  - it sends to each peer p, in rank order, its own spanning rows whose request p holds, in row
    order (`q_send`); it receives from each peer o, in rank order, o's rows whose request r holds
    (`recv`), in span order; `x_src` picks X_r from [own spanning rows; received rows];
  - it returns to each owner o, in rank order, the partials of the received rows (`recv`: the
    same rows in the same order, so `p_send` indexes X_r); each owner receives back, from each
    peer p, the partials of the rows it sent p, in the order it sent them;
  - `merge_src` (N, n_r) picks, for each rank p and each of r's spanning rows, its partial from
    [r's partials of X_r; received partials; one empty row]: the empty row where p holds nothing
    of the row's request, so the merge sees what an all-gather would have brought.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class ExchangeScope:
    send: list[list[int]]  # (N, N) host ints: queries each owner sends each peer (diagonal: own)
    in_splits: list[int]  # rows this rank sends each rank in the query exchange (0 to itself)
    out_splits: list[int]  # rows it receives from each (0 from itself); the partials go back
    q_send: torch.Tensor  # (sum_p send[r][p], p != r) int64 row among r's spanning rows
    x_src: torch.Tensor  # (X,) int64 index into [own spanning rows; received rows]
    x_query_start_loc: torch.Tensor  # (B+1,) int32 offsets of each request's queries in X
    x_pos: torch.Tensor  # (X,) int32 position of each
    p_send: torch.Tensor  # (received,) int64 index into X of each partial returned, owner order
    merge_src: torch.Tensor  # (N * n_r,) int64 index into [X partials; received; empty]


def span_holders(routing, holders: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner (S,) int64, hold (S, N) bool) of the step's spanning queries in span order."""
    s = routing.num_spanning
    dev = holders.device
    if s == 0:
        return (torch.zeros(0, dtype=torch.int64, device=dev),
                torch.zeros((0, routing.world), dtype=torch.bool, device=dev))
    owner = torch.div(routing.span_restore, routing.s_max, rounding_mode="floor")
    qsl = routing.span_query_start_loc.to(torch.int64)
    req = torch.searchsorted(qsl[1:], torch.arange(s, device=dev), right=True)
    return owner, holders[req]


def send_matrix(owner: torch.Tensor, hold: torch.Tensor, world: int) -> list[list[int]]:
    """send[o][p]: spanning queries owned by o whose request p holds (host ints, one read)."""
    # A scatter, not a one-hot matmul: integer matmuls are not implemented on CUDA.
    idx = owner.unsqueeze(1) * world + torch.arange(world, device=owner.device)  # (S, N)
    send = torch.zeros(world * world, dtype=torch.int64, device=owner.device)
    send.scatter_add_(0, idx.reshape(-1), hold.reshape(-1).to(torch.int64))
    return send.view(world, world).tolist()


def needs_scope(send: list[list[int]]) -> bool:
    """Some spanning query's request is not on every rank (else an all-gather is the scope)."""
    return any(send[o][p] < send[o][o] for o in range(len(send)) for p in range(len(send)))


def _first(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the True entries of `mask` (1-D) in order; `size` (a host int) of them. A stable
    sort rather than `nonzero`, which would read its size back from the device."""
    return torch.argsort((~mask).to(torch.int32), stable=True)[:size]


def exchange_scope(routing, owner: torch.Tensor, hold: torch.Tensor,
                   send: list[list[int]]) -> ExchangeScope:
    """This rank's scope of the step (see the module docstring)."""
    r, n, dev = routing.rank, routing.world, owner.device
    s = owner.shape[0]
    mine = owner == r
    in_splits = [0 if p == r else k for p, k in enumerate(send[r])]
    out_splits = [0 if o == r else row[r] for o, row in enumerate(send)]
    n_r, n_sent, recv_n = send[r][r], sum(in_splits), sum(out_splits)
    x_n = n_r + recv_n
    hold_r = hold[:, r] if s else torch.zeros(0, dtype=torch.bool, device=dev)
    # Own spanning rows, in span order (= row order), and their row index.
    my_tok = _first(mine, n_r)
    row_of = torch.zeros(s, dtype=torch.int64, device=dev)
    row_of[my_tok] = torch.arange(n_r, device=dev)
    # Received rows: others' queries whose request r holds, by owner, span order within.
    key = torch.where(hold_r & ~mine, owner, torch.full_like(owner, n))
    recv_tok = torch.argsort(key, stable=True)[:recv_n]
    recv_at = torch.zeros(s, dtype=torch.int64, device=dev)
    recv_at[recv_tok] = torch.arange(recv_n, device=dev)
    # X: the queries r holds KV for, span order.
    x_tok = _first(hold_r, x_n)
    x_src = torch.where(mine[x_tok], row_of[x_tok], n_r + recv_at[x_tok])
    x_at = torch.zeros(s, dtype=torch.int64, device=dev)
    x_at[x_tok] = torch.arange(x_n, device=dev)
    # Queries sent: for each peer in rank order, r's rows whose request it holds.
    sent = hold[my_tok].t().clone()  # (N, n_r)
    sent[r] = False
    flat = sent.reshape(-1)
    q_send = _first(flat, n_sent) % max(n_r, 1)
    # Partials back: from peer p, the rows r sent p, in that order; p == r: r's own; else empty.
    sent_at = torch.cumsum(flat.to(torch.int64), 0).view(n, n_r) - 1
    own = x_at[my_tok].unsqueeze(0).expand(n, n_r)
    merge_src = torch.where(sent, x_n + sent_at, torch.full_like(sent_at, x_n + n_sent))
    merge_src[r] = own[r]
    # Offsets of each request's queries in X.
    qsl = routing.span_query_start_loc.to(torch.int64)
    b = qsl.shape[0] - 1
    req = torch.searchsorted(qsl[1:], x_tok, right=True) if x_n else x_tok
    per_req = torch.zeros(b + 1, dtype=torch.int64, device=dev)
    per_req.scatter_add_(0, req + 1, torch.ones_like(req))
    return ExchangeScope(send=send, in_splits=in_splits, out_splits=out_splits,
                         q_send=q_send, x_src=x_src,
                         x_query_start_loc=per_req.cumsum(0).to(torch.int32),
                         x_pos=routing.span_pos[x_tok], p_send=x_at[recv_tok],
                         merge_src=merge_src.reshape(-1))
