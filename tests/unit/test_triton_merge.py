"""triton_merge_partials under Triton's CPU interpreter, against a float64 reference merge.

``triton.jit`` chooses interpreter or compiler when a kernel is decorated, and other tests (or
vLLM) may already have imported Triton or this module normally. So a private copy of the module is
loaded with TRITON_INTERPRET=1 set only while it is being decorated; the variable is restored
afterwards so nothing else in this pytest process (or processes it starts) runs interpreted.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton", reason="triton is not installed")

import vllm_kvp.ops  # noqa: E402  (locates the package; imports neither triton nor vllm)
from vllm_kvp.ops.merge import merge_partials  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _load_interpreted():
    path = pathlib.Path(vllm_kvp.ops.__file__).with_name("triton_merge.py")
    spec = importlib.util.spec_from_file_location("_kvp_triton_merge_interpreted", path)
    module = importlib.util.module_from_spec(spec)
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

    assert isinstance(module._merge_partials_kernel, InterpretedFunction)
    return module.triton_merge_partials


triton_merge_partials = _load_interpreted()


def ref_merge(outs, lses):
    """float64 merge: outs (R, T, H, D), lses (R, T, H) -> out (T, H, D), lse (T, H)."""
    outs, lses = outs.double(), lses.double()
    lse = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - torch.where(torch.isneginf(lse), 0.0, lse))  # all-empty rows: weights 0
    return (w.unsqueeze(-1) * outs).sum(0), lse


@settings(max_examples=25, deadline=None)
@given(
    r=st.integers(1, 5),
    t=st.integers(1, 9),
    h=st.integers(1, 3),
    d=st.sampled_from([1, 8, 24, 64, 200]),
    empty_frac=st.sampled_from([0.0, 0.3, 1.0]),
    lse_scale=st.sampled_from([1.0, 30.0]),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_merge_matches_reference(r, t, h, d, empty_frac, lse_scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(r, t, h, d, generator=g).to(dtype)
    lses = torch.randn(r, t, h, generator=g) * lse_scale
    lses[torch.rand(r, t, h, generator=g) < empty_frac] = -math.inf
    out, lse = triton_merge_partials(outs, lses)
    ref_out, ref_lse = ref_merge(outs, lses)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == (t, h, d) and lse.shape == (t, h)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5 * lse_scale, rtol=1e-5)
    # Same contract as the torch merge: agree within rounding (exp/log implementations differ).
    t_out, t_lse = merge_partials(outs, lses)
    torch.testing.assert_close(out.double(), t_out.double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, t_lse, atol=1e-5 * lse_scale, rtol=1e-5)


def test_all_empty_and_deterministic():
    g = torch.Generator().manual_seed(0)
    outs = torch.randn(3, 70, 2, 16, generator=g).half()  # 140 rows: several programs, ragged tail
    lses = torch.randn(3, 70, 2, generator=g)
    lses[:, 5] = -math.inf
    out, lse = triton_merge_partials(outs, lses)
    assert (out[5] == 0).all() and torch.isneginf(lse[5]).all()
    assert torch.isfinite(lse[:5]).all() and torch.isfinite(lse[6:]).all()
    again = triton_merge_partials(outs.clone(), lses.clone())
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])


def test_noncontiguous_inputs():
    g = torch.Generator().manual_seed(1)
    outs = torch.randn(4, 2, 5, 3, 8, generator=g)[:, 1].transpose(1, 2)  # (R, T=3, H=5, D) strided
    lses = torch.randn(4, 5, 3, generator=g).transpose(1, 2).double()  # float64 LSE is accepted too
    out, lse = triton_merge_partials(outs, lses)
    ref_out, ref_lse = ref_merge(outs, lses)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_env_restored():
    assert os.environ.get("TRITON_INTERPRET") in (None, "0", "")
