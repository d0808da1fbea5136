"""ops.partials: the exchange format of partial attention results (outputs in their dtype, float32
LSEs, one byte row per query), round-tripped through a simulated all-gather."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvp.ops import partials


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h, d", [(8, 128), (4, 32), (3, 5), (1, 1)])
def test_round_trip_is_bit_exact(dtype, h, d):
    g = torch.Generator().manual_seed(h * 100 + d)
    ranks, t = 3, 5
    outs = [torch.randn(t, h, d, generator=g).to(dtype) for _ in range(ranks)]
    lses = [torch.randn(t, h, generator=g) * 50 for _ in range(ranks)]
    lses[1][2] = -math.inf  # an empty shard's LSE survives the trip
    gathered = torch.stack([partials.pack(o, l) for o, l in zip(outs, lses)])  # an all-gather
    assert gathered.dtype == torch.uint8
    wd = partials.wire_dtype(dtype, h, d)
    assert gathered.shape == (ranks, t, h * d * wd.itemsize + 4 * h)
    rows = torch.tensor([4, 0, 2, 2])
    got_o, got_l = partials.unpack(gathered, rows, h, d, dtype)
    assert got_o.shape == (ranks, 4, h, d) and got_o.dtype == wd
    assert got_l.shape == (ranks, 4, h) and got_l.dtype == torch.float32
    for r in range(ranks):
        # bit-exact: the outputs are sent in their own dtype (or widened exactly to float32)
        assert torch.equal(got_o[r].to(dtype), outs[r][rows])
        assert torch.equal(got_l[r], lses[r][rows])


def test_two_byte_outputs_halve_the_bytes_of_float32():
    out, lse = torch.zeros(7, 32, 128, dtype=torch.bfloat16), torch.zeros(7, 32)
    half = partials.pack(out, lse)
    full = partials.pack(out.float(), lse)
    assert half.numel() == 7 * (32 * 128 * 2 + 32 * 4)
    assert full.numel() == 7 * (32 * 128 * 4 + 32 * 4)


def test_pack_needs_no_host_values():
    """On the meta device (no data) packing and unpacking still produce the right shapes: nothing
    in them reads a tensor's values, so they can sit inside a CUDA graph."""
    out = torch.empty(6, 8, 64, dtype=torch.bfloat16, device="meta")
    lse = torch.empty(6, 8, device="meta")
    buf = partials.pack(out, lse)
    assert buf.device.type == "meta" and buf.shape == (6, 8 * 64 * 2 + 32)
    o, l = partials.unpack(buf.unsqueeze(0).expand(2, -1, -1), torch.arange(3, device="meta"),
                           8, 64, torch.bfloat16)
    assert o.shape == (2, 3, 8, 64) and l.shape == (2, 3, 8)
