"""The KV ranks x PP x TP world: which workers form a KVP group, and which one answers the engine.

vLLM numbers a world of KV ranks (its ExternalDP dimension) x PP x TP as
rank = kvp_rank * PP * TP + stage * TP + tp_rank.
"""

from types import SimpleNamespace

import pytest

from vllm_kvp.step.comm import kvp_group_ranks
from vllm_kvp.engine.executor import KVPExecutor


def _coords(rank: int, pp: int, tp: int) -> tuple[int, int, int]:
    return rank // (pp * tp), rank // tp % pp, rank % tp


@pytest.mark.parametrize("kvp, pp, tp", [(2, 1, 1), (2, 2, 1), (2, 2, 2), (3, 2, 1), (4, 3, 2)])
def test_kvp_groups_join_workers_of_one_stage_and_tp_position(kvp, pp, tp):
    groups = kvp_group_ranks(kvp * pp * tp, kvp)
    assert sorted(r for g in groups for r in g) == list(range(kvp * pp * tp))
    assert len(groups) == pp * tp
    for group in groups:
        coords = [_coords(r, pp, tp) for r in group]
        assert [c[0] for c in coords] == list(range(kvp))  # one worker per KV rank, in rank order
        assert len({c[1:] for c in coords}) == 1  # all on the same (stage, tp) position


def test_kvp2_pp2_groups_by_hand():
    assert kvp_group_ranks(4, 2) == [[0, 2], [1, 3]]


def _executor(kvp: int, pp: int, tp: int) -> KVPExecutor:
    """The executor's own sizing, without starting workers."""
    parallel = SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                               prefill_context_parallel_size=1, world_size=pp * tp,
                               nnodes_within_dp=1, local_world_size=None)
    executor = object.__new__(KVPExecutor)
    executor.vllm_config = SimpleNamespace(parallel_config=parallel,
                                           additional_config={"kvp": {"size": kvp}})
    executor.parallel_config = parallel
    executor._setup_kvp()
    return executor


@pytest.mark.parametrize("kvp, pp, tp", [(2, 1, 1), (2, 2, 1), (2, 2, 2), (3, 2, 1), (4, 3, 2)])
def test_world_and_output_rank(kvp, pp, tp):
    executor = _executor(kvp, pp, tp)
    assert executor.parallel_config.world_size == kvp * pp * tp
    sizes = executor._get_parallel_sizes()
    assert executor.world_size == sizes[0] * sizes[1] * sizes[2] == kvp * pp * tp
    # The engine hears from TP rank 0 of the last stage (the one that samples), of one replica.
    _, stage, tp_rank = _coords(executor._get_output_rank(), pp, tp)
    assert (stage, tp_rank) == (pp - 1, 0)
    assert executor._is_driver_worker(executor._get_output_rank())
