"""A shared step's fresh requests (no KV before the step) attended by rows over all ranks
(`step.fresh`): every fresh query is attended exactly once, by one rank, over exactly its request's
keys, and gives a float64 causal attention's output; every other request keeps its cache path."""

import math

import pytest
import torch

from vllm_kvp.ops.paged_attention import paged_attention_lse
from vllm_kvp.step.fresh import STRIPE, fresh_split, scratch_cache


def _reference(q, k, v, scale):
    """float64 causal attention of one request's queries (T, H, D) over its keys (T, Hkv, D)."""
    t, h, d = q.shape
    rep = h // k.shape[1]
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = torch.einsum("thd,shd->hts", q.double(), kk) * scale
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), vv)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("block_size", [16, 128])
def test_fresh_rows_attended_once_and_exactly(world, block_size):
    g = torch.Generator().manual_seed(world * block_size)
    # Requests: (new tokens, tokens before the step). Fresh: no past and more than one token.
    reqs = [(1, 40), (70, 0), (5, 12), (1, 0), (33, 0), (200, 0)]
    q_lens = torch.tensor([n for n, _ in reqs])
    seq_lens = torch.tensor([n + p for n, p in reqs], dtype=torch.int32)
    qsl = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).to(torch.int32)
    t, h, hkv, d = int(q_lens.sum()), 4, 2, 32
    q, k, v = (torch.randn(t, n, d, generator=g) for n in (h, hkv, hkv))
    shard_lens = seq_lens.clone()
    scale = 1 / math.sqrt(d)
    fresh = [i for i, (n, p) in enumerate(reqs) if p == 0 and n > 1]
    seen = torch.zeros(t, dtype=torch.int64)
    got = torch.zeros(t, h, d, dtype=torch.float64)
    for rank in range(world):
        f = fresh_split(qsl, seq_lens, shard_lens, rank, world, block_size)
        assert f is not None
        assert [i for i in range(len(reqs)) if f.cache_lens[i] == 0] == fresh
        assert torch.equal(f.cache_lens[[i for i in range(len(reqs)) if i not in fresh]],
                           shard_lens[[i for i in range(len(reqs)) if i not in fresh]])
        seen[f.rows] += 1
        out, lse = paged_attention_lse(q[f.rows], scratch_cache(f, k, v), f.block_table, f.lens,
                                       f.query_start_loc, scale, q_pos=f.pos,
                                       block_pos=f.block_pos)
        assert torch.isfinite(lse).all()
        got[f.rows] = out.double()
        # Runs of STRIPE positions dealt round robin: the causal work is near even.
        assert all(int(p) // STRIPE % world == rank for p in f.pos)
    fresh_tokens = torch.cat([torch.arange(int(qsl[i]), int(qsl[i + 1])) for i in fresh])
    assert seen[fresh_tokens].eq(1).all() and int(seen.sum()) == fresh_tokens.numel()
    for i in fresh:
        a, b = int(qsl[i]), int(qsl[i + 1])
        want = _reference(q[a:b], k[a:b], v[a:b], scale)
        assert torch.allclose(got[a:b], want, atol=1e-5), (got[a:b] - want).abs().max()


def test_no_fresh_request_or_one_rank_gives_none():
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    lens = torch.tensor([30, 1], dtype=torch.int32)  # a decode token and a 1-token prompt
    assert fresh_split(qsl, lens, lens, 0, 2, 16) is None
    qsl = torch.tensor([0, 64], dtype=torch.int32)
    lens = torch.tensor([64], dtype=torch.int32)
    assert fresh_split(qsl, lens, lens, 0, 1, 16) is None
    assert fresh_split(qsl, lens, lens, 0, 2, 16) is not None
