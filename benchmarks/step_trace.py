#!/usr/bin/env python
"""Where a layout's time goes, step by step: the throughput workload of `owner_computes.py`
(bench-size model, 16 requests of 1k prompt + 128 output tokens) stepped by hand, each engine
step timed from the driver.

    python benchmarks/step_trace.py [--layouts tp2,kvp2-onboard] [--repeats 3]

Steps are grouped into phases the layouts share (vLLM's scheduler decides them alike): "prefill"
(steps until every request has its first token: prompt chunks with the running requests' decode
rows) and "decode" (16-row steps, then the tail as requests finish). For KV-rank layouts the
step log of `kvp_stats()` gives each step's kind and tokens per rank. Per layout and phase: the
steps, their total and median time; per step of the prefill phase, the times side by side.
Results: JSON and a Markdown table in --out. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from owner_computes import LAYOUTS, _engine, _generate, _prompts  # noqa: E402


def child(layout: str, model: str, chunk: int) -> dict:
    from vllm import SamplingParams

    llm = _engine(model, LAYOUTS[layout][1], 2048, chunk)
    _generate(llm, _prompts(4, 1024, 3), 8)  # warm-up, as in owner_computes
    eng = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for i, p in enumerate(_prompts(16, 1024, 4)):
        eng.add_request(f"r{i}", p, params)
    steps, started = [], set()
    while eng.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = eng.step()
        dt = time.perf_counter() - t0
        new = [o.request_id for o in outs if o.outputs[0].token_ids]
        phase = "prefill" if len(started) < 16 else "decode"
        started.update(new)
        steps.append({"ms": 1000 * dt, "phase": phase, "outputs": len(new)})
    kvp = LAYOUTS[layout][1].get("additional_config", {}).get("kvp")
    if kvp:
        log = llm.collective_rpc("kvp_stats")[0]["step_log"][-len(steps):]
        for s, (kind, counts, spans, tokens, logits, *_) in zip(steps, log):
            s.update(kind=kind, counts=counts, spans=spans, tokens=tokens, logits=logits)
    return {"steps": steps}


def summary(steps: list[dict]) -> dict:
    out = {}
    for phase in ("prefill", "decode"):
        ms = [s["ms"] for s in steps if s["phase"] == phase]
        out[phase] = {"steps": len(ms), "total_s": sum(ms) / 1000,
                      "median_ms": statistics.median(ms) if ms else None}
    out["total_s"] = sum(s["ms"] for s in steps) / 1000
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="tp2,kvp2-onboard")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--out", default="bench_results/step_trace")
    ap.add_argument("--child", nargs=2, metavar=("LAYOUT", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.chunk)), flush=True)
        return 0
    layouts = args.layouts.split(",")
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        ap.error(f"unknown layouts {sorted(unknown)}; known: {list(LAYOUTS)}")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from vllm_kvp.model import build_default_model

    model = str(build_default_model(None, size="bench"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict = {l: [] for l in layouts}
    for _ in range(args.repeats):  # rounds interleave the layouts
        for layout in layouts:
            time.sleep(args.settle)
            env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=LAYOUTS[layout][0])
            proc = subprocess.run([sys.executable, __file__, "--child", layout, model,
                                   "--chunk", str(args.chunk)],
                                  env=env, capture_output=True, text=True, timeout=1800)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{layout} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}",
                      file=sys.stderr)
                continue
            steps = json.loads(lines[-1][len("RESULT "):])["steps"]
            runs[layout].append(steps)
            s = summary(steps)
            print(f"  {layout:14s} total {s['total_s']:.2f} s  prefill {s['prefill']['steps']} "
                  f"steps {s['prefill']['total_s']:.2f} s  decode {s['decode']['steps']} steps "
                  f"{s['decode']['total_s']:.2f} s (median {s['decode']['median_ms']:.1f} ms)",
                  flush=True)
            (out / "step_trace_runs.json").write_text(json.dumps(runs, indent=1))
    lines = ["| layout | total s | prefill steps | prefill s | decode steps | decode s | "
             "decode median ms |", "|---|---|---|---|---|---|---|"]
    for layout, rs in runs.items():
        if not rs:
            continue
        ss = [summary(r) for r in rs]
        med = lambda f: statistics.median(f(s) for s in ss)  # noqa: E731
        lines.append(
            f"| {layout} | {med(lambda s: s['total_s']):.2f} | {ss[0]['prefill']['steps']} | "
            f"{med(lambda s: s['prefill']['total_s']):.2f} | {ss[0]['decode']['steps']} | "
            f"{med(lambda s: s['decode']['total_s']):.2f} | "
            f"{med(lambda s: s['decode']['median_ms']):.1f} |")
    table = "\n".join(lines)
    (out / "step_trace.md").write_text(table + "\n")
    print(table)
    first = [rs[0] for rs in runs.values() if rs]
    if first:
        print("\nprefill steps, ms (first round):")
        for i in range(max(sum(s["phase"] == "prefill" for s in r) for r in first)):
            cells = []
            for layout, rs in runs.items():
                if rs and i < len(rs[0]) and rs[0][i]["phase"] == "prefill":
                    s = rs[0][i]
                    cells.append(f"{layout} {s['ms']:7.1f}" + (
                        f" {s['kind']} {s['counts']}" if "kind" in s else ""))
            print(f"  {i:2d}  " + "  |  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
