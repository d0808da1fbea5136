"""The KVP process group and the exchange of partial attention results.

All communication of vllm_kvp lives here. The group joins the workers that share a (pp, tp)
position across KV ranks. Under owner computes each token is computed on one rank, and three
exchanges move what the others need (see `routing.StepRouting` for the row conventions):
  - `gather_spanning_queries`: every rank's rows of requests that span ranks, in span order (a
    layer's queries; rows of local requests never leave their rank);
  - `gather_rows`: every rank's rows, in vLLM's token order (the final hidden states, so that
    every rank samples from the same bits);
  - `gather_partials`: each rank's packed partial attention of every exchanged query, to every
    rank; each query's owner (every rank, in a shared step) then merges its rows in rank order;
  - `gather_columns`: in a shared step, each rank's slice of a split linear layer's output
    columns (see `split_linear`), for every row; also each rank's vocab columns of the logits
    when the lm_head is split;
  - `gather_partial_sums`: in a shared step, each rank's partial sums of a gated MLP's down
    projection (its input columns' share), for every row (counted as columns: the exchange of a
    split linear layer).
  - `exchange_scoped`: in a scoped step (see `scope`), the queries and then the partials of
    spanning rows, each only to the ranks that need it: an all-to-all of variable sizes.
Each collective is recorded in `stats.STATS` under its exchange kind and the step's kind, the
names `step_policy.exchanges` predicts with. All but the last are all-gathers: one collective
each, equal sizes on every rank (padded to the routing's t_max or s_max), which vLLM's CPU
communicator also runs over shared memory (its all-to-all goes through torch.distributed: gloo
on CPUs, NCCL on GPUs). A step with no spanning query issues none of the first, third or last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_kvp.engine import vllm_compat
from vllm_kvp.step.columns import assemble_columns, pad_columns
from vllm_kvp.step.stats import STATS
from vllm_kvp.step_policy import COLUMNS, PARTIALS, QUERIES

if TYPE_CHECKING:
    from vllm_kvp.step import Step

_KVP_GROUP = None  # vllm GroupCoordinator, set once per worker process by init_kvp_group()


def kvp_group_ranks(world_size: int, kvp_size: int) -> list[list[int]]:
    """Global ranks of each KVP group. vLLM lays the world out as ExternalDP x PP x TP, and the
    KV ranks are the ExternalDP replicas, so group g holds ranks g, g + R, g + 2R, ... (R = PP*TP)."""
    per_replica = world_size // kvp_size
    return torch.arange(world_size).reshape(kvp_size, per_replica).t().tolist()


def init_kvp_group(kvp_size: int) -> None:
    """Build the KVP group. Every worker calls it, in the same order, after vLLM's own groups."""
    global _KVP_GROUP
    from vllm.distributed.parallel_state import get_world_group, init_model_parallel_group
    from vllm.platforms import current_platform

    world = get_world_group()
    backend = "gloo" if current_platform.is_cpu() else current_platform.dist_backend
    # vLLM's CPU communicator moves the collectives of groups whose name starts with "tp" or "pp"
    # over shared memory instead of gloo's sockets; the name has no other effect.
    _KVP_GROUP = init_model_parallel_group(
        kvp_group_ranks(world.world_size, kvp_size), world.local_rank, backend,
        group_name=vllm_compat.KVP_GROUP_NAME,
    )


def destroy_kvp_group() -> None:
    global _KVP_GROUP
    if _KVP_GROUP is not None:
        _KVP_GROUP.destroy()
        _KVP_GROUP = None


def agree(obj):
    """World rank 0's `obj` on every worker (a small picklable value, over the CPU group): what
    every rank and pipeline stage must decide alike."""
    from vllm.distributed.parallel_state import get_world_group

    world = get_world_group()
    if world.world_size == 1:
        return obj
    return world.broadcast_object(obj, src=0)


def kvp_rank() -> int:
    return 0 if _KVP_GROUP is None else _KVP_GROUP.rank_in_group


def kvp_world_size() -> int:
    return 1 if _KVP_GROUP is None else _KVP_GROUP.world_size


def _count(kind: str, x: torch.Tensor, step_kind: str) -> None:
    """Record one collective this rank sends `x` into (`kind`: a `step_policy` exchange kind)."""
    STATS.record(kind, x.numel() * x.element_size(), step_kind)


def gather_rows(x: torch.Tensor, step: Step, kind: str) -> torch.Tensor:
    """This rank's rows x (routing.rows, F) -> every token's row (T, F), vLLM order. `kind` names
    the exchange the traffic is recorded under."""
    r = step.routing
    if r.world == 1:
        return x[r.restore_idx]
    if x.shape[0] < r.t_max:  # equal sizes on every rank
        x = torch.cat([x, x.new_zeros((r.t_max - x.shape[0], *x.shape[1:]))])
    _count(kind, x, step.kind)
    return _KVP_GROUP.all_gather(x.contiguous(), dim=0)[r.restore_idx]


def gather_spanning_queries(x: torch.Tensor, step: Step) -> torch.Tensor:
    """This rank's spanning rows x (>= span_counts[rank], F) of a layer's queries -> the step's
    spanning queries (S, F), in span order."""
    r = step.routing
    x = x[: r.span_counts[r.rank]]
    if r.world == 1:
        return x
    if x.shape[0] < r.s_max:  # equal sizes on every rank
        x = torch.cat([x, x.new_zeros((r.s_max - x.shape[0], *x.shape[1:]))])
    _count(QUERIES, x, step.kind)
    return _KVP_GROUP.all_gather(x.contiguous(), dim=0)[r.span_restore]


def gather_partials(packed: torch.Tensor, step: Step) -> torch.Tensor:
    """This rank's packed partials of the step's exchanged queries, one row each ((X, H * D + H)
    float32 on CPU: out then LSEs; `ops.partials` bytes on GPU) -> every rank's, (R, X, F), by KV
    rank."""
    if step.world == 1:
        return packed.unsqueeze(0)
    _count(PARTIALS, packed, step.kind)
    return _KVP_GROUP.all_gather(packed.contiguous(), dim=0).view(step.world, packed.shape[0], -1)


def exchange_scoped(x: torch.Tensor, in_splits: list[int], out_splits: list[int], kind: str,
                    step: Step) -> torch.Tensor:
    """Rows x (sum(in_splits), F), in_splits[p] of them for rank p in rank order -> the rows the
    other ranks sent this one, out_splits[o] from rank o in rank order. `kind`: QUERIES or
    PARTIALS."""
    import torch.distributed as dist

    x = x.contiguous()
    _count(kind, x, step.kind)
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=_KVP_GROUP.device_group)
    return out


def gather_columns(part: torch.Tensor, bounds: list[int], step: Step,
                   kind: str = COLUMNS) -> torch.Tensor:
    """This rank's output columns [bounds[rank], bounds[rank + 1]) of a linear layer, (rows, w) ->
    every rank's, (rows, features) in column order. `kind`: the exchange it is counted as."""
    widest = max(b - a for a, b in zip(bounds, bounds[1:]))
    part = pad_columns(part, widest).contiguous()
    _count(kind, part, step.kind)
    gathered = _KVP_GROUP.all_gather(part, dim=0)
    return assemble_columns(gathered.view(len(bounds) - 1, part.shape[0], widest), bounds)


def gather_partial_sums(part: torch.Tensor, step: Step) -> torch.Tensor:
    """This rank's partial sums (rows, features) of a layer split by input columns -> every
    rank's, (world, rows, features) in rank order (`columns.sum_in_rank_order` adds them)."""
    part = part.contiguous()
    _count(COLUMNS, part, step.kind)
    return _KVP_GROUP.all_gather(part, dim=0).view(step.world, *part.shape)
