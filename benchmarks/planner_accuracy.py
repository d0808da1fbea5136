"""How well the calibrated cost model (vllm_kvp.cost_model) predicts decode steps it was not fitted on.

    .venv/bin/python benchmarks/planner_accuracy.py [BENCH.json ...] [--model DIR] [--holdout loo|context]
        [--mode replicated|owner]

Input: files written by benchmarks/decode_step.py (default: docs/benchmarks/decode_step.json); rows
of several files are pooled. `--holdout loo` (default): each row is predicted by the constants fitted
on all the other rows. `--holdout context`: fit on the rows at the smallest context, predict the
rest (extrapolation in context, which is what the planner does). Target: every held-out row within
25% of its measured step time. `--mode`: the execution mode the benchmark ran in (the committed
snapshot predates owner computes: replicated). Not a test: numbers, side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vllm_kvp import calibrate
from vllm_kvp.gpus import get_gpu
from vllm_kvp.planner import bench_model

TARGET = 0.25
DEFAULT = Path(__file__).resolve().parents[1] / "docs/benchmarks/decode_step.json"


def splits(rows: list[dict], holdout: str) -> list[tuple[list[dict], list[dict]]]:
    """(fit rows, held-out rows) pairs."""
    if holdout == "loo":
        return [(rows[:i] + rows[i + 1:], [rows[i]]) for i in range(len(rows))]
    first = min(r["context"] for r in rows)
    fit = [r for r in rows if r["context"] == first]
    rest = [r for r in rows if r["context"] != first]
    if not rest:
        raise calibrate.CalibrationError("--holdout context needs rows at more than one context")
    return [(fit, rest)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", nargs="*", default=[str(DEFAULT)], help="decode_step.py JSON files")
    ap.add_argument("--model", default=None, help="model the benchmark ran (default: the embedded one)")
    ap.add_argument("--holdout", choices=("loo", "context"), default="loo")
    ap.add_argument("--mode", choices=("replicated", "owner"), default="replicated")
    args = ap.parse_args()
    try:
        rows = [r for path in args.bench for r in calibrate.load_rows(path)]
        m = bench_model(args.model)
        calibrate.check_model_matches(m, rows)
        # Starting rates only matter for what is not fitted (FLOP/s, link bandwidth); any GPU will do.
        start = get_gpu("h100").effective()
        results = []
        for fit_rows, held in splits(rows, args.holdout):
            hw = calibrate.fit(fit_rows, m, start, args.mode)
            predicted = calibrate.predict_ms(held, m, hw, args.mode)
            results += [(r, p, len(fit_rows)) for r, p in zip(held, predicted)]
        everything = calibrate.fit(rows, m, start, args.mode)
    except calibrate.CalibrationError as e:
        print(f"planner_accuracy: error: {e}", file=sys.stderr)
        return 2
    print(f"{len(rows)} rows from {', '.join(args.bench)}; mode {args.mode}; held out: {args.holdout}")
    print(f"{'ranks':>5} {'context':>8} {'measured ms':>12} {'predicted ms':>13} {'error':>7} {'fit on':>7}")
    worst = 0.0
    for r, pred, n in results:
        err = (pred - r["step_ms"]) / r["step_ms"]
        worst = max(worst, abs(err))
        print(f"{r['ranks']:>5} {r['context']:>8} {r['step_ms']:>12.2f} {pred:>13.2f} {err:>+7.1%} {n:>4} rows")
    verdict = "met" if worst <= TARGET else "NOT met"
    print(f"largest held-out error {worst:.1%} (target {TARGET:.0%}: {verdict})")
    print(f"fitted on all rows: HBM {everything.hbm_bw / 1e9:.2f} GB/s, collective hop "
          f"{everything.intra_latency * 1e3:.3f} ms, step overhead {everything.step_overhead * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
