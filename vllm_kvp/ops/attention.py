"""Partial attention over a rank's local KV shard, plus causal attention over a step's new tokens.

KV cache layout (one layer): ``kv_cache`` (num_blocks, num_kv_heads, block_size, 2 * head_dim), K in
``[..., :head_dim]`` and V in ``[..., head_dim:]``. Keeping K and V of a token side by side lets one
indexed write store both.

Every function returns ``(out, lse)``: out (T, Hq, D) in the query dtype and lse (T, Hq) float32,
the natural-log sum of exp(scaled scores). A query with nothing to attend to gets out = 0 and
lse = -inf, which is exactly the identity element of :func:`vllm_kvp.ops.merge.merge_partials`.

The torch path is the reference implementation and runs anywhere. On CUDA with fp16/bf16 and a
flash-attention build importable, a varlen flash-attention call is used instead. Nothing here imports
vLLM at module level, so this module can be used in tools that must not pull vLLM in.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["write_kv", "shard_attention", "causal_attention", "position_attention"]

# The CPU flash kernel is exact up to float32 rounding and far lighter on memory than materialising
# the score matrix; tests flip this to cover the matmul path that CUDA-without-flash-attn uses.
_USE_ATEN_CPU = True
# Upper bound on float32 score-matrix elements the matmul path materialises at once (64 MiB).
_MAX_SCORE_ELEMS = 1 << 24


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


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """q (H, Tq, D), k/v (H, Tk, D), Tq, Tk > 0, same dtype; causal is top-left aligned (query i sees
    keys 0..i). Returns out (H, Tq, D) (q dtype on the aten path, float32 on the matmul path) and lse
    (H, Tq) float32."""
    if _USE_ATEN_CPU and q.device.type == "cpu":
        # Returns output (B, H, Tq, D) and logsumexp (B, H, Tq) float32 (natural log; its memory is
        # laid out (B, Tq, H)). It aborts the process on Tq == 0 or Tk == 0, which callers exclude.
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, causal, scale=scale
        )
        return o[0], lse[0].float()

    h, tq, _ = q.shape
    tk = k.shape[1]
    kf, vf = k.float(), v.float()
    chunk = max(1, _MAX_SCORE_ELEMS // max(1, h * tk))
    outs, lses = [], []
    for s in range(0, tq, chunk):
        e = min(tq, s + chunk)
        # Causal query i never sees keys past i, so later keys are not even multiplied.
        kend = min(tk, e) if causal else tk
        scores = torch.matmul(q[:, s:e].float(), kf[:, :kend].transpose(1, 2)) * scale  # (H, c, kend)
        if causal:
            qi = torch.arange(s, e, device=q.device).unsqueeze(1)
            ki = torch.arange(kend, device=q.device).unsqueeze(0)
            scores = scores.masked_fill(ki > qi, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (H, c); every row has >= 1 key here
        outs.append(torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vf[:, :kend]))
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _gather_shard(kv_cache: torch.Tensor, blocks: torch.Tensor, length: int):
    """The first ``length`` tokens of the concatenated ``blocks``: k, v (Hkv, length, D) views."""
    _, hkv, bs, d2 = kv_cache.shape
    nblk = -(-length // bs)
    kv = kv_cache.index_select(0, blocks[:nblk].long())  # (nblk, Hkv, bs, 2D)
    kv = kv.transpose(0, 1).reshape(hkv, nblk * bs, d2)[:, :length]
    return kv[..., : d2 // 2], kv[..., d2 // 2 :]


@functools.lru_cache(maxsize=1)
def _flash_varlen_fn():
    """(flash_attn_varlen_func, kind) or None. vLLM's build takes ``return_softmax_lse``; upstream
    flash_attn takes ``return_attn_probs``. Imported lazily: both are heavy and CUDA-only."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func, "vllm"
    except Exception:  # ImportError, or a broken CUDA extension
        pass
    try:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func, "flash_attn"
    except Exception:
        return None


def _use_flash(query: torch.Tensor) -> bool:
    """Flash attention only takes fp16/bf16 with head_dim a multiple of 8 up to 256."""
    d = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
            and _flash_varlen_fn() is not None)


def _flash(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool):
    """Varlen flash attention: q (Tq, Hq, D), k/v (Tk, Hkv, D), cu_* (B+1,) int32. Returns out
    (Tq, Hq, D) and lse (Tq, Hq) float32, or None when this build's LSE layout is not (Hq, Tq)."""
    fn, kind = _flash_varlen_fn()
    kwargs = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                  max_seqlen_k=max_k, softmax_scale=scale, causal=causal)
    if kind == "vllm":
        out, lse = fn(**kwargs, return_softmax_lse=True)
    else:
        out, lse, _ = fn(**kwargs, return_attn_probs=True)
    if lse.shape != (q.shape[1], q.shape[0]):  # old builds pad LSE to (B, H, max_seqlen_q)
        return None
    return out, lse.transpose(0, 1).float()


def _shard_attention_flash(query, kv_cache, block_table, shard_lens, query_start_loc, scale):
    """CUDA path: gather every request's shard into one packed varlen K/V, then one flash call."""
    _, hkv, bs, d2 = kv_cache.shape
    dev = query.device
    lens = shard_lens.to(device=dev, dtype=torch.long)
    cu_q = query_start_loc.to(device=dev, dtype=torch.int32)
    cu_k = torch.zeros(lens.numel() + 1, device=dev, dtype=torch.long)
    cu_k[1:] = torch.cumsum(lens, 0)
    total_k, max_k = int(cu_k[-1]), int(lens.max()) if lens.numel() else 0
    if total_k == 0:
        return None
    req = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens, output_size=total_k)
    pos = torch.arange(total_k, device=dev) - cu_k[req]
    blk = block_table.to(dev)[req, pos // bs].long()
    kv = kv_cache[blk, :, pos % bs].to(query.dtype)  # (total_k, Hkv, 2D)
    q_lens = cu_q[1:] - cu_q[:-1]
    res = _flash(query.contiguous(), kv[..., : d2 // 2].contiguous(), kv[..., d2 // 2 :].contiguous(), cu_q,
                 cu_k.to(torch.int32), int(q_lens.max()), max_k, scale, causal=False)
    if res is None:
        return None
    out, lse = res
    # Flash attention reports +inf LSE (and 0 output) for a query with no keys; we want -inf.
    empty = torch.repeat_interleave(lens == 0, q_lens.long(), output_size=query.shape[0])
    return out.masked_fill(empty[:, None, None], 0), lse.masked_fill(empty[:, None], float("-inf"))


def shard_attention(query, kv_cache, block_table, shard_lens, query_start_loc, scale: float,
                    out_dtype: torch.dtype | None = None):
    """Non-causal attention of each request's query tokens over its local KV shard.

    query: (T, Hq, D); kv_cache: (num_blocks, Hkv, block_size, 2D); block_table: (B, M) int32 local block
    ids (request i's shard is the first shard_lens[i] tokens of blocks block_table[i, :ceil(len/bs)]);
    shard_lens: (B,) int, may be 0; query_start_loc: (B+1,) int cumulative query offsets; Hq % Hkv == 0
    (query head h reads kv head h // (Hq // Hkv)). Returns out (T, Hq, D) in out_dtype (default
    query.dtype) and lse (T, Hq) float32; out = 0, lse = -inf for a request whose shard is empty.
    The torch path computes in float32 whatever the input dtype, so a caller that merges partials
    in float32 (out_dtype=torch.float32) rounds to a reduced dtype only once, after the merge.
    """
    t, hq, d = query.shape
    _, hkv, _, d2 = kv_cache.shape
    if d2 != 2 * d or hq % hkv:
        raise ValueError(f"query {tuple(query.shape)} does not fit kv_cache {tuple(kv_cache.shape)}")
    out_dtype = out_dtype or query.dtype
    if _use_flash(query):
        res = _shard_attention_flash(query, kv_cache, block_table, shard_lens, query_start_loc, scale)
        if res is not None:
            return res[0].to(out_dtype), res[1]
    g = hq // hkv
    out = torch.zeros((t, hq, d), dtype=torch.float32, device=query.device)
    lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=query.device)
    qsl, lens = query_start_loc.tolist(), shard_lens.tolist()
    for i, length in enumerate(lens):
        s, e = qsl[i], qsl[i + 1]
        tq = e - s
        if tq <= 0 or length <= 0:
            continue
        k, v = _gather_shard(kv_cache, block_table[i], length)
        k, v = k.float(), v.float()
        # Non-causal GQA: the g query heads sharing a kv head are just more query rows for it, so
        # fold them into the row dimension instead of repeating K/V g times.
        q = query[s:e].float().reshape(tq, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * tq, d)
        o, l = _attend(q, k, v, scale, causal=False)
        out[s:e] = o.reshape(hkv, g, tq, d).permute(2, 0, 1, 3).reshape(tq, hq, d)
        lse[s:e] = l.reshape(hkv, g, tq).permute(2, 0, 1).reshape(tq, hq)
    return out.to(out_dtype), lse


def causal_attention(query, key, value, query_start_loc, scale: float,
                     out_dtype: torch.dtype | None = None):
    """Causal attention of each request's new tokens over that request's own new tokens.

    query: (T, Hq, D); key/value: (T, Hkv, D) in the same token order; query_start_loc: (B+1,) int.
    Query token j of a request attends keys 0..j of the same request. Returns out (T, Hq, D) in
    out_dtype (default query.dtype) and lse (T, Hq) float32; the torch path computes in float32.
    """
    t, hq, d = query.shape
    hkv = key.shape[1]
    if key.shape != value.shape or key.shape[0] != t or hq % hkv:
        raise ValueError(f"query {tuple(query.shape)} / key {tuple(key.shape)} mismatch")
    g = hq // hkv
    if _use_flash(query):
        cu = query_start_loc.to(device=query.device, dtype=torch.int32)
        max_q = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        k, v = key.to(query.dtype).contiguous(), value.to(query.dtype).contiguous()
        res = _flash(query.contiguous(), k, v, cu, cu, max_q, max_q, scale, causal=True) if max_q > 0 else None
        if res is not None:
            return res[0].to(out_dtype or query.dtype), res[1]
    out_dtype = out_dtype or query.dtype
    out = torch.zeros((t, hq, d), dtype=torch.float32, device=query.device)
    lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=query.device)
    qsl = query_start_loc.tolist()
    for i in range(len(qsl) - 1):
        s, e = qsl[i], qsl[i + 1]
        if e <= s:
            continue
        q = query[s:e].float().transpose(0, 1)  # (Hq, Tq, D)
        # Causal rows differ per query, so GQA folding does not apply; the new-token K/V is small,
        # so repeating it per query head is cheap.
        k = key[s:e].float().transpose(0, 1).repeat_interleave(g, dim=0)
        v = value[s:e].float().transpose(0, 1).repeat_interleave(g, dim=0)
        o, l = _attend(q, k, v, scale, causal=True)
        out[s:e] = o.transpose(0, 1)
        lse[s:e] = l.transpose(0, 1)
    return out.to(out_dtype), lse



def position_attention(query, q_req, q_pos, key, value, k_req, k_pos, scale: float,
                       out_dtype: torch.dtype | None = None):
    """Attention of queries over a set of keys of the same step, causal by position.

    query (Tq, Hq, D) with q_req, q_pos (Tq,) int (request and position of each query);
    key/value (Tk, Hkv, D) with k_req, k_pos (Tk,) int (k_req < 0: not a key). Query i sees key j
    iff k_req[j] == q_req[i] and k_pos[j] <= q_pos[i]: the keys may be any subset of the step's
    tokens, in any order (a KV rank's own new tokens under any placement). Returns out (Tq, Hq, D)
    in out_dtype (default query.dtype) and lse (Tq, Hq) float32; out = 0, lse = -inf for a query
    that sees no key. Computed in float32, in query chunks that bound the score matrix.
    """
    tq, hq, d = query.shape
    tk, hkv = key.shape[0], key.shape[1]
    if key.shape != value.shape or key.shape[2] != d or hq % hkv:
        raise ValueError(f"query {tuple(query.shape)} / key {tuple(key.shape)} mismatch")
    out_dtype = out_dtype or query.dtype
    g = hq // hkv
    out = torch.zeros((tq, hq, d), dtype=torch.float32, device=query.device)
    lse = torch.full((tq, hq), float("-inf"), dtype=torch.float32, device=query.device)
    if tq == 0 or tk == 0:
        return out.to(out_dtype), lse
    kf = key.float().transpose(0, 1)  # (Hkv, Tk, D)
    vf = value.float().transpose(0, 1)
    chunk = max(1, _MAX_SCORE_ELEMS // max(1, hq * tk))
    for s in range(0, tq, chunk):
        e = min(tq, s + chunk)
        c = e - s
        visible = (q_req[s:e, None] == k_req[None, :]) & (k_pos[None, :] <= q_pos[s:e, None])
        # GQA: the g query heads of a kv head become rows of one (Hkv, g*c, Tk) product.
        q = query[s:e].float().reshape(c, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * c, d)
        scores = torch.bmm(q, kf.transpose(1, 2)) * scale  # (Hkv, g*c, Tk)
        scores = scores.view(hkv, g, c, tk).masked_fill(~visible, float("-inf"))
        m = scores.amax(dim=-1, keepdim=True)
        m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        p = torch.exp(scores - m_safe)  # exactly 0 where masked
        denom = p.sum(dim=-1)  # (Hkv, g, c)
        o = torch.bmm(p.view(hkv, g * c, tk), vf).view(hkv, g, c, d)
        nonempty = denom > 0
        o = o / torch.where(nonempty, denom, torch.ones_like(denom)).unsqueeze(-1)
        l = torch.where(nonempty, m_safe.squeeze(-1) + torch.log(denom),
                        torch.full_like(denom, float("-inf")))
        out[s:e] = o.permute(2, 0, 1, 3).reshape(c, hq, d)
        lse[s:e] = l.permute(2, 0, 1).reshape(c, hq)
    return out.to(out_dtype), lse
