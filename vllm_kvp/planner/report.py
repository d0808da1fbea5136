"""Rendering of `vllm-kvp plan` results: the text table and the PNG (matplotlib, imported lazily)."""

from __future__ import annotations

from vllm_kvp.planner import cost_model as cm

MODE_NAMES = {"replicated": "replicated", "owner": "owner computes"}
_COLUMNS = ("gpus", "tp", "pp", "kvp", "placement", "tokens/rank", "mode", "weights/GPU", "KV/GPU",
            "fits", "TTFT", "ms/token", "floor", "SLO")


def human_seconds(s: float) -> str:
    """0.25 -> "250 ms", 75 -> "1.2 min", 7200 -> "2.0 h"."""
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _slo_text(slo) -> str:
    parts = []
    if slo.tpot is not None:
        parts.append(f"time/token <= {slo.tpot * 1e3:g} ms")
    if slo.ttft is not None:
        parts.append(f"TTFT <= {human_seconds(slo.ttft)}")
    return ", ".join(parts) if parts else "none (every layout that fits meets it)"


def _cells(r: dict) -> tuple:
    return (r["gpus"], r["tp"], r["pp"], r["kvp"], r["placement"], f"{r['max_tokens_per_rank']:,}",
            MODE_NAMES[r["mode"]], f"{r['weights_gb_per_gpu']:.1f} GB", f"{r['kv_gb_per_gpu']:.1f} GB",
            "yes" if r["fits"] else "no", human_seconds(r["ttft_s"]), f"{r['tpot_ms']:.2f}",
            f"{r['tpot_floor_ms']:.2f}", "ok" if r["meets_slo"] else "-")


def shown_rows(rows: list[dict], every: bool) -> list[dict]:
    """All rows, or (default) the best of each (GPU budget, mode), keeping the rank order."""
    if every:
        return rows
    seen, out = set(), []
    for r in rows:
        if (r["gpus"], r["mode"]) not in seen:
            seen.add((r["gpus"], r["mode"]))
            out.append(r)
    return out


def table(rows: list[dict], m: cm.ModelShape, gpu_note: str, slo, every: bool = False) -> str:
    """The planner's text report: one table per context, then the best command per mode."""
    lines = [f"model: {m.params / 1e9:.2f} B params ({m.weight_bytes / 1e9:.1f} GB), {m.layers} "
             f"layers, KV {m.kv_bytes_per_token:,} B/token; GPU: {gpu_note}",
             f"SLO: {_slo_text(slo)}; floor = datasheet bandwidth, no latency"]
    for context in dict.fromkeys(r["context"] for r in rows):
        group = [r for r in rows if r["context"] == context]
        shown = [_cells(r) for r in shown_rows(group, every)]
        widths = [max(len(str(c)) for c in col) for col in zip(_COLUMNS, *shown)]
        lines += ["", f"context {context:,} tokens: KV {context * m.kv_bytes_per_token / 1e9:,.1f} "
                      f"GB per request"]
        for cells in (_COLUMNS, *shown):
            lines.append("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)))
        for mode in cm.MODES:
            best = next((r for r in group if r["mode"] == mode and r["fits"]), None)
            if best is None:
                continue
            verdict = "best" if best["meets_slo"] else "no layout meets the SLO; fastest of the fewest GPUs"
            lines.append(f"{verdict} ({MODE_NAMES[mode]}): {best['command']}")
    if len({r["mode"] for r in rows}) > 1:
        lines.append("(the plugin runs owner computes; replicated rows are for comparison)")
    return "\n".join(lines)


def plot(rows: list[dict], m: cm.ModelShape, hw: cm.Hardware, path: str, curves: int = 10) -> None:
    """PNG of predicted time per token against context for the best layout of each GPU budget and
    mode at the largest context asked for; each curve stops where its KV no longer fits."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib (install the `bench` extra)") from None
    top = max(r["context"] for r in rows)
    chosen = [r for r in shown_rows([r for r in rows if r["context"] == top], False) if r["fits"]]
    xs = [int(top * 2.0 ** (k / 4)) for k in range(-40, 1)]
    xs = [x for x in xs if x >= 1024]
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in chosen[:curves]:
        layout = cm.Layout(r["tp"], r["pp"], r["kvp"], r["placement"])
        capacity = r["kv_capacity_tokens_per_rank"]
        pts = [(x, 1e3 * cm.decode_step_time(m, hw, layout, x, r["mode"])) for x in xs
               if cm.tokens_per_rank(layout, x) <= capacity]
        if pts:
            ax.plot(*zip(*pts), "-" if r["mode"] == "replicated" else "--",
                    label=f"{r['gpus']} GPUs tp{r['tp']} pp{r['pp']} kvp{r['kvp']} {r['placement']}, "
                          f"{MODE_NAMES[r['mode']]}")
    ax.set_xscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("predicted time per output token (ms)")
    ax.set_title(f"{m.params / 1e9:.1f}B params, KV {m.kv_bytes_per_token:,} B/token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
