"""Reduced-precision inputs are attended in float32: with out_dtype=float32 the only rounding left
is the inputs' own, so results match a float64 reference on the same (rounded) inputs to ~1e-6."""

import pytest
import torch

from vllm_kvp.ops.attention import causal_attention, shard_attention, write_kv


def _reference(q, k, v, scale, causal):
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if causal:
        s = s.masked_fill(torch.ones_like(s[0], dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v.double()), torch.logsumexp(s, -1).T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_partials_from_reduced_precision_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    tq, tk, h, d, bs = 5, 70, 4, 32, 16
    q = torch.randn(tq, h, d, generator=g).to(dtype)
    k = torch.randn(tk, h, d, generator=g).to(dtype)
    v = torch.randn(tk, h, d, generator=g).to(dtype)
    cache = torch.zeros(8, h, bs, 2 * d, dtype=dtype)
    blocks = torch.tensor([6, 1, 3, 0, 5], dtype=torch.int32)
    write_kv(cache, k, v, (blocks.long()[torch.arange(tk) // bs] * bs + torch.arange(tk) % bs))
    qsl = torch.tensor([0, tq])

    out, lse = shard_attention(q, cache, blocks[None], torch.tensor([tk]), qsl, 0.2,
                               out_dtype=torch.float32)
    ref_out, ref_lse = _reference(q, k, v, 0.2, causal=False)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref_out, atol=2e-6)
    assert torch.allclose(lse.double(), ref_lse, atol=2e-6)

    out, lse = causal_attention(q, q, q, qsl, 0.2, out_dtype=torch.float32)
    ref_out, ref_lse = _reference(q, q, q, 0.2, causal=True)
    assert torch.allclose(out.double(), ref_out, atol=2e-6)
    assert torch.allclose(lse.double(), ref_lse, atol=2e-6)
    # The default keeps the caller's dtype.
    assert causal_attention(q, q, q, qsl, 0.2)[0].dtype == dtype
