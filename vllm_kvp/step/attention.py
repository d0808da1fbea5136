"""KVP attention, once for every device: queries travel to the KV, partial outputs travel back.

Under owner computes (see `runner.py`) each rank runs a step's layers on its own rows only: the
tokens whose KV slots it owns. A request whose KV is all on one rank (local, see
`routing.StepRouting`) is attended there alone; only the rows of requests whose KV spans ranks are
exchanged. One step, in every attention layer:
  1. each rank writes its rows' new K/V into its own cache (K/V never moves; the backend's
     `do_kv_cache_update`, before `attend`);
  2. each rank attends its local requests' rows over its own KV, which is all of their context;
  3. the spanning rows' queries are all-gathered, so every rank has every spanning query;
  4. each rank attends every spanning query over what it holds of that query's request, causally
     by position: its shard of the request's past and its own new tokens of this step, all read
     in place from its cache through a compacted local block table -> one (out, lse) per query;
  5. the partials are exchanged and each rank merges, in rank order, those of its spanning rows.
A step with no spanning row (a "local" step) stops after 2: no collective in any attention layer.
In a scoped step (`scope`) 3 and 5 are all-to-alls: each spanning query goes only to the other
ranks holding KV of its request, and each rank attends only those queries.
In a shared step (see `step_policy`) every rank runs every row: 2 and 3 are skipped, 4 covers every
query and each rank merges every row; where the kernels can, the queries of fresh requests (no KV
before the step) are attended by rows over all ranks from the step's own K/V instead of by their
owner alone (`fresh`). A rank holding nothing of a request contributes out = 0, lse = -inf.

The device kernels plug in through `AttentionKernels` (C++ on CPUs: `backend_cpu.py`; Triton on
CUDA: `backend_cuda.py`); the backends hold nothing else but vLLM's metadata and cache hooks.
"""

from __future__ import annotations

from typing import Protocol

import torch

from vllm_kvp.ops.partials import empty_partial
from vllm_kvp.step import Step, comm
from vllm_kvp.step_policy import PARTIALS, QUERIES


class AttentionKernels(Protocol):
    def partials(self, q: torch.Tensor, kv_cache: torch.Tensor, step: Step,
                 scale: float) -> torch.Tensor:
        """q (X, H, D) the step's exchanged queries (`Step.exchanged_query_start_loc`,
        `exchanged_pos`) -> (X, F) this rank's packed partials, one row per query
        (`ops.partials` layout: H x D outputs, then H float32 LSEs)."""

    def merge(self, gathered: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> None:
        """gathered (R, X, F) every rank's packed partials; rows (n,) int64 queries -> out (n, H,
        D) their merged outputs, ranks in order."""

    def fresh_partials(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       step: Step, scale: float, packed: torch.Tensor) -> None:
        """A shared step with fresh requests (`step.fresh`, only built where the kernels have
        this): q (T, H, D) every query, key/value (T, Hkv, D) the step's K/V -> the packed
        partials of this rank's rows of the fresh requests, written into packed (T, F)."""

    def attend_own(self, q: torch.Tensor, kv_cache: torch.Tensor, step: Step, scale: float,
                   out: torch.Tensor) -> None:
        """q (own_rows, H, D) this rank's local rows -> out (own_rows, H, D) their attention over
        this rank's KV (it holds all of their requests' context)."""


def attend(step: Step, query: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor,
           num_heads: int, head_size: int, scale: float, kernels: AttentionKernels,
           key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 2-5 of one attention layer; `output` (>= out_rows, H * D) receives this rank's rows.
    key, value (T, Hkv, D): the step's new K/V (read only for a shared step's fresh requests,
    `step.fresh`)."""
    h, d, rows, own = num_heads, head_size, step.out_rows, step.own_rows
    out = output[:rows].view(rows, h, d)
    if own:  # 2.
        kernels.attend_own(query[:own].view(own, h, d), kv_cache, step, scale, out[:own])
    if step.scope is not None:  # 3.-5., each query only to the ranks holding its KV
        _attend_scoped(step, query[own:rows], kv_cache, out[own:], h, d, scale, kernels)
        return output
    if step.shared:
        q = query[:rows].view(rows, h, d)
    elif step.routing.s_max:
        q = comm.gather_spanning_queries(query[own:rows].reshape(rows - own, h * d), step)  # 3.
        q = q.view(-1, h, d)
    else:  # nothing spans: local rows only (and a dummy row, which nothing reads)
        if rows > own:
            out[own:].zero_()
        return output
    packed = kernels.partials(q, kv_cache, step, scale)  # 4.
    if step.fresh is not None:  # a shared step's fresh requests: this rank's rows of them
        kernels.fresh_partials(q, key, value, step, scale, packed)
    gathered = comm.gather_partials(packed, step)  # 5. (R, X, F)
    merged = step.merge_idx.shape[0]
    if merged:
        kernels.merge(gathered, step.merge_idx, out[own:own + merged])
    if own + merged < rows:  # a dummy row
        out[own + merged:].zero_()
    return output


def _attend_scoped(step: Step, query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor,
                   h: int, d: int, scale: float, kernels: AttentionKernels) -> None:
    """Steps 3-5 of a scoped step (`scope`): query (>= n, H * D) this rank's spanning rows ->
    out (>= n, H, D) their merged outputs (a dummy row past them zeroed)."""
    sc, r = step.scope, step.routing
    n = r.span_counts[r.rank]
    mine = query[:n].reshape(n, h * d)
    received = comm.exchange_scoped(mine[sc.q_send], sc.in_splits, sc.out_splits, QUERIES, step)
    q = torch.cat([mine, received])[sc.x_src].view(-1, h, d)
    packed = kernels.partials(q, kv_cache, step, scale)
    # The partials go back the way the queries came.
    back = comm.exchange_scoped(packed[sc.p_send], sc.out_splits, sc.in_splits, PARTIALS, step)
    if n:
        src = torch.cat([packed, back, empty_partial(packed, h)])
        gathered = src[sc.merge_src].view(step.world, n, src.shape[1])
        kernels.merge(gathered, step.merge_idx, out[:n])
    if out.shape[0] > n:  # a dummy row
        out[n:].zero_()


def refuse_unsupported_layer(attn_type: str, decoder: str, **features: object) -> None:
    """Raise for a layer that is not plain causal decoder attention. `features` are the layer's
    optional attention features (ALiBi slopes, sliding window, soft cap, sinks, KV sharing); any
    that is not None is refused."""
    given = [k for k, v in features.items() if v is not None]
    if given or attn_type != decoder:
        raise NotImplementedError(
            f"vllm_kvp attention supports plain causal decoder attention; this model's layers "
            f"use {given or attn_type}")
