"""Scoped exchanges (`step.scope`) on simulated ranks: each spanning query reaches exactly the
other ranks holding KV of its request, partials come back only from them, and one attention layer
run that way (the all-to-alls emulated by slicing each rank's send buffer) equals float64
attention over the whole context. The per-rank byte counts equal `step_policy.exchanges`'s."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import ref_attention, step_tensors, steps

from vllm_kvp.ops.merge import merge_gathered_rows
from vllm_kvp.ops.paged_attention import paged_attention_lse, write_kv
from vllm_kvp.ops.partials import empty_partial
from vllm_kvp.rank_map import RankMap
from vllm_kvp.step.routing import request_holders, route_step
from vllm_kvp.step.scope import exchange_scope, needs_scope, send_matrix, span_holders
from vllm_kvp.step.shard_map import local_blocks, local_slots
from vllm_kvp.step_policy import PARTIALS, QUERIES, ROUTED, ExchangeShape, exchanges


def _all_to_all(bufs: list[torch.Tensor], splits: list[list[int]]) -> list[torch.Tensor]:
    """bufs[o] holds splits[o][p] rows for each p in rank order -> what each rank receives, by
    source rank."""
    n = len(bufs)
    parts = [list(torch.split(bufs[o], splits[o])) for o in range(n)]
    return [torch.cat([parts[o][p] for o in range(n)]) for p in range(n)]


def _holders_ref(tables, past, new, bs, per_rank, world):
    return [{b // per_rank for b in t[: -(-(p + q) // bs)]} for t, p, q in zip(tables, past, new)]


@settings(max_examples=80, deadline=None)
@given(steps(), st.sampled_from([(4, 2), (2, 1)]))
def test_scoped_layer_on_simulated_ranks_matches_full_attention(step, heads):
    world, bs, per_rank, past, new, tables = step
    hq, hkv = heads
    d, scale = 8, 0.35
    table, qsl, seq_lens, slots = step_tensors(bs, past, new, tables)
    t = slots.shape[0]
    g = torch.Generator().manual_seed(t + world)
    ks = [torch.randn(p + q, hkv, d, generator=g) for p, q in zip(past, new)]
    vs = [torch.randn(p + q, hkv, d, generator=g) for p, q in zip(past, new)]
    query = torch.randn(t, hq, d, generator=g)
    all_slots = torch.tensor([tables[i][pos // bs] * bs + pos % bs
                              for i, (p, q) in enumerate(zip(past, new))
                              for pos in range(p + q)], dtype=torch.int64)
    all_k, all_v = torch.cat(ks), torch.cat(vs)

    ranks = RankMap(world, per_rank, bs)
    plans = [route_step(slots, qsl, seq_lens, r, ranks, block_table=table) for r in range(world)]
    holders = request_holders(table, seq_lens, ranks)
    assert [set(torch.nonzero(h).flatten().tolist()) for h in holders] == _holders_ref(
        tables, past, new, bs, per_rank, world)
    if plans[0].num_spanning == 0:
        return
    scopes, caches = [], []
    for plan in plans:
        owner, hold = span_holders(plan, holders)
        send = send_matrix(owner, hold, world)
        scopes.append(exchange_scope(plan, owner, hold, send))
        cache = torch.zeros(per_rank, hkv, bs, 2 * d)
        write_kv(cache, all_k, all_v, local_slots(all_slots, plan.rank, ranks))
        caches.append(cache)
    send = scopes[0].send
    assert all(s.send == send for s in scopes)  # every rank derives the same sizes
    span_req = [plans[0].token_req[i].item() for i in range(t) if
                len(_holders_ref(tables, past, new, bs, per_rank, world)[
                    plans[0].token_req[i].item()]) > 1]
    held = _holders_ref(tables, past, new, bs, per_rank, world)
    # Queries out: rank r sends each peer exactly its spanning rows whose request the peer holds.
    sent_q = []
    for r, (plan, sc) in enumerate(zip(plans, scopes)):
        own = plan.num_own_local
        mine = query[plan.row_idx[own:own + plan.span_counts[r]]].reshape(-1, hq * d)
        rows = plan.row_idx[own:own + plan.span_counts[r]].tolist()
        want = [j for p in range(world) if p != r for j, tok in enumerate(rows)
                if p in held[plans[0].token_req[tok].item()]]
        assert sc.q_send.tolist() == want
        assert sc.in_splits == [0 if p == r else sum(
            p in held[plans[0].token_req[tok].item()] for tok in rows) for p in range(world)]
        sent_q.append(mine[sc.q_send])
    received = _all_to_all(sent_q, [sc.in_splits for sc in scopes])
    packed, back_bufs = [], []
    for r, (plan, sc) in enumerate(zip(plans, scopes)):
        own = plan.num_own_local
        mine = query[plan.row_idx[own:own + plan.span_counts[r]]].reshape(-1, hq * d)
        x = torch.cat([mine, received[r]])[sc.x_src].view(-1, hq, d)
        # X: the spanning queries of requests r holds, in span order.
        want = [i for i in range(t) if len(held[plans[0].token_req[i].item()]) > 1
                and r in held[plans[0].token_req[i].item()]]
        assert torch.equal(x, query[want])
        local_table, lens, block_pos = local_blocks(table, seq_lens, r, ranks)
        out, lse = paged_attention_lse(x, caches[r], local_table, lens, sc.x_query_start_loc,
                                       scale, q_pos=sc.x_pos, block_pos=block_pos)
        buf = torch.cat([out.reshape(-1, hq * d), lse], dim=1)
        packed.append(buf)
        back_bufs.append(buf[sc.p_send])
    back = _all_to_all(back_bufs, [sc.out_splits for sc in scopes])
    result = torch.full((t, hq, d), float("nan"))
    shape = ExchangeShape(heads=hq, head_dim=d, hidden=hq * d, act_bytes=4, out_bytes=4,
                          attn_layers=1, last_stage=False)
    for r, (plan, sc) in enumerate(zip(plans, scopes)):
        n = plan.span_counts[r]
        predicted = exchanges(ROUTED, plan.counts, t, shape, world, plan.span_counts, scope=send,
                              rank=r)
        assert predicted[QUERIES][1] == sent_q[r].numel() * 4
        assert predicted[PARTIALS][1] == back_bufs[r].numel() * 4
        if not n:
            continue
        src = torch.cat([packed[r], back[r], empty_partial(packed[r], hq)])
        gathered = src[sc.merge_src].view(world, n, -1)
        out = torch.empty(n, hq, d)
        merge_gathered_rows(gathered, torch.arange(n), hq, d, out)
        own = plan.num_own_local
        result[plan.row_idx[own:own + n]] = out
    for i, req in enumerate(plans[0].token_req.tolist()):
        if len(held[req]) < 2:
            continue
        pos = plans[0].token_pos[i].item()
        mask = torch.arange(past[req] + new[req])[None, :] <= pos
        ref_out, _ = ref_attention(query[i:i + 1], ks[req], vs[req], scale, mask)
        torch.testing.assert_close(result[i:i + 1].double(), ref_out, atol=2e-5, rtol=2e-5)
    assert span_req or not plans[0].num_spanning
    # An all-gather would deliver every spanning query everywhere: scoped sends no more.
    assert needs_scope(send) == any(len(held[q]) < world for q in span_req)


def test_empty_partial_is_zero_output_and_minus_infinite_lse():
    h, d = 3, 4
    like = torch.randn(5, h * d + h)
    row = empty_partial(like, h)
    assert row.shape == (1, h * d + h) and torch.equal(row[0, :h * d], torch.zeros(h * d))
    assert torch.isneginf(row[0, h * d:]).all()
    packed = torch.zeros(2, h * d * 2 + 4 * h, dtype=torch.uint8)  # bf16 outputs + f32 LSEs
    row = empty_partial(packed, h)
    assert torch.isneginf(row[:, -4 * h:].view(torch.float32)).all()
    assert not row[:, : -4 * h].any()
