"""One step under KV parallelism: built once, published to the layers through vLLM's forward context.

A worker process is one KV rank; what it knows of the layout is fixed at start-up
(`RankContext`: its rank, the rank map, the step policy). Each step, the KVP metadata builder calls
`build_step` once with vLLM's `CommonAttentionMetadata`; the resulting `Step` is both the
attention metadata every layer receives and, published in the forward context by the runner
(`publish`), what the runner and the split linear layers read (`current_step`). Nothing steering
the forward lives in a module global.

A Step holds the routing (who computes which token and which requests span ranks,
`routing.StepRouting`), the kind the step policy chose for it (`step_policy`: local, routed or
shared), and this rank's view of each request's KV (`shard_map.local_blocks`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vllm_kvp.engine import vllm_compat
from vllm_kvp.rank_map import RankMap
from vllm_kvp.step.fresh import FreshSplit, fresh_split
from vllm_kvp.step.routing import (StepRouting, request_holders, route_step,
                                   routing_from_tensors)
from vllm_kvp.step.shard_map import local_blocks
from vllm_kvp.step.scope import (ExchangeScope, exchange_scope, needs_scope, send_matrix,
                                  span_holders)
from vllm_kvp.step_policy import LOCAL, ROUTED, SHARED, StepPolicy


@dataclass(frozen=True)
class RankContext:
    """What one worker process knows of the KV-parallel layout, fixed at start-up."""

    rank: int
    ranks: RankMap
    policy: StepPolicy

    @property
    def world(self) -> int:
        return self.ranks.num_ranks


_CONTEXT: RankContext | None = None  # set once per worker process by `configure`


def configure(context: RankContext) -> None:
    """Record this worker's rank context (KVPWorker, once its KV cache size is known)."""
    global _CONTEXT
    _CONTEXT = context


def rank_context() -> RankContext:
    if _CONTEXT is None:
        raise RuntimeError("vllm_kvp: the KV rank context is not configured in this process "
                           "(KVPWorker.initialize_from_config sets it)")
    return _CONTEXT


@dataclass
class Step:
    """One step as this rank runs it; also the attention metadata of every KVP layer."""

    routing: StepRouting
    kind: str  # step_policy.LOCAL, ROUTED or SHARED
    spans: bool  # some request of the step holds KV on more than one rank
    num_actual_tokens: int
    query_start_loc: torch.Tensor  # (B+1,) int32, offsets of each request's new tokens
    local_block_table: torch.Tensor  # (B, M) int32, this rank's blocks of each request first
    shard_lens: torch.Tensor  # (B,) int32, tokens of each request held here (this step's too)
    block_pos: torch.Tensor  # (B, M) int32, position of the first token of each local block
    token_pos: torch.Tensor  # (T,) int32, position of each query of the step
    max_query_len: int  # host bound on the step's query lengths (kernel launch parameters)
    max_kv_len: int  # host bound on shard_lens
    # A shared step's fresh requests, attended by rows over every rank (`fresh`; CPU steps only)
    fresh: FreshSplit | None = None
    # A routed step whose spanning queries go only to the ranks holding their KV (`scope`)
    scope: ExchangeScope | None = None

    @property
    def local(self) -> bool:
        """No request spans ranks: each rank attends its own rows, nothing is exchanged."""
        return self.kind == LOCAL

    @property
    def shared(self) -> bool:
        """Every rank runs every token (see `step_policy`)."""
        return self.kind == SHARED

    @property
    def world(self) -> int:
        return self.routing.world

    @property
    def num_tokens(self) -> int:
        return self.routing.num_tokens

    @property
    def out_rows(self) -> int:
        """Rows this rank's layers run: every token in a shared step, else its own rows."""
        return self.routing.num_tokens if self.shared else self.routing.rows

    @property
    def own_rows(self) -> int:
        """This rank's rows attended here alone (the first ones): none in a shared step."""
        return 0 if self.shared else self.routing.num_own_local

    @property
    def exchanged_query_start_loc(self) -> torch.Tensor:
        """(B+1,) int32 offsets of each request's queries among those whose partials every rank
        computes: all of the step's in a shared step, else the spanning ones (span order; in a
        scoped step those whose request this rank holds)."""
        if self.scope is not None:
            return self.scope.x_query_start_loc
        return self.query_start_loc if self.shared else self.routing.span_query_start_loc

    @property
    def exchanged_lens(self) -> torch.Tensor:
        """(B,) int32 KV of each request the exchanged queries read from this rank's cache (a
        shared step's fresh requests read none: see `fresh`)."""
        return self.fresh.cache_lens if self.fresh is not None else self.shard_lens

    @property
    def exchanged_pos(self) -> torch.Tensor:
        """(X,) int32 positions of those queries."""
        if self.scope is not None:
            return self.scope.x_pos
        return self.token_pos if self.shared else self.routing.span_pos

    @property
    def own_query_start_loc(self) -> torch.Tensor:
        """(B+1,) int32 offsets of each request's rows among this rank's local rows."""
        return self.routing.own_query_start_loc

    @property
    def own_pos(self) -> torch.Tensor:
        """(own_rows,) int32 positions of this rank's local rows."""
        return self.routing.own_pos

    @functools.cached_property
    def merge_idx(self) -> torch.Tensor:
        """Index, among the exchanged queries, of each row whose partials this rank merges: every
        query in a shared step, else this rank's spanning rows (rows[own_rows:]; in a scoped step
        the merge reads them from a buffer of their own, in row order)."""
        if self.scope is not None:
            n = self.routing.span_counts[self.routing.rank]
            return torch.arange(n, device=self.routing.restore_idx.device)
        if self.shared:
            return torch.arange(self.num_tokens, device=self.routing.restore_idx.device)
        return self.routing.span_merge


def build_step(cm, context: RankContext, split_fresh: bool = False) -> Step:
    """The step of vLLM's CommonAttentionMetadata `cm` on this rank (called once per step).
    `split_fresh`: the backend's kernels attend a shared step's fresh requests by rows
    (`AttentionKernels.fresh_partials`)."""
    n, t = cm.num_reqs, cm.num_actual_tokens
    ranks, rank = context.ranks, context.rank
    qsl = cm.query_start_loc[: n + 1]
    slots, seq_lens = cm.slot_mapping[:t], cm.seq_lens[:n]
    # cm.max_seq_len bounds every request's length (host int): columns past it hold no token.
    cols = min(cm.block_table_tensor.shape[1], -(-cm.max_seq_len // ranks.block_size))
    table = cm.block_table_tensor[:n, :cols]
    routed = None
    if slots.device.type == "cpu":
        from vllm_kvp.ops import cpu_kernel

        # One C++ pass instead of ~50 small torch ops (the torch path is its reference).
        routed = cpu_kernel.step_routing_cpu(slots, qsl, seq_lens, table, rank, ranks.num_ranks,
                                             ranks.blocks_per_rank, ranks.block_size)
    if routed is not None:
        routing = routing_from_tensors(routed[:-3], rank, ranks.num_ranks)
        local_table, lens, block_pos = routed[-3:]
    else:
        # Every token up to the end of the step: owners write this step's K/V before attending.
        local_table, lens, block_pos = local_blocks(table, seq_lens, rank, ranks)
        routing = route_step(slots, qsl, seq_lens, rank, ranks, block_table=table)
    spans = routing.num_spanning > 0
    kind = context.policy.kind(routing.counts, spans, routing.span_counts, t)
    scope = None
    if kind == ROUTED and spans and context.policy.may_scope_step(routing.span_counts):
        owner, hold = span_holders(routing, request_holders(table, seq_lens, ranks))
        send = send_matrix(owner, hold, ranks.num_ranks)
        if needs_scope(send) and context.policy.scoped(send, routing.span_counts):
            scope = exchange_scope(routing, owner, hold, send)
    fresh = None
    if kind == SHARED and split_fresh:
        fresh = fresh_split(qsl, seq_lens, lens, rank, ranks.num_ranks, ranks.block_size)
    return Step(routing=routing, kind=kind, spans=spans, num_actual_tokens=t, fresh=fresh,
                scope=scope,
                query_start_loc=qsl, local_block_table=local_table, shard_lens=lens,
                block_pos=block_pos, token_pos=routing.token_pos.to(torch.int32),
                max_query_len=cm.max_query_len,
                max_kv_len=min(cm.max_seq_len, ranks.tokens_per_rank))


def step_of(attn_metadata) -> Step | None:
    """The Step among a forward's attention metadata (None for dummy, profile and warm-up runs,
    which carry none, and for micro-batched steps, never scheduled with KV ranks)."""
    if not attn_metadata or isinstance(attn_metadata, list):
        return None
    md = next(iter(attn_metadata.values()))
    return md if isinstance(md, Step) else None


def publish(step: Step | None) -> None:
    """Make `step` the current step of this forward (read by `current_step`)."""
    vllm_compat.publish_step(step)


def current_step() -> Step | None:
    """The step the model is running now, if it is a KVP step (None outside a forward)."""
    return vllm_compat.current_step()
