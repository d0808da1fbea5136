"""Owner computes without vLLM: the step routing against a Python reference, and one attention layer
run on N simulated ranks (own rows only, paged shards, queries out, partials back) against float64
attention over the whole context."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import ref_attention, require_cpu_kernel, step_tensors, steps

from vllm_kvp.ops.merge import merge_partials
from vllm_kvp.ops.paged_attention import paged_attention_lse, write_kv
from vllm_kvp.rank_map import RankMap
from vllm_kvp.step.routing import ROUTING_TENSORS, route_step, routing_from_tensors
from vllm_kvp.step.shard_map import local_blocks, local_slots


@settings(max_examples=120, deadline=None)
@given(steps())
def test_routing_sends_every_token_to_its_slot_owner_and_back(step):
    world, bs, per_rank, past, new, tables = step
    table, qsl, seq_lens, slots = step_tensors(bs, past, new, tables)
    t = slots.shape[0]
    owners = [s // (per_rank * bs) for s in slots.tolist()]
    ref_req = [i for i, q in enumerate(new) for _ in range(q)]
    ref_pos = [pos for p, q in zip(past, new) for pos in range(p, p + q)]
    ranks = RankMap(world, per_rank, bs)
    plans = [route_step(slots, qsl, seq_lens, r, ranks) for r in range(world)]
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


@settings(max_examples=60, deadline=None)
@given(steps(), st.sampled_from([(4, 2), (4, 1), (2, 2)]))
def test_one_layer_on_simulated_ranks_matches_full_attention(step, heads):
    """Each rank writes only its rows' K/V, attends its local requests' rows alone, attends every
    spanning query over what it holds, and merges its spanning rows' partials from all ranks in
    rank order: the result is attention over the whole context."""
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

    ranks = RankMap(world, per_rank, bs)
    plans = [route_step(slots, qsl, seq_lens, r, ranks, block_table=table)
             for r in range(world)]
    caches, views, sent = [], [], []
    for r, plan in enumerate(plans):
        cache = torch.zeros(per_rank, hkv, bs, 2 * d)
        write_kv(cache, past_k, past_v, local_slots(past_slots, r, ranks))  # earlier steps
        k_rows, v_rows = new_k[plan.row_idx], new_v[plan.row_idx]  # this rank's rows only
        write_kv(cache, k_rows, v_rows, local_slots(plan.row_slots, r, ranks))
        caches.append(cache)
        # Past and this step's tokens alike, read in place, causal by position.
        views.append(local_blocks(table, seq_lens, r, ranks))
        # The query exchange carries each rank's spanning rows only, padded to s_max.
        own = plan.num_own_local
        spanning = query[plan.row_idx[own:own + plan.span_counts[r]]]
        sent.append(torch.cat([spanning, spanning.new_zeros(plan.s_max - spanning.shape[0], hq, d)]))
    partials = []
    for r, plan in enumerate(plans):
        local_table, lens, block_pos = views[r]
        q_span = torch.cat(sent)[plan.span_restore]  # what the query all-gather delivers
        partials.append(paged_attention_lse(q_span, caches[r], local_table, lens,
                                            plan.span_query_start_loc, scale,
                                            q_pos=plan.span_pos, block_pos=block_pos))
    result = torch.full((t, hq, d), float("nan"))
    for r, plan in enumerate(plans):
        if plan.num_local == 0:
            continue
        own = plan.num_own_local
        local_table, lens, block_pos = views[r]
        if own:  # local requests: attended here alone, nothing exchanged
            out, lse = paged_attention_lse(query[plan.row_idx[:own]], caches[r], local_table,
                                           lens, plan.own_query_start_loc, scale,
                                           q_pos=plan.own_pos, block_pos=block_pos)
            assert torch.isfinite(lse).all()
            result[plan.row_idx[:own]] = out
        if plan.span_counts[r]:
            outs = torch.stack([o[plan.span_merge] for o, _ in partials])
            lses = torch.stack([l[plan.span_merge] for _, l in partials])
            out, lse = merge_partials(outs, lses)
            assert torch.isfinite(lse).all()
            result[plan.row_idx[own:]] = out
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
    plans = [route_step(slots, qsl, seq_lens, r, RankMap(2, 4, 1)) for r in range(2)]
    assert plans[0].counts == [3, 2]
    assert plans[0].row_idx.tolist() == [0, 2, 4] and plans[1].row_idx.tolist() == [1, 3]
    assert plans[0].token_req.tolist()[:5] == [0, 0, 0, 1, 1]


@settings(max_examples=150, deadline=None)
@given(steps(), st.integers(0, 3), st.integers(0, 3), st.data())
def test_cpu_step_routing_equals_the_torch_routing_and_local_table(step, pad_tokens, pad_cols,
                                                                  data):
    """The C++ pass the CPU builder uses gives every tensor of `route_step` and `local_blocks`
    exactly; with padded step tokens (slot -1), block-table columns past every request (stale ids,
    as vLLM's buffers hold) and every rank's view."""
    cpu_kernel = require_cpu_kernel()
    world, bs, per_rank, past, new, tables = step
    table, qsl, seq_lens, slots = step_tensors(bs, past, new, tables)
    stale = data.draw(st.lists(st.integers(0, world * per_rank - 1), min_size=pad_cols * len(new),
                               max_size=pad_cols * len(new)))
    table = torch.cat([table, torch.tensor(stale, dtype=torch.int32).view(len(new), pad_cols)], 1)
    slots = torch.cat([slots, torch.full((pad_tokens,), -1, dtype=torch.int64)])
    for rank in range(world):
        ranks = RankMap(world, per_rank, bs)
        ref_plan = route_step(slots, qsl, seq_lens, rank, ranks, block_table=table)
        ref_table = local_blocks(table, seq_lens, rank, ranks)
        routed = cpu_kernel.step_routing_cpu(slots, qsl, seq_lens, table, rank, world, per_rank, bs)
        plan = routing_from_tensors(routed[:-3], rank, world)
        for name in ROUTING_TENSORS:
            want, got = getattr(ref_plan, name), getattr(plan, name)
            assert got.dtype == want.dtype and torch.equal(got, want), name
        assert (plan.counts, plan.span_counts, plan.rows, plan.t_max, plan.num_tokens) == (
            ref_plan.counts, ref_plan.span_counts, ref_plan.rows, ref_plan.t_max,
            ref_plan.num_tokens)
        for want, got in zip(ref_table, routed[-3:]):
            assert got.dtype == want.dtype and torch.equal(got, want)


def _spans(tables, past, new, bs, per_rank):
    """Reference: does each request hold KV (this step's included) on more than one rank?"""
    return [len({blk // per_rank for blk in tab[: -(-(p + q) // bs)]}) > 1
            for tab, p, q in zip(tables, past, new)]


@settings(max_examples=120, deadline=None)
@given(steps())
def test_routing_splits_each_ranks_rows_into_local_and_spanning_requests(step):
    """With the block table, each rank's rows are its local requests' tokens first, then its
    spanning requests' ones (each in vLLM order), and only spanning tokens enter the query
    exchange: a rank-major gather of each rank's spanning rows, restored to span order."""
    world, bs, per_rank, past, new, tables = step
    table, qsl, seq_lens, slots = step_tensors(bs, past, new, tables)
    t = slots.shape[0]
    owners = [s // (per_rank * bs) for s in slots.tolist()]
    ref_req = [i for i, q in enumerate(new) for _ in range(q)]
    ref_pos = [pos for p, q in zip(past, new) for pos in range(p, p + q)]
    spans = _spans(tables, past, new, bs, per_rank)
    span_tokens = [j for j in range(t) if spans[ref_req[j]]]
    ranks = RankMap(world, per_rank, bs)
    plans = [route_step(slots, qsl, seq_lens, r, ranks, block_table=table) for r in range(world)]
    values = torch.arange(t, dtype=torch.float32) * 10 + 7
    rows_of, spanning_of = [], []
    for r, plan in enumerate(plans):
        local = [j for j in range(t) if owners[j] == r and not spans[ref_req[j]]]
        spanning = [j for j in range(t) if owners[j] == r and spans[ref_req[j]]]
        assert plan.span_counts == [sum(1 for j in span_tokens if owners[j] == o)
                                    for o in range(world)]
        assert plan.num_own_local == len(local) and plan.num_spanning == len(span_tokens)
        if local or spanning:
            assert plan.row_idx.tolist() == local + spanning
        assert plan.own_pos.tolist() == [ref_pos[j] for j in local]
        own_per_req = [sum(1 for j in local if ref_req[j] == i) for i in range(len(new))]
        assert plan.own_query_start_loc.tolist() == [0, *torch.tensor(own_per_req).cumsum(0).tolist()]
        span_per_req = [sum(1 for j in span_tokens if ref_req[j] == i) for i in range(len(new))]
        assert plan.span_query_start_loc.tolist() == [0, *torch.tensor(span_per_req).cumsum(0).tolist()]
        assert plan.span_pos.tolist() == [ref_pos[j] for j in span_tokens]
        assert plan.span_merge.tolist() == [span_tokens.index(j) for j in spanning]
        rows = values[plan.row_idx]
        rows_of.append(torch.cat([rows, rows.new_full((plan.t_max - plan.rows,), -1.0)]))
        sp = values[spanning] if spanning else values[:0]
        spanning_of.append(torch.cat([sp, sp.new_full((plan.s_max - len(spanning),), -1.0)]))
    for plan in plans:
        assert torch.equal(torch.cat(rows_of)[plan.restore_idx], values)
        assert torch.equal(torch.cat(spanning_of)[plan.span_restore], values[span_tokens])
