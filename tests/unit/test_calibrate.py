"""Calibration: fitting the cost model's constants to decode-step rows; hand-worked cases."""

import dataclasses
import json
from pathlib import Path

import pytest

from vllm_kvp.planner import calibrate, fitting
from vllm_kvp.planner import cost_model as cm

# The embedded model (float32): KV 2 x 2 layers x 2 KV heads x 32 x 4 B = 1024 B per token;
# weights streamed per step: 2 layers x (q,k,v,o 163,840 + MLP 589,824 + norms 512) + final norm
# 256 + lm_head 4096 x 256 = 2,557,184 parameters = 10,228,736 B.
TINY = cm.ModelShape(layers=2, hidden=256, heads=8, kv_heads=2, head_dim=32, intermediate=768,
                     vocab=4096, max_context=131072, dtype_bytes=4)
W, KV = 10_228_736, 1024
# FLOPs and link bytes free, so a step is overhead + bytes / bandwidth + hops x latency.
FREE = cm.Hardware(memory_bytes=64e9, hbm_bw=1.0, flops=1e30, intra_bw=1e30, inter_bw=1e30,
                   intra_latency=0.0, inter_latency=0.0)
OVERHEAD, BW, LATENCY = 1e-3, 8e9, 1e-4


def hand_step_ms(ranks: int, context: int, cpus: int = 2, step_mode: str = "auto") -> float:
    """Owner computes on a `cpus`-core host: a worker's work (overhead, weights, its KV share) is
    stretched by (ranks + engine process) / cpus when that exceeds 1. The one token is owned by one
    rank, so with step mode auto every rank runs it: each of the 2 layers gathers partials and the
    step gathers hidden states once, 3 collectives of ranks - 1 hops; routed ("owner"), each layer
    also gathers the queries: 5."""
    share = max(1.0, (ranks + 1) / cpus) if cpus else 1.0
    hops = (3 if step_mode == "auto" else 5) * (ranks - 1)
    return 1e3 * (share * (OVERHEAD + (W + KV * context / ranks) / BW) + hops * LATENCY)


def rows_for(points, cpus: int = 2, step_mode: str = "auto") -> list[dict]:
    rows = [{"ranks": n, "context": c, "cpus": cpus, "step_ms": hand_step_ms(n, c, cpus, step_mode)}
            for n, c in points]
    return rows if step_mode == "auto" else [{**r, "step_mode": step_mode} for r in rows]


GRID = [(1, 8192), (2, 8192), (1, 32768), (2, 32768), (1, 60000), (2, 60000)]


def test_hand_worked_rows_match_the_model():
    assert TINY.active_params * 4 == W and TINY.kv_bytes_per_token == KV
    true = dataclasses.replace(FREE, hbm_bw=BW, intra_latency=LATENCY, step_overhead=OVERHEAD)
    rows = rows_for(GRID)
    assert calibrate.predict_ms(rows, TINY, true) == pytest.approx([r["step_ms"] for r in rows])


@pytest.mark.parametrize("cpus,step_mode", [(0, "auto"), (2, "auto"), (2, "owner")])
def test_fit_recovers_the_constants_that_made_the_rows(cpus, step_mode):
    fitted = calibrate.fit(rows_for(GRID, cpus, step_mode), TINY, FREE)
    assert fitted.step_overhead == pytest.approx(OVERHEAD, rel=1e-9)
    assert fitted.hbm_bw == pytest.approx(BW, rel=1e-9)
    assert fitted.intra_latency == pytest.approx(LATENCY, rel=1e-9)
    assert fitted.flops == FREE.flops          # not fitted: kept


def test_each_row_left_out_is_predicted_exactly():
    rows = rows_for(GRID)
    for i, row in enumerate(rows):
        hw = calibrate.fit(rows[:i] + rows[i + 1:], TINY, FREE)
        assert calibrate.predict_ms([row], TINY, hw) == pytest.approx([row["step_ms"]], rel=1e-9)


def test_core_sharing_is_what_separates_the_ranks():
    # Fitted as if every worker had a core of its own, the same rows need other constants and
    # leave residuals: the stretch is not something the three constants can absorb.
    rows = rows_for(GRID)
    blind = [{k: v for k, v in r.items() if k != "cpus"} for r in rows]
    hw = calibrate.fit(blind, TINY, FREE)
    predicted = calibrate.predict_ms(blind, TINY, hw)
    errors = [abs(p / r["step_ms"] - 1) for p, r in zip(predicted, rows)]
    assert max(errors) > 0.01


def test_collectives_counted_by_the_plugin_replace_the_models_count():
    row = {"ranks": 4, "context": 8192, "step_ms": 1.0, "collectives_per_step": 3}
    assert calibrate.row_terms(TINY, FREE, row).intra_hops == 3 * 3
    assert calibrate.row_terms(TINY, FREE, {**row, "collectives_per_step": 0}).intra_hops == 0


@pytest.mark.parametrize("ranks", [2, 4])
def test_the_plugins_count_is_the_one_the_planner_predicts_with(ranks):
    # decode_step.py at batch 1 under the default step mode: 2 layers of partials + hidden = 3.
    layout = cm.Layout(kvp=ranks, placement="striped")
    counted = {"ranks": ranks, "context": 8192, "step_ms": 1.0, "collectives_per_step": 3}
    calibrate.check_rows(TINY, [counted])
    plain = {k: v for k, v in counted.items() if k != "collectives_per_step"}
    host = calibrate.row_host(FREE, counted)
    assert calibrate.row_terms(TINY, FREE, counted) == calibrate.row_terms(TINY, FREE, plain) \
        == cm.decode_step_terms(TINY, host, layout, 8192, "owner")


def test_rows_that_pay_no_collective_cannot_fit_its_latency():
    rows = rows_for([(1, 8192), (1, 32768), (1, 60000)])
    with pytest.raises(calibrate.CalibrationError,
                       match="no benchmark row depends on intra_latency.*another number of KV ranks"):
        calibrate.fit(rows, TINY, FREE)
    hw = calibrate.fit(rows, TINY, FREE, constants=("step_overhead", "hbm_bw"))
    assert hw.step_overhead == pytest.approx(OVERHEAD) and hw.hbm_bw == pytest.approx(BW)


def test_rows_at_one_context_cannot_separate_latency_from_overhead():
    # Both 2-rank rows are the same step: three rows, two distinct ones, three constants.
    rows = rows_for([(1, 8192), (2, 8192), (2, 8192)])
    with pytest.raises(calibrate.CalibrationError,
                       match="cannot tell intra_latency apart from step_overhead, hbm_bw"):
        calibrate.fit(rows, TINY, FREE)


def test_flops_of_one_model_cannot_be_told_from_overhead_and_bandwidth():
    rows = rows_for([(1, 8192), (1, 32768), (1, 60000)], cpus=0)
    with pytest.raises(calibrate.CalibrationError,
                       match="cannot tell flops apart from step_overhead, hbm_bw.*other sizes"):
        calibrate.fit(rows, TINY, FREE, constants=("step_overhead", "hbm_bw", "flops"))


def test_fewer_rows_than_constants_or_unknown_names_are_refused():
    with pytest.raises(calibrate.CalibrationError, match="need at least 3 benchmark rows, got 2"):
        calibrate.fit(rows_for(GRID[:2]), TINY, FREE)
    with pytest.raises(calibrate.CalibrationError, match="cannot fit \\['hbm'\\]"):
        calibrate.fit(rows_for(GRID), TINY, FREE, constants=("hbm",))


def test_step_time_that_does_not_grow_with_bytes_gives_no_bandwidth():
    rows = [{"ranks": 1, "context": c, "step_ms": t}
            for c, t in [(8192, 5.0), (32768, 4.0), (60000, 3.0)]]
    with pytest.raises(calibrate.CalibrationError, match="do not determine a positive hbm_bw"):
        calibrate.fit(rows, TINY, FREE, constants=("step_overhead", "hbm_bw"))


def test_a_constant_the_rows_put_below_zero_is_zero():
    # Steps faster with KV ranks than the bytes allow: the latency that fits best is negative.
    rows = rows_for(GRID)
    rows = [{**r, "step_ms": r["step_ms"] - (0.6 if r["ranks"] == 2 else 0)} for r in rows]
    assert calibrate.fit(rows, TINY, FREE).intra_latency == 0.0


def test_rows_are_checked_against_the_model_and_the_mode():
    # Per layer a rank sends partials of 8 heads x (32 + 1) x 4 B = 1056 B (and, routed, a query
    # of 8 x 32 x 4 B = 1024 B); per step a hidden state of 256 x 4 B = 1024 B; 2 ranks send.
    row = {"ranks": 2, "context": 8192, "step_ms": 4.6, "kv_read_per_rank_MB": 4.194304,
           "exchanged_per_step_KB": 6.272, "collectives_per_step": 3}
    calibrate.check_rows(TINY, [row], "owner")   # 2 x (2 x 1056 + 1024) B, 2 layers + 1
    routed = {**row, "exchanged_per_step_KB": 10.368, "collectives_per_step": 5}
    with pytest.raises(calibrate.CalibrationError, match="ran 5 KVP collectives per step, but "
                       "owner mode \\(step mode auto\\) issues 3.*step_mode"):
        calibrate.check_rows(TINY, [routed], "owner")
    with pytest.raises(calibrate.CalibrationError, match="exchanged 10.368 KB per step, but owner "
                       "mode \\(step mode auto\\) moves 6.272 KB"):
        calibrate.check_rows(TINY, [{k: v for k, v in routed.items()
                                     if k != "collectives_per_step"}], "owner")
    calibrate.check_rows(TINY, [{**routed, "step_mode": "owner"}])   # 2 x (2 x 2080 + 1024) B
    plain = {k: v for k, v in row.items() if k != "collectives_per_step"}
    with pytest.raises(calibrate.CalibrationError,
                       match="exchanged 6.272 KB per step, but replicated mode moves 4.224 KB"):
        calibrate.check_rows(TINY, [plain], "replicated")
    with pytest.raises(calibrate.CalibrationError, match="but replicated mode issues 2"):
        calibrate.check_rows(TINY, [row], "replicated")
    calibrate.check_rows(TINY, [{**row, "mode": "owner"}], "replicated")  # the row's own mode wins
    with pytest.raises(calibrate.CalibrationError, match="pass the model the benchmark ran"):
        calibrate.check_rows(TINY, [{**row, "kv_read_per_rank_MB": 8.0}])


def test_the_stored_rows_ran_every_step_routed():
    # Measured before the per-step switch: 2 layers x (queries, partials) + hidden = 5 per step.
    path = Path(__file__).resolve().parents[2] / "docs/benchmarks/decode_step_contexts.json"
    rows = calibrate.load_rows(path)
    assert {r["step_mode"] for r in rows} == {"owner"}
    calibrate.check_rows(TINY, rows)
    two = next(r for r in rows if r["ranks"] == 2)
    assert calibrate.row_terms(TINY, FREE, two).intra_hops == 5


def test_load_rows_refuses_bad_rows(tmp_path):
    f = tmp_path / "b.json"
    f.write_text(json.dumps([{"ranks": 1, "context": 10}]))
    with pytest.raises(calibrate.CalibrationError, match="row 0 lacks \\['step_ms'\\]"):
        calibrate.load_rows(f)
    f.write_text(json.dumps([{"ranks": 1, "context": 10, "step_ms": 1.0, "mode": "tp"}]))
    with pytest.raises(calibrate.CalibrationError, match="row 0 has a bad mode"):
        calibrate.load_rows(f)
    f.write_text(json.dumps([{"ranks": 1, "context": 10, "step_ms": 1.0, "step_mode": "routed"}]))
    with pytest.raises(calibrate.CalibrationError, match="row 0 has a bad mode, step_mode"):
        calibrate.load_rows(f)


def test_least_squares_solves_a_small_system():
    # y = 2 a + 3 b, overdetermined and consistent.
    a, b = [1.0, 0.0, 1.0, 2.0], [0.0, 1.0, 1.0, 1.0]
    y = [2 * x + 3 * z for x, z in zip(a, b)]
    assert fitting.least_squares([a, b], y) == pytest.approx([2, 3])


def test_nonnegative_least_squares_by_hand():
    ones, ramp, y = [1.0, 1.0, 1.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]
    # Unconstrained: y = 4 - ramp. With x >= 0 the ramp's coefficient is 0 and the constant is the
    # mean of y (residual 2; the ramp alone would leave 6.86).
    assert fitting.least_squares([ones, ramp], y) == pytest.approx([4, -1])
    assert fitting.nonnegative_least_squares([ones, ramp], y) == pytest.approx([2, 0])
    assert fitting.nonnegative_least_squares([ones, ramp], [-1.0, -1.0, -1.0]) == [0.0, 0.0]


def test_first_dependent_names_the_combination():
    a, b = [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]
    assert fitting.first_dependent([a, b]) is None
    assert fitting.first_dependent([a, b, [2.0, 3.0, 5.0]]) == (2, [0, 1])
    assert fitting.first_dependent([a, [0.0, 0.0, 0.0], b]) == (1, [])
    assert fitting.first_dependent([a, b, [0.0, 2.0, 2.0]]) == (2, [1])
