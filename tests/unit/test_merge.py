"""merge_partials against float64 full attention.

A random attention problem's keys are split into R arbitrary shards (possibly empty or one token);
each shard's exact (out, lse) is rounded to the tested dtype, merged, and compared with full attention
over all keys computed in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import require_cpu_kernel

from vllm_kvp.ops.merge import merge_partials

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) on outputs; the partials are rounded to the dtype before merging.
OUT_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}
LSE_ATOL = 1e-4  # lse stays float32 throughout


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """float64 full softmax attention. q (T, H, D), k/v (S, H, D) -> out (T, H, D), lse (T, H).
    S == 0 gives out 0, lse -inf."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[0] == 0:
        return torch.zeros_like(q), torch.full(q.shape[:2], -math.inf, dtype=torch.float64)
    scores = torch.einsum("thd,shd->ths", q, k) * scale
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse.unsqueeze(-1))
    return torch.einsum("ths,shd->thd", p, v), lse


def assert_merged_close(out, lse, ref_out, ref_lse, dtype):
    atol, rtol = OUT_TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    # Equal infinities compare equal in assert_close, so -inf rows are checked too.
    torch.testing.assert_close(lse.double(), ref_lse, atol=LSE_ATOL, rtol=1e-5)


@st.composite
def split_problem(draw):
    t = draw(st.integers(1, 6))
    h = draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 4, 16, 40]))
    s = draw(st.integers(0, 24))
    r = draw(st.integers(1, 5))
    cuts = sorted(draw(st.lists(st.integers(0, s), min_size=r - 1, max_size=r - 1)))
    scale = draw(st.floats(0.05, 2.0))
    return t, h, d, s, [0, *cuts, s], scale, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(DTYPES))


@settings(max_examples=60, deadline=None)
@given(split_problem())
def test_merge_of_shards_equals_full_attention(problem):
    t, h, d, s, bounds, scale, seed, dtype = problem
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, d, generator=g)
    k = torch.randn(s, h, d, generator=g)
    v = torch.randn(s, h, d, generator=g)
    # Arbitrary shards: a random permutation of the keys, cut into contiguous runs.
    perm = torch.randperm(s, generator=g)
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, l = ref_attention(q, k[perm[a:b]], v[perm[a:b]], scale)
        outs.append(o.to(dtype))
        lses.append(l.float())
    out, lse = merge_partials(torch.stack(outs), torch.stack(lses))
    ref_out, ref_lse = ref_attention(q, k, v, scale)
    assert_merged_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_empty_rows_give_zero_and_neg_inf(dtype):
    g = torch.Generator().manual_seed(0)
    outs = torch.randn(3, 4, 2, 8, generator=g).to(dtype)
    lses = torch.randn(3, 4, 2, generator=g)
    lses[:, 1, :] = -math.inf  # token 1: every shard empty
    lses[:, 2, 0] = -math.inf  # token 2, head 0 only
    lses[0, 3, :] = -math.inf  # token 3: one shard empty, others not
    out, lse = merge_partials(outs, lses)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[1] == 0).all() and (out[2, 0] == 0).all()
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[2, 0])
    assert torch.isfinite(lse[0]).all() and torch.isfinite(lse[3]).all()
    # The whole tensor being empty is fine too (e.g. every rank has an empty shard).
    out, lse = merge_partials(outs, torch.full_like(lses, -math.inf))
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_empty_partner_is_identity():
    g = torch.Generator().manual_seed(1)
    o = torch.randn(5, 3, 16, generator=g)
    l = torch.randn(5, 3, generator=g) * 10
    empty_o, empty_l = torch.zeros_like(o), torch.full_like(l, -math.inf)
    for outs, lses in ((torch.stack([o, empty_o]), torch.stack([l, empty_l])),
                       (torch.stack([empty_o, o]), torch.stack([empty_l, l]))):
        out, lse = merge_partials(outs, lses)
        assert torch.equal(out, o) and torch.equal(lse, l)


@pytest.mark.parametrize("offset", [-1e4, 0.0, 80.0, 3e4])
def test_large_lse_is_stable(offset):
    # exp(lse) would overflow or underflow float32 here; the max shift must make it irrelevant.
    g = torch.Generator().manual_seed(2)
    outs = torch.randn(4, 3, 2, 8, generator=g)
    lses = (torch.randn(4, 3, 2, generator=g) + offset).float()  # what a rank would really hold
    out, lse = merge_partials(outs, lses)
    w = torch.softmax(lses.double(), dim=0)
    torch.testing.assert_close(out.double(), (w.unsqueeze(-1) * outs.double()).sum(0), atol=1e-5, rtol=1e-5)
    # float32 spacing at |offset| bounds how exactly the merged lse can be represented.
    ulp = abs(offset) * 2.0**-23
    torch.testing.assert_close(lse.double(), torch.logsumexp(lses.double(), 0), atol=4 * ulp + 1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_and_order_insensitive(dtype):
    g = torch.Generator().manual_seed(3)
    outs = torch.randn(4, 7, 4, 32, generator=g).to(dtype)
    lses = torch.randn(4, 7, 4, generator=g) * 3
    lses[2, :3] = -math.inf
    first = merge_partials(outs, lses)
    # Same gathered tensor on another "rank" (fresh copies): identical bits.
    for _ in range(3):
        again = merge_partials(outs.clone(), lses.clone())
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    # A permuted order is a different (but equally valid) rounding: close, not necessarily equal.
    perm = torch.tensor([2, 0, 3, 1])
    out_p, lse_p = merge_partials(outs[perm], lses[perm])
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(out_p.double(), first[0].double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse_p, first[1], atol=LSE_ATOL, rtol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError):
        merge_partials(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError):
        merge_partials(torch.zeros(0, 3, 4, 5), torch.zeros(0, 3, 4))


def _packed(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """(R, T, H, D), (R, T, H) -> the exchange layout (R, T, H * D + H) float32."""
    r, t, h, d = outs.shape
    return torch.cat([outs.float().reshape(r, t, h * d), lses.float()], dim=2).contiguous()


@pytest.mark.parametrize("path", ["cpp", "torch"])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_merge_gathered_rows_against_float64(path, out_dtype, monkeypatch):
    """Selected rows of the packed exchange buffer, merged into a strided output view, against a
    float64 softmax over the ranks' LSEs; empty shards and all-empty rows included."""
    from vllm_kvp.ops import cpu_kernel
    from vllm_kvp.ops.merge import merge_gathered_rows

    if path == "cpp":
        require_cpu_kernel()
    if path == "torch":
        monkeypatch.setattr(cpu_kernel, "merge_gathered_rows_cpu", lambda *a: False)
    g = torch.Generator().manual_seed(4)
    r, t, h, d = 3, 9, 4, 32
    outs = torch.randn(r, t, h, d, generator=g)
    lses = torch.randn(r, t, h, generator=g) * 5
    lses[1, 2] = -math.inf  # one rank empty for token 2
    lses[:, 5] = -math.inf  # every rank empty for token 5
    lses[0, 7] += 3e4  # far from the others: only the max shift keeps exp() finite
    rows = torch.tensor([7, 0, 5, 2, 2], dtype=torch.int64)  # any order, repeats allowed
    backing = torch.full((rows.numel(), h * d + 8), 7.0, dtype=out_dtype)  # strided (n, H, D) view
    out = backing[:, : h * d].view(rows.numel(), h, d)
    merge_gathered_rows(_packed(outs, lses), rows, h, d, out)
    w = torch.softmax(lses.double(), dim=0).nan_to_num(0.0)  # all -inf -> NaN -> 0
    ref = (w.unsqueeze(-1) * outs.double()).sum(0)[rows]
    atol, rtol = OUT_TOL[out_dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    assert (out[2] == 0).all()  # token 5: nothing to attend
    assert (backing[:, h * d:] == 7.0).all()  # nothing written outside the view


def test_merge_gathered_rows_cpp_matches_torch_merge():
    from vllm_kvp.ops import cpu_kernel
    from vllm_kvp.ops.merge import merge_gathered_rows

    require_cpu_kernel()
    g = torch.Generator().manual_seed(5)
    outs, lses = torch.randn(4, 6, 8, 128, generator=g), torch.randn(4, 6, 8, generator=g)
    rows = torch.arange(6)
    out = merge_gathered_rows(_packed(outs, lses), rows, 8, 128, torch.empty(6, 8, 128))
    ref, _ = merge_partials(outs, lses)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
