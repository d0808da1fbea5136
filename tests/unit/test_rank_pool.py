"""RankedFreeQueue keeps vLLM's free-queue contract while taking blocks from planned ranks."""

import pytest
from vllm.v1.core.kv_cache_utils import KVCacheBlock

from vllm_kvp.rank_map import RankMap
from vllm_kvp.engine.rank_pool import RankedFreeQueue, most_free_first


def _queue(ranks=3, per_rank=4):
    blocks = [KVCacheBlock(i) for i in range(ranks * per_rank)]
    return RankedFreeQueue(blocks, RankMap(ranks, per_rank, 16)), blocks


def test_pops_follow_the_plan_in_order():
    q, _ = _queue()
    q.chooser = lambda n, free: [2, 0, 2]
    got = q.popleft_n(3)
    assert [b.block_id for b in got] == [8, 0, 9]
    assert q.free_per_rank() == [3, 4, 2] and q.num_free_blocks == 9


def test_without_plan_takes_most_free_rank_and_round_trips():
    q, blocks = _queue()
    first = q.popleft()
    assert first.block_id == 0  # ties go to rank 0 (vLLM's null block comes from there)
    taken = q.popleft_n(5)
    assert sorted(q.rank_of(b.block_id) for b in taken) == [0, 1, 1, 2, 2]
    q.append_n(taken[::-1])
    q.append(first)
    assert q.num_free_blocks == 12
    assert sorted(b.block_id for b in q.get_all_free_blocks()) == list(range(12))


def test_remove_and_prepend_stay_within_their_rank():
    q, blocks = _queue()
    q.remove(blocks[5])
    assert q.free_per_rank() == [4, 3, 4]
    q.prepend_n([blocks[5]])
    q.chooser = lambda n, free: [1]
    assert q.popleft().block_id == 5  # prepended blocks are evicted first within their rank


def test_most_free_first_refuses_an_impossible_take():
    assert most_free_first(3, [1, 2, 0]) == [1, 0, 1]
    with pytest.raises(ValueError):
        most_free_first(4, [1, 2, 0])
