"""Owner computes without vLLM: the step plan against a Python reference, and one attention layer
run on N simulated ranks (own rows only, paged shards, queries out, partials back) against float64
attention over the whole context."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_attention import ref_attention

from vllm_kvp.ops.attention import position_attention, write_kv
from vllm_kvp.ops.merge import merge_partials
from vllm_kvp.ops.paged_attention import paged_attention_lse
from vllm_kvp.plan import build_step_plan
from vllm_kvp.shard_map import local_blocks, local_slots


@st.composite
def steps(draw):
    """A step: N ranks of P blocks, B requests with past and new tokens, blocks on random ranks."""
    world = draw(st.integers(1, 4))
    bs = draw(st.sampled_from([1, 4, 8]))
    n_req = draw(st.integers(1, 4))
    past = [draw(st.integers(0, 12)) for _ in range(n_req)]
    new = [draw(st.integers(1, 9)) for _ in range(n_req)]
    needed = sum(-(-(p + q) // bs) for p, q in zip(past, new)) + 1
    per_rank = max(draw(st.integers(4, 10)), -(-needed // world))
    free = list(draw(st.permutations(range(1, world * per_rank))))  # block 0 is vLLM's null block
    tables = []
    for p, q in zip(past, new):
        nblk = -(-(p + q) // bs)
        tables.append([free.pop() for _ in range(nblk)])
    return world, bs, per_rank, past, new, tables


def step_tensors(bs, past, new, tables):
    m = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (m - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0).tolist()), dtype=torch.int32)
    seq_lens = torch.tensor([p + q for p, q in zip(past, new)], dtype=torch.int32)
    slots = torch.tensor([tables[i][pos // bs] * bs + pos % bs
                          for i, (p, q) in enumerate(zip(past, new)) for pos in range(p, p + q)])
    return table, qsl, seq_lens, slots


@settings(max_examples=120, deadline=None)
@given(steps())
def test_plan_routes_every_token_to_its_slot_owner_and_back(step):
    world, bs, per_rank, past, new, tables = step
    table, qsl, seq_lens, slots = step_tensors(bs, past, new, tables)
    t = slots.shape[0]
    owners = [s // (per_rank * bs) for s in slots.tolist()]
    ref_req = [i for i, q in enumerate(new) for _ in range(q)]
    ref_pos = [pos for p, q in zip(past, new) for pos in range(p, p + q)]
    plans = [build_step_plan(slots, qsl, seq_lens, r, world, per_rank * bs) for r in range(world)]
    values = torch.arange(t, dtype=torch.float32) * 10 + 7
    gathered = []
    for r, plan in enumerate(plans):
        mine = [j for j in range(t) if owners[j] == r]
        assert plan.counts == [owners.count(o) for o in range(world)]
        assert plan.token_req.tolist() == ref_req and plan.token_pos.tolist() == ref_pos
        assert plan.t_max == max(max(plan.counts), 1) and plan.rows == max(len(mine), 1)
        if mine:
            assert plan.row_idx.tolist() == mine  # vLLM order kept
            assert plan.row_slots.tolist() == [slots[j].item() for j in mine]
            assert plan.row_req.tolist() == [ref_req[j] for j in mine]
            assert plan.row_pos.tolist() == [ref_pos[j] for j in mine]
        else:  # a dummy row: no slot, no request
            assert plan.row_slots.tolist() == [-1] and plan.row_req.tolist() == [-1]
        rows = values[plan.row_idx]
        gathered.append(torch.cat([rows, rows.new_full((plan.t_max - plan.rows,), -1.0)]))
    # Rank-major gather, then restore_idx: every token's row comes back in vLLM order.
    for plan in plans:
        assert torch.equal(torch.cat(gathered)[plan.restore_idx], values)


def test_position_attention_matches_masked_reference():
    g = torch.Generator().manual_seed(0)
    tq, tk, hq, hkv, d = 11, 7, 4, 2, 8
    q, k, v = (torch.randn(n, h, d, generator=g) for n, h in ((tq, hq), (tk, hkv), (tk, hkv)))
    q_req = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    q_pos = torch.tensor([5, 6, 7, 0, 1, 3, 4, 5, 6, 9, 10])
    k_req = torch.tensor([0, 2, 0, 2, 1, -1, 2])  # keys in any order; -1 is not a key
    k_pos = torch.tensor([6, 4, 7, 6, 3, 0, 0])
    out, lse = position_attention(q, q_req, q_pos, k, v, k_req, k_pos, 0.3)
    mask = (q_req[:, None] == k_req[None, :]) & (k_pos[None, :] <= q_pos[:, None])
    ref_out, ref_lse = ref_attention(q, k, v, 0.3, mask)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    # Queries that see nothing (request 3, request 1 before position 3, query 0 of request 0):
    empty = ~mask.any(dim=1)
    assert empty.tolist()[:4] == [True, False, False, True] and empty[9:].all()
    assert torch.isneginf(lse[empty]).all() and (out[empty] == 0).all()


@settings(max_examples=60, deadline=None)
@given(steps(), st.sampled_from([(4, 2), (4, 1), (2, 2)]))
def test_one_layer_on_simulated_ranks_matches_full_attention(step, heads):
    """Each rank writes only its rows' K/V, attends every query over what it holds, and merges its
    rows' partials from all ranks in rank order: the result is attention over the whole context."""
    world, bs, per_rank, past, new, tables = step
    hq, hkv = heads
    d, scale = 8, 0.35
    table, qsl, seq_lens, slots = step_tensors(bs, past, new, tables)
    t, n_req = slots.shape[0], len(new)
    g = torch.Generator().manual_seed(t)
    # Full K/V of every request (past and new), and the step's queries, in vLLM order.
    ks = [torch.randn(p + q, hkv, d, generator=g) for p, q in zip(past, new)]
    vs = [torch.randn(p + q, hkv, d, generator=g) for p, q in zip(past, new)]
    query = torch.randn(t, hq, d, generator=g)
    new_k = torch.cat([k[p:] for k, p in zip(ks, past)])
    new_v = torch.cat([v[p:] for v, p in zip(vs, past)])
    past_slots = torch.tensor([tables[i][pos // bs] * bs + pos % bs
                               for i, p in enumerate(past) for pos in range(p)], dtype=torch.int64)
    past_k = torch.cat([k[:p] for k, p in zip(ks, past)])
    past_v = torch.cat([v[:p] for v, p in zip(vs, past)])

    plans = [build_step_plan(slots, qsl, seq_lens, r, world, per_rank * bs) for r in range(world)]
    partials = []
    for r, plan in enumerate(plans):
        cache = torch.zeros(per_rank, hkv, bs, 2 * d)
        write_kv(cache, past_k, past_v, local_slots(past_slots, bs, r, per_rank))  # earlier steps
        k_rows, v_rows = new_k[plan.row_idx], new_v[plan.row_idx]  # this rank's rows only
        write_kv(cache, k_rows, v_rows, local_slots(plan.row_slots, bs, r, per_rank))
        # Past and this step's tokens alike, read in place, causal by position.
        local_table, lens, block_pos = local_blocks(table, seq_lens, bs, r, per_rank)
        q_all = query  # what the query all-gather delivers
        partials.append(paged_attention_lse(q_all, cache, local_table, lens, qsl, scale,
                                            q_pos=plan.token_pos.to(torch.int32),
                                            block_pos=block_pos))
    result = torch.zeros(t, hq, d)
    for plan in plans:
        if plan.num_local == 0:
            continue
        outs = torch.stack([o[plan.row_idx] for o, _ in partials])
        lses = torch.stack([l[plan.row_idx] for _, l in partials])
        out, lse = merge_partials(outs, lses)
        assert torch.isfinite(lse).all()
        result[plan.row_idx] = out
    # Reference: causal attention of each new token over its request's whole context.
    for i in range(n_req):
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        pos = torch.arange(past[i], past[i] + new[i])
        mask = torch.arange(past[i] + new[i])[None, :] <= pos[:, None]
        ref_out, _ = ref_attention(query[rows], ks[i], vs[i], scale, mask)
        torch.testing.assert_close(result[rows].double(), ref_out, atol=2e-5, rtol=2e-5)
    assert math.isclose(sum(p.num_local for p in plans), t)


def test_padded_step_tokens_belong_to_no_rank():
    # Two requests (3 + 2 tokens) and 3 padding tokens (slot -1), 2 ranks of 4 one-token blocks.
    slots = torch.tensor([0, 5, 1, 6, 2, -1, -1, -1])
    qsl = torch.tensor([0, 3, 5], dtype=torch.int32)
    seq_lens = torch.tensor([3, 2], dtype=torch.int32)
    plans = [build_step_plan(slots, qsl, seq_lens, r, 2, 4) for r in range(2)]
    assert plans[0].counts == [3, 2]
    assert plans[0].row_idx.tolist() == [0, 2, 4] and plans[1].row_idx.tolist() == [1, 3]
    assert plans[0].token_req.tolist()[:5] == [0, 0, 0, 1, 1]


@pytest.mark.parametrize("slots, want", [
    ([5], True),  # a batch-1 decode: one token, one owner
    ([4, 5, 6, -1], True),  # a chunk on rank 1 (and a padding token, owned by no rank)
    ([0, 5], False),  # two owners: the tokens are routed
    ([-1, -1], False),  # padding only: nothing to own
])
def test_replicated_when_one_rank_owns_every_token(slots, want):
    """2 ranks of 4 one-token slots. A replicated plan keeps the ownership fields (the final hidden
    states still come from the owner) and lists every row to merge."""
    slots = torch.tensor(slots)
    t = slots.numel()
    qsl = torch.tensor([0, t], dtype=torch.int32)
    seq_lens = torch.tensor([8], dtype=torch.int32)
    for rank in range(2):
        routed = build_step_plan(slots, qsl, seq_lens, rank, 2, 4)
        plan = build_step_plan(slots, qsl, seq_lens, rank, 2, 4, allow_replicated=True)
        assert not routed.replicated and plan.replicated == want
        assert plan.counts == routed.counts and torch.equal(plan.row_idx, routed.row_idx)
        assert torch.equal(plan.restore_idx, routed.restore_idx)
        assert plan.merge_idx.tolist() == (list(range(t)) if want else routed.row_idx.tolist())
    # One rank alone never replicates (there is nothing to save).
    assert not build_step_plan(slots.clamp(max=3), qsl, seq_lens, 0, 1, 8, allow_replicated=True).replicated


@settings(max_examples=150, deadline=None)
@given(steps(), st.integers(0, 3), st.integers(0, 3), st.data())
def test_cpu_step_routing_equals_the_torch_plan_and_local_table(step, pad_tokens, pad_cols, data):
    """The C++ pass the CPU builder uses gives every tensor of `build_step_plan` and `local_blocks`
    exactly; with padded step tokens (slot -1), block-table columns past every request (stale ids,
    as vLLM's buffers hold) and every rank's view."""
    from vllm_kvp.ops import cpu_kernel
    from vllm_kvp.plan import step_plan_from_routing

    if cpu_kernel.load() is None:
        pytest.skip(f"C++ kernel unavailable: {cpu_kernel.failure()}")
    world, bs, per_rank, past, new, tables = step
    table, qsl, seq_lens, slots = step_tensors(bs, past, new, tables)
    stale = data.draw(st.lists(st.integers(0, world * per_rank - 1), min_size=pad_cols * len(new),
                               max_size=pad_cols * len(new)))
    table = torch.cat([table, torch.tensor(stale, dtype=torch.int32).view(len(new), pad_cols)], 1)
    slots = torch.cat([slots, torch.full((pad_tokens,), -1, dtype=torch.int64)])
    for rank in range(world):
        ref_plan = build_step_plan(slots, qsl, seq_lens, rank, world, per_rank * bs,
                                   allow_replicated=True, split=True, split_step_tokens=6)
        ref_table = local_blocks(table, seq_lens, bs, rank, per_rank)
        routed = cpu_kernel.step_routing_cpu(slots, qsl, seq_lens, table, rank, world, per_rank, bs)
        plan = step_plan_from_routing(routed[:8], rank, world, True, True, 6)
        for name in ("row_idx", "row_slots", "row_req", "row_pos", "restore_idx", "token_req",
                     "token_pos"):
            want, got = getattr(ref_plan, name), getattr(plan, name)
            assert got.dtype == want.dtype and torch.equal(got, want), name
        assert (plan.counts, plan.rows, plan.t_max, plan.num_tokens, plan.replicated) == (
            ref_plan.counts, ref_plan.rows, ref_plan.t_max, ref_plan.num_tokens,
            ref_plan.replicated)
        for want, got in zip(ref_table, routed[8:]):
            assert got.dtype == want.dtype and torch.equal(got, want)
