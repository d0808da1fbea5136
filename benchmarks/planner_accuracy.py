"""How well the calibrated cost model (vllm_kvp.planner.cost_model) predicts decode steps it was not fitted on.

    .venv/bin/python benchmarks/planner_accuracy.py [BENCH.json ...] [--model DIR]
        [--mode owner|replicated] [--holdout loo|context] [--fit step_overhead,hbm_bw,intra_latency]

Input: files written by benchmarks/decode_step.py (default: docs/benchmarks/decode_step_contexts.json);
rows of several files are pooled. `--holdout loo` (default): each row is predicted by the constants
fitted on all the other rows. `--holdout context`: each context is predicted by the constants fitted
on the rows at smaller contexts only (extrapolation in context, which is what the planner does).
A split whose rows cannot determine the constants is reported as such, with the reason. Target:
every held-out row within 25% of its measured step time. `--mode`: the execution mode the
benchmark ran in, for rows without their own `mode` (rows name a step mode other than the plugin's
default, `auto`, in their `step_mode`). `--fit`: the constants fitted (calibrate.py);
the others keep neutral values (no step overhead; FLOP/s and link bandwidth of an H100, which
decode rows of a small model barely touch). Then the fit on all rows, term by term. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from vllm_kvp.planner import calibrate
from vllm_kvp.planner.cost_model import MODES, core_sharing
from vllm_kvp.planner.gpus import get_gpu
from vllm_kvp.planner.command import bench_model

TARGET = 0.25
DEFAULT = Path(__file__).resolve().parents[1] / "docs/benchmarks/decode_step_contexts.json"


def splits(rows: list[dict], holdout: str) -> list[tuple[list[dict], list[dict]]]:
    """(fit rows, held-out rows) pairs."""
    if holdout == "loo":
        return [(rows[:i] + rows[i + 1:], [rows[i]]) for i in range(len(rows))]
    contexts = sorted({r["context"] for r in rows})
    if len(contexts) < 2:
        raise calibrate.CalibrationError("--holdout context needs rows at more than one context")
    return [([r for r in rows if r["context"] < c], [r for r in rows if r["context"] == c])
            for c in contexts[1:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", nargs="*", default=[str(DEFAULT)], help="decode_step.py JSON files")
    ap.add_argument("--model", default=None, help="model the benchmark ran (default: the embedded one)")
    ap.add_argument("--holdout", choices=("loo", "context"), default="loo")
    ap.add_argument("--mode", choices=MODES, default="owner")
    ap.add_argument("--fit", default=",".join(calibrate.DEFAULT_FIT),
                    help=f"constants to fit, among {', '.join(calibrate.CONSTANTS)}")
    args = ap.parse_args()
    constants = tuple(c.strip() for c in args.fit.split(",") if c.strip())
    # Only what is not fitted reads these; no step overhead unless it is fitted.
    start = dataclasses.replace(get_gpu("h100").effective(), step_overhead=0.0)
    try:
        calibrate.check_constants(constants)
        rows = [r for path in args.bench for r in calibrate.load_rows(path)]
        m = bench_model(args.model)
        calibrate.check_rows(m, rows, args.mode)
        results = []   # (row, predicted ms or None, fit rows, why not predicted)
        for fit_rows, held in splits(rows, args.holdout):
            try:
                hw = calibrate.fit(fit_rows, m, start, args.mode, constants)
            except calibrate.CalibrationError as e:
                results += [(r, None, len(fit_rows), str(e)) for r in held]
                continue
            predicted = calibrate.predict_ms(held, m, hw, args.mode)
            results += [(r, p, len(fit_rows), "") for r, p in zip(held, predicted)]
    except calibrate.CalibrationError as e:
        print(f"planner_accuracy: error: {e}", file=sys.stderr)
        return 2
    held_out = "each row in turn" if args.holdout == "loo" else "each context, from smaller ones"
    print(f"{len(rows)} rows from {', '.join(args.bench)}; mode {args.mode}; "
          f"fitted: {', '.join(constants)}; held out: {held_out}")
    print(f"{'ranks':>5} {'context':>8} {'cpus':>4} {'measured ms':>12} {'predicted ms':>13} "
          f"{'error':>7}  fitted on")
    errors, reasons = [], []
    for r, pred, n, why in results:
        head = f"{r['ranks']:>5} {r['context']:>8} {r.get('cpus', 0):>4} {r['step_ms']:>12.2f}"
        if pred is None:
            reasons.append(why)
            print(f"{head} {'-':>13} {'-':>7}  {n} rows: not determined [{len(set(reasons))}]")
            continue
        err = (pred - r["step_ms"]) / r["step_ms"]
        errors.append(abs(err))
        print(f"{head} {pred:>13.2f} {err:>+7.1%}  {n} rows")
    for i, why in enumerate(dict.fromkeys(reasons), 1):
        print(f"[{i}] {why}")
    if errors:
        verdict = "met" if max(errors) <= TARGET else "NOT met"
        missed = f"; {len(reasons)} not predicted" if reasons else ""
        print(f"largest held-out error {max(errors):.1%} over {len(errors)} predicted rows "
              f"(target {TARGET:.0%}: {verdict}{missed})")
    else:
        print("no held-out row could be predicted")
    report_full_fit(rows, m, start, args.mode, constants)
    return 0 if errors else 1


def report_full_fit(rows, m, start, mode, constants) -> None:
    """The constants fitted on every row, and each row's predicted time term by term."""
    try:
        hw = calibrate.fit(rows, m, start, mode, constants)
    except calibrate.CalibrationError as e:
        print(f"fit on all {len(rows)} rows: not determined: {e}")
        return
    values = {"step_overhead": f"step overhead {hw.step_overhead * 1e3:.3f} ms",
              "hbm_bw": f"bandwidth {hw.hbm_bw / 1e9:.2f} GB/s",
              "intra_latency": f"collective latency {hw.intra_latency * 1e3:.3f} ms per hop",
              "flops": f"{hw.flops / 1e12:.4g} TFLOP/s"}
    kept = [v for c, v in values.items() if c not in constants]
    print(f"\nfitted on all {len(rows)} rows: {', '.join(values[c] for c in constants)}"
          f" (kept: {', '.join(kept)})")
    print(f"{'ranks':>5} {'context':>8} {'share':>5} {'overhead':>8} {'weights':>7} {'KV':>6} "
          f"{'flops':>6} {'exchange':>8} {'predicted':>9} {'measured':>8} {'error':>7}   (ms)")
    for r in rows:
        parts = calibrate.breakdown_ms(r, m, hw, mode)
        total = sum(parts.values())
        sharing = core_sharing(calibrate.row_host(hw, r), calibrate.row_layout(r))
        print(f"{r['ranks']:>5} {r['context']:>8} {sharing:>5.2f} {parts['overhead']:>8.2f} "
              f"{parts['weights']:>7.2f} {parts['kv']:>6.2f} {parts['flops']:>6.2f} "
              f"{parts['exchange']:>8.2f} {total:>9.2f} {r['step_ms']:>8.2f} "
              f"{(total - r['step_ms']) / r['step_ms']:>+7.1%}")


if __name__ == "__main__":
    sys.exit(main())
