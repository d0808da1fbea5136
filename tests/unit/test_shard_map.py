"""Logical -> local KV addressing against a plain-Python reference."""

import torch
from hypothesis import given, settings, strategies as st

from vllm_kvp.rank_map import RankMap
from vllm_kvp.step.shard_map import local_blocks, local_slots


@st.composite
def layouts(draw):
    ranks = draw(st.integers(1, 4))
    per_rank = draw(st.integers(2, 6))
    bs = draw(st.sampled_from([1, 4, 16]))
    n_req = draw(st.integers(1, 4))
    m = draw(st.integers(1, 6))
    ids = draw(st.permutations(range(ranks * per_rank)))
    table = torch.tensor([[ids[(i * m + j) % len(ids)] for j in range(m)] for i in range(n_req)])
    past = torch.tensor([draw(st.integers(0, m * bs)) for _ in range(n_req)])
    return ranks, per_rank, bs, table, past


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_local_shards_hold_exactly_the_past_tokens_of_each_rank(layout):
    ranks, per_rank, bs, table, past = layout
    seen = [[] for _ in range(table.shape[0])]
    for rank in range(ranks):
        local, lens, block_pos = local_blocks(table, past, rank, RankMap(ranks, per_rank, bs))
        for i in range(table.shape[0]):
            # Reference: walk the request's past tokens; keep those whose block lives on `rank`.
            expected = [(table[i, t // bs].item() - rank * per_rank, t % bs)
                        for t in range(past[i].item()) if table[i, t // bs].item() // per_rank == rank]
            got = [(local[i, k // bs].item(), k % bs) for k in range(lens[i].item())]
            assert got == expected
            # Each held block's first position in its request (what causal-by-position reads).
            held_pos = [t - t % bs for t in range(past[i].item())
                        if t % bs == 0 and table[i, t // bs].item() // per_rank == rank]
            assert block_pos[i, : len(held_pos)].tolist() == held_pos
            assert all(0 <= b < per_rank for b, _ in got)
            seen[i] += expected
    # Together the ranks hold every past token exactly once.
    assert [len(s) for s in seen] == past.tolist()


def test_local_slots_keep_only_own_slots():
    per_rank, bs = 3, 4
    slots = torch.tensor([0, 5, 11, 12, 13, 23, -1, 20])
    assert local_slots(slots, 0, RankMap(2, per_rank, bs)).tolist() == [0, 5, 11, -1, -1, -1, -1, -1]
    assert local_slots(slots, 1, RankMap(2, per_rank, bs)).tolist() == [-1, -1, -1, 0, 1, 11, -1, 8]
