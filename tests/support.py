"""Test helpers shared by several test modules: float64 references and input generators.

Test modules import from here, never from each other.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from hypothesis import strategies as st

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) on outputs: fp16/bf16 probabilities are rounded to the input dtype before P @ V.
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


def reference(q, kv_cache, block_table, kv_lens, qsl, scale, q_pos=None, block_pos=None):
    """float64 out (T, Hq, D), lse (T, Hq) straight from the contract; empty rows: 0 and -inf."""
    t, hq, d = q.shape
    _, hkv, bs, _ = kv_cache.shape
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    lse = torch.full((t, hq), -math.inf, dtype=torch.float64)
    for b in range(block_table.shape[0]):
        s, e, n = int(qsl[b]), int(qsl[b + 1]), int(kv_lens[b])
        if e == s or n == 0:
            continue
        idx = torch.arange(n)
        kv = kv_cache[block_table[b, idx // bs].long(), :, idx % bs].double()  # (n, Hkv, 2D)
        k, v = (x.repeat_interleave(hq // hkv, dim=1) for x in (kv[..., :d], kv[..., d:]))
        scores = torch.einsum("qhd,khd->qhk", q[s:e].double(), k) * scale
        if q_pos is not None:
            key_pos = block_pos[b, idx // bs].long() + idx % bs
            visible = key_pos[None, :] <= q_pos[s:e].long()[:, None]  # (Tq, n)
            scores = scores.masked_fill(~visible[:, None, :], -math.inf)
        l = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - torch.where(torch.isneginf(l), 0.0, l)[..., None])
        out[s:e], lse[s:e] = torch.einsum("qhk,khd->qhd", p, v), l
    return out, lse


def make_cache(g, num_blocks, hkv, bs, d, dtype, block_major):
    """Garbage-filled cache (large values, so a stray read shows), in either physical layout."""
    if block_major:  # vLLM's FlashAttention layout, seen through the shared logical view
        return (torch.randn(num_blocks, bs, hkv, 2 * d, generator=g) * 3).to(dtype).transpose(1, 2)
    return (torch.randn(num_blocks, hkv, bs, 2 * d, generator=g) * 3).to(dtype)


def make_case(g, q_lens, kv_lens, hq, hkv, d, bs, dtype, block_major, causal, stripe=1):
    """Random block tables (distinct physical blocks, garbage ids past each length). With causal, block
    j of a request holds logical positions starting at stripe * j * bs (stripe 2: every other block,
    as a KV rank sees it) and each query sits at a random position around the shard's end."""
    nblk = [-(-n // bs) for n in kv_lens]
    m = max(nblk + [1]) + 1
    num_blocks = sum(nblk) + 2
    cache = make_cache(g, num_blocks, hkv, bs, d, dtype, block_major)
    ids = torch.randperm(num_blocks, generator=g).int()
    table = torch.randint(0, 10**6, (len(kv_lens), m), generator=g, dtype=torch.int32)  # garbage: never read
    used = 0
    for b, n in enumerate(nblk):
        table[b, :n] = ids[used : used + n]
        used += n
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    if not causal:
        return q, cache, table, lens, qsl, None, None
    block_pos = (torch.arange(m, dtype=torch.int32) * stripe * bs).expand(len(kv_lens), m).contiguous()
    span = [max(1, stripe * n) for n in kv_lens]
    q_pos = torch.cat([torch.randint(-2, span[b] + 2, (ql,), generator=g) for b, ql in enumerate(q_lens)])
    return q, cache, table, lens, qsl, q_pos.int(), block_pos


@st.composite
def steps(draw):
    """A step: N ranks of P blocks, B requests with past and new tokens, blocks on random ranks."""
    world = draw(st.integers(1, 4))
    bs = draw(st.sampled_from([1, 4, 8]))
    n_req = draw(st.integers(1, 4))
    past = [draw(st.integers(0, 12)) for _ in range(n_req)]
    new = [draw(st.integers(1, 9)) for _ in range(n_req)]
    needed = sum(-(-(p + q) // bs) for p, q in zip(past, new)) + 1
    per_rank = max(draw(st.integers(4, 10)), -(-needed // world))
    free = list(draw(st.permutations(range(1, world * per_rank))))  # block 0 is vLLM's null block
    tables = []
    for p, q in zip(past, new):
        nblk = -(-(p + q) // bs)
        tables.append([free.pop() for _ in range(nblk)])
    return world, bs, per_rank, past, new, tables


def step_tensors(bs, past, new, tables):
    m = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (m - len(t)) for t in tables], dtype=torch.int32)
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0).tolist()), dtype=torch.int32)
    seq_lens = torch.tensor([p + q for p, q in zip(past, new)], dtype=torch.int32)
    slots = torch.tensor([tables[i][pos // bs] * bs + pos % bs
                          for i, (p, q) in enumerate(zip(past, new)) for pos in range(p, p + q)])
    return table, qsl, seq_lens, slots


def require_cpu_kernel():
    """The C++ CPU kernel module. Where a C++ compiler is present (CI has one) a kernel that fails
    to build or load fails the test: production would silently fall back to torch, and the kernel
    would go untested. Without a compiler the test is skipped."""
    from vllm_kvp.ops import cpu_kernel

    if cpu_kernel.load() is None:
        reason = f"C++ CPU kernel unavailable: {cpu_kernel.failure()}"
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(reason)
        pytest.skip(reason)
    return cpu_kernel
