"""Fit the cost model's rates to the project's own decode benchmark (benchmarks/decode_step.py).

A benchmark row is one decode step of one request whose `context` tokens are striped over `ranks`
KV ranks (tp = pp = 1, one host), with its measured `step_ms`, run in the execution mode given
(the row's own `mode` field when it has one: "replicated" or "owner"). The cost model's
time for it is linear in the unknown rates:

    step = step_overhead + hbm_bytes / hbm_bw + intra_hops * intra_latency + (known terms)

so they come from linear least squares on the same `Terms` the planner uses. FLOP/s is not fitted:
decode moves ~1 FLOP per byte, so decode rows cannot tell FLOP/s from bandwidth; it keeps the
catalogue's value. The overhead is fitted only when there are rows to spare (more than three).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vllm_kvp.cost_model import Hardware, Layout, ModelShape, Terms, decode_step_terms

REQUIRED = ("ranks", "context", "step_ms")


class CalibrationError(ValueError):
    """Unusable benchmark rows; the message says which row and why."""


def load_rows(path: str | Path) -> list[dict]:
    """Rows of a decode_step.py JSON file (a list of objects with ranks, context, step_ms)."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"cannot read benchmark file {path}: {e}") from None
    if not isinstance(rows, list) or not rows:
        raise CalibrationError(f"{path}: expected a non-empty JSON list of benchmark rows")
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if not isinstance(row, dict) or k not in row]
        if missing:
            raise CalibrationError(f"{path}: row {i} lacks {missing} (rows need {list(REQUIRED)})")
        if row["ranks"] < 1 or row["context"] < 1 or row["step_ms"] <= 0:
            raise CalibrationError(f"{path}: row {i} has non-positive ranks/context/step_ms: {row}")
    return rows


def row_terms(m: ModelShape, hw: Hardware, row: dict, mode: str = "replicated") -> Terms:
    """The cost model's work for one benchmark row."""
    layout = Layout(tp=1, pp=1, kvp=int(row["ranks"]), placement="striped")
    return decode_step_terms(m, hw, layout, int(row["context"]), row.get("mode", mode))


def check_model_matches(m: ModelShape, rows: list[dict]) -> None:
    """The rows' own KV-bytes field must agree with the model shape they are fitted with."""
    for row in rows:
        if "kv_read_per_rank_MB" not in row:
            continue
        ours = m.kv_bytes_per_token * row["context"] / row["ranks"] / 1e6
        if abs(ours - row["kv_read_per_rank_MB"]) > 0.01 * row["kv_read_per_rank_MB"]:
            raise CalibrationError(
                f"benchmark row {row} reads {row['kv_read_per_rank_MB']:.3f} MB of KV per rank, "
                f"but the model given predicts {ours:.3f} MB: pass the model the benchmark ran")


def fit(rows: list[dict], m: ModelShape, hw: Hardware, mode: str = "replicated") -> Hardware:
    """`hw` with hbm_bw, intra_latency (and step_overhead, given > 3 rows) fitted to `rows`."""
    if len(rows) < 2:
        raise CalibrationError(f"calibration needs at least 2 benchmark rows, got {len(rows)}")
    terms = [row_terms(m, hw, r, mode) for r in rows]
    base = dataclasses.replace(hw, hbm_bw=float("inf"), intra_latency=0.0, step_overhead=0.0)
    y = [r["step_ms"] / 1e3 - t.seconds(base) for r, t in zip(rows, terms)]
    columns = [[t.hbm_bytes for t in terms]]
    names = ["hbm"]
    if any(t.intra_hops for t in terms):
        columns.append([t.intra_hops for t in terms])
        names.append("hops")
    if len(rows) > 3:
        columns.append([1.0] * len(rows))
        names.append("overhead")
    coef = dict(zip(names, least_squares(columns, y)))
    if coef["hbm"] <= 0:
        raise CalibrationError("the benchmark rows do not determine a positive bandwidth "
                               "(step time does not grow with KV bytes read)")
    return dataclasses.replace(hw, hbm_bw=1.0 / coef["hbm"],
                               intra_latency=max(0.0, coef.get("hops", hw.intra_latency)),
                               step_overhead=coef.get("overhead", hw.step_overhead))


def predict_ms(rows: list[dict], m: ModelShape, hw: Hardware, mode: str = "replicated") -> list[float]:
    """Predicted step_ms of each row."""
    return [1e3 * row_terms(m, hw, r, mode).seconds(hw) for r in rows]


def least_squares(columns: list[list[float]], y: list[float]) -> list[float]:
    """argmin_x |A x - y|^2 for A given by columns, via the normal equations (a handful of
    unknowns), each column scaled to unit norm first so bytes and hop counts stay comparable."""
    scale = [max(sum(v * v for v in c) ** 0.5, 1e-300) for c in columns]
    a = [[v / s for v in c] for c, s in zip(columns, scale)]
    k = len(a)
    ata = [[sum(p * q for p, q in zip(a[i], a[j])) for j in range(k)] for i in range(k)]
    aty = [sum(p * q for p, q in zip(a[i], y)) for i in range(k)]
    x = solve(ata, aty)
    return [xi / s for xi, s in zip(x, scale)]


def solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting; a singular system is a CalibrationError."""
    n = len(b)
    m = [row[:] + [bi] for row, bi in zip(a, b)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            raise CalibrationError("the benchmark rows cannot separate the fitted constants "
                                   "(use rows with different ranks and contexts)")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            m[r] = [v - f * p for v, p in zip(m[r], m[col])]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x
