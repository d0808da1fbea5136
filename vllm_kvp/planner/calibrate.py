"""Fit the cost model's constants to the project's own decode benchmark (benchmarks/decode_step.py).

A benchmark row is one decode step of one request whose `context` tokens are striped over `ranks`
KV ranks (tp = pp = 1, one host), with its measured `step_ms`. Optional fields: `mode`, the
execution mode it ran in ("owner" or "replicated"; else the caller's); `step_mode`, the plugin's
`kvp.step_mode` under owner computes ("auto", the default: a batch-1 decode step runs whole on
every rank, L + 1 collectives; "owner": every step routed, 2 L + 1, as the plugin ran before the
per-step switch); `cpus`, the cores of the CPU host it ran on (its workers and the engine process
share them: cost_model.core_sharing; absent or 0 on GPUs); `collectives_per_step`, the KVP
collectives a rank ran per step as the plugin counted them (else the cost model's count);
`kv_read_per_rank_MB` and `exchanged_per_step_KB`. The counts and bytes are checked against the
model, the mode and the step mode: the planner predicts with the cost model's count, so a latency
fitted to rows that issued another count would not carry over.

The cost model's time of a row is linear in the inverse of its constants,

    step = steps * step_overhead + hbm_bytes / hbm_bw + hops * intra_latency + flops / flops + known

(steps, bytes and FLOPs stretched by core sharing), so the constants come from non-negative least
squares on the same `Terms` the planner uses. A constant the rows cannot determine is an error,
never a guess: no row pays it (every row has one KV rank: no collective latency), or its column is
a combination of the others'. FLOP/s is not fitted by default for that reason: rows of one model do
the same dense work every step, so it cannot be told from the per-step overhead.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vllm_kvp.config import STEP_MODES
from vllm_kvp.planner import fitting
from vllm_kvp.planner.cost_model import (
    MODES, Hardware, Layout, ModelShape, Terms, core_sharing, decode_step_terms, kvp_collectives)

REQUIRED = ("ranks", "context", "step_ms")


@dataclasses.dataclass(frozen=True)
class Constant:
    column: str      # the Terms field it multiplies
    rate: bool       # the Hardware field is 1 / coefficient (bytes/s, FLOP/s), else the coefficient
    varied_by: str   # rows that determine it


CONSTANTS = {
    "step_overhead": Constant("steps", False, "rows at more than one context"),
    "hbm_bw": Constant("hbm_bytes", True, "rows at other contexts"),
    "intra_latency": Constant("intra_hops", False, "rows with another number of KV ranks"),
    "flops": Constant("flops", True, "rows of models of other sizes"),
}
DEFAULT_FIT = ("step_overhead", "hbm_bw", "intra_latency")
# A row's terms depend on the hardware only through its host (cores, node size), not on rates.
_ANY_RATES = Hardware(memory_bytes=0, hbm_bw=1, flops=1, intra_bw=1, inter_bw=1,
                      intra_latency=0, inter_latency=0)


class CalibrationError(ValueError):
    """Unusable benchmark rows; the message says which row or constant and why."""


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
        counts = [row.get(k, 0) for k in ("cpus", "collectives_per_step")]
        modes_ok = row.get("mode", MODES[0]) in MODES and row.get("step_mode", "auto") in STEP_MODES
        if not modes_ok or not all(isinstance(c, (int, float)) and c >= 0 for c in counts):
            raise CalibrationError(f"{path}: row {i} has a bad mode, step_mode, cpus or "
                                   f"collectives_per_step (modes: {', '.join(MODES)}; step modes: "
                                   f"{', '.join(STEP_MODES)}; counts >= 0): {row}")
    return rows


def row_layout(row: dict) -> Layout:
    return Layout(tp=1, pp=1, kvp=int(row["ranks"]), placement="striped")


def row_host(hw: Hardware, row: dict) -> Hardware:
    """`hw` as the row's host: its cores (if a CPU), all its ranks on one node."""
    return dataclasses.replace(hw, cpus=int(row.get("cpus", 0)),
                               gpus_per_node=max(hw.gpus_per_node, int(row["ranks"])))


def row_modes(row: dict, mode: str) -> tuple[str, str]:
    """(execution mode, step mode) the row ran: its own fields, else `mode` and the default."""
    return row.get("mode", mode), row.get("step_mode", "auto")


def row_terms(m: ModelShape, hw: Hardware, row: dict, mode: str = "owner") -> Terms:
    """The cost model's work for one benchmark row, on the row's host."""
    n = int(row["ranks"])
    terms = decode_step_terms(m, row_host(hw, row), row_layout(row), int(row["context"]),
                              *row_modes(row, mode), by_cost=False)
    if "collectives_per_step" in row:   # counted by the plugin: ring all-gathers, n - 1 hops each
        terms = dataclasses.replace(terms, intra_hops=row["collectives_per_step"] * (n - 1))
    return terms


def check_rows(m: ModelShape, rows: list[dict], mode: str = "owner") -> None:
    """The rows' own KV, collective and exchange figures must agree with the model shape, the mode
    and the step mode."""
    for row in rows:
        where = f"benchmark row (ranks {row['ranks']}, context {row['context']})"
        ran, step = row_modes(row, mode)
        named = f"{ran} mode" + (f" (step mode {step})" if ran == "owner" else "")
        fix = "the benchmark ran another mode (name it, or give the rows mode / step_mode fields)"
        if "kv_read_per_rank_MB" in row:
            ours = m.kv_bytes_per_token * row["context"] / row["ranks"] / 1e6
            if abs(ours - row["kv_read_per_rank_MB"]) > 0.01 * row["kv_read_per_rank_MB"]:
                raise CalibrationError(
                    f"{where} reads {row['kv_read_per_rank_MB']:.3f} MB of KV per rank, but the "
                    f"model given predicts {ours:.3f} MB: pass the model the benchmark ran")
        if "collectives_per_step" in row:
            ours = kvp_collectives(m, row_layout(row), 1, ran, step_mode=step)
            if abs(ours - row["collectives_per_step"]) > 0.5:   # whole counts, averaged over steps
                raise CalibrationError(
                    f"{where} ran {row['collectives_per_step']:g} KVP collectives per step, but "
                    f"{named} issues {ours}: {fix}")
        if "exchanged_per_step_KB" in row:
            # decode_step.py sums what each rank sent, times the n - 1 ranks receiving it.
            terms = row_terms(m, _ANY_RATES, row, mode)
            ours = terms.intra_link_bytes * row["ranks"] / 1e3
            if abs(ours - row["exchanged_per_step_KB"]) > 0.01 * max(ours, 1e-3):
                raise CalibrationError(
                    f"{where} exchanged {row['exchanged_per_step_KB']:.3f} KB per step, but "
                    f"{named} moves {ours:.3f} KB: {fix}")


def check_constants(constants: tuple[str, ...]) -> None:
    unknown = [c for c in constants if c not in CONSTANTS]
    if unknown or not constants or len(set(constants)) < len(constants):
        raise CalibrationError(f"cannot fit {list(constants)}: name distinct constants among "
                               f"{', '.join(CONSTANTS)}")


def fit(rows: list[dict], m: ModelShape, hw: Hardware, mode: str = "owner",
        constants: tuple[str, ...] = DEFAULT_FIT) -> Hardware:
    """`hw` with `constants` (names of Hardware fields, see CONSTANTS) fitted to `rows`; the other
    fields keep their values. Raises CalibrationError when the rows cannot determine one."""
    check_constants(constants)
    check_rows(m, rows, mode)
    if len(rows) < len(constants):
        raise CalibrationError(f"{len(constants)} constants ({', '.join(constants)}) need at least "
                               f"{len(constants)} benchmark rows, got {len(rows)}")
    terms = [row_terms(m, hw, r, mode) for r in rows]
    known = dataclasses.replace(hw, **{c: float("inf") if CONSTANTS[c].rate else 0.0
                                       for c in constants})
    y = [r["step_ms"] / 1e3 - t.seconds(known) for r, t in zip(rows, terms)]
    columns = [[getattr(t, CONSTANTS[c].column) for t in terms] for c in constants]
    dependent = fitting.first_dependent(columns)
    if dependent:
        j, others = dependent
        name, need = constants[j], CONSTANTS[constants[j]].varied_by
        if not others:
            raise CalibrationError(f"no benchmark row depends on {name} (its term is 0 in every "
                                   f"row): it needs {need}; or leave it out of the fit")
        raise CalibrationError(
            f"the benchmark rows cannot tell {name} apart from "
            f"{', '.join(constants[i] for i in others)} (their terms are proportional in these "
            f"rows): {name} needs {need}; or leave it out of the fit")
    values = {}
    for c, x in zip(constants, fitting.nonnegative_least_squares(columns, y)):
        if CONSTANTS[c].rate:
            if x <= 0:
                raise CalibrationError(f"the benchmark rows do not determine a positive {c}: step "
                                       f"time does not grow with the {CONSTANTS[c].column} term")
            x = 1.0 / x
        values[c] = x
    return dataclasses.replace(hw, **values)


def predict_ms(rows: list[dict], m: ModelShape, hw: Hardware, mode: str = "owner") -> list[float]:
    """Predicted step_ms of each row."""
    return [1e3 * row_terms(m, hw, r, mode).seconds(hw) for r in rows]


def breakdown_ms(row: dict, m: ModelShape, hw: Hardware, mode: str = "owner") -> dict[str, float]:
    """A row's predicted step time by term, in ms: per-step overhead, weights and KV streamed,
    FLOPs, exchanges (they add up to predict_ms)."""
    t = row_terms(m, hw, row, mode)
    weights = core_sharing(row_host(hw, row), row_layout(row)) * m.active_params * m.dtype_bytes
    return {"overhead": 1e3 * t.steps * hw.step_overhead, "weights": 1e3 * weights / hw.hbm_bw,
            "kv": 1e3 * (t.hbm_bytes - weights) / hw.hbm_bw, "flops": 1e3 * t.flops / hw.flops,
            "exchange": 1e3 * t.comm_seconds(hw)}
