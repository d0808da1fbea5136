"""Paged attention with LSE over a rank's KV shard, on any device, reading the cache through the table.

The contract is :func:`vllm_kvp.ops.triton_paged_attention.paged_attention_lse`'s (same arguments,
shapes, masking, and out = 0 / lse = -inf for a query with no visible key). CUDA tensors go to that
Triton kernel. CPU tensors go to the C++ kernel of :mod:`vllm_kvp.ops.cpu_kernel` (built on first
use; it reads each block in place, one pass per request and kv head). Where that kernel cannot be
built or does not cover the inputs (a head dim it has no vector split for, a cache whose last dim
is strided), they go to :func:`torch_paged_attention`, written for one core's caches:

* no loop over requests: requests are sorted by KV length, longest first, so the ones that still
  have keys at block-table column c form a prefix of the batch and each step is one batched op;
* no copy of a whole shard: each step copies a few block-table columns of every active request into
  one reused buffer (``index_select`` of whole (block, head) runs, about ``_CHUNK_BYTES``, so it is
  still in cache when it is multiplied twice) and folds it into an online softmax;
* length and position masks are applied only in the steps that contain a request's last block or
  (causal) a key past some query's position.

This module imports neither Triton nor vLLM at import time.
"""

from __future__ import annotations

import math

import torch

__all__ = ["paged_attention_lse", "torch_paged_attention", "write_kv"]

# Gathered float32 K/V per step. Measured on one EPYC core (1 MiB L2, 32 MiB L3): 2 MiB beat 128-512
# KiB (the fixed cost of a step's ~15 small ops dominates) and 8 MiB (both products then read L3).
_CHUNK_BYTES = 2 << 20


def paged_attention_lse(q, kv_cache, block_table, kv_lens, query_start_loc, scale, q_pos=None, block_pos=None,
                        out=None, lse=None, *, max_kv_len=None, max_query_len=None):
    """Dispatch on the device; see the module docstring for the contract. Returns (out, lse)."""
    if q.is_cuda:
        from vllm_kvp.ops.triton_paged_attention import \
            paged_attention_lse as triton_paged_attention

        return triton_paged_attention(q, kv_cache, block_table, kv_lens, query_start_loc, scale, q_pos, block_pos,
                                      out, lse, max_kv_len=max_kv_len, max_query_len=max_query_len)
    from vllm_kvp.ops.cpu_kernel import paged_attention_lse_cpu

    res = paged_attention_lse_cpu(q, kv_cache, block_table, kv_lens, query_start_loc, scale, q_pos, block_pos,
                                  out, lse)
    if res is not None:
        return res
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
    qr = qr.contiguous()
    lens_t = torch.tensor([lens[i] for i in order])
    n_blocks = [-(-lens[i] // bs) for i in order]  # non-increasing
    table = block_table[idx, : n_blocks[0]].long()  # only the columns some request uses
    table = torch.where(torch.arange(table.shape[1]) < torch.tensor(n_blocks)[:, None], table, 0)  # garbage -> 0
    causal = q_pos is not None
    qp = q_pos[tok].long().repeat_interleave(g, dim=1) if causal else None  # (n, rows)
    bpos = block_pos[idx].long() if causal else None

    # Running max starts at a finite floor, not -inf: a row that has seen no visible key then gets
    # alpha = exp(0) and p = exp(-inf) = 0 with no special case (its l stays 0 -> lse = -inf).
    m = torch.full((n, hkv, rows), -1e30)
    l = torch.zeros(n, hkv, rows)
    acc = torch.zeros(n, hkv, rows, d)
    cols = max(1, chunk_bytes // (n * hkv * bs * d2 * 4))
    gather = _HeadMajorGather(kv_cache, table, n, cols)
    sbuf = torch.empty(n * hkv * rows * cols * bs)
    offs = torch.arange(bs)
    for c0 in range(0, n_blocks[0], cols):
        na = sum(nb > c0 for nb in n_blocks)  # active requests: a prefix, longest first
        c1 = min(c0 + cols, n_blocks[0])
        keys = (c1 - c0) * bs
        kv = gather(na, c0, c1)  # (na * hkv, keys, 2d) float32
        s = torch.bmm(qr[:na].view(na * hkv, rows, d), kv[..., :d].transpose(1, 2),
                      out=sbuf[: na * hkv * rows * keys].view(na * hkv, rows, keys)).view(na, hkv, rows, keys)
        if c1 * bs > lens[order[na - 1]]:  # some active request ends inside this chunk
            valid = (c0 * bs + torch.arange(keys))[None] < lens_t[:na, None]
            s.masked_fill_(~valid[:, None, None, :], -math.inf)
        if causal:
            kpos = (bpos[:na, c0:c1, None] + offs).view(na, keys)
            s.masked_fill_((kpos[:, None, :] > qp[:na, :, None])[:, None], -math.inf)
        m_new = torch.maximum(m[:na], s.amax(-1))
        alpha = torch.exp(m[:na] - m_new)
        s.sub_(m_new[..., None]).exp_()
        l[:na].mul_(alpha).add_(s.sum(-1))
        acc_a = acc[:na]
        acc_a.mul_(alpha[..., None])
        acc_a.view(na * hkv, rows, d).baddbmm_(s.view(na * hkv, rows, keys), kv[..., d:])
        m[:na] = m_new

    nonempty = l > 0
    o = acc / torch.where(nonempty, l, 1.0)[..., None]  # empty rows: acc is exactly 0
    lse_r = torch.where(nonempty, m + torch.log(torch.where(nonempty, l, 1.0)), -math.inf)
    o = o.view(n, hkv, max_q, g, d).permute(0, 2, 1, 3, 4).reshape(n, max_q, hq, d)
    lse_r = lse_r.view(n, hkv, max_q, g).permute(0, 2, 1, 3).reshape(n, max_q, hq)
    keep = slot[None, :] < q_len_t[:, None]
    out[tok[keep]] = o[keep].to(out.dtype)
    lse[tok[keep]] = lse_r[keep]
    return out, lse


class _HeadMajorGather:
    """Copies block-table columns [c0, c1) of the first na (sorted) requests into one reused buffer,
    head-major: (na * Hkv, (c1 - c0) * block_size, 2D) float32, so each head's keys are one matrix.

    vLLM's CPU cache is contiguous head-major, so a (block, head) pair is one contiguous run of
    block_size * 2D values and the copy is a single index_select of whole runs into the buffer
    (memcpy speed; a fresh tensor per step would page-fault on every large allocation). Other
    layouts gather whole blocks and regroup them, which costs one more copy of the chunk."""

    def __init__(self, kv_cache, table, n, cols):
        nb, self.hkv, self.bs, self.d2 = kv_cache.shape
        self.cache, self.table = kv_cache, table
        try:
            self.runs = kv_cache.view(nb * self.hkv, self.bs, self.d2)
        except RuntimeError:  # (block, head) pairs are not evenly strided: gather whole blocks
            self.runs = None
        numel = n * cols * self.hkv * self.bs * self.d2
        self.buf = torch.empty(numel, dtype=kv_cache.dtype)
        self.fbuf = self.buf if kv_cache.dtype == torch.float32 else torch.empty(numel)
        self.heads = torch.arange(self.hkv)[None, :, None]

    def __call__(self, na, c0, c1):
        hkv, bs, d2 = self.hkv, self.bs, self.d2
        cc = c1 - c0
        size = na * hkv * cc * bs * d2
        if self.runs is not None:
            ids = (self.table[:na, None, c0:c1] * hkv + self.heads).reshape(-1)  # (na, hkv, cc)
            kv = torch.index_select(self.runs, 0, ids, out=self.buf[:size].view(-1, bs, d2))
        else:
            blocks = self.cache.index_select(0, self.table[:na, c0:c1].reshape(-1))  # (na * cc, hkv, bs, 2D)
            kv = self.buf[:size].view(na, hkv, cc, bs, d2)
            kv.copy_(blocks.view(na, cc, hkv, bs, d2).transpose(1, 2))
        kv = kv.view(na * hkv, cc * bs, d2)
        if self.fbuf is not self.buf:
            kv = self.fbuf[:size].view(na * hkv, cc * bs, d2).copy_(kv)
        return kv


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new tokens' K/V in place.

    kv_cache: (num_blocks, Hkv, block_size, 2D); key/value: (T, Hkv, D); slot_mapping: (T,) int64 local
    slot ``block * block_size + offset``; tokens with a negative slot (not stored on this rank) are skipped.
    """
    _, hkv, bs, d2 = kv_cache.shape
    if key.shape != value.shape or key.shape[1:] != (hkv, d2 // 2):
        raise ValueError(f"key/value {tuple(key.shape)} do not fit kv_cache {tuple(kv_cache.shape)}")
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kv = torch.cat([key[keep], value[keep]], dim=-1).to(kv_cache.dtype)  # (N, Hkv, 2D)
    # Advanced indices split by a slice put the index dimension first: target shape is (N, Hkv, 2D).
    kv_cache[slots // bs, :, slots % bs] = kv
