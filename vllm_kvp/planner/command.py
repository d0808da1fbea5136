"""`vllm-kvp plan`: layouts (TP x PP x KV ranks, placement, tokens per rank) for a model, context
lengths and GPU budgets, with predicted memory, TTFT and time per output token (cost_model).

Never imports vLLM or torch: MODEL is read as a plain config.json. This module parses the input,
enumerates and scores layouts; planner_report renders the table, the JSON and the PNG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from vllm_kvp.planner import cost_model as cm
from vllm_kvp.planner import gpus as gpu_catalogue
from vllm_kvp.planner.calibrate import DEFAULT_FIT

BLOCK = 16  # vLLM's default KV block size: per-rank limits are whole blocks
_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?)?\s*$")
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|min|h)?\s*$")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "": 1.0, "min": 60.0, "h": 3600.0}


class PlanError(ValueError):
    """Bad input or an impossible request; the message names what was wrong."""


@dataclass(frozen=True)
class SLO:
    """Targets in seconds; None means no target."""

    tpot: float | None = None
    ttft: float | None = None


def parse_count(text: str, what: str = "count") -> int:
    """"1M" -> 1_000_000, "128k" -> 128_000, "1Mi" -> 1_048_576, "4096" -> 4096."""
    m = _COUNT.match(text)
    if not m:
        raise PlanError(f"{what} {text!r} is not a number like 4096, 128k, 1M, 1.5M or 1Mi")
    value = float(m.group(1)) * _COUNT_UNITS[(m.group(2) or "").lower()]
    if value < 1 or value != int(value):
        raise PlanError(f"{what} {text!r} must be a whole number >= 1")
    return int(value)


def parse_counts(text: str, what: str) -> list[int]:
    """Comma-separated counts, e.g. "1M,4M,10M"."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise PlanError(f"{what}: empty list {text!r}")
    return [parse_count(t, what) for t in items]


def parse_duration(text: str, what: str) -> float:
    """"30ms" -> 0.03, "10min" -> 600, "2s" / "2" -> 2, "50us", "1h" (seconds)."""
    m = _DURATION.match(text)
    if not m:
        raise PlanError(f"{what} {text!r} is not a duration like 30ms, 2s, 10min or 1h")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or ""]


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "float8_e4m3fn": 1}


def shape_from_config(cfg: dict, source: str = "config") -> cm.ModelShape:
    """ModelShape from a Hugging Face config.json dict (Llama/Mistral/Qwen-like; MoE via
    num_local_experts / num_experts and num_experts_per_tok)."""
    cfg = cfg.get("text_config", cfg)

    def need(key: str):
        if key not in cfg:
            raise PlanError(f"{source}: no {key!r}; a decoder-only transformer config is needed")
        return cfg[key]

    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 1
    width = cfg.get("moe_intermediate_size") if experts > 1 else None
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return cm.ModelShape(
        layers=need("num_hidden_layers"), hidden=hidden, heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        intermediate=width or need("intermediate_size"), vocab=need("vocab_size"),
        max_context=need("max_position_embeddings"), dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)), experts=experts,
        experts_per_token=(cfg.get("num_experts_per_tok") or 1) if experts > 1 else 1)


def load_model(path: str) -> cm.ModelShape:
    """A local model directory (its config.json) or a config.json file; nothing is downloaded."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise PlanError(f"model {path!r}: no such directory with a config.json, nor a config file "
                        f"(the planner reads local configs only, it downloads nothing)")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"cannot read {file}: {e}") from None
    return shape_from_config(cfg, str(file))


def candidate_layouts(m: cm.ModelShape, hw: cm.Hardware, gpus: int, context: int) -> list[cm.Layout]:
    """Every (tp, pp, kvp, placement) using exactly `gpus` GPUs that vLLM accepts: tp a power of
    two inside one node dividing the heads (KV heads split or replicated evenly), pp a power of
    two up to 16 and the layer count; max_tokens_per_rank balances `context` over the KV ranks."""
    out = []
    tp = 1
    while tp <= min(gpus, hw.gpus_per_node):
        if m.heads % tp == 0 and (m.kv_heads % tp == 0 or tp % m.kv_heads == 0):
            pp = 1
            while tp * pp <= gpus and pp <= min(16, m.layers):
                if gpus % (tp * pp) == 0:
                    kvp = gpus // (tp * pp)
                    limit = BLOCK * math.ceil(context / kvp / BLOCK)
                    out += [cm.Layout(tp, pp, kvp, place, limit) for place in cm.PLACEMENTS]
                pp *= 2
        tp *= 2
    return out


def serve_command(model: str, layout: cm.Layout, context: int, gpus_per_node: int) -> str:
    """The `vllm-kvp serve` line that starts `layout` for requests up to `context` tokens; `model`
    is a directory or its config.json (vLLM wants the directory)."""
    path = Path(model)
    parts = ["vllm-kvp serve", str(path.parent) if path.name == "config.json" else model]
    if layout.kvp > 1:
        parts += [f"--kvp-size {layout.kvp}", f"--kvp-placement {layout.placement}"]
        if layout.placement == "onboard":  # striped deals blocks round robin: no limit to set
            parts.append(f"--kvp-max-tokens-per-rank {layout.max_tokens_per_rank}")
    parts += [f"--tensor-parallel-size {layout.tp}", f"--pipeline-parallel-size {layout.pp}",
              f"--max-model-len {context}"]
    if layout.gpus > gpus_per_node:
        parts.append("--distributed-executor-backend ray")
    return " ".join(parts)


def evaluate(m: cm.ModelShape, hw: cm.Hardware, peak: cm.Hardware, layout: cm.Layout, mode: str,
             context: int, chunk: int, slo: SLO, model: str) -> dict:
    """One candidate at one context: memory, fit, predicted TTFT and time per token, SLO."""
    capacity = cm.kv_capacity_tokens(m, hw, layout, chunk)
    resident = cm.tokens_per_rank(layout, context)
    fits = capacity >= resident
    ttft = cm.prefill_time(m, hw, layout, context, chunk, mode, max_points=64)
    tpot = cm.decode_step_time(m, hw, layout, context, mode)
    meets = fits and (slo.tpot is None or tpot <= slo.tpot) and (slo.ttft is None or ttft <= slo.ttft)
    return {
        "context": context, "gpus": layout.gpus, "tp": layout.tp, "pp": layout.pp,
        "kvp": layout.kvp, "placement": layout.placement,
        "max_tokens_per_rank": layout.max_tokens_per_rank, "mode": mode, "fits": fits,
        "kv_bytes_per_token": m.kv_bytes_per_token,
        "weights_gb_per_gpu": cm.weight_bytes_per_gpu(m, layout.tp, layout.pp) / 1e9,
        "kv_gb_per_gpu": resident * cm.kv_bytes_per_token_per_gpu(m, layout.tp, layout.pp) / 1e9,
        "kv_capacity_tokens_per_rank": capacity, "ttft_s": ttft, "tpot_ms": 1e3 * tpot,
        "tpot_floor_ms": 1e3 * cm.decode_step_time(m, peak, layout, context, mode),
        "meets_slo": meets, "command": serve_command(model, layout, context, hw.gpus_per_node),
    }


def rank_key(row: dict) -> tuple:
    """SLO-meeting first, then fitting, then fewest GPUs, then fastest token, then fastest TTFT."""
    return (not row["meets_slo"], not row["fits"], row["gpus"], row["tpot_ms"], row["ttft_s"])


def plan(m: cm.ModelShape, hw: cm.Hardware, peak: cm.Hardware, model: str, contexts: list[int],
         gpu_counts: list[int], slo: SLO = SLO(), chunk: int = 8192,
         modes: tuple[str, ...] = cm.MODES) -> list[dict]:
    """Every candidate layout x mode x context, each context's rows best first (contexts in the
    order given). Raises PlanError for a context beyond the model's window or one nothing fits."""
    for c in contexts:
        if c > m.max_context:
            raise PlanError(f"context {c:,} exceeds the model's window (max_position_embeddings "
                            f"{m.max_context:,})")
    rows = []
    for c in contexts:
        # With one KV rank both modes are the same engine: score it once.
        scored = [evaluate(m, hw, peak, layout, mode, c, chunk, slo, model)
                  for g in gpu_counts for layout in candidate_layouts(m, hw, g, c)
                  for mode in (modes if layout.kvp > 1 else modes[:1])]
        if not any(r["fits"] for r in scored):
            raise PlanError(no_fit_message(m, hw, c, max(gpu_counts), chunk))
        rows += sorted(scored, key=rank_key)
    return rows


def no_fit_message(m: cm.ModelShape, hw: cm.Hardware, context: int, most: int, chunk: int) -> str:
    """Why nothing fits, and about how many GPUs would (KV spread over tp=8 replicas)."""
    total = context * m.kv_bytes_per_token
    tp = min(hw.gpus_per_node, 8)
    per_rank = cm.kv_capacity_tokens(m, hw, cm.Layout(tp=tp), chunk)
    need = f"about {tp * math.ceil(context / per_rank)} GPUs" if per_rank else "a larger GPU"
    return (f"no layout of at most {most} GPUs fits a {context:,}-token request (its KV alone is "
            f"{total / 1e9:,.1f} GB, weights {m.weight_bytes / 1e9:,.1f} GB); it needs {need} "
            f"(try --gpus with larger counts)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vllm-kvp plan", description="Layouts and predicted latency for long-context serving "
        "with KV parallelism (see docs/planner.md).")
    p.add_argument("model", help="local model directory or config.json (nothing is downloaded)")
    p.add_argument("--context", required=True, help="total tokens per request, e.g. 1M,4M,10M")
    p.add_argument("--gpu", default="h100", help=f"one of {', '.join(gpu_catalogue.CATALOGUE)}")
    p.add_argument("--gpu-spec", help="JSON file describing another GPU (fields of gpus.GPU)")
    p.add_argument("--gpus", default="1,2,4,8,16,32,64,128", help="GPU budgets to try")
    p.add_argument("--tbt-slo", help="target time per output token, e.g. 30ms")
    p.add_argument("--ttft-slo", help="target time to first token, e.g. 10min")
    p.add_argument("--prefill-chunk", default="8192", help="prefill chunk in tokens (8192)")
    p.add_argument("--calibrate", metavar="BENCH.json",
                   help="fit per-step overhead, bandwidth and collective latency to "
                        "benchmarks/decode_step.py output")
    p.add_argument("--calibrate-model", help="model the benchmark ran (default: the embedded one)")
    p.add_argument("--calibrate-fit", default=",".join(DEFAULT_FIT), metavar="CONSTANTS",
                   help=f"constants to fit, comma-separated (default {','.join(DEFAULT_FIT)}; "
                        f"also flops, given rows of several models)")
    p.add_argument("--calibrate-mode", choices=cm.MODES, default="owner",
                   help="execution mode the benchmark ran in (default: owner, what the plugin runs)")
    p.add_argument("--save-spec", metavar="FILE.json",
                   help="write the hardware constants predicted with (calibrated, if asked) as a "
                        "spec file, for --gpu-spec and the plugin's --kvp-device")
    p.add_argument("--mode", choices=(*cm.MODES, "all"), default="owner",
                   help="execution mode to predict: owner (each token computed on the rank that "
                        "holds its KV: what the plugin runs, the default), replicated (every KV "
                        "rank runs every token: for comparison) or all")
    p.add_argument("--json", action="store_true", help="print every candidate as JSON, best first")
    p.add_argument("--all", action="store_true", help="table: every candidate, not the best per budget")
    p.add_argument("--plot", metavar="FILE.png", help="time per token against context, per layout")
    return p


def hardware(args) -> tuple[cm.Hardware, cm.Hardware, str]:
    """(effective, peak, description) for the chosen GPU, calibrated when asked."""
    gpu = gpu_catalogue.load_gpu_spec(args.gpu_spec) if args.gpu_spec else gpu_catalogue.get_gpu(args.gpu)
    hw, note = gpu.effective(), gpu.name
    if args.calibrate:
        from vllm_kvp.planner import calibrate

        rows = calibrate.load_rows(args.calibrate)
        measured_model = bench_model(args.calibrate_model)
        fitted = tuple(c.strip() for c in args.calibrate_fit.split(",") if c.strip())
        hw = calibrate.fit(rows, measured_model, hw, args.calibrate_mode, fitted)
        note += (f", calibrated on {args.calibrate}: HBM {hw.hbm_bw / 1e9:.1f} GB/s, hop "
                 f"{hw.intra_latency * 1e6:.1f} us, step overhead {hw.step_overhead * 1e3:.2f} ms")
    return hw, gpu.peak(), note


def save_spec(hw: cm.Hardware, name: str, path: str) -> None:
    """`hw` as a spec file `gpus.load_gpu_spec` reads back as it is (achieved rates: measured)."""
    spec = {"name": name, **dataclasses.asdict(hw), "measured": True}
    try:
        Path(path).write_text(json.dumps(spec, indent=1) + "\n")
    except OSError as e:
        raise PlanError(f"cannot write --save-spec {path}: {e}") from None


def bench_model(path: str | None) -> cm.ModelShape:
    """The model a decode benchmark ran: `path`, else the embedded default model (built or not)."""
    if path:
        return load_model(path)
    from vllm_kvp.model import ARCH, DEFAULT_MODEL_DIR

    config = DEFAULT_MODEL_DIR.expanduser() / "config.json"
    if config.is_file():
        return load_model(str(config))
    return shape_from_config({**ARCH, "dtype": "float32"}, "embedded model")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `vllm-kvp plan`; errors are one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    from vllm_kvp.planner import report as planner_report
    from vllm_kvp.planner.calibrate import CalibrationError

    try:
        m = load_model(args.model)
        contexts = parse_counts(args.context, "--context")
        gpu_counts = parse_counts(args.gpus, "--gpus")
        slo = SLO(tpot=parse_duration(args.tbt_slo, "--tbt-slo") if args.tbt_slo else None,
                  ttft=parse_duration(args.ttft_slo, "--ttft-slo") if args.ttft_slo else None)
        chunk = parse_count(args.prefill_chunk, "--prefill-chunk")
        hw, peak, note = hardware(args)
        if args.save_spec:
            save_spec(hw, note.split(",")[0], args.save_spec)
        modes = cm.MODES if args.mode == "all" else (args.mode,)
        rows = plan(m, hw, peak, args.model, contexts, gpu_counts, slo, chunk, modes)
        if args.plot:
            planner_report.plot(rows, m, hw, args.plot)
    except (PlanError, CalibrationError, gpu_catalogue.GPUSpecError, ImportError) as e:
        print(f"vllm-kvp plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(planner_report.table(rows, m, note, slo, every=args.all))
    return 0
