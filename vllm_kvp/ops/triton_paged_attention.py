"""Triton paged attention with LSE over a rank's KV shard, read in place through the block table.

One launch covers every request of the step: the grid is (query tiles, kv heads, kv splits). A
program holds all query heads of one kv head for a tile of query tokens (GQA: each K/V tile is read
once for the whole group) and walks its split of the request's keys with an online softmax. With
more than one split, each writes a float32 partial (out, lse) into a workspace and a second kernel
combines them in the fixed order s = 0..S-1 (flash-decoding: long contexts with few queries still
fill the GPU). The split count is chosen on the host from shapes and optional host-int hints only, so
nothing here reads a device value on the host and the call can be captured in a CUDA graph.

Runs under ``TRITON_INTERPRET=1`` on CPU tensors, with the same restriction as
:mod:`vllm_kvp.ops.triton_merge`: kernels call only Triton builtins (``tl.full``, ``tl.reduce``),
never standard-library helpers such as ``tl.zeros``, ``tl.max`` or ``tl.sum``, which are decorated
when Triton is first imported and cannot be called from a kernel interpreted later.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["paged_attention_lse", "KernelConfig"]

_LOG2E = 1.4426950408889634
# Keys a split must cover at least: below this the combine's extra traffic outweighs the parallelism.
_MIN_SPLIT_KEYS = 512
# Programs per SM the split heuristic aims for. Two per SM, all started at once, measured best on an
# H100 (fewer left bandwidth idle; more, smaller splits paid more pipeline ramps and a ragged tail).
_CTAS_PER_SM = 2
_MAX_SPLITS = 128
# Row reductions go through tl.reduce with Triton's own combine functions (the ones tl.max / tl.sum
# use): they are callable from an interpreted kernel, and the interpreter recognises them and
# reduces with numpy instead of calling the combine once per element pair (100x slower).
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of the attention kernel (tuning only; results do not depend on them beyond
    float rounding). block_m: query rows (tokens x padded group heads) per program, a power of two
    >= 16; block_n: keys per inner step, a power of two >= 16."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@triton.jit
def _paged_attn_kernel(
    q_ptr, kv_ptr, bt_ptr, kv_lens_ptr, qsl_ptr, qpos_ptr, bpos_ptr, o_ptr, lse_ptr,
    scale_log2, B, D, split_len,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_btb, stride_btm, stride_bpb, stride_bpm,
    stride_os, stride_ot, stride_oh, stride_od,
    stride_ls, stride_lt, stride_lh,
    PAGE: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    pid_q = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)

    # Request b owns query tiles [qsl[b] // BLOCK_Q + b, qsl[b+1] // BLOCK_Q + b + 1): an upper bound
    # on its tile count that needs no prefix sum, so the grid is T // BLOCK_Q + B. Binary search for
    # the last b whose first tile is <= pid_q.
    lo = pid_q * 0  # a tensor from the start: B == 1 would make a literal bound a constexpr
    hi = lo + B - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= pid_q, mid, lo)
        hi = tl.where(first <= pid_q, hi, mid - 1)
    req = lo
    q_start = tl.load(qsl_ptr + req)
    q_end = tl.load(qsl_ptr + req + 1)
    tok0 = q_start + (pid_q - (q_start // BLOCK_Q + req)) * BLOCK_Q
    if tok0 >= q_end:
        return

    rows = tl.arange(0, BLOCK_M)
    tok = (tok0 + rows // GP).to(tl.int64)
    head = kvh * G + rows % GP
    row_ok = (tok < q_end) & (rows % GP < G)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if CAUSAL:
        qp = tl.load(qpos_ptr + tok, mask=row_ok, other=-1)

    kv_len = tl.load(kv_lens_ptr + req)
    k_lo = split * split_len
    k_hi = tl.minimum(kv_len, k_lo + split_len)
    bt_row = bt_ptr + req.to(tl.int64) * stride_btb
    kv_head = kv_ptr + kvh * stride_kh

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for start in range(k_lo, k_hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        k_ok = t < k_hi
        page = t // PAGE
        # Table entries past the request's length are garbage: never dereferenced (masked load).
        phys = tl.load(bt_row + page * stride_btm, mask=k_ok, other=0).to(tl.int64)
        tok_ptr = kv_head + phys * stride_kb + (t % PAGE) * stride_kt
        k = tl.load(tok_ptr[None, :] + d[:, None] * stride_kd, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k)
        visible = k_ok[None, :]
        if CAUSAL:
            kp = tl.load(bpos_ptr + req.to(tl.int64) * stride_bpb + page * stride_bpm, mask=k_ok, other=0)
            visible = visible & ((kp + t % PAGE)[None, :] <= qp[:, None])
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 1, _MAX))
        # A row that has seen no visible key keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l = l * alpha + tl.reduce(p, 1, _SUM)
        v = tl.load(tok_ptr[:, None] + (D + d[None, :]) * stride_kd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:  # p rounded to the input dtype first, as the tensor-core branch does
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new

    nonempty = l > 0.0
    safe_l = tl.where(nonempty, l, 1.0)
    out = acc / safe_l[:, None]
    lse_log2 = tl.where(nonempty, m, 0.0) + tl.log2(safe_l)
    lse = tl.where(nonempty, lse_log2 * 0.6931471805599453, float("-inf"))  # times ln 2: natural log
    o_rows = o_ptr + split.to(tl.int64) * stride_os + tok * stride_ot + head * stride_oh
    tl.store(o_rows[:, None] + d[None, :] * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + split.to(tl.int64) * stride_ls + tok * stride_lt + head * stride_lh, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    po_ptr, pl_ptr, out_ptr, lse_ptr, S, N, HQ, D, stride_ps,
    stride_ot, stride_oh, stride_od, stride_lt, stride_lh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge S float32 partials po (S, N, D), pl (S, N) of one row n = t * HQ + h per program.

    The splits are loaded as one (BLOCK_S, D) tile rather than one after the other: a decode step has
    few rows and tens of splits, and a loop over s would be a chain of dependent memory round trips.
    """
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + sp
        m_vec = tl.maximum(m_vec, tl.load(pl_ptr + s.to(tl.int64) * N + row, mask=s < S, other=float("-inf")))
    m = tl.reduce(m_vec, 0, _MAX)
    m_shift = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights exp(-inf) = 0
    den_vec = tl.full([BLOCK_S], 0.0, tl.float32)
    acc = tl.full([BLOCK_D], 0.0, tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + sp
        s_ok = s < S
        w = tl.exp(tl.load(pl_ptr + s.to(tl.int64) * N + row, mask=s_ok, other=float("-inf")) - m_shift)
        o = tl.load(po_ptr + (s.to(tl.int64) * stride_ps + row * D)[:, None] + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        den_vec += w
        acc += tl.reduce(w[:, None] * o, 0, _SUM)
    den = tl.reduce(den_vec, 0, _SUM)
    nonempty = den > 0.0
    safe = tl.where(nonempty, den, 1.0)
    t = row // HQ
    h = row % HQ
    tl.store(out_ptr + t * stride_ot + h * stride_oh + d * stride_od, (acc / safe).to(out_ptr.dtype.element_ty),
             mask=d_ok)
    tl.store(lse_ptr + t * stride_lt + h * stride_lh, tl.where(nonempty, m_shift + tl.log(safe), float("-inf")))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small count still exercises the split path on modest contexts


@functools.lru_cache(maxsize=None)
def _smem_bytes(device: torch.device) -> int:
    """Shared memory one program may use (the interpreter has no limit; 99 KiB is the smallest opt-in
    size of the GPUs Triton supports)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 99 << 10)
    return 99 << 10


def default_config(group: int, est_q_per_req: int, head_dim: int, elem_bytes: int,
                   device: torch.device) -> KernelConfig:
    """Decode-like steps (few query rows per kv head) get a 16-row tile and the widest key step whose
    pipelined K/V buffers fit in shared memory (on an H100, bf16 D=128: 128 keys, 8 warps measured
    5-8% faster than 64 keys, 4 warps); prefill-like ones a 64-128 row tile with 32-key steps (512
    queries over 32k keys: 17% faster than 64-key steps)."""
    gp = triton.next_power_of_2(group)
    rows = gp * max(1, est_q_per_req)
    block_m = max(16, gp, min(128, triton.next_power_of_2(rows)))
    block_d = max(16, triton.next_power_of_2(head_dim))
    budget = _smem_bytes(device) - (16 << 10)  # room for Q and the reductions' scratch
    if block_m <= 32:
        for stages in (3, 2):
            for block_n in (128, 64, 32, 16):
                if stages * 2 * block_n * block_d * elem_bytes <= budget:
                    return KernelConfig(block_m, block_n, 8 if block_n == 128 else 4, stages)
        return KernelConfig(block_m, 16, 4, 1)
    if block_d * elem_bytes <= 256:  # bf16/fp16 up to D=128: fastest of six measured on an H100
        return KernelConfig(block_m, 32, 4, 3)
    return KernelConfig(block_m, 32, 8 if block_m >= 128 else 4, 2)


def choose_splits(base_programs: int, max_kv_len: int, device: torch.device) -> int:
    """Splits of the key range so that base_programs * splits is about _CTAS_PER_SM per SM, each split
    keeping at least _MIN_SPLIT_KEYS keys. Rounding down matters: on an H100, 1.7 programs per SM (a
    ragged partial wave) ran at 66% of peak bandwidth where 2 ran at 88%. Host ints only."""
    want = _CTAS_PER_SM * _num_sms(device) // max(1, base_programs)
    return max(1, min(want, -(-max_kv_len // _MIN_SPLIT_KEYS), _MAX_SPLITS))


def paged_attention_lse(q, kv_cache, block_table, kv_lens, query_start_loc, scale, q_pos=None, block_pos=None,
                        out=None, lse=None, *, max_kv_len=None, max_query_len=None, num_splits=None, config=None):
    """Attention of each request's queries over its paged KV, read in place, returning the LSE.

    Args:
        q: (T, Hq, D) float32/float16/bfloat16, same dtype as kv_cache; rows of request b are
            query_start_loc[b]:query_start_loc[b+1].
        kv_cache: (num_blocks, Hkv, block_size, 2*D) logical view with any strides (head-major
            contiguous, or ``cache.transpose(1, 2)`` of a block-major (num_blocks, block_size, Hkv, 2D)
            tensor); K = [..., :D], V = [..., D:].
        block_table: (B, M) int32 physical block ids. Request b's keys are the first kv_lens[b] tokens
            of blocks block_table[b, 0], block_table[b, 1], ...; entries beyond are never read.
        kv_lens: (B,) int32, may be 0.
        query_start_loc: (B+1,) int32, non-decreasing, query_start_loc[B] == T.
        scale: softmax scale (float).
        q_pos, block_pos: both None for non-causal attention (every query sees all kv_lens[b] keys).
            Both given for causal-by-position: q_pos (T,) int32 logical position of each query,
            block_pos (B, M) int32 logical position of the first token of block_table[b, j]. Key t of
            request b (block j = t // block_size, offset o = t % block_size) is visible to query i iff
            t < kv_lens[b] and block_pos[b, j] + o <= q_pos[i]. Blocks need not be contiguous.
        out: optional (T, Hq, D) in q.dtype, any strides, written in place.
        lse: optional (T, Hq) float32, any strides, written in place.
        max_kv_len: optional host int, an upper bound on kv_lens (default M * block_size). A tight
            bound lets short contexts use fewer, denser splits; a bound below a real length is wrong.
        max_query_len: optional host int, hint for the query tile size (default ceil(T / B)).
        num_splits: optional host int forcing the number of key splits (default: chosen from the
            shapes and the GPU's SM count).
        config: optional :class:`KernelConfig` overriding the launch parameters.

    Returns:
        out (T, Hq, D) in q.dtype and lse (T, Hq) float32, natural log of the sum of exp(scale *
        q.k) over visible keys. A query with no visible key gets out = 0 and lse = -inf. Scores,
        softmax and accumulation are float32 (fp16/bf16 probabilities are rounded to the input dtype
        before P @ V, as in flash attention). Launches without reading any device value on the host.
    """
    t, hq, d = q.shape
    nb, hkv, page, d2 = kv_cache.shape
    b, m_cols = block_table.shape
    if d2 != 2 * d or hq % hkv or kv_lens.shape != (b,) or query_start_loc.shape != (b + 1,):
        raise ValueError(f"q {tuple(q.shape)}, kv_cache {tuple(kv_cache.shape)}, block_table "
                         f"{tuple(block_table.shape)}, kv_lens {tuple(kv_lens.shape)}, query_start_loc "
                         f"{tuple(query_start_loc.shape)} do not fit the contract")
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"q is {q.dtype} but kv_cache is {kv_cache.dtype}")
    if (q_pos is None) != (block_pos is None):
        raise ValueError("q_pos and block_pos go together (causal-by-position) or are both None")
    causal = q_pos is not None
    if out is None:
        out = torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((t, hq), dtype=torch.float32, device=q.device)
    if t == 0 or b == 0:
        return out, lse
    group = hq // hkv
    max_kv_len = m_cols * page if max_kv_len is None else min(max_kv_len, m_cols * page)
    cfg = config or default_config(group, max_query_len or -(-t // b), d, q.element_size(), q.device)
    gp = triton.next_power_of_2(group)
    if cfg.block_m < gp or cfg.block_m % gp:
        raise ValueError(f"block_m {cfg.block_m} must be a multiple of the padded group size {gp}")
    block_q = cfg.block_m // gp
    q_tiles = t // block_q + b
    if num_splits is None:
        # Tiles that do real work: each request's estimated query count in whole tiles.
        busy_tiles = b * -(-(max_query_len or -(-t // b)) // block_q)
        num_splits = choose_splits(min(q_tiles, busy_tiles) * hkv, max_kv_len, q.device)
    split_len = max(1, -(-max(1, max_kv_len) // num_splits))
    split_len = -(-split_len // cfg.block_n) * cfg.block_n  # whole inner steps per split
    num_splits = max(1, -(-max_kv_len // split_len))

    # No-ops for int32 inputs; a conversion is an ordinary async kernel, never a host sync.
    table, lens, qsl = (x.to(torch.int32) for x in (block_table, kv_lens, query_start_loc))
    qpos_t = q_pos.to(torch.int32) if causal else lens  # placeholders when not causal: never read
    bpos_t = block_pos.to(torch.int32) if causal else table
    if num_splits == 1:
        o_t, l_t = out, lse
        o_strides, l_strides = (0, *out.stride()), (0, *lse.stride())
    else:
        o_t = torch.empty((num_splits, t, hq, d), dtype=torch.float32, device=q.device)
        l_t = torch.empty((num_splits, t, hq), dtype=torch.float32, device=q.device)
        o_strides, l_strides = o_t.stride(), l_t.stride()
    _paged_attn_kernel[(q_tiles, hkv, num_splits)](
        q, kv_cache, table, lens, qsl, qpos_t, bpos_t, o_t, l_t,
        scale * _LOG2E, b, d, split_len,
        *q.stride(), *kv_cache.stride(), *table.stride(), *bpos_t.stride(), *o_strides, *l_strides,
        PAGE=page, G=group, GP=gp, BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_m // gp, BLOCK_N=cfg.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=causal,
        # fp32 inputs need IEEE products (Triton's default is TF32). On CPU (the interpreter) every
        # dtype takes this branch: the interpreter multiplies bf16 operands as their raw uint16 bits.
        IEEE=q.dtype == torch.float32 or q.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if num_splits > 1:
        block_d = triton.next_power_of_2(d)
        block_s = max(1, min(triton.next_power_of_2(num_splits), 8192 // block_d))  # <= 64 fp32 per thread
        n = t * hq
        _combine_kernel[(n,)](
            o_t, l_t, out, lse, num_splits, n, hq, d, n * d, *out.stride(), *lse.stride(),
            BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
        )
    return out, lse
