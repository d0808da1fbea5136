"""Paged attention with LSE over a rank's KV shard, on any device, reading the cache through the table.

The contract is :func:`vllm_kvp.ops.triton_paged_attention.paged_attention_lse`'s (same arguments,
shapes, masking, and out = 0 / lse = -inf for a query with no visible key). CUDA tensors go to that
Triton kernel. CPU tensors go to :func:`torch_paged_attention`, written for one core's caches:

* no loop over requests: requests are sorted by KV length, longest first, so the ones that still
  have keys at block-table column c form a prefix of the batch and each step is one batched op;
* no copy of a whole shard: each step gathers ``chunk`` columns of the block table of every active
  request (``index_select``, a working set of about ``_CHUNK_BYTES``, so it stays in the core's L2
  while it is multiplied twice) and folds it into an online softmax;
* length and position masks are applied only in the steps that contain a request's last block or
  (causal) a key past some query's position.

This module imports neither Triton nor vLLM at import time.
"""

from __future__ import annotations

import math

import torch

__all__ = ["paged_attention_lse", "torch_paged_attention"]

# Gathered float32 K/V per step: half of a 1 MiB L2, leaving room for scores and the other operand.
_CHUNK_BYTES = 512 << 10
# Query rows per kv head up to which a step multiplies each gathered block separately (broadcasting
# the queries over blocks) instead of first regrouping the chunk head-major, which costs a copy.
_BROADCAST_MAX_ROWS = 16


def paged_attention_lse(q, kv_cache, block_table, kv_lens, query_start_loc, scale, q_pos=None, block_pos=None,
                        out=None, lse=None, *, max_kv_len=None, max_query_len=None):
    """Dispatch on the device; see the module docstring for the contract. Returns (out, lse)."""
    if q.is_cuda:
        from vllm_kvp.ops.triton_paged_attention import paged_attention_lse as triton_paged_attention

        return triton_paged_attention(q, kv_cache, block_table, kv_lens, query_start_loc, scale, q_pos, block_pos,
                                      out, lse, max_kv_len=max_kv_len, max_query_len=max_query_len)
    return torch_paged_attention(q, kv_cache, block_table, kv_lens, query_start_loc, scale, q_pos, block_pos,
                                 out, lse)


def torch_paged_attention(q, kv_cache, block_table, kv_lens, query_start_loc, scale, q_pos=None, block_pos=None,
                          out=None, lse=None, chunk_bytes: int = _CHUNK_BYTES):
    """CPU implementation of the contract (float32 math for every input dtype). Reads kv_lens and
    query_start_loc on the host, which is free on the CPU and why CUDA never comes here."""
    t, hq, d = q.shape
    _, hkv, bs, d2 = kv_cache.shape
    if d2 != 2 * d or hq % hkv or (q_pos is None) != (block_pos is None):
        raise ValueError(f"q {tuple(q.shape)} / kv_cache {tuple(kv_cache.shape)} / q_pos, block_pos do not fit")
    out = torch.empty((t, hq, d), dtype=q.dtype) if out is None else out
    lse = torch.empty((t, hq), dtype=torch.float32) if lse is None else lse
    out.zero_()
    lse.fill_(-math.inf)
    lens, starts = kv_lens.tolist(), query_start_loc.tolist()
    q_lens = [e - s for s, e in zip(starts, starts[1:])]
    order = sorted((i for i, n in enumerate(lens) if n > 0 and q_lens[i] > 0), key=lambda i: -lens[i])
    if not order:
        return out, lse
    g, n = hq // hkv, len(order)
    max_q = max(q_lens[i] for i in order)
    idx = torch.tensor(order)
    # Query slot j of sorted request i is token starts[i] + j; slots past its count repeat its last
    # token (finite, harmless) and are dropped when the result is scattered back.
    q_len_t = torch.tensor([q_lens[i] for i in order])
    slot = torch.arange(max_q)
    tok = torch.tensor([starts[i] for i in order])[:, None] + torch.minimum(slot, q_len_t[:, None] - 1)
    rows = max_q * g  # query rows per kv head: (slot, group head)
    qr = (q[tok].float() * scale).view(n, max_q, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(n, hkv, rows, d)
    lens_t = torch.tensor([lens[i] for i in order])
    n_blocks = [-(-lens[i] // bs) for i in order]  # non-increasing
    table = block_table[idx].long()
    table = torch.where(torch.arange(table.shape[1]) < torch.tensor(n_blocks)[:, None], table, 0)  # garbage -> 0
    causal = q_pos is not None
    qp = q_pos[tok].long().repeat_interleave(g, dim=1) if causal else None  # (n, rows)
    bpos = block_pos[idx].long() if causal else None

    m = torch.full((n, hkv, rows), -math.inf)
    l = torch.zeros(n, hkv, rows)
    acc = torch.zeros(n, hkv, rows, d)
    per_col = n * hkv * bs * d2 * 4
    cols = max(1, chunk_bytes // per_col)
    broadcast = rows <= _BROADCAST_MAX_ROWS
    offs = torch.arange(bs)
    for c0 in range(0, n_blocks[0], cols):
        na = sum(nb > c0 for nb in n_blocks)  # active requests: a prefix, longest first
        c1 = min(c0 + cols, n_blocks[0])
        cc = c1 - c0
        kv = kv_cache.index_select(0, table[:na, c0:c1].reshape(-1)).view(na, cc, hkv, bs, d2)
        kv = kv if kv.dtype == torch.float32 else kv.float()
        # (na, cc, bs) key visibility, None when every gathered key is visible to every query.
        visible = None
        if c1 * bs > lens[order[na - 1]]:  # some active request ends inside this chunk
            visible = (c0 * bs + torch.arange(cc * bs).view(cc, bs))[None] < lens_t[:na, None, None]
        if causal:
            kpos = bpos[:na, c0:c1, None] + offs  # (na, cc, bs)
            vis_pos = kpos[:, :, :, None] <= qp[:na, None, None, :]  # (na, cc, bs, rows)
            visible = vis_pos if visible is None else vis_pos & visible[..., None]
        step = _step_broadcast if broadcast else _step_headmajor
        step(qr[:na], kv, visible, m[:na], l[:na], acc[:na], d)

    nonempty = l > 0
    o = acc / torch.where(nonempty, l, 1.0)[..., None]  # empty rows: acc is exactly 0
    lse_r = torch.where(nonempty, m + torch.log(torch.where(nonempty, l, 1.0)), -math.inf)
    o = o.view(n, hkv, max_q, g, d).permute(0, 2, 1, 3, 4).reshape(n, max_q, hq, d)
    lse_r = lse_r.view(n, hkv, max_q, g).permute(0, 2, 1, 3).reshape(n, max_q, hq)
    keep = slot[None, :] < q_len_t[:, None]
    out[tok[keep]] = o[keep].to(out.dtype)
    lse[tok[keep]] = lse_r[keep]
    return out, lse


def _online_update(s, m, l, acc, pv_fn, max_dims, sum_dims):
    """Fold scores s (any layout) into the running max m, denominator l and numerator acc, in place.
    pv_fn(p) returns p @ V already reduced to acc's shape."""
    m_new = torch.maximum(m, s.amax(dim=max_dims))
    m_safe = m_new.masked_fill(m_new == -math.inf, 0.0)  # rows with no visible key yet: exp(-inf) = 0
    alpha = torch.exp(m - m_safe)
    s.sub_(_expand_like(m_safe, s, max_dims)).exp_()
    l.mul_(alpha).add_(s.sum(dim=sum_dims))
    acc.mul_(alpha[..., None]).add_(pv_fn(s))
    m.copy_(m_new)


def _expand_like(x, s, dims):
    for dim in sorted(dims):
        x = x.unsqueeze(dim)
    return x


def _step_broadcast(qr, kv, visible, m, l, acc, d):
    """Few query rows: multiply every gathered block in place (queries broadcast over blocks).
    qr (na, hkv, rows, d); kv (na, cc, hkv, bs, 2d); scores (na, cc, hkv, rows, bs)."""
    s = torch.matmul(qr[:, None], kv[..., :d].transpose(-1, -2))
    if visible is not None:  # (na, cc, bs) or (na, cc, bs, rows)
        mask = visible[:, :, None, None, :] if visible.dim() == 3 else visible.transpose(2, 3)[:, :, None]
        s.masked_fill_(~mask, -math.inf)
    _online_update(s, m, l, acc, lambda p: torch.matmul(p, kv[..., d:]).sum(1), (1, 4), (1, 4))


def _step_headmajor(qr, kv, visible, m, l, acc, d):
    """Many query rows: regroup the chunk head-major once (a copy within the cache) so each head is
    one large product. kv -> (na, hkv, cc * bs, 2d); scores (na, hkv, rows, cc * bs)."""
    na, cc, hkv, bs, d2 = kv.shape
    kvh = kv.permute(0, 2, 1, 3, 4).reshape(na, hkv, cc * bs, d2)
    s = torch.matmul(qr, kvh[..., :d].transpose(-1, -2))
    if visible is not None:
        mask = (visible.reshape(na, 1, 1, cc * bs) if visible.dim() == 3
                else visible.reshape(na, cc * bs, -1).transpose(1, 2)[:, None])
        s.masked_fill_(~mask, -math.inf)
    _online_update(s, m, l, acc, lambda p: torch.matmul(p, kvh[..., d:]), (3,), (3,))
