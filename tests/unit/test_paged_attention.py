"""The CPU implementation of paged_attention_lse (torch, batched over requests, chunked over the block
table) against the same float64 reference and cases as the Triton kernel's tests."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the shared cases live in the Triton kernel's test module")

from support import DTYPES, LSE_TOL, OUT_TOL, make_case, reference  # noqa: E402

from vllm_kvp.ops import paged_attention as pa  # noqa: E402


def check(case, dtype, **kwargs):
    q, cache, table, lens, qsl, q_pos, block_pos = case
    scale = q.shape[-1] ** -0.5
    out, lse = pa.torch_paged_attention(q, cache, table, lens, qsl, scale, q_pos, block_pos, **kwargs)
    ref_out, ref_lse = reference(q, cache, table, lens, qsl, scale, q_pos, block_pos)
    assert out.dtype == dtype and lse.dtype == torch.float32
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty) and (out[empty] == 0).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOL[dtype], rtol=1e-5)


@settings(max_examples=150, deadline=None)
@given(
    heads=st.sampled_from([(1, 1), (4, 1), (8, 2), (2, 2), (6, 2)]),
    d=st.sampled_from([8, 16, 24]),
    bs=st.sampled_from([1, 16, 128]),
    q_lens=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    kv_lens=st.lists(st.sampled_from([0, 1, 15, 16, 17, 40, 130, 300]), min_size=4, max_size=4),
    dtype=st.sampled_from(DTYPES),
    block_major=st.booleans(),
    causal=st.booleans(),
    stripe=st.sampled_from([1, 2]),
    chunk_bytes=st.sampled_from([1, 4096, 1 << 20]),  # one block per step ... the whole shard at once
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(heads, d, bs, q_lens, kv_lens, dtype, block_major, causal, stripe, chunk_bytes, seed):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    case = make_case(g, q_lens, kv_lens[: len(q_lens)], hq, hkv, d, bs, dtype, block_major, causal, stripe)
    check(case, dtype, chunk_bytes=chunk_bytes)


def test_prefill_rows_take_the_head_major_step():
    g = torch.Generator().manual_seed(1)
    case = make_case(g, [40, 3, 0], [700, 90, 5], 8, 2, 16, 16, torch.float32, block_major=True, causal=True,
                     stripe=2)
    check(case, torch.float32, chunk_bytes=64 << 10)


def test_dispatch_and_in_place_outputs():
    g = torch.Generator().manual_seed(2)
    q, cache, table, lens, qsl, _, _ = make_case(g, [2, 1], [33, 0], 4, 2, 8, 16, torch.float32, False, False)
    out = torch.full((3, 4, 8), 5.0)
    lse = torch.full((4, 3), 5.0).t()
    r_out, r_lse = pa.paged_attention_lse(q, cache, table, lens, qsl, 0.5, out=out, lse=lse)
    ref_out, ref_lse = reference(q, cache, table, lens, qsl, 0.5)
    assert r_out is out and r_lse is lse
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
