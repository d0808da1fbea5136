#!/usr/bin/env python
"""GPU check of the KVP attention kernels against float64 torch references, plus merge timings.

    python benchmarks/gpu_kernel_check.py                # on a CUDA machine
    python benchmarks/gpu_kernel_check.py --with-vllm-fa # also check vLLM's flash-attention build
    TRITON_INTERPRET=1 python benchmarks/gpu_kernel_check.py --device cpu --quick   # smoke test

Checks: triton_merge_partials (vs float64 merge, vs the torch merge, bit-determinism), and the CUDA
branch of shard_attention / causal_attention (upstream flash_attn if importable; vLLM's build only
with --with-vllm-fa, because importing it imports vLLM, which this script otherwise never does).
Prints a table; exits 1 on any mismatch. Without CUDA (and without --device cpu) it prints SKIP and
exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from vllm_kvp.ops import attention as attn  # noqa: E402  (none of these import vLLM)
from vllm_kvp.ops.merge import merge_partials  # noqa: E402
from vllm_kvp.ops.triton_merge import triton_merge_partials  # noqa: E402

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


def check_attention(dev, with_vllm):
    """shard_attention + causal_attention on `dev`; on CUDA this exercises the flash branch."""
    kinds = []
    if dev.type == "cuda":
        try:
            from flash_attn import flash_attn_varlen_func as fa

            kinds.append(("flash_attn", fa))
        except Exception as e:  # noqa: BLE001 - report, do not fail: the torch path is the fallback
            rows.append(("flash_attn", "import", "skipped", repr(e)[:60]))
        if with_vllm:
            try:
                from vllm.vllm_flash_attn import flash_attn_varlen_func as vfa

                kinds.append(("vllm", vfa))
            except Exception as e:  # noqa: BLE001
                rows.append(("vllm_flash_attn", "import", "skipped", repr(e)[:60]))
    kinds.append(("torch", None))
    for kind, fn in kinds:
        calls = []
        if fn is not None:
            def counted(*a, _fn=fn, **k):
                calls.append(1)
                return _fn(*a, **k)
            attn._flash_varlen_fn = lambda c=counted, k=kind: (c, k)
        else:
            attn._flash_varlen_fn = lambda: None
        for dtype in (torch.float16, torch.bfloat16):
            _attention_case(dev, kind, dtype, calls)


def _attention_case(dev, kind, dtype, calls):
    hkv, hq, d, bs = 2, 8, 128, 16
    lens, q_lens = [300, 0, 1, 17], [5, 3, 1, 0]
    nblk = [-(-n // bs) for n in lens]
    kv_cache = torch.randn(sum(nblk) + 2, hkv, bs, 2 * d, device=dev).to(dtype) * 100
    ids = torch.randperm(kv_cache.shape[0], device=dev)
    table = torch.zeros(len(lens), max(nblk), dtype=torch.int32, device=dev)
    shards, used = [], 0
    for i, n in enumerate(lens):
        table[i, : nblk[i]] = ids[used : used + nblk[i]].int()
        used += nblk[i]
        k, v = torch.randn(n, hkv, d, device=dev).to(dtype), torch.randn(n, hkv, d, device=dev).to(dtype)
        pos = torch.arange(n, device=dev)
        attn.write_kv(kv_cache, k, v, table[i, pos // bs].long() * bs + pos % bs)
        shards.append((k, v))
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = torch.randn(sum(q_lens), hq, d, device=dev).to(dtype)
    kn, vn = torch.randn(sum(q_lens), hkv, d, device=dev).to(dtype), torch.randn(sum(q_lens), hkv, d, device=dev).to(dtype)
    scale = d**-0.5
    calls.clear()
    out, lse = attn.shard_attention(q, kv_cache, table, torch.tensor(lens, device=dev), cu, scale)
    c_out, c_lse = attn.causal_attention(q, kn, vn, cu, scale)
    e = [0.0, 0.0]
    for i, (k, v) in enumerate(shards):
        s, t = int(cu[i]), int(cu[i + 1])
        for (o, l), (ro, rl) in (((out[s:t], lse[s:t]), ref_attention(q[s:t], k, v, scale, False)),
                                 ((c_out[s:t], c_lse[s:t]), ref_attention(q[s:t], kn[s:t], vn[s:t], scale, True))):
            e = [max(e[0], err(o, ro)), max(e[1], err(l, rl))]
    used_flash = bool(calls)
    ok = e[0] <= TOL[dtype] and e[1] <= 1e-2 and (used_flash or kind == "torch")
    record(f"attention[{kind}]", str(dtype)[6:], ok,
           f"out {e[0]:.1e} lse {e[1]:.1e} kernel_called={used_flash}")


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small shapes only (for interpreter smoke tests)")
    p.add_argument("--with-vllm-fa", action="store_true", help="also check vllm.vllm_flash_attn (imports vLLM)")
    args = p.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a smoke test)")
        return 0
    torch.manual_seed(0)
    t0 = time.time()
    check_merge(dev, args.quick)
    check_attention(dev, args.with_vllm_fa)
    timings = time_merge(dev, args.quick)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}   torch {torch.__version__}   ({time.time() - t0:.1f}s)")
    w = [max(len(r[i]) for r in rows + [("check", "case", "result", "detail")]) for i in range(4)]
    for r in [("check", "case", "result", "detail")] + rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    if timings:
        print(f"\n{'merge shape':<24}{'torch us':>10}{'triton us':>11}{'speedup':>9}")
        for shape, a, b in timings:
            print(f"{shape:<24}{a:>10.1f}{b:>11.1f}{a / b:>8.1f}x")
    if "vllm" in sys.modules and not args.with_vllm_fa:
        print("ERROR: vllm was imported")
        return 1
    print(f"\n{failures} mismatch(es)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
