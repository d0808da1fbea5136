"""`vllm-kvp plan`: input parsing, layout search, JSON fields and error messages (no vLLM)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_kvp.planner import cost_model as cm
from vllm_kvp.planner import command as planner
from vllm_kvp.cli import main as cli_main
from vllm_kvp.planner.gpus import CATALOGUE, get_gpu

REPO = Path(__file__).resolve().parents[2]
LLAMA8B = str(REPO / "examples/planner/llama-8b-1m.json")
LLAMA70B = str(REPO / "examples/planner/llama-70b-10m.json")
FIELDS = {"context", "gpus", "tp", "pp", "kvp", "fits", "ttft_s", "tpot_ms", "meets_slo", "command"}


@pytest.mark.parametrize("text,value", [("1M", 1_000_000), ("4k", 4000), ("10M", 10_000_000),
                                        ("1.5M", 1_500_000), ("128Ki", 131072), ("1Mi", 1 << 20),
                                        ("4096", 4096)])
def test_parse_count(text, value):
    assert planner.parse_count(text) == value


@pytest.mark.parametrize("text", ["1X", "", "M", "-3", "0.5", "1.5k7", "1e6"])
def test_parse_count_refuses(text):
    with pytest.raises(planner.PlanError, match="--context"):
        planner.parse_count(text, "--context")


def test_parse_duration():
    assert planner.parse_duration("30ms", "x") == pytest.approx(0.03)
    assert planner.parse_duration("10min", "x") == 600
    assert planner.parse_duration("2", "x") == 2
    with pytest.raises(planner.PlanError, match="--tbt-slo 'fast'"):
        planner.parse_duration("fast", "--tbt-slo")


def test_config_becomes_a_model_shape(tmp_path):
    m = planner.load_model(LLAMA8B)
    assert (m.layers, m.heads, m.kv_heads, m.head_dim, m.dtype_bytes) == (32, 32, 8, 128, 2)
    assert m.params == 8_030_261_248 and m.max_context == 1 << 20
    (tmp_path / "config.json").write_text(Path(LLAMA8B).read_text())
    assert planner.load_model(str(tmp_path)) == m          # a model directory reads its config.json


def test_candidates_use_exactly_the_budget():
    m = planner.load_model(LLAMA8B)
    layouts = planner.candidate_layouts(m, get_gpu("h100").effective(), 16, 1_000_000)
    assert {(l.tp, l.pp, l.kvp) for l in layouts} >= {(1, 1, 16), (8, 1, 2), (8, 2, 1), (4, 4, 1)}
    assert all(l.gpus == 16 and l.max_tokens_per_rank % 16 == 0 for l in layouts)
    assert all(l.max_tokens_per_rank * l.kvp >= 1_000_000 for l in layouts)
    assert not any(l.tp > 8 for l in layouts)          # TP stays inside an 8-GPU node


def test_serve_command_names_the_layout():
    layout = cm.Layout(tp=8, pp=2, kvp=4, placement="onboard", max_tokens_per_rank=262144)
    cmd = planner.serve_command("/m/config.json", layout, 1_000_000, 8)
    assert cmd == ("vllm-kvp serve /m --kvp-size 4 --kvp-placement onboard --kvp-max-tokens-per-rank "
                   "262144 --tensor-parallel-size 8 --pipeline-parallel-size 2 --max-model-len 1000000 "
                   "--distributed-executor-backend ray")
    striped = cm.Layout(tp=2, kvp=4, placement="striped", max_tokens_per_rank=262144)
    assert planner.serve_command("/m", striped, 1000, 8) == (
        "vllm-kvp serve /m --kvp-size 4 --kvp-placement striped --tensor-parallel-size 2 "
        "--pipeline-parallel-size 1 --max-model-len 1000")


def _plan_json(capsys, *args):
    assert cli_main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_rows_have_the_documented_fields_best_first(capsys):
    rows = _plan_json(capsys, LLAMA8B, "--context", "128k,1M", "--gpu", "h100", "--gpus", "8,16",
                      "--tbt-slo", "6ms")
    assert rows and all(FIELDS <= set(r) for r in rows)
    assert [r["context"] for r in rows] == sorted(r["context"] for r in rows)
    for r in rows:
        assert isinstance(r["fits"], bool) and isinstance(r["meets_slo"], bool)
        assert r["gpus"] == r["tp"] * r["pp"] * r["kvp"]
        assert r["meets_slo"] == (r["fits"] and r["tpot_ms"] <= 6.0)
        assert r["command"].startswith("vllm-kvp serve ")
    for c in (128_000, 1_000_000):
        group = [r for r in rows if r["context"] == c]
        assert group == sorted(group, key=planner.rank_key)
    best = rows[0]
    assert best["meets_slo"] and best["gpus"] == min(r["gpus"] for r in rows if r["meets_slo"] and r["context"] == 128_000)


def test_8b_at_1m_on_8_h100_matches_the_hand_worked_floor(capsys):
    rows = _plan_json(capsys, LLAMA8B, "--context", "1M", "--gpus", "8")
    row = next(r for r in rows if (r["tp"], r["kvp"]) == (8, 1))
    # Each GPU holds 1/8 of the weights and of 1M tokens' KV; per token it streams its KV and every
    # weight but the input embedding table (one row of it), and does 2 FLOPs per weight plus
    # 4 * layers * heads * head_dim per token of context, all over 8 GPUs.
    weights, kv = 8_030_261_248 * 2 / 8, 1_000_000 * 131072 / 8
    streamed = (8_030_261_248 - 128256 * 4096) * 2 / 8 + kv
    flops = (2 * (8_030_261_248 - 128256 * 4096) + 4 * 32 * 32 * 128 * 1_000_000) / 8
    assert row["weights_gb_per_gpu"] == pytest.approx(weights / 1e9)
    assert row["kv_gb_per_gpu"] == pytest.approx(kv / 1e9)
    assert row["tpot_floor_ms"] == pytest.approx(1e3 * (streamed / 3.35e12 + flops / 989e12), rel=1e-3)
    # Prediction: 80% of the bandwidth, 50% of the FLOP/s, two all-reduces per layer of 6 hops x 1.5 us,
    # and the catalogue's 0.5 ms of host-side work per step.
    predicted = (streamed / (0.8 * 3.35e12) + flops / (0.5 * 989e12) + 32 * 2 * 6 * 1.5e-6
                 + 0.5e-3)
    assert row["fits"] and row["tpot_ms"] == pytest.approx(1e3 * predicted, rel=1e-3)


def test_owner_decode_against_replicated(capsys):
    # One request's decode token is owned by one rank, so owner computes runs it on every rank (the
    # plugin's default step mode): per layer the same partials gather as replicated, plus the
    # final hidden states once (8 KV ranks over 8 nodes: 7 hops x 4 us and 7 x 8192 x 2 B over
    # 400 Gb/s), plus the split MLP projections (>= 32 MiB per TP rank at tp 8): each rank reads
    # 1/8 of their weights; the MLP splits like a TP layer, so one collective a layer gathers the
    # down projection's partial sums (8192 values of 2 B a rank). The serve line needs no
    # step-mode flag: the default is the one predicted.
    rows = _plan_json(capsys, LLAMA70B, "--context", "10M", "--gpus", "64", "--mode", "all")
    pick = {r["mode"]: r for r in rows if (r["tp"], r["kvp"], r["placement"]) == (8, 8, "striped")}
    link, hop = 400e9 / 8, 4e-6
    hidden = 7 * hop + 7 * 8192 * 2 / link
    columns = 80 * 7 * hop + 80 * 7 * 8192 * 2 / link
    hbm_bw = CATALOGUE["h100"].effective().hbm_bw
    saved = 80 * (7168 * 8192 + 8192 * 3584) * 2 * 7 / 8 / hbm_bw
    assert pick["owner"]["tpot_ms"] - pick["replicated"]["tpot_ms"] == pytest.approx(
        1e3 * (hidden + columns - saved))
    assert not any("step-mode" in r["command"] for r in rows)


def test_text_report_and_plot(tmp_path, capsys):
    png = tmp_path / "tpot.png"
    assert cli_main(["plan", LLAMA70B, "--context", "10M", "--gpus", "64,128", "--tbt-slo", "30ms",
                     "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    # By default the planner predicts the mode the plugin runs; --mode all adds the other.
    assert "best (owner computes): vllm-kvp serve" in out and "replicated" not in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli_main(["plan", LLAMA70B, "--context", "10M", "--gpus", "64", "--mode", "all"]) == 0
    out = capsys.readouterr().out
    assert "best (replicated): vllm-kvp serve" in out and "best (owner computes)" in out


def test_calibrated_plan(capsys):
    bench = str(REPO / "docs/benchmarks/decode_step_contexts.json")
    assert cli_main(["plan", LLAMA8B, "--context", "1M", "--gpus", "8", "--calibrate", bench]) == 0
    out = capsys.readouterr().out
    # The 2-core CPU's constants (docs/planner.md, Calibration).
    assert "calibrated on" in out and "HBM 7.9 GB/s, hop 113" in out and "overhead 0.87 ms" in out
    rows = _plan_json(capsys, LLAMA8B, "--context", "1M", "--gpus", "8", "--calibrate", bench,
                      "--calibrate-fit", "hbm_bw,intra_latency")
    assert all(r["tpot_ms"] > 0 for r in rows)


def test_saved_spec_is_what_the_plugin_and_the_planner_read_back(tmp_path, capsys):
    """`--save-spec` writes the calibrated constants; `kvp.device` and `--gpu-spec` read them back
    as they are (achieved rates: no efficiency applied twice)."""
    from vllm_kvp.config import KVPConfig
    from vllm_kvp.planner.gpus import runtime_hardware

    bench = str(REPO / "docs/benchmarks/decode_step_contexts.json")
    spec = tmp_path / "host.json"
    assert cli_main(["plan", LLAMA8B, "--context", "1M", "--gpus", "8", "--calibrate", bench,
                     "--save-spec", str(spec)]) == 0
    capsys.readouterr()
    saved = json.loads(spec.read_text())
    assert saved["measured"] is True and abs(saved["hbm_bw"] - 7.93e9) < 0.01e9
    assert KVPConfig(size=2, device=str(spec)).device == str(spec)  # validated
    hw, name = runtime_hardware(str(spec), None, 2)
    assert (hw.hbm_bw, hw.intra_latency, name) == (saved["hbm_bw"], saved["intra_latency"],
                                                  saved["name"])
    assert cli_main(["plan", LLAMA8B, "--context", "1M", "--gpus", "8", "--save-spec",
                     str(tmp_path / "missing" / "x.json")]) == 2
    assert "cannot write --save-spec" in capsys.readouterr().err


def test_calibration_that_cannot_determine_a_constant_is_one_clear_line(tmp_path, capsys):
    one_rank = [{"ranks": 1, "context": c, "step_ms": 2 + c / 1e4, "cpus": 2}
                for c in (8192, 32768, 60000)]
    bench = tmp_path / "one_rank.json"
    bench.write_text(json.dumps(one_rank))
    args = ["plan", LLAMA8B, "--context", "1M", "--gpus", "8", "--calibrate", str(bench)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "no benchmark row depends on intra_latency" in err and "Traceback" not in err
    assert cli_main([*args, "--calibrate-fit", "step_overhead,hbm_bw"]) == 0
    capsys.readouterr()
    two_ranks = [{"ranks": 2, "context": 8192, "step_ms": 4.6, "exchanged_per_step_KB": 10.368}]
    bench.write_text(json.dumps(one_rank + two_ranks))
    assert cli_main([*args, "--calibrate-mode", "replicated"]) == 2
    assert "but replicated mode moves 4.224 KB" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["nowhere", "--context", "1M"], "no such directory"),
    ([LLAMA8B, "--context", "4M"], "exceeds the model's window"),
    ([LLAMA8B, "--context", "1M", "--gpu", "v100"], "unknown GPU 'v100'"),
    ([LLAMA8B, "--context", "1MB"], "--context '1MB' is not a number"),
    ([LLAMA8B, "--context", "1M", "--gpus", "8,x"], "--gpus 'x' is not a number"),
    ([LLAMA70B, "--context", "10M", "--gpus", "8,16"], "no layout of at most 16 GPUs fits"),
    ([LLAMA8B, "--context", "1M", "--ttft-slo", "soon"], "--ttft-slo 'soon'"),
])
def test_bad_input_is_one_clear_line(capsys, args, message):
    assert cli_main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_runs_without_vllm_or_torch():
    code = ("import sys; from vllm_kvp.cli import main; "
            f"rc = main(['plan', {LLAMA8B!r}, '--context', '1M', '--gpus', '8', '--json']); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch')]; "
            "assert rc == 0 and not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert FIELDS <= set(json.loads(done.stdout)[0])
