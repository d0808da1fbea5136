"""The C++ CPU kernel of paged_attention_lse (vllm_kvp/csrc/paged_attention_cpu.cpp) against the
float64 reference and the cases of the Triton kernel's tests, and its place in the CPU dispatch.

The first test run on a machine builds the kernel (cached under ~/.cache/vllm_kvp/torch_extensions).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import DTYPES, LSE_TOL, OUT_TOL, make_case, reference, require_cpu_kernel

from vllm_kvp.ops import cpu_kernel
from vllm_kvp.ops import paged_attention as pa
from vllm_kvp.rank_map import RankMap


@pytest.fixture(scope="module", autouse=True)
def _kernel_built():
    require_cpu_kernel()


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(case, **kwargs):
    q, cache, table, lens, qsl, q_pos, block_pos = case
    res = cpu_kernel.paged_attention_lse_cpu(q, cache, table, lens, qsl, q.shape[-1] ** -0.5, q_pos, block_pos,
                                             **kwargs)
    assert res is not None, "the kernel declined inputs it should cover"
    return res


def check(case, dtype, out_dtype=None, **kwargs):
    q, cache, table, lens, qsl, q_pos, block_pos = case
    out, lse = run(case, **kwargs)
    ref_out, ref_lse = reference(q, cache, table, lens, qsl, q.shape[-1] ** -0.5, q_pos, block_pos)
    assert out.dtype == (out_dtype or dtype) and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)  # exactly the rows with no visible key
    assert (out[empty] == 0).all() and not torch.isposinf(lse).any()
    atol, rtol = OUT_TOL[out_dtype or dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_TOL[dtype], rtol=1e-5)
    return out, lse


@settings(max_examples=150, deadline=None)
@given(
    heads=st.sampled_from([(1, 1), (4, 1), (8, 2), (2, 2), (6, 2)]),  # (Hq, Hkv): MHA, MQA, GQA, group 3
    d=st.sampled_from([8, 16, 24, 32]),
    bs=st.sampled_from([1, 16, 128]),
    q_lens=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    kv_lens=st.lists(st.sampled_from([0, 1, 15, 16, 17, 40, 130, 300]), min_size=4, max_size=4),
    dtype=st.sampled_from(DTYPES),
    block_major=st.booleans(),
    causal=st.booleans(),
    stripe=st.sampled_from([1, 2]),
    num_splits=st.sampled_from([0, 1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference(heads, d, bs, q_lens, kv_lens, dtype, block_major, causal, stripe, num_splits, seed):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    case = make_case(g, q_lens, kv_lens[: len(q_lens)], hq, hkv, d, bs, dtype, block_major, causal, stripe)
    check(case, dtype, num_splits=num_splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_and_one_token_shards(dtype):
    g = torch.Generator().manual_seed(1)
    case = make_case(g, [2, 1, 3, 1], [0, 1, 0, 1], 8, 2, 16, 16, dtype, block_major=False, causal=False)
    out, lse = check(case, dtype)
    assert torch.isneginf(lse[0:2]).all() and (out[0:2] == 0).all()  # request 0: empty shard
    assert torch.isneginf(lse[3:6]).all() and (out[3:6] == 0).all()  # request 2: empty shard
    q, cache, table = case[:3]
    one = cache[table[1, 0].long(), :, 0, 16:]  # a single visible key: output is its V exactly
    torch.testing.assert_close(out[2].float(), one.float().repeat_interleave(4, 0), atol=0, rtol=0)


@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("bs", [16, 128])
def test_head_dims_of_the_models(d, bs):
    g = torch.Generator().manual_seed(d + bs)
    case = make_case(g, [3, 1, 2], [700, 1, 300], 8, 2, d, bs, torch.float32, block_major=False, causal=True,
                     stripe=2)
    check(case, torch.float32)
    check(case, torch.float32, num_splits=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_sized_causal_striped_batch(dtype, threads):
    """512 queries over a 4k-key striped shard next to a decode row and an empty shard, one and two
    threads (two: the items are spread over ATen's pool)."""
    g = torch.Generator().manual_seed(5)
    case = make_case(g, [512, 1, 7], [4096, 3000, 0], 8, 2, 32, 128, dtype, block_major=False, causal=True,
                     stripe=2)
    for n in (1, 2):
        torch.set_num_threads(n)
        check(case, dtype)


@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.float32)])
def test_prefill_tiles_with_a_group_of_three(d, dtype):
    """Group 3: query tiles of 85 tokens (255 rows), score tiles with 3- and 1-row remainders."""
    g = torch.Generator().manual_seed(d)
    case = make_case(g, [100, 5, 20], [700, 300, 0], 6, 2, d, 16, dtype, block_major=True, causal=True, stripe=2)
    check(case, dtype)
    check(case, dtype, num_splits=3)


@pytest.mark.parametrize("shuffled", [False, True])
def test_causal_tiles_stop_at_their_last_visible_key(shuffled):
    """A prefill tile walks keys only up to the last local block that starts at or before its last
    query's position: queries spread over a striped shard (each tile a different cut), head dim
    128 (P @ V in slices of the head), with the local blocks in position order and shuffled (a
    cut then only drops blocks past every query of the tile; earlier ones are masked per key)."""
    g = torch.Generator().manual_seed(11)
    q, cache, table, lens, qsl, _, block_pos = make_case(g, [300, 40], [2000, 900], 8, 2, 128, 16,
                                                          torch.float32, block_major=False, causal=True,
                                                          stripe=2)
    if shuffled:
        block_pos = block_pos.clone()
        for b, n in enumerate(lens.tolist()):
            nb = -(-n // 16)
            block_pos[b, :nb] = block_pos[b, torch.randperm(nb, generator=g)]
    # Increasing positions across each request's span, two of them before any key.
    q_pos = torch.cat([torch.linspace(-2, 2 * 2000, 300), torch.linspace(0, 2 * 900 + 40, 40)]).int()
    case = (q, cache, table, lens, qsl, q_pos, block_pos)
    check(case, torch.float32)
    check(case, torch.float32, num_splits=3)


def test_splits_chosen_for_idle_threads(threads):
    """One decode request and fewer (request, kv head) items than threads: the key range is split
    across threads and the partials combined by their LSE."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(6)
    case = make_case(g, [1], [5000], 4, 1, 32, 16, torch.float32, block_major=False, causal=False)
    check(case, torch.float32)
    check(case, torch.float32, num_splits=7)


def test_float32_out_for_low_precision_inputs_and_strided_outputs():
    """The attention backend asks for float32 partials of bf16 queries; out and lse may be views."""
    g = torch.Generator().manual_seed(7)
    case = make_case(g, [3, 2], [50, 200], 4, 1, 32, 16, torch.bfloat16, block_major=True, causal=True)
    q = case[0]
    out = torch.full((5, 6, 32), 7.0)[:, 1:5]  # (T=5, Hq=4, D) inside a wider float32 buffer
    lse = torch.full((4, 5), 7.0).t()  # (T, Hq) stored head-major
    r_out, r_lse = run(case, out=out, lse=lse)
    assert r_out is out and r_lse is lse
    ref_out, ref_lse = reference(*case[:5], q.shape[-1] ** -0.5, *case[5:])
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)  # float32 P @ V on bf16 K/V
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_dispatch_uses_the_kernel_and_falls_back(monkeypatch):
    g = torch.Generator().manual_seed(8)
    q, cache, table, lens, qsl, _, _ = make_case(g, [2, 1], [33, 0], 4, 2, 32, 16, torch.float32, False, False)
    ref_out, ref_lse = reference(q, cache, table, lens, qsl, 0.5)

    def refuse(*args, **kwargs):
        raise AssertionError("the torch implementation ran although the kernel covers the inputs")

    with monkeypatch.context() as mp:
        mp.setattr(pa, "torch_paged_attention", refuse)
        out, lse = pa.paged_attention_lse(q, cache, table, lens, qsl, 0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=1e-5)
    # A head dim without a vector split (40) and a cache with a strided last dim go to torch.
    q40, c40, t40, l40, s40, _, _ = make_case(g, [2], [70], 4, 2, 40, 16, torch.float32, False, False)
    assert cpu_kernel.paged_attention_lse_cpu(q40, c40, t40, l40, s40, 0.5) is None
    out, lse = pa.paged_attention_lse(q40, c40, t40, l40, s40, 0.5)
    torch.testing.assert_close(out.double(), reference(q40, c40, t40, l40, s40, 0.5)[0], atol=2e-5, rtol=2e-5)
    strided = torch.empty(cache.shape[:3] + (cache.shape[3] * 2,))[..., ::2]
    strided.copy_(cache)
    assert cpu_kernel.paged_attention_lse_cpu(q, strided, table, lens, qsl, 0.5) is None
    out, _ = pa.paged_attention_lse(q, strided, table, lens, qsl, 0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)


def test_int64_metadata_and_empty_batch():
    g = torch.Generator().manual_seed(9)
    q, cache, table, lens, qsl, q_pos, block_pos = make_case(g, [3, 2], [40, 90], 8, 2, 16, 16, torch.float16,
                                                             False, True, stripe=2)
    out, lse = run((q, cache, table.long(), lens.long(), qsl.long(), q_pos.long(), block_pos.long()))
    ref_out, ref_lse = reference(q, cache, table, lens, qsl, 0.25, q_pos, block_pos)
    torch.testing.assert_close(out.double(), ref_out, atol=4e-3, rtol=4e-3)
    out, lse = run((q[:0], cache, table[:0], lens[:0], qsl[:1] * 0, None, None))
    assert out.shape == (0, 8, 16) and lse.shape == (0, 8)


def test_build_failure_falls_back_with_one_warning(tmp_path):
    """No usable compiler: one RuntimeWarning, then every call takes the torch path."""
    script = textwrap.dedent("""
        import warnings, torch
        from vllm_kvp.ops import paged_attention as pa, cpu_kernel
        q = torch.randn(2, 4, 32); cache = torch.randn(3, 2, 16, 64)
        table = torch.tensor([[0, 2]], dtype=torch.int32); lens = torch.tensor([20], dtype=torch.int32)
        qsl = torch.tensor([0, 2], dtype=torch.int32)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for _ in range(3):
                out, lse = pa.paged_attention_lse(q, cache, table, lens, qsl, 0.3)
        ref, ref_lse = pa.torch_paged_attention(q, cache, table, lens, qsl, 0.3)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
        assert cpu_kernel.failure() is not None
        print(sum("C++ CPU attention kernel is unavailable" in str(x.message) for x in w))
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), VLLM_KVP_EXTENSIONS_DIR=str(tmp_path / "ext"))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "1"


def test_lse_is_natural_log():
    q = torch.zeros(1, 1, 16)
    cache = torch.zeros(1, 1, 16, 32)
    out, lse = run((q, cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([10], dtype=torch.int32),
                    torch.tensor([0, 1], dtype=torch.int32), None, None))
    assert abs(lse.item() - math.log(10)) < 1e-6 and (out == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_rank_matches_torch_write(dtype):
    """The C++ store of a step's K/V against local_slots + write_kv: rows of this rank written at
    their local slots, other ranks' and padding rows skipped, strided key/value (views of a fused
    qkv output, as vLLM passes them), and the count of rows written."""
    from vllm_kvp.ops.paged_attention import write_kv
    from vllm_kvp.step.shard_map import local_slots

    g = torch.Generator().manual_seed(6)
    nb, hkv, bs, d, rank = 5, 2, 16, 32, 1
    per_rank = nb * bs
    qkv = torch.randn(9, (4 + 2 * hkv) * d, generator=g).to(dtype)
    key = qkv[:, 4 * d: (4 + hkv) * d].view(9, hkv, d)
    value = qkv[:, (4 + hkv) * d:].view(9, hkv, d)
    # logical slots: rank 1's (80..159), rank 0's, rank 2's, padding; one at each end of the rank
    slots = torch.tensor([80, 3, 159, 200, -1, 100, 117, 79, 160], dtype=torch.int64)
    want = torch.zeros(nb, hkv, bs, 2 * d, dtype=dtype)
    ranks = RankMap(3, nb, bs)
    write_kv(want, key, value, local_slots(slots, rank, ranks))
    got = torch.zeros_like(want)
    n = cpu_kernel.write_kv_rank_cpu(got, key, value, slots, rank, ranks)
    assert n == 4
    assert torch.equal(got, want)
    # a dtype the cache does not have is left to the torch path
    assert cpu_kernel.write_kv_rank_cpu(got, key.float() if dtype != torch.float32 else key.half(),
                                        value, slots, rank, ranks) is None
