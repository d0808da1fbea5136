"""write_kv / shard_attention / causal_attention against float64 attention over explicit K/V.

Inputs are generated in float32, rounded to the tested dtype, and the float64 reference is computed
from the rounded values, so the tolerances only cover the kernels' own rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_kvp.ops import attention as attn
from vllm_kvp.ops.attention import causal_attention, shard_attention, write_kv
from vllm_kvp.ops.merge import merge_partials

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) for outputs. The CPU flash kernel rounds probabilities to the input dtype before P @ V.
OUT_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
LSE_TOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def ref_attention(q, k, v, scale, mask=None):
    """float64 reference. q (Tq, Hq, D); k/v (Tk, Hkv, D); mask (Tq, Tk) bool, True = may attend.
    Returns out (Tq, Hq, D), lse (Tq, Hq); a query with no allowed key gets out 0, lse -inf."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # head h -> kv head h // g
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1) if k.shape[0] else torch.full(scores.shape[:2], -math.inf).double()
    p = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    return torch.einsum("hqk,khd->qhd", p, v), lse.transpose(0, 1)


def assert_close_to_ref(out, lse, ref_out, ref_lse, dtype):
    atol, rtol = OUT_TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOL[dtype], rtol=1e-5)


def rand(g, *shape, dtype):
    return torch.randn(*shape, generator=g).to(dtype)


def build_paged(g, shards, block_size, dtype, spare_blocks=3):
    """Store each shard (k, v: (L, Hkv, D)) in one freshly allocated, garbage-filled paged cache.

    Block ids are shuffled, the last block of a shard is partly filled, unused table entries hold
    valid but unrelated ids, and tokens are written in shuffled order mixed with skipped (-1) tokens.
    Returns kv_cache, block_table (B, M) int32, shard_lens (B,) int32.
    """
    hkv, d = shards[0][0].shape[1:]
    nblks = [-(-k.shape[0] // block_size) for k, _ in shards]
    num_blocks = sum(nblks) + spare_blocks
    kv_cache = rand(g, num_blocks, hkv, block_size, 2 * d, dtype=dtype) * 100  # garbage must not leak
    ids = torch.randperm(num_blocks, generator=g)
    m = max(max(nblks), 1) + 1
    table = torch.randint(0, num_blocks, (len(shards), m), generator=g, dtype=torch.int32)
    keys, values, slots, used = [], [], [], 0
    for i, ((k, v), n) in enumerate(zip(shards, nblks)):
        table[i, :n] = ids[used : used + n].int()
        used += n
        pos = torch.arange(k.shape[0])
        slots.append(table[i, pos // block_size].long() * block_size + pos % block_size)
        keys.append(k)
        values.append(v)
    n_skip = 3
    keys.append(torch.full((n_skip, hkv, d), 1e3).to(dtype))  # would be obvious if it landed anywhere
    values.append(torch.full((n_skip, hkv, d), 1e3).to(dtype))
    slots.append(torch.full((n_skip,), -1, dtype=torch.long))
    key, value, slot = torch.cat(keys), torch.cat(values), torch.cat(slots)
    order = torch.randperm(key.shape[0], generator=g)
    write_kv(kv_cache, key[order], value[order], slot[order])
    lens = torch.tensor([k.shape[0] for k, _ in shards], dtype=torch.int32)
    return kv_cache, table, lens


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


head_cfg = st.tuples(st.sampled_from([1, 2, 4]), st.sampled_from([1, 2, 4]))  # (Hkv, Hq // Hkv)


@settings(max_examples=40, deadline=None)
@given(
    heads=head_cfg,
    d=st.sampled_from([4, 8, 40]),
    block_size=st.sampled_from([1, 2, 4, 16]),
    q_lens=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    shard_lens=st.lists(st.integers(0, 23), min_size=3, max_size=3),
    dtype=st.sampled_from(DTYPES),
    use_aten=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_shard_attention_matches_reference(heads, d, block_size, q_lens, shard_lens, dtype, use_aten, seed):
    hkv, grp = heads
    hq, b = hkv * grp, len(q_lens)
    g = torch.Generator().manual_seed(seed)
    scale = d**-0.5
    lens = shard_lens[:b]
    shards = [(rand(g, n, hkv, d, dtype=dtype), rand(g, n, hkv, d, dtype=dtype)) for n in lens]
    kv_cache, table, shard_len_t = build_paged(g, shards, block_size, dtype)
    query = rand(g, sum(q_lens), hq, d, dtype=dtype)
    qsl = cu(q_lens)
    old, attn._USE_ATEN_CPU = attn._USE_ATEN_CPU, use_aten
    try:
        out, lse = shard_attention(query, kv_cache, table, shard_len_t, qsl, scale)
    finally:
        attn._USE_ATEN_CPU = old
    for i, (k, v) in enumerate(shards):
        s, e = int(qsl[i]), int(qsl[i + 1])
        ref_out, ref_lse = ref_attention(query[s:e], k, v, scale)
        assert_close_to_ref(out[s:e], lse[s:e], ref_out, ref_lse, dtype)


@settings(max_examples=30, deadline=None)
@given(
    heads=head_cfg,
    d=st.sampled_from([4, 8, 40]),
    q_lens=st.lists(st.integers(0, 9), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    use_aten=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_causal_attention_matches_reference(heads, d, q_lens, dtype, use_aten, seed):
    hkv, grp = heads
    g = torch.Generator().manual_seed(seed)
    t = sum(q_lens)
    query = rand(g, t, hkv * grp, d, dtype=dtype)
    key, value = rand(g, t, hkv, d, dtype=dtype), rand(g, t, hkv, d, dtype=dtype)
    qsl = cu(q_lens)
    old, attn._USE_ATEN_CPU = attn._USE_ATEN_CPU, use_aten
    try:
        out, lse = causal_attention(query, key, value, qsl, 0.3)
    finally:
        attn._USE_ATEN_CPU = old
    for i in range(len(q_lens)):
        s, e = int(qsl[i]), int(qsl[i + 1])
        mask = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        ref_out, ref_lse = ref_attention(query[s:e], key[s:e], value[s:e], 0.3, mask)
        assert_close_to_ref(out[s:e], lse[s:e], ref_out, ref_lse, dtype)


@settings(max_examples=30, deadline=None)
@given(
    heads=head_cfg,
    d=st.sampled_from([8, 40]),
    block_size=st.sampled_from([1, 4, 16]),
    ranks=st.integers(2, 4),
    reqs=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 5)), min_size=1, max_size=2),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_sharded_decode_composes_to_full_causal_attention(heads, d, block_size, ranks, reqs, dtype, seed):
    """Past KV split block-wise over simulated ranks + causal attention over the new tokens, merged
    with merge_partials, equals causal attention over (past + new)."""
    hkv, grp = heads
    g = torch.Generator().manual_seed(seed)
    scale = d**-0.5
    past = [(rand(g, p, hkv, d, dtype=dtype), rand(g, p, hkv, d, dtype=dtype)) for p, _ in reqs]
    new_lens = [n for _, n in reqs]
    query = rand(g, sum(new_lens), hkv * grp, d, dtype=dtype)
    key_new = rand(g, sum(new_lens), hkv, d, dtype=dtype)
    value_new = rand(g, sum(new_lens), hkv, d, dtype=dtype)
    qsl = cu(new_lens)

    # Deal each request's past blocks to random ranks. The partial last block must be the last
    # block of whichever rank holds it, so it is appended after the rank's full blocks.
    per_rank = [[None] * len(reqs) for _ in range(ranks)]
    for i, (k, v) in enumerate(past):
        starts = list(range(0, k.shape[0], block_size))
        owner = torch.randint(0, ranks, (len(starts),), generator=g).tolist()
        for r in range(ranks):
            mine = [s for s, o in zip(starts, owner) if o == r]
            idx = torch.cat([torch.arange(s, min(s + block_size, k.shape[0])) for s in mine] or [torch.zeros(0, dtype=torch.long)])
            per_rank[r][i] = (k[idx], v[idx])
    partials = []
    for r in range(ranks):
        kv_cache, table, lens = build_paged(g, per_rank[r], block_size, dtype)
        partials.append(shard_attention(query, kv_cache, table, lens, qsl, scale))
    partials.append(causal_attention(query, key_new, value_new, qsl, scale))
    out, lse = merge_partials(torch.stack([o for o, _ in partials]), torch.stack([l for _, l in partials]))

    for i, ((k, v), n) in enumerate(zip(past, new_lens)):
        s, e = int(qsl[i]), int(qsl[i + 1])
        p = k.shape[0]
        mask = torch.ones(n, p + n, dtype=torch.bool).tril(p)  # new token j sees past + new 0..j
        ref_out, ref_lse = ref_attention(
            query[s:e], torch.cat([k, key_new[s:e]]), torch.cat([v, value_new[s:e]]), scale, mask
        )
        assert_close_to_ref(out[s:e], lse[s:e], ref_out, ref_lse, dtype)


def _fake_flash(kind):
    """A float64 stand-in with flash-attention's varlen conventions: LSE (Hq, total_q), and +inf LSE
    with zero output for a query that has no keys."""

    def fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, **kw):
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), math.inf, dtype=torch.float32)
        for i in range(cu_seqlens_q.numel() - 1):
            qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
            ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
            assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
            if qe == qs or ke == ks:
                continue
            mask = torch.ones(qe - qs, ke - ks, dtype=torch.bool).tril() if causal else None
            o, l = ref_attention(q[qs:qe], k[ks:ke], v[ks:ke], softmax_scale, mask)
            out[qs:qe], lse[:, qs:qe] = o.to(q.dtype), l.T.float()
        return (out, lse) if kind == "vllm" else (out, lse, None)

    return fn


@pytest.mark.parametrize("kind", ["vllm", "flash_attn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_branch_layout_with_fake_kernel(monkeypatch, kind, dtype):
    """The CUDA branch's gather, cu_seqlens and LSE handling, run on CPU against a fake kernel."""
    monkeypatch.setattr(attn, "_use_flash", lambda q: True)
    monkeypatch.setattr(attn, "_flash_varlen_fn", lambda: (_fake_flash(kind), kind))
    g = torch.Generator().manual_seed(5)
    hkv, hq, d, bs = 2, 4, 8, 4
    lens, q_lens = [9, 0, 1, 4], [3, 2, 0, 1]
    shards = [(rand(g, n, hkv, d, dtype=dtype), rand(g, n, hkv, d, dtype=dtype)) for n in lens]
    kv_cache, table, lens_t = build_paged(g, shards, bs, dtype)
    query = rand(g, sum(q_lens), hq, d, dtype=dtype)
    qsl = cu(q_lens)
    out, lse = shard_attention(query, kv_cache, table, lens_t, qsl, 0.5)
    key, value = rand(g, sum(q_lens), hkv, d, dtype=dtype), rand(g, sum(q_lens), hkv, d, dtype=dtype)
    c_out, c_lse = causal_attention(query, key, value, qsl, 0.5)
    for i, (k, v) in enumerate(shards):
        s, e = int(qsl[i]), int(qsl[i + 1])
        assert_close_to_ref(out[s:e], lse[s:e], *ref_attention(query[s:e], k, v, 0.5), dtype)
        mask = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        ref = ref_attention(query[s:e], key[s:e], value[s:e], 0.5, mask)
        assert_close_to_ref(c_out[s:e], c_lse[s:e], *ref, dtype)


def test_write_kv_layout_and_skip():
    kv_cache = torch.zeros(3, 2, 4, 6)
    key = torch.arange(3 * 2 * 3, dtype=torch.float32).reshape(3, 2, 3) + 1
    value = -key
    write_kv(kv_cache, key, value, torch.tensor([9, -1, 2]))
    assert torch.equal(kv_cache[2, :, 1, :3], key[0]) and torch.equal(kv_cache[2, :, 1, 3:], value[0])
    assert torch.equal(kv_cache[0, :, 2, :3], key[2]) and torch.equal(kv_cache[0, :, 2, 3:], value[2])
    assert int((kv_cache != 0).sum()) == 2 * 2 * 6  # the skipped token went nowhere
