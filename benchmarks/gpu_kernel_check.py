#!/usr/bin/env python
"""GPU check of the KVP attention kernels against float64 torch references, plus merge timings.

    python benchmarks/gpu_kernel_check.py                # on a CUDA machine (torch + Triton, no vLLM)
    TRITON_INTERPRET=1 python benchmarks/gpu_kernel_check.py --device cpu --quick   # smoke test

Checks: triton_merge_partials (vs float64 merge, vs the torch merge, bit-determinism); a simulated
KV-rank step (N ranks in one process, each with its own paged KV shard in vLLM's FlashAttention
cache layout: the Triton paged kernel's partials, packed as they travel (ops.partials), "gathered"
by stacking, merged by the Triton merge on every rank; bf16 against a float64 attention over the
whole context, and bit-identical across ranks); split linear layers (each rank's column slice of a
bf16 GEMM, reassembled, against the unsplit GEMM); and
the Triton paged attention kernel (paged_attention_lse): small cases in every dtype / layout / mask,
then decode at 32k, 128k and 1M KV tokens per rank (bf16, Hq=32, Hkv=8, D=128, blocks of 16 and 128,
batch 1 and 8 requests sharing the rank's tokens) and a 512-query causal prefill over 32k keys, each
against a float64 reference computed blockwise on the device. Timings run the call inside a CUDA graph
(which also proves the launch never syncs with the host) after an L2 flush, launch latency excluded;
the achieved bandwidth is K/V bytes read / time, against the card's peak (H100 SXM 3.35e12 B/s, H200
4.8e12 B/s). The merge of 8 partials for the same batch is reported as a share of attention time.
Prints tables, writes gpu_kernel_check.{json,md} under --out; exits 1 on any mismatch. Without CUDA
(and without --device cpu) it prints SKIP and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from vllm_kvp.step.columns import assemble_columns, column_bounds, pad_columns  # noqa: E402
from vllm_kvp.ops import partials  # noqa: E402  (none of these import vLLM)
from vllm_kvp.ops.merge import merge_partials  # noqa: E402
from vllm_kvp.ops.triton_merge import triton_merge_partials  # noqa: E402
from vllm_kvp.ops.triton_paged_attention import KernelConfig, paged_attention_lse  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # atol = rtol on outputs
rows: list[tuple[str, str, str, str]] = []
failures = 0


def record(name: str, case: str, ok: bool, detail: str) -> None:
    global failures
    failures += not ok
    rows.append((name, case, "ok" if ok else "MISMATCH", detail))


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| over finite entries; inf if the non-finite patterns differ."""
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)) or not torch.equal(a[~torch.isfinite(a)], b[~torch.isfinite(b)]):
        return math.inf
    fin = torch.isfinite(a)
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


def ref_merge(outs, lses):
    outs, lses = outs.double(), lses.double()
    lse = torch.logsumexp(lses, 0)
    w = torch.exp(lses - torch.where(torch.isneginf(lse), 0.0, lse))
    return (w.unsqueeze(-1) * outs).sum(0), lse


def ref_attention(q, k, v, scale, causal):
    """float64; q (Tq, Hq, D), k/v (Tk, Hkv, D) -> out (Tq, Hq, D), lse (Tq, Hq)."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[0] == 0:
        return torch.zeros_like(q), torch.full(q.shape[:2], -math.inf, dtype=torch.float64, device=q.device)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[1:], dtype=torch.bool, device=s.device).tril().logical_not(), -math.inf)
    lse = torch.logsumexp(s, -1)
    return torch.einsum("hqk,khd->qhd", torch.exp(s - lse.unsqueeze(-1)), v), lse.T


def check_merge(dev, quick):
    shapes = [(1, 3, 2, 8), (4, 37, 5, 72)] + ([] if quick else [(8, 1024, 32, 128), (3, 5, 4, 256)])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for r, t, h, d in shapes:
            outs = torch.randn(r, t, h, d, device=dev).to(dtype)
            lses = torch.randn(r, t, h, device=dev) * 20
            lses[torch.rand(r, t, h, device=dev) < 0.2] = -math.inf
            lses[:, 0] = -math.inf  # a fully empty row
            out, lse = triton_merge_partials(outs, lses)
            ref_out, ref_lse = ref_merge(outs, lses)
            e_out, e_lse = err(out, ref_out), err(lse, ref_lse)
            again = triton_merge_partials(outs.clone(), lses.clone())
            det = torch.equal(out, again[0]) and torch.equal(lse, again[1])
            t_out, t_lse = merge_partials(outs, lses)
            e_torch = err(out, t_out)
            ok = e_out <= TOL[dtype] * 2 and e_lse <= 1e-3 and det and e_torch <= TOL[dtype] * 2
            record("triton_merge", f"{str(dtype)[6:]} R{r} T{t} H{h} D{d}", ok,
                   f"out {e_out:.1e} lse {e_lse:.1e} vs-torch {e_torch:.1e} det={det}")


# ---------------------------------------------------------------------------------------------------
# A KV-rank step simulated in one process, and split linear layers

# bf16 rank step: partials are bf16 (the kernel's output dtype), LSEs float32, merge weights
# computed in float32; the error is dominated by bf16 rounding of the partial and merged outputs
# (a few ulps at |out| < 1), so the same tolerance as one kernel call.
RANK_STEP_TOL = {"out": TOL[torch.bfloat16], "lse": 1e-2}
# Split linear: max |slices - unsplit| / max |unsplit|. A column slice keeps each dot product whole,
# but cuBLAS may pick another algorithm (tile, split-K) for the narrower shape, so the sums can
# round differently: not bit-identical to the unsplit GEMM, within about one bf16 ulp.
SPLIT_LINEAR_TOL = 2 ** -7


def rank_shards(lens, num_ranks, bs, stripe_blocks):
    """Which KV rank holds each block of each request: runs of `stripe_blocks` blocks, request b's
    first run on rank b % N (so shards are uneven and some requests miss some ranks)."""
    return [[(b + j // stripe_blocks) % num_ranks for j in range(-(-n // bs))]
            for b, n in enumerate(lens)]


def simulated_rank_step(dev, num_ranks, lens, q_lens, hq, hkv, d, bs, stripe_blocks, seed=0):
    """One step of `sum(q_lens)` queries (each request's last q_len positions, as in a chunked
    prefill or a decode) over requests whose KV is spread over `num_ranks` ranks; returns the
    merged output and LSE of every rank and the float64 reference."""
    torch.manual_seed(seed)
    dtype = torch.bfloat16
    keys = [torch.randn(n, hkv, 2 * d, device=dev, dtype=dtype) for n in lens]  # K | V per token
    owner = rank_shards(lens, num_ranks, bs, stripe_blocks)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = torch.randn(sum(q_lens), hq, d, device=dev, dtype=dtype)
    q_pos = torch.cat([torch.arange(n - ql, n, device=dev) for n, ql in zip(lens, q_lens)]).int()
    scale = d ** -0.5
    packed = []
    for r in range(num_ranks):
        mine = [[j for j, o in enumerate(own) if o == r] for own in owner]
        num_blocks = max(1, sum(len(m) for m in mine)) + 1  # + a never-read block
        # vLLM's FlashAttention layout: physical (num_blocks, block_size, Hkv, 2D) per layer, seen
        # through the logical (num_blocks, Hkv, block_size, 2D) view every backend indexes.
        phys = torch.randn(num_blocks, bs, hkv, 2 * d, device=dev, dtype=dtype)  # stale contents
        kv = phys.transpose(1, 2)
        m = max(1, max(len(x) for x in mine))
        table = torch.full((len(lens), m), num_blocks - 1, dtype=torch.int32, device=dev)
        block_pos = torch.zeros(len(lens), m, dtype=torch.int32, device=dev)
        shard_lens, next_block = [], 0
        for b, blocks in enumerate(mine):
            held = 0
            for i, j in enumerate(blocks):
                n_tok = min(bs, lens[b] - j * bs)
                # The cache write (reshape_and_cache_flash) by slot: block next_block, offsets 0..
                phys[next_block, :n_tok] = keys[b][j * bs:j * bs + n_tok]
                table[b, i], block_pos[b, i] = next_block, j * bs
                next_block += 1
                held += n_tok
            shard_lens.append(held)
        lens_t = torch.tensor(shard_lens, dtype=torch.int32, device=dev)
        out, lse = paged_attention_lse(q, kv, table, lens_t, qsl, scale, q_pos, block_pos,
                                       max_kv_len=max(shard_lens + [1]),
                                       max_query_len=max(q_lens))
        packed.append(partials.pack(out, lse))  # what this rank sends
    gathered = torch.stack(packed)  # the all-gather, in rank order
    rows = torch.arange(q.shape[0], device=dev)
    merged = []
    for _ in range(num_ranks):  # every rank merges the same gathered bytes
        outs, lses = partials.unpack(gathered, rows, hq, d, dtype)
        merged.append(triton_merge_partials(outs, lses))
    # float64 reference: each query attends over its request's keys up to its own position
    ref_out = torch.empty(q.shape, dtype=torch.float64, device=dev)
    ref_lse = torch.empty(q.shape[:2], dtype=torch.float64, device=dev)
    for b, n in enumerate(lens):
        s, e = int(qsl[b]), int(qsl[b + 1])
        for i in range(s, e):
            p = int(q_pos[i]) + 1
            o, l = ref_attention(q[i:i + 1], keys[b][:p, :, :d], keys[b][:p, :, d:], scale, False)
            ref_out[i], ref_lse[i] = o[0], l[0]
    return merged, ref_out, ref_lse


def check_rank_step(dev, quick):
    cases = [(2, [200, 37, 64], [1, 1, 1], 8, 2, 64, 16, 2),
             (3, [300, 90], [24, 5], 8, 2, 128, 16, 1)]
    if not quick:
        cases += [(4, [4096, 1000, 17, 2048], [1, 1, 1, 1], 32, 8, 128, 16, 4),
                  (8, [8192, 513], [256, 64], 32, 8, 128, 16, 16),
                  (2, [3000], [512], 32, 8, 128, 128, 1)]
    for n, lens, q_lens, hq, hkv, d, bs, stripe in cases:
        name = f"N{n} lens{lens} q{q_lens} Hq{hq}/Hkv{hkv} D{d} bs{bs}"
        res = guarded("rank_step", name, simulated_rank_step, dev, n, lens, q_lens, hq, hkv, d, bs,
                      stripe)
        if res is None:
            continue
        merged, ref_out, ref_lse = res
        same = all(torch.equal(merged[0][0], o) and torch.equal(merged[0][1], l)
                   for o, l in merged[1:])
        e_out, e_lse = err(merged[0][0], ref_out), err(merged[0][1], ref_lse)
        ok = e_out <= RANK_STEP_TOL["out"] and e_lse <= RANK_STEP_TOL["lse"] and same
        record("rank_step", name, ok, f"out {e_out:.1e} lse {e_lse:.1e} ranks-identical={same}")


def check_split_linear(dev, quick):
    shapes = [(7, 64, 96)] if quick else [(1, 4096, 14336 * 2), (8, 4096, 6144), (128, 4096, 4096),
                                          (2048, 4096, 14336 * 2), (3, 1000, 777)]
    for rows, k, o in shapes:
        torch.manual_seed(0)
        x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(o, k, device=dev, dtype=torch.bfloat16) * k ** -0.5
        bias = torch.randn(o, device=dev, dtype=torch.bfloat16)
        whole = torch.nn.functional.linear(x, w, bias)
        for n in (2, 3, 8):
            bounds = column_bounds(o, n)
            widest = max(b - a for a, b in zip(bounds, bounds[1:]))
            slices = [pad_columns(torch.nn.functional.linear(x, w[a:b], bias[a:b]), widest)
                      for a, b in zip(bounds, bounds[1:])]
            again = [torch.nn.functional.linear(x, w[a:b], bias[a:b])
                     for a, b in zip(bounds, bounds[1:])]
            deterministic = all(torch.equal(s[:, :a.shape[1]], a) for s, a in zip(slices, again))
            split = assemble_columns(torch.stack(slices), bounds)  # what every rank assembles
            rel = (split.double() - whole.double()).abs().max().item() / whole.double().abs().max().item()
            exact = (split == whole).double().mean().item()
            ok = rel <= SPLIT_LINEAR_TOL and deterministic and split.shape == whole.shape
            record("split_linear", f"rows{rows} K{k} O{o} N{n}", ok,
                   f"rel {rel:.1e} bit-equal {exact:.1%} deterministic={deterministic}")

def time_merge(dev, quick):
    if dev.type != "cuda":
        return []
    from triton.testing import do_bench

    res = []
    for r, t in ([(4, 64)] if quick else [(2, 1), (4, 64), (8, 256), (4, 4096), (8, 8192)]):
        outs = torch.randn(r, t, 32, 128, device=dev, dtype=torch.bfloat16)
        lses = torch.randn(r, t, 32, device=dev)
        ms_torch = do_bench(lambda: merge_partials(outs, lses))
        ms_triton = do_bench(lambda: triton_merge_partials(outs, lses))
        res.append((f"R{r} T{t} H32 D128 bf16", ms_torch * 1e3, ms_triton * 1e3))
    return res


# ---------------------------------------------------------------------------------------------------
# Triton paged attention (paged_attention_lse)

PEAK_BW = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12))


def peak_bandwidth(name: str) -> float | None:
    """HBM peak in B/s from the device name (None when unknown)."""
    return next((bw for key, bw in PEAK_BW if key in name), None)


def paged_reference(q, kv, table, lens, qsl, scale, q_pos=None, block_pos=None):
    """float64 attention by the kernel's contract, accumulated over key chunks so 1M-token shards
    fit in memory: out (T, Hq, D), lse (T, Hq); 0 / -inf where a query sees no key."""
    t, hq, d = q.shape
    hkv, bs = kv.shape[1], kv.shape[2]
    g = hq // hkv
    out = torch.zeros(t, hq, d, dtype=torch.float64, device=q.device)
    lse = torch.full((t, hq), -math.inf, dtype=torch.float64, device=q.device)
    qsl_h, lens_h = qsl.tolist(), lens.tolist()
    for b, n in enumerate(lens_h):
        s, e = qsl_h[b], qsl_h[b + 1]
        if e == s:
            continue
        qb = q[s:e].double().view(e - s, hkv, g, d)
        chunk = max(512, min(32768, (1 << 24) // ((e - s) * hq)))
        for c0 in range(0, n, chunk):
            idx = torch.arange(c0, min(n, c0 + chunk), device=q.device)
            kvc = kv[table[b, idx // bs].long(), :, idx % bs].double()  # (C, Hkv, 2D)
            sc = torch.einsum("qkgd,ckd->qkgc", qb, kvc[..., :d]) * scale
            if q_pos is not None:
                kpos = block_pos[b, idx // bs].long() + idx % bs
                sc = sc.masked_fill((kpos[None, :] > q_pos[s:e].long()[:, None])[:, None, None], -math.inf)
            lc = torch.logsumexp(sc, -1)
            oc = torch.einsum("qkgc,ckd->qkgd", torch.exp(sc - torch.where(torch.isneginf(lc), 0.0, lc)[..., None]),
                              kvc[..., d:]).reshape(e - s, hq, d)
            lc = lc.reshape(e - s, hq)
            new = torch.logaddexp(lse[s:e], lc)
            safe = torch.where(torch.isneginf(new), 0.0, new)
            out[s:e] = out[s:e] * torch.exp(lse[s:e] - safe)[..., None] + oc * torch.exp(lc - safe)[..., None]
            lse[s:e] = new
    return out, lse


def paged_case(dev, dtype, lens, q_lens, hq, hkv, d, bs, block_major=True, causal=False, stripe=1, seed=0):
    """Random paged cache holding exactly the requests' blocks (randomly permuted), a block table
    with garbage past each length, queries; causal: block j of a request starts at position
    stripe * j * bs and the queries sit at the shard's last q_len positions (a chunked prefill)."""
    torch.manual_seed(seed)
    nblk = [-(-n // bs) for n in lens]
    num_blocks = max(1, sum(nblk))
    shape = (num_blocks, bs, hkv, 2 * d) if block_major else (num_blocks, hkv, bs, 2 * d)
    kv = torch.randn(shape, device=dev, dtype=dtype)
    kv = kv.transpose(1, 2) if block_major else kv  # the logical (num_blocks, Hkv, bs, 2D) view
    m = max(nblk + [1]) + 1
    table = torch.randint(0, 1 << 30, (len(lens), m), device=dev, dtype=torch.int32)  # never read
    perm = torch.randperm(num_blocks, device=dev).int()
    used = 0
    for b, n in enumerate(nblk):
        table[b, :n] = perm[used : used + n]
        used += n
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = torch.randn(sum(q_lens), hq, d, device=dev, dtype=dtype)
    q_pos = block_pos = None
    if causal:
        block_pos = (torch.arange(m, device=dev, dtype=torch.int32) * stripe * bs).expand(len(lens), m).contiguous()
        q_pos = torch.cat([torch.arange(stripe * n - ql, stripe * n, device=dev) for n, ql in zip(lens, q_lens)]).int()
    return q, kv, table, torch.tensor(lens, dtype=torch.int32, device=dev), qsl, q_pos, block_pos


def guarded(name, case, fn, *args, **kwargs):
    """fn(*args) or None; an exception is recorded as a mismatch (with its traceback printed) so one
    failing case does not cost the rest of a device run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        record(name, case, False, repr(e)[:100])
        return None


def check_paged_small(dev, quick):
    """Compiled-Triton semantics on small cases: every dtype, both layouts, GQA/MQA, empty shards,
    head sizes whose default launch configuration differs (shared-memory budget)."""
    cases = [(torch.float32, 8, 2, 16, 64, True, False), (torch.float16, 8, 1, 128, 64, False, True),
             (torch.bfloat16, 32, 8, 16, 64, True, True), (torch.bfloat16, 4, 4, 128, 64, False, False),
             (torch.float32, 4, 1, 16, 256, False, True), (torch.bfloat16, 8, 2, 16, 256, True, False)]
    for dtype, hq, hkv, bs, d, block_major, causal in cases[:2] if quick else cases:
        for num_splits in (None, 1):
            layout = "blk-major" if block_major else "head-major"
            name = (f"{str(dtype)[6:]} Hq{hq}/Hkv{hkv} D{d} bs{bs} {layout}{' causal' if causal else ''} "
                    f"splits={num_splits}")
            guarded("paged_attention", name, _small_case, dev, dtype, hq, hkv, d, bs, block_major, causal,
                    num_splits, name, quick)


def _small_case(dev, dtype, hq, hkv, d, bs, block_major, causal, num_splits, name, quick):
    lens, q_lens = [300, 0, 1, 700 if not quick else 40], [1, 2, 3, 5]
    c = paged_case(dev, dtype, lens, q_lens, hq, hkv, d, bs, block_major, causal, stripe=2)
    out, lse = paged_attention_lse(*c[:5], d**-0.5, *c[5:], num_splits=num_splits)
    ro, rl = paged_reference(*c[:5], d**-0.5, *c[5:])
    e_out, e_lse = err(out, ro), err(lse, rl)
    ok = e_out <= TOL[dtype] and e_lse <= 1e-2 and bool(torch.isneginf(lse[1:3]).all())
    record("paged_attention", name, ok, f"out {e_out:.1e} lse {e_lse:.1e}")


def time_graph(fn, dev, reps, flush_bytes):
    """Mean ms of fn() as a CUDA graph would run it (which also proves the launch never syncs with
    the host): one graph holds `reps` copies of [flush L2 by reading a buffer, fn()], another the
    flushes alone; the difference per copy is fn's GPU time without launch latency, with K/V coming
    from HBM. Each graph is replayed 5 times; the medians are used."""
    fn()
    fn()
    flush = torch.empty(max(flush_bytes, 4), dtype=torch.uint8, device=dev)
    torch.cuda.synchronize(dev)

    def graph_ms(body):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                body()
        graph.replay()
        times = []
        for _ in range(5):
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            st.record()
            graph.replay()
            en.record()
            torch.cuda.synchronize(dev)
            times.append(st.elapsed_time(en))
        return sorted(times)[2]

    if not flush_bytes:
        return graph_ms(fn) / reps

    def flush_l2():
        flush.view(torch.int64).sum()  # reading leaves no dirty lines to write back during fn

    return (graph_ms(lambda: (flush_l2(), fn())) - graph_ms(flush_l2)) / reps


def bench_paged(dev, quick, peak):
    """Decode cases at 32k/128k/1M tokens per rank, merge share, and a causal prefill."""
    hq, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    results = []
    sizes = [2048] if dev.type != "cuda" else ([32768] if quick else [32768, 131072, 1048576])
    for n_tok in sizes:
        for bs in (16, 128):
            for batch in (1, 8):
                name = f"decode {n_tok // 1024}k B{batch} bs{bs}"
                c = paged_case(dev, dtype, [n_tok // batch] * batch, [1] * batch, hq, hkv, d, bs)
                results.append(guarded("paged_attention", name, _run_case, dev, c, name, n_tok // batch, peak))
                del c
                r = results[-1] or {}
                print(f"  {name}: {r.get('ms', math.nan) * 1e3:.1f} us, {r.get('bw_frac') or 0:.0%} of peak",
                      flush=True)
    n_tok = sizes[-1] // 8 if len(sizes) > 1 else sizes[0]
    c = paged_case(dev, dtype, [n_tok], [1], hq, hkv, d, 16, block_major=False)  # the CPU (head-major) layout
    name = f"decode {n_tok // 1024}k B1 bs16 head-major"
    results.append(guarded("paged_attention", name, _run_case, dev, c, name, n_tok, peak))
    del c
    n_tok, n_q = (32768, 512) if dev.type == "cuda" else (1024, 32)
    c = paged_case(dev, dtype, [n_tok], [n_q], hq, hkv, d, 16, causal=True)
    name = f"prefill {n_q}q causal {n_tok // 1024}k bs16"
    results.append(guarded("paged_attention", name, _run_case, dev, c, name, n_tok, peak, max_query_len=n_q))
    return [r for r in results if r is not None]


def _run_case(dev, c, name, max_kv_len, peak, max_query_len=1):
    q, kv, table, lens, qsl, q_pos, block_pos = c
    scale = q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=dev)

    def call():
        paged_attention_lse(q, kv, table, lens, qsl, scale, q_pos, block_pos, out, lse,
                            max_kv_len=max_kv_len, max_query_len=max_query_len)

    call()
    ro, rl = paged_reference(q, kv, table, lens, qsl, scale, q_pos, block_pos)
    e_out, e_lse = err(out, ro), err(lse, rl)
    del ro, rl
    ok = e_out <= TOL[q.dtype] and e_lse <= 1e-2
    record("paged_attention", name, ok, f"out {e_out:.1e} lse {e_lse:.1e}")
    kv_bytes = int(lens.sum()) * kv.shape[1] * kv.shape[-1] * kv.element_size()
    row = {"case": name, "batch": int(lens.numel()), "kv_tokens": int(lens.sum()), "queries": q.shape[0],
           "block_size": kv.shape[2], "kv_bytes": kv_bytes, "err_out": e_out, "err_lse": e_lse, "ok": ok}
    if dev.type != "cuda":
        return row
    try:
        ms = time_graph(call, dev, 10, 256 << 20)
    except Exception as e:  # noqa: BLE001 - a capture failure means the launch syncs: report it
        record("paged_attention", f"{name} graph capture", False, repr(e)[:80])
        return row
    # QK^T and PV over the keys each query sees (decode: all of its request's; causal prefill: the
    # queries are the shard's last positions, so query i of n sees kv_len - n + 1 + i keys).
    seen = sum(int(lens[b]) - (int(qsl[b + 1] - qsl[b]) - 1) / 2 for b in range(lens.numel())
               for _ in range(int(qsl[b + 1] - qsl[b]))) if q_pos is not None else float(lens.sum())
    flops = 4 * q.shape[1] * q.shape[2] * seen
    row.update(ms=ms, bw=kv_bytes / (ms * 1e-3), bw_frac=kv_bytes / (ms * 1e-3) / peak if peak else None,
               tflops=flops / (ms * 1e-3) / 1e12)
    if max_query_len == 1:  # merge of 8 partials of this batch's decode output
        outs = torch.randn(8, *q.shape, device=dev, dtype=q.dtype)
        lses = torch.randn(8, *q.shape[:2], device=dev)
        row["merge_ms"] = time_graph(lambda: triton_merge_partials(outs, lses), dev, 10, 0)
        row["merge_share"] = row["merge_ms"] / ms
    return row


def sweep_configs(dev, quick):
    """A few launch configurations and split counts for two decode cases and the prefill, to see how
    far the defaults are from the best of these."""
    if dev.type != "cuda" or quick:
        return []
    res = []
    decode = (KernelConfig(16, 64, 4, 3), KernelConfig(16, 128, 4, 3), KernelConfig(16, 128, 8, 3),
              KernelConfig(16, 128, 8, 2))
    prefill = (KernelConfig(128, 64, 8, 2), KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 2),
               KernelConfig(64, 64, 4, 3), KernelConfig(128, 32, 4, 3), KernelConfig(64, 128, 4, 2))
    for n_tok, batch, n_q, configs, split_opts in ((32768, 1, 1, decode, (None, 32, 64)),
                                                   (1048576, 8, 1, decode, (None, 16, 32)),
                                                   (32768, 1, 512, prefill, (None, 1))):
        c = paged_case(dev, torch.bfloat16, [n_tok // batch] * batch, [n_q] * batch, 32, 8, 128, 16, causal=n_q > 1)
        q, kv, table, lens, qsl, q_pos, block_pos = c
        kv_bytes = n_tok * 8 * 256 * 2
        for cfg in configs:
            for splits in split_opts:
                def call(cfg=cfg, splits=splits):
                    paged_attention_lse(q, kv, table, lens, qsl, 0.088, q_pos, block_pos, max_kv_len=n_tok // batch,
                                        max_query_len=n_q, num_splits=splits, config=cfg)
                row = {"case": f"{'decode' if n_q == 1 else f'prefill {n_q}q causal'} {n_tok // 1024}k B{batch} bs16",
                       "config": str(cfg)[12:], "splits": splits}
                try:
                    ms = time_graph(call, dev, 5, 256 << 20)
                    row.update(ms=ms, bw=kv_bytes / (ms * 1e-3))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for a config: skip it
                    row["error"] = repr(e)[:80]
                res.append(row)
        del c, q, kv
    return res


def write_report(out_dir, meta, paged, sweep, merge_timings):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_kernel_check.json"), "w") as f:
        json.dump({**meta, "checks": rows, "paged_attention": paged, "config_sweep": sweep,
                   "merge_timings_us": merge_timings}, f, indent=1)
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    peak = f", peak HBM {meta['peak_bw']:.3g} B/s" if meta["peak_bw"] else ""
    lines = [f"# gpu_kernel_check: {meta['device']}", "", f"torch {meta['torch']}, triton {meta['triton']}{peak}. "
             "Paged attention (bf16, Hq=32, Hkv=8, D=128, block-major cache) timed inside a CUDA graph after an "
             "L2 flush, launch latency excluded; merge = triton_merge_partials of 8 partials of the same batch.", "",
             "| case | KV tokens | KV MB read | time us | GB/s | of peak | TFLOP/s | merge us | merge share "
             "| max err out / lse |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in paged:
        ms, merge = r.get("ms"), r.get("merge_ms")
        cells = [r["case"], str(r["kv_tokens"]), fmt(r["kv_bytes"] / 1e6, ".0f"), fmt(ms and ms * 1e3, ".1f"),
                 fmt(r.get("bw") and r["bw"] / 1e9, ".0f"), fmt(r.get("bw_frac"), ".0%"),
                 fmt(r.get("tflops"), ".1f"),
                 fmt(merge and merge * 1e3, ".1f"), fmt(r.get("merge_share"), ".1%"),
                 f"{r['err_out']:.1e} / {r['err_lse']:.1e} {'ok' if r['ok'] else 'MISMATCH'}"]
        lines.append("| " + " | ".join(cells) + " |")
    if sweep:
        lines += ["", "Launch configurations (splits None = the heuristic's choice):", "",
                  "| case | config | splits | time us | GB/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['config']} | {r['splits']} | {fmt(r.get('ms') and r['ms'] * 1e3, '.1f')} | "
                  f"{fmt(r.get('bw') and r['bw'] / 1e9, '.0f')} |" for r in sweep]
    lines += ["", f"{failures} mismatch(es) over {len(rows)} checks."]
    with open(os.path.join(out_dir, "gpu_kernel_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small shapes only (for interpreter smoke tests)")
    p.add_argument("--out", default="docs/benchmarks", help="directory for gpu_kernel_check.{json,md}")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a smoke test)")
        return 0
    torch.manual_seed(0)
    t0 = time.time()
    check_merge(dev, args.quick)
    check_rank_step(dev, args.quick)
    check_split_linear(dev, args.quick)
    timings = time_merge(dev, args.quick)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = peak_bandwidth(name) if dev.type == "cuda" else None
    check_paged_small(dev, args.quick)
    print(f"paged attention checks done ({time.time() - t0:.1f}s)", flush=True)
    paged = bench_paged(dev, args.quick, peak)
    print(f"paged attention benchmark done ({time.time() - t0:.1f}s)", flush=True)
    sweep = guarded("paged_attention", "config sweep", sweep_configs, dev, args.quick) or []
    print(f"device: {name}   torch {torch.__version__}   ({time.time() - t0:.1f}s)")
    w = [max(len(r[i]) for r in rows + [("check", "case", "result", "detail")]) for i in range(4)]
    for r in [("check", "case", "result", "detail")] + rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    if timings:
        print(f"\n{'merge shape':<24}{'torch us':>10}{'triton us':>11}{'speedup':>9}")
        for shape, a, b in timings:
            print(f"{shape:<24}{a:>10.1f}{b:>11.1f}{a / b:>8.1f}x")
    import triton

    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "peak_bw": peak,
            "seconds": round(time.time() - t0, 1)}
    print("\n" + write_report(args.out, meta, paged, sweep, timings))
    if "vllm" in sys.modules:
        print("ERROR: vllm was imported")
        return 1
    print(f"\n{failures} mismatch(es)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
