"""paged_attention_lse under Triton's CPU interpreter, against a float64 reference of its contract.

The module is loaded privately with TRITON_INTERPRET=1 set only while its kernels are decorated (the
mechanism of test_triton_merge.py), so nothing else in this process runs interpreted. The reference
gathers each request's keys through the block table exactly as the docstring defines them, masks by
length (and by position when causal), and takes a float64 softmax.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="triton is not installed")

import vllm_kvp.ops  # noqa: E402  (locates the package; imports neither triton nor vllm)
from support import DTYPES, LSE_TOL, OUT_TOL, make_case, reference  # noqa: E402


def _load_interpreted():
    path = pathlib.Path(vllm_kvp.ops.__file__).with_name("triton_paged_attention.py")
    spec = importlib.util.spec_from_file_location("_kvp_triton_paged_interpreted", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(module._paged_attn_kernel, InterpretedFunction)
    return module


kernel_module = _load_interpreted()
paged_attention_lse = kernel_module.paged_attention_lse


def check(q, cache, table, lens, qsl, q_pos, block_pos, dtype, **kwargs):
    scale = q.shape[-1] ** -0.5
    out, lse = paged_attention_lse(q, cache, table, lens, qsl, scale, q_pos, block_pos, **kwargs)
    ref_out, ref_lse = reference(q, cache, table, lens, qsl, scale, q_pos, block_pos)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)  # exactly the rows with no visible key
    assert (out[empty] == 0).all() and not torch.isposinf(lse).any()
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOL[dtype], rtol=1e-5)
    return out, lse


@settings(max_examples=120, deadline=None)
@given(
    heads=st.sampled_from([(1, 1), (4, 1), (8, 2), (2, 2), (6, 2)]),  # (Hq, Hkv): MHA, MQA, GQA, group 3
    d=st.sampled_from([8, 16, 24]),
    bs=st.sampled_from([16, 128]),
    q_lens=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    kv_lens=st.lists(st.sampled_from([0, 1, 15, 16, 17, 40, 130, 300]), min_size=3, max_size=3),
    dtype=st.sampled_from(DTYPES),
    block_major=st.booleans(),
    causal=st.booleans(),
    stripe=st.sampled_from([1, 2]),
    num_splits=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(heads, d, bs, q_lens, kv_lens, dtype, block_major, causal, stripe, num_splits, seed):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    case = make_case(g, q_lens, kv_lens[: len(q_lens)], hq, hkv, d, bs, dtype, block_major, causal, stripe)
    check(*case, dtype, num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_one_token_shards(dtype):
    g = torch.Generator().manual_seed(1)
    case = make_case(g, [2, 1, 3, 1], [0, 1, 0, 1], 8, 2, 16, 16, dtype, block_major=False, causal=False)
    out, lse = check(*case, dtype)
    assert torch.isneginf(lse[0:2]).all() and (out[0:2] == 0).all()  # request 0: empty shard
    assert torch.isneginf(lse[3:6]).all() and (out[3:6] == 0).all()  # request 2: empty shard
    assert torch.isfinite(lse[2]).all() and torch.isfinite(lse[6]).all()
    q, cache, table, lens, qsl = case[:5]
    one = cache[table[1, 0].long(), :, 0, 16:]  # a single visible key: output is its V exactly
    torch.testing.assert_close(out[2].float(), one.float().repeat_interleave(4, 0), atol=0, rtol=0)


def test_causal_striped_prefill_with_splits():
    """Many queries, striped blocks (a rank holding every other block), positions before, inside and
    after the shard; forced splits and a query tile that spans several tiles per request."""
    g = torch.Generator().manual_seed(2)
    case = make_case(g, [37, 5], [700, 260], 8, 2, 16, 16, torch.float32, block_major=True, causal=True, stripe=2)
    for num_splits in (1, 4):
        check(*case, torch.float32, num_splits=num_splits, max_query_len=37)


def test_in_place_outputs_strided_and_hints():
    g = torch.Generator().manual_seed(3)
    q, cache, table, lens, qsl, _, _ = make_case(g, [3, 2], [50, 200], 4, 1, 16, 16, torch.float16,
                                                 block_major=True, causal=False)
    out = torch.empty(5, 6, 16, dtype=torch.float16)[:, 1:5]  # (T=5, Hq=4, D) inside a wider buffer
    lse = torch.empty(4, 5).t()  # (T, Hq) stored head-major
    ref_out, ref_lse = reference(q, cache, table, lens, qsl, 0.25)
    for kwargs in ({}, {"max_kv_len": 200, "max_query_len": 3}, {"num_splits": 5}):
        r_out, r_lse = paged_attention_lse(q, cache, table.long(), lens.long(), qsl.long(), 0.25,
                                           out=out, lse=lse, **kwargs)
        assert r_out is out and r_lse is lse
        torch.testing.assert_close(out.double(), ref_out, atol=4e-3, rtol=4e-3)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-5)


def test_rejects_mismatched_inputs():
    g = torch.Generator().manual_seed(4)
    q, cache, table, lens, qsl, _, _ = make_case(g, [1], [5], 4, 2, 8, 16, torch.float32, False, False)
    with pytest.raises(ValueError):
        paged_attention_lse(q.half(), cache, table, lens, qsl, 1.0)
    with pytest.raises(ValueError):
        paged_attention_lse(q, cache, table, lens, qsl, 1.0, q_pos=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError):
        paged_attention_lse(q[:, :3], cache, table, lens, qsl, 1.0)


def test_env_restored():
    assert os.environ.get("TRITON_INTERPRET") in (None, "0", "")


def test_host_code_never_reads_device_values(monkeypatch):
    """The launch path decides everything from shapes and host ints: reading a tensor's value on the
    host (a device sync on CUDA, and a CUDA-graph capture error) must not happen."""
    g = torch.Generator().manual_seed(5)
    case = make_case(g, [4, 1], [90, 33], 8, 2, 16, 16, torch.float32, block_major=False, causal=True, stripe=2)
    ref = reference(*case[:5], 0.25, *case[5:])
    def forbidden(*_a, **_k):
        raise AssertionError("host read of a device value")

    for name in ("item", "tolist", "__int__", "__bool__", "__index__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out, lse = paged_attention_lse(*case[:5], 0.25, *case[5:], num_splits=2)
    monkeypatch.undo()
    torch.testing.assert_close(out.double(), ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref[1], atol=2e-5, rtol=1e-5)


def test_more_splits_than_one_combine_tile():
    """D = 256 leaves the combine tile 32 splits; 35 splits take two tiles."""
    g = torch.Generator().manual_seed(6)
    case = make_case(g, [1, 2], [2200, 900], 2, 1, 256, 128, torch.float32, block_major=False, causal=False)
    check(*case, torch.float32, num_splits=35, max_kv_len=2200)  # 35 splits of 64 keys
