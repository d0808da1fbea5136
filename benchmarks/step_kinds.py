#!/usr/bin/env python
"""Where sharing a step pays: decode steps of B requests, kept on their owners or shared, against
what the cost model predicts (the step policy's choice, `kvp.step_mode` "auto").

    python benchmarks/step_kinds.py [--batches 16,64,128,192,256,320] [--repeats 3]

The bench-size model (`vllm-kvp make-model --size bench`, fp32) on 2 KV ranks `onboard`, each
worker pinned to its own core. B requests of 16-token prompts start together, so placement puts
B/2 on each rank: every decode step is balanced and local. Three engines, each in its own process:
  local   `split_step_tokens` 0: the fixed rule, which keeps balanced steps local;
  shared  `split_step_tokens` 1M: every step shared (every rank runs all B rows, each reading and
          computing 1/2 of the split layers' columns, the columns all-gathered);
  auto    the cost model's choice per step (the default).
Each figure is the median time of --steps engine steps of B decode rows (after the prefill and two
more steps), then the median of --repeats rounds. The measured break-even is
the B where shared stops beating local; the predicted one is `StepPolicy.break_even("balanced")`.
Results: JSON and a Markdown table in --out (docs/benchmarks/step_kinds/).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {"local": {"split_step_tokens": 0}, "shared": {"split_step_tokens": 1 << 20}, "auto": {}}


def child(mode: str, model: str, batches: list[int], steps: int) -> dict:
    from vllm import LLM, SamplingParams

    kvp = {"size": 2, "placement": "onboard", **MODES[mode]}
    llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, max_num_seqs=max(batches),
              max_model_len=256, max_num_batched_tokens=max(4096, 16 * max(batches)),
              enable_prefix_caching=True, kv_cache_memory_bytes=2 << 30,
              additional_config={"kvp": kvp})
    eng = llm.llm_engine
    out = {}
    for b in batches:
        rng = random.Random(b)
        params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        for i in range(b):
            eng.add_request(f"b{b}-{i}", {"prompt_token_ids": [rng.randrange(3, 4000)
                                                              for _ in range(16)]}, params)
        started: set[str] = set()
        while len(started) < b:  # prefill: every request has its first token
            started.update(o.request_id for o in eng.step() if o.outputs[0].token_ids)
        for _ in range(2):  # settle into steps of B decode rows
            eng.step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t0)
        while eng.has_unfinished_requests():
            eng.step()
        out[b] = 1000 * statistics.median(times)
    stats = llm.collective_rpc("kvp_stats")[0]["steps"]
    return {"ms_per_step": out, "steps_by_kind": stats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,64,128,192,256,320")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--out", default="docs/benchmarks/step_kinds")
    ap.add_argument("--table-only", action="store_true",
                    help="redo the fit and the table from --out's step_kinds.json")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        mode, model = args.child
        print("RESULT " + json.dumps(child(mode, model, batches, args.steps)), flush=True)
        return 0

    from vllm_kvp.model import build_default_model
    from vllm_kvp.planner import cost_model as cm
    from vllm_kvp.planner.command import load_model
    from vllm_kvp.planner.gpus import runtime_hardware

    model = str(build_default_model(Path("~/.cache/vllm_kvp/models/bench").expanduser(),
                                    size="bench"))
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    if args.table_only:
        saved = json.loads((Path(args.out) / "step_kinds.json").read_text())
        runs = saved["runs"]
        batches = [int(b) for b in saved["median"]["local"]]
    for r in range(0 if args.table_only else args.repeats):
        for mode in MODES:  # rounds interleaved: a drift of the host hits every mode alike
            time.sleep(args.settle)
            env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1")
            proc = subprocess.run([sys.executable, __file__, "--child", mode, model,
                                   "--batches", args.batches, "--steps", str(args.steps)],
                                  env=env, capture_output=True, text=True, timeout=3600)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(lines[-1][len("RESULT "):])
            runs[mode].append(res)
            print(f"round {r + 1} {mode:6s} {res['ms_per_step']} {res['steps_by_kind']}",
                  flush=True)
    med = {m: {b: statistics.median(run["ms_per_step"][str(b)] for run in runs[m])
               for b in batches} for m in MODES}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_kinds.json").write_text(json.dumps({"runs": runs, "median": med}, indent=1))
    import dataclasses

    shape = dataclasses.replace(load_model(model), dtype_bytes=4)
    hw, name = runtime_hardware(None, None, os.cpu_count() or 1)
    fitted = fit(shape, hw, med, batches)
    print("fitted to the local and shared rows: " + ", ".join(
        f"{k} {v:.4g}" for k, v in dataclasses.asdict(fitted).items()
        if k in ("hbm_bw", "flops", "intra_latency", "step_overhead")))
    policy = cm.policy(shape, cm.Layout(kvp=2), 4 << 20, hw=hw, out_bytes=4)
    costs = policy.costs
    predicted = {b: {k: 1000 * costs.seconds(k, [b // 2] * 2, [0, 0], b)
                     for k in ("local", "shared")} for b in batches}
    measured_even = next((b for b in batches if med["shared"][b] >= med["local"][b]), None)
    lines = ["| B | local ms/step | shared ms/step | auto ms/step | auto's kind | predicted "
             "local - shared ms |", "|---|---|---|---|---|---|"]
    for b in batches:
        kind = policy.kind([b // 2] * 2, False, [0, 0], b)
        gap = predicted[b]["local"] - predicted[b]["shared"]
        lines.append(f"| {b} | {med['local'][b]:.1f} | {med['shared'][b]:.1f} | "
                     f"{med['auto'][b]:.1f} | {kind} | {gap:+.1f} |")
    refit = cm.policy(shape, cm.Layout(kvp=2), 4 << 20, hw=fitted, out_bytes=4)
    summary = (f"predicted break-even ({name}): {policy.break_even('balanced')} tokens; with the "
               f"constants fitted to these rows: {refit.break_even('balanced')}; measured: shared "
               f"is not faster from B = {measured_even} (the first batch where it is not)")
    consts = (f"fitted: step overhead {fitted.step_overhead * 1e3:.2f} ms, weights stream at "
              f"{fitted.hbm_bw / 1e9:.1f} GB/s, {fitted.flops / 1e9:.0f} GFLOP/s (hop "
              f"{fitted.intra_latency * 1e6:.0f} us and links {fitted.intra_bw / 1e9:.1f} GB/s "
              f"kept)")
    table = "\n".join(lines) + "\n\n" + summary + "\n\n" + consts + "\n"
    print(table)
    (out / "step_kinds.json").write_text(json.dumps({"runs": runs, "median": med,
                                                     "predicted_ms": predicted}, indent=1))
    (out / "step_kinds.md").write_text(table)
    return 0


def fit(shape, hw, med: dict, batches: list[int]):
    """The CPU host's per-step overhead, weight-streaming rate and FLOP/s fitted to the measured
    local and shared steps by non-negative least squares on the cost model's own terms
    (`StepCosts` with unit rates gives each row's weight bytes, FLOPs and collectives). The hop
    latency and link rate stay the profile's: with one model, a shared step's extra collectives
    and its saved weight reads are the same two-valued column, which no fit can separate."""
    import dataclasses

    from vllm_kvp import step_policy
    from vllm_kvp.planner import cost_model as cm
    from vllm_kvp.planner.fitting import nonnegative_least_squares

    unit = dataclasses.replace(hw, hbm_bw=1.0, flops=1.0, intra_latency=0.0, inter_latency=0.0)
    c = cm.step_costs(shape, unit, cm.Layout(kvp=2), 4 << 20, 4)
    cols: list[list[float]] = [[], [], []]
    y = []
    for mode, kind in (("local", step_policy.LOCAL), ("shared", step_policy.SHARED)):
        for b in batches:
            counts = [b // 2, b // 2]
            sent = step_policy.exchanges(kind, counts, b, c.shape, 2, [0, 0])
            if kind == step_policy.SHARED:
                weights = c.weight_s - c.split_weight_s / 2
                flops = b * (c.row_s - c.split_row_s / 2)
            else:
                weights, flops = c.weight_s, b // 2 * c.row_s
            for col, v in zip(cols, (1.0, c.sharing * weights, c.sharing * flops)):
                col.append(v)
            known = sum(n * hw.intra_latency + nbytes / hw.intra_bw
                        for n, nbytes in sent.values())
            y.append(med[mode][b] / 1000 - known)
    overhead, inv_bw, inv_flops = nonnegative_least_squares(cols, y)
    return dataclasses.replace(hw, step_overhead=overhead, hbm_bw=1 / inv_bw, flops=1 / inv_flops)


if __name__ == "__main__":
    sys.exit(main())
