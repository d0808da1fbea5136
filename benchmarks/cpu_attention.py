#!/usr/bin/env python
"""CPU attention on one thread: vLLM's CPU kernel, the plugin's C++ kernel and its torch path, side by side.

    nice -n 5 .venv/bin/python benchmarks/cpu_attention.py          # full grid, writes docs/benchmarks/cpu_attention.*
    nice -n 5 .venv/bin/python benchmarks/cpu_attention.py --quick  # one small decode case and a small prefill
    .venv/bin/python benchmarks/cpu_attention.py --striped-prefill   # an 8k prompt's chunks: striped rank vs TP = 2

All three read the same K/V of one layer, fp32, block size 128 (vLLM's CPU default), each in its own
cache layout: vLLM's op (``torch.ops._C.cpu_attention_with_kv_cache``, called exactly as vLLM's CPU_ATTN
backend calls it, with scheduler metadata from ``cpu_attn_get_scheduler_metadata``) reads
(num_blocks, Hkv, 2 * block_size, D) with K and V as the two halves of each block, filled by its own
``cpu_attn_reshape_and_cache`` (whose block interior depends on the ISA); the plugin's kernels
(``cpu_kernel.paged_attention_lse_cpu``, the C++ kernel, and ``torch_paged_attention``) read
(num_blocks, Hkv, block_size, 2D) and also return the LSE, which vLLM's does not.

Decode: each request has one query over its whole context (vLLM: causal with the query last; ours:
non-causal over kv_lens, the same keys). Prefill: one request, 512 queries that are the last 512
positions of a 32k context (vLLM: causal; ours: causal by position, q_pos / block_pos). Outputs are
checked against vLLM's. Timing: median of --reps rounds in which the kernels alternate, each call
after evicting the last-level cache ("cold": one layer's KV is not cache-resident when a multi-layer
model comes back to it) and, separately, back to back ("warm").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from vllm_kvp.ops import cpu_kernel  # noqa: E402
from vllm_kvp.ops.paged_attention import torch_paged_attention  # noqa: E402

BLOCK = 128
KERNELS = ("vllm", "cpp", "torch")


def vllm_fn(q, cache_vllm, table, lens, qsl, scale):
    """A zero-argument call of vLLM's CPU attention kernel, set up as its CPU_ATTN backend does."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    _, hq, d = q.shape
    hkv = cache_vllm.shape[1]
    key_cache, value_cache = cache_vllm.chunk(2, dim=2)
    isa = _get_attn_isa(q.dtype, BLOCK, d)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=lens.numel(), num_heads=hq, num_kv_heads=hkv, head_dim=d, seq_lens=lens, dtype=q.dtype,
        query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=True)
    out = torch.empty_like(q)

    def call():
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl, seq_lens=lens,
            scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
            scheduler_metadata=meta, s_aux=None)
        return out

    return call, isa


def median_ms(fns, reps, evict):
    """Median ms of each function over `reps` rounds; the functions alternate within a round so that
    all see the same background load on a shared host."""
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            if evict is not None:
                evict.add_(1.0)  # touches 64 MiB: twice the last-level cache
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) * 1e3 for ts in times]


def fill_caches(nb, hkv, d, isa, tokens_per_write=1 << 16):
    """The same random K/V in both layouts: ours written directly, vLLM's through its own cache
    write (its block interior depends on the ISA)."""
    from vllm import _custom_ops as ops

    cache = torch.empty(nb, hkv, BLOCK, 2 * d)
    cache_vllm = torch.empty(nb, hkv, 2 * BLOCK, d)
    key_cache, value_cache = cache_vllm.chunk(2, dim=2)
    for s in range(0, nb * BLOCK, tokens_per_write):
        slots = torch.arange(s, min(nb * BLOCK, s + tokens_per_write))
        k, v = torch.randn(slots.numel(), hkv, d), torch.randn(slots.numel(), hkv, d)
        cache[slots // BLOCK, :, slots % BLOCK] = torch.cat([k, v], dim=-1)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    return cache, cache_vllm


def run_case(hq, hkv, d, batch, ctx, queries, reps, evict, skip_torch=False):
    """One case: `batch` requests of `ctx` keys and `queries` queries each (the last positions)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    nb = batch * ctx // BLOCK
    cache, cache_vllm = fill_caches(nb, hkv, d, _get_attn_isa(torch.float32, BLOCK, d))
    table = torch.randperm(nb, dtype=torch.int32).view(batch, ctx // BLOCK)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    qsl = torch.arange(batch + 1, dtype=torch.int32) * queries
    q = torch.randn(batch * queries, hq, d)
    scale = d**-0.5
    vllm_call, isa = vllm_fn(q, cache_vllm, table, lens, qsl, scale)
    if queries == 1:
        pos = {}
    else:  # causal by position: the queries are the last positions of the context
        pos = {"q_pos": (ctx - queries + torch.arange(queries, dtype=torch.int32)).repeat(batch),
               "block_pos": (torch.arange(ctx // BLOCK, dtype=torch.int32) * BLOCK).expand(batch, -1).contiguous()}
    out, lse = torch.empty_like(q), torch.empty(q.shape[:2])

    def cpp():
        return cpu_kernel.paged_attention_lse_cpu(q, cache, table, lens, qsl, scale, out=out, lse=lse, **pos)[0]

    def torch_path():
        return torch_paged_attention(q, cache, table, lens, qsl, scale, out=out, lse=lse, **pos)[0]

    fns = {"vllm": vllm_call, "cpp": cpp, "torch": torch_path}
    if skip_torch:
        del fns["torch"]
    ref = vllm_call().clone()
    row = {"Hq": hq, "Hkv": hkv, "D": d, "batch": batch, "context": ctx, "queries": queries, "isa": isa,
           "kv_MB": batch * ctx * hkv * 2 * d * 4 / 1e6}
    for name in fns:
        if name != "vllm":
            row[f"max_abs_diff_{name}"] = (fns[name]() - ref).abs().max().item()
    for tag, ev in (("cold", evict), ("warm", None)):
        for name, ms in zip(fns, median_ms(list(fns.values()), reps, ev)):
            row[f"{name}_ms_{tag}"] = ms
        for name in fns:
            if name != "vllm":
                row[f"ratio_{name}_{tag}"] = row[f"{name}_ms_{tag}"] / row[f"vllm_ms_{tag}"]
    return row


def striped_prefill(prompt, chunk, hq, hkv, d, ranks, reps, evict):
    """The attention of one prompt prefilled in chunks, as each of its layers runs it: TP = `ranks`
    (vLLM's kernel, hq / ranks heads over all keys) against one KV rank of `ranks` in striped
    placement (the C++ kernel, all hq heads over every `ranks`-th block, causal by position), one
    row per chunk. Both do the same multiply-adds. The C++ output is checked against the plugin's
    torch path on the same shard."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    rows = []
    scale = d**-0.5
    for c0 in range(0, prompt, chunk):
        ctx = c0 + chunk
        nb = ctx // BLOCK
        _, cache_vllm = fill_caches(nb, hkv // ranks, d, _get_attn_isa(torch.float32, BLOCK, d))
        qsl = torch.tensor([0, chunk], dtype=torch.int32)
        vllm_call, _ = vllm_fn(torch.randn(chunk, hq // ranks, d), cache_vllm,
                               torch.arange(nb, dtype=torch.int32).view(1, nb),
                               torch.tensor([ctx], dtype=torch.int32), qsl, scale)
        local = list(range(0, nb, ranks))  # rank 0's blocks
        cache = torch.randn(len(local), hkv, BLOCK, 2 * d)
        table = torch.arange(len(local), dtype=torch.int32).view(1, -1)
        lens = torch.tensor([len(local) * BLOCK], dtype=torch.int32)
        pos = {"q_pos": c0 + torch.arange(chunk, dtype=torch.int32),
               "block_pos": (torch.tensor(local, dtype=torch.int32) * BLOCK).view(1, -1).contiguous()}
        q = torch.randn(chunk, hq, d)
        out, lse = torch.empty_like(q), torch.empty(q.shape[:2])

        def cpp():
            return cpu_kernel.paged_attention_lse_cpu(q, cache, table, lens, qsl, scale, out=out, lse=lse, **pos)[0]

        ref = torch_paged_attention(q, cache, table, lens, qsl, scale, **pos)[0]
        diff = (cpp() - ref).abs().max().item()
        vllm_ms, cpp_ms = median_ms([vllm_call, cpp], reps, evict)
        rows.append({"prompt": prompt, "chunk_start": c0, "chunk": chunk, "Hq": hq, "Hkv": hkv, "D": d,
                     "ranks": ranks, "vllm_tp_ms": vllm_ms, "cpp_striped_ms": cpp_ms, "ratio": cpp_ms / vllm_ms,
                     "max_abs_diff_cpp_vs_torch": diff, "reps": reps})
        print(f"chunk at {c0}: vLLM (TP = {ranks}) {vllm_ms:.1f} ms, C++ (striped rank 0 of {ranks}) {cpp_ms:.1f} ms "
              f"({cpp_ms / vllm_ms:.3f}x); max diff vs torch {diff:.1e}", flush=True)
    return rows


def fmt(r, key, spec):
    return format(r[key], spec) if key in r else "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=15, help="rounds per decode case (median)")
    p.add_argument("--prefill-reps", type=int, default=5, help="rounds per prefill case (each ~1 s per kernel)")
    p.add_argument("--out", default="docs/benchmarks", help="directory for cpu_attention.{json,md}")
    p.add_argument("--striped-prefill", action="store_true",
                   help="only the chunked prefill of an 8k prompt (bench model heads): one striped KV rank of 2 "
                        "against TP = 2, writes cpu_attention_striped_prefill.{json,md}")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if cpu_kernel.load() is None:
        print(f"the C++ kernel is unavailable: {cpu_kernel.failure()}")
        return 1
    if args.striped_prefill:
        return striped_prefill_main(args)
    heads = [(8, 2, 32)] if args.quick else [(8, 2, 32), (8, 2, 128)]
    grid = [(1, 8192)] if args.quick else [(b, c) for b in (1, 16) for c in (8192, 32768, 61440)]
    cases = [(hq, hkv, d, b, c, 1) for hq, hkv, d in heads for b, c in grid]
    cases += [(8, 2, d, 1, 4096 if args.quick else 32768, 512) for _, _, d in heads]
    evict = torch.zeros(16 << 20)
    rows = []
    for hq, hkv, d, batch, ctx, queries in cases:
        reps = args.reps if queries == 1 else args.prefill_reps
        rows.append(run_case(hq, hkv, d, batch, ctx, queries, reps, evict))
        rows[-1]["reps"] = reps
        r = rows[-1]
        print(f"Hq{hq}/Hkv{hkv} D{d} B{batch} ctx{ctx} q{queries}: vLLM {r['vllm_ms_cold']:.2f} ms, C++ "
              f"{r['cpp_ms_cold']:.2f} ms ({r['ratio_cpp_cold']:.2f}x), torch {fmt(r, 'torch_ms_cold', '.2f')} ms "
              f"({fmt(r, 'ratio_torch_cold', '.2f')}x) cold; warm C++ {r['ratio_cpp_warm']:.2f}x, torch "
              f"{fmt(r, 'ratio_torch_warm', '.2f')}x; max diff C++ {r['max_abs_diff_cpp']:.1e}", flush=True)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = ["# CPU attention, one thread: vLLM's kernel vs the plugin's C++ kernel and torch path", "",
             f"{rows[0]['isa']} ISA, fp32, block size {BLOCK}, Hq/Hkv = 8/2. Ratio = time / vLLM's time (target for the "
             "C++ kernel at decode: <= 1.15). Median of "
             f"{args.reps} rounds (prefill: {args.prefill_reps}), the three kernels interleaved in each round; cold = last-level cache evicted "
             f"before each call. Host load average at the end of the run: {load} on {os.cpu_count()} cores (a "
             "shared host: ratios move by ~0.1-0.2 between runs).", "",
             "| D | batch | context | queries | KV MB | vLLM ms cold | C++ ms cold | C++ / vLLM cold | torch / vLLM cold "
             "| vLLM ms warm | C++ ms warm | C++ / vLLM warm | torch / vLLM warm | max diff C++ |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['D']} | {r['batch']} | {r['context']} | {r['queries']} | {r['kv_MB']:.0f} | "
                     f"{r['vllm_ms_cold']:.2f} | {r['cpp_ms_cold']:.2f} | **{r['ratio_cpp_cold']:.2f}** | "
                     f"{fmt(r, 'ratio_torch_cold', '.2f')} | {r['vllm_ms_warm']:.2f} | {r['cpp_ms_warm']:.2f} | "
                     f"**{r['ratio_cpp_warm']:.2f}** | {fmt(r, 'ratio_torch_warm', '.2f')} | "
                     f"{r['max_abs_diff_cpp']:.1e} |")
    print("\n".join(lines))
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cpu_attention.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(args.out, "cpu_attention.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if all(r[k] < 1e-4 for r in rows for k in r if k.startswith("max_abs_diff")) else 1


def striped_prefill_main(args) -> int:
    rows = striped_prefill(8192, 2048, 8, 2, 128, 2, args.prefill_reps, torch.zeros(16 << 20))
    total = sum(r["cpp_striped_ms"] for r in rows) / sum(r["vllm_tp_ms"] for r in rows)
    lines = ["# Chunked prefill attention of an 8k prompt, one thread: a striped KV rank against TP = 2", "",
             "One layer of the bench model's shape (Hq/Hkv = 8/2, D = 128), fp32, block size 128, chunks of 2048. "
             "TP = 2: vLLM's CPU kernel, 4 query heads over all keys. KV rank 0 of 2, striped: the C++ kernel, all 8 "
             "heads over every other block, causal by position. The same multiply-adds; the C++ output is checked "
             f"against the plugin's torch path. Median of {args.prefill_reps} rounds, the two kernels interleaved, "
             "last-level cache evicted before each call.", "",
             "| chunk start | vLLM TP ms | C++ striped ms | C++ / vLLM |", "|---|---|---|---|"]
    lines += [f"| {r['chunk_start']} | {r['vllm_tp_ms']:.1f} | {r['cpp_striped_ms']:.1f} | {r['ratio']:.3f} |"
              for r in rows]
    lines.append(f"| **all** | {sum(r['vllm_tp_ms'] for r in rows):.0f} | "
                 f"{sum(r['cpp_striped_ms'] for r in rows):.0f} | **{total:.3f}** |")
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpu_attention_striped_prefill.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "cpu_attention_striped_prefill.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0 if all(r["max_abs_diff_cpp_vs_torch"] < 1e-4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
