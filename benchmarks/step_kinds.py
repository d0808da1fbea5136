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
Each figure is the time per decode step, (time for 1 + S tokens - time for 1 token) / S with the
prompts served from the prefix cache, the median of --repeats rounds. The measured break-even is
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
    out = {}
    for b in batches:
        rng = random.Random(b)
        prompts = [{"prompt_token_ids": [rng.randrange(3, 4000) for _ in range(16)]}
                   for _ in range(b)]

        def run(n: int) -> float:
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - t0

        run(1)  # prefill; the prompts stay in the prefix cache
        short = run(1)
        long = run(1 + steps)
        out[b] = 1000 * (long - short) / steps
    stats = llm.collective_rpc("kvp_stats")[0]["steps"]
    return {"ms_per_step": out, "steps_by_kind": stats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,64,128,192,256,320")
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--out", default="docs/benchmarks/step_kinds")
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
    for r in range(args.repeats):
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
    import dataclasses

    shape = dataclasses.replace(load_model(model), dtype_bytes=4)
    hw, name = runtime_hardware(None, None, os.cpu_count() or 1)
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
    summary = (f"predicted break-even ({name}): {policy.break_even('balanced')} tokens; measured: "
               f"shared stops winning at B = {measured_even} (first batch where it does not)")
    table = "\n".join(lines) + "\n\n" + summary + "\n"
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_kinds.json").write_text(json.dumps({"runs": runs, "median": med,
                                                     "predicted_ms": predicted}, indent=1))
    (out / "step_kinds.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
