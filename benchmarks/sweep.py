"""`make bench`: latency / throughput / per-rank KV memory of vllm_kvp over context length x KV ranks.

    python benchmarks/sweep.py [--model DIR] [--quick] [--contexts 1024,4096,...] [--ranks 1,2,4]
                               [--concurrency 1,8] [--num-prompts K] [--output-len T] [--out-dir DIR]

For every (KV ranks N, context length) pair that fits, one real server is started
(`vllm-kvp serve MODEL --kvp-size N ...`) with a deliberately small KV budget per worker
(`--kv-cache-memory-bytes`), so that the largest context really needs all ranks; it is then driven
by vLLM's own client (`vllm-kvp bench serve --dataset-name random ...`) once per concurrency level.
While a client runs, `/metrics` is polled to record each rank's peak KV blocks in use.

Results: <out-dir>/sweep.csv, <out-dir>/sweep.json, <out-dir>/sweep.png, plus the raw client JSON and
server log of every run under <out-dir>/runs/. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(os.environ.get("VLLM_KVP_MODEL_DIR", "~/.cache/vllm_kvp/models/default")).expanduser()
CPU_BLOCK_SIZE = 128  # vLLM's default KV block size on CPU (checked against the server log)


# --------------------------------------------------------------------------------------------------
# configuration


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory (also the tokenizer)")
    p.add_argument("--contexts", type=parse_int_list,
                   help="prompt lengths in tokens; 'max' is not needed: by default the largest context "
                        "that fits in max(--ranks) ranks is appended (default 1024,4096,8192,+largest; with the default KV budget 4096 fits 1 rank, 8192 needs 2, the largest (17664) needs 4)")
    p.add_argument("--ranks", type=parse_int_list, help="KV ranks N to sweep (default 1,2,4)")
    p.add_argument("--concurrency", type=parse_int_list, help="client --max-concurrency levels (default 1,8)")
    p.add_argument("--num-prompts", type=int,
                   help="requests per client run (default: max(2, concurrency); quick: concurrency)")
    p.add_argument("--output-len", type=int, help="generated tokens per request, fixed with --ignore-eos "
                                                  "(default 32; quick 16)")
    p.add_argument("--kv-tokens-per-rank", type=int,
                   help="KV capacity of each rank in tokens; sets --kv-cache-memory-bytes per worker "
                        "(default 4608 = 36 blocks; quick 2048)")
    p.add_argument("--max-tokens-per-rank", type=int,
                   help="--kvp-max-tokens-per-rank: tokens of one request a rank takes before the "
                        "request onboards another rank (default: --kv-tokens-per-rank)")
    p.add_argument("--placement", default="onboard", choices=("onboard", "striped"))
    p.add_argument("--quick", action="store_true",
                   help="small smoke sweep: 2048-token ranks, contexts 1024,+largest, concurrency 1,4, 16 output tokens")
    p.add_argument("--out-dir", default=str(REPO / "bench_results"))
    p.add_argument("--startup-timeout", type=float, default=420.0, help="seconds to wait for /health")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds one client run may take")
    p.add_argument("--metrics-interval", type=float, default=0.5, help="seconds between /metrics polls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the plot and table from <out-dir>/sweep.json without running anything")
    args = p.parse_args(argv)

    q = args.quick
    args.ranks = sorted(set(args.ranks or [1, 2, 4]))
    args.concurrency = sorted(set(args.concurrency or ([1, 4] if q else [1, 8])))
    args.output_len = args.output_len or (16 if q else 32)
    args.kv_tokens_per_rank = args.kv_tokens_per_rank or (2048 if q else 4608)
    args.max_tokens_per_rank = args.max_tokens_per_rank or args.kv_tokens_per_rank
    args.model = str(Path(args.model).expanduser())
    return args


def model_geometry(model_dir: str) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    layers = cfg["num_hidden_layers"]
    dtype_bytes = 4  # the sweep serves with --dtype float32 (KV cache dtype auto = float32)
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "bytes_per_token": 2 * layers * kv_heads * head_dim * dtype_bytes}


def margin(ctx: int) -> int:
    """Slack for vLLM's random dataset, whose prompt lengths are only approximately the target."""
    return 16 + ctx // 64


def tokens_needed(ctx: int, out: int) -> int:
    return ctx + out + margin(ctx)


def ranks_needed(ctx: int, out: int, blocks_per_rank: int, block_size: int) -> int:
    """Fewest KV ranks whose pooled blocks (less vLLM's one null block) hold one request."""
    blocks = math.ceil(tokens_needed(ctx, out) / block_size)
    return math.ceil((blocks + 1) / blocks_per_rank)


def largest_context(n: int, out: int, blocks_per_rank: int, block_size: int) -> int:
    usable = (n * blocks_per_rank - 1) * block_size - out
    ctx = int((usable - 16) / (1 + 1 / 64))
    ctx -= ctx % 256
    while ctx > 0 and ranks_needed(ctx, out, blocks_per_rank, block_size) > n:
        ctx -= 256
    return ctx


# --------------------------------------------------------------------------------------------------
# server and client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


LIVE: set[subprocess.Popen] = set()  # process groups to kill on any exit


def kill_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Workers may outlive the leader: always sweep the whole group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(timeout=10)
    LIVE.discard(proc)


def kill_all() -> None:
    for proc in list(LIVE):
        kill_group(proc, grace=10.0)


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    interesting = [l for l in text if re.search(r"Error|error|OOM|Killed|Traceback|raise", l)]
    pick = (interesting or text)[-lines:]
    return " | ".join(l.strip()[-240:] for l in pick)


class Server:
    def __init__(self, args, n: int, max_model_len: int, kv_bytes: int, log_path: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [str(VENV_BIN / "vllm-kvp"), "serve", args.model, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
               "--kv-cache-memory-bytes", str(kv_bytes), "--max-model-len", str(max_model_len),
               "--seed", str(args.seed), "--kvp-size", str(n)]
        if n > 1:
            cmd += ["--kvp-max-tokens-per-rank", str(args.max_tokens_per_rank),
                    "--kvp-placement", args.placement]
        self.cmd = cmd
        self.log = open(log_path, "w")
        self.log.write("$ " + " ".join(cmd) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(REPO))
        LIVE.add(self.proc)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {log_tail(self.log_path)}")
            with contextlib.suppress(OSError, ValueError):
                if http_get(self.base + "/health", timeout=2)[0] == 200:
                    return
            if time.time() > deadline:
                raise TimeoutError(f"server not healthy after {timeout:.0f}s: {log_tail(self.log_path)}")
            time.sleep(1)

    def layout(self) -> dict:
        """Block size and blocks per rank, from the plugin's layout line or vLLM's own lines."""
        text = self.log_path.read_text(errors="replace")
        m = re.search(r"vllm_kvp layout: (\d+) KV ranks x (\d+) blocks per rank \((\d+) tokens per rank, "
                      r"block size (\d+)\)", text)
        if m:
            return {"blocks_per_rank": int(m[2]), "block_size": int(m[4]), "source": "vllm_kvp layout"}
        # Plain vLLM (N=1) logs no block count ("KV cache size: X tokens" is max_concurrency x
        # max_model_len, not blocks); its block size is the CPU default unless --block-size is given.
        return {}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        kill_group(self.proc)
        self.log.close()


METRIC_RE = re.compile(r'^(vllm_kvp:[a-z_]+|vllm:kv_cache_usage_perc|vllm:num_requests_running)'
                       r'(?:\{([^}]*)\})?\s+([-+0-9.eEinfNa]+)$')


def scrape(base: str) -> dict:
    """{'rank_used': {rank: v}, 'rank_total': {...}, 'usage': v, 'onboard': v} from /metrics."""
    status, text = http_get(base + "/metrics", timeout=5)
    out: dict = {"rank_used": {}, "rank_total": {}, "usage": None, "onboard": None}
    if status != 200:
        return out
    for line in text.splitlines():
        m = METRIC_RE.match(line.strip())
        if not m:
            continue
        name, labels, value = m[1], m[2] or "", float(m[3])
        rank = re.search(r'rank="(\d+)"', labels)
        if name == "vllm_kvp:rank_kv_cache_blocks_used" and rank:
            out["rank_used"][int(rank[1])] = value
        elif name == "vllm_kvp:rank_kv_cache_blocks_total" and rank:
            out["rank_total"][int(rank[1])] = value
        elif name == "vllm:kv_cache_usage_perc":
            out["usage"] = max(out["usage"] or 0.0, value)
        elif name == "vllm_kvp:onboard_events_total":
            out["onboard"] = value
    return out


class MetricsPoller(threading.Thread):
    """Polls /metrics while a client runs and keeps each rank's peak blocks in use."""

    def __init__(self, base: str, interval: float):
        super().__init__(daemon=True)
        self.base, self.interval = base, interval
        self.stop_event = threading.Event()
        self.peak_used: dict[int, float] = {}
        self.total: dict[int, float] = {}
        self.peak_usage = 0.0
        self.onboard_start = self.onboard_end = None
        self.samples = 0

    def sample(self) -> None:
        with contextlib.suppress(Exception):
            m = scrape(self.base)
            self.samples += 1
            for r, v in m["rank_used"].items():
                self.peak_used[r] = max(self.peak_used.get(r, 0.0), v)
            self.total.update(m["rank_total"])
            if m["usage"] is not None:
                self.peak_usage = max(self.peak_usage, m["usage"])
            if m["onboard"] is not None:
                if self.onboard_start is None:
                    self.onboard_start = m["onboard"]
                self.onboard_end = m["onboard"]

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def finish(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)
        self.sample()


def run_client(args, server: Server, ctx: int, conc: int, num_prompts: int, result_dir: Path,
               name: str) -> tuple[dict | None, str]:
    cmd = [str(VENV_BIN / "vllm-kvp"), "bench", "serve", "--backend", "vllm", "--base-url", server.base,
           "--model", args.model, "--tokenizer", args.model, "--dataset-name", "random",
           "--random-input-len", str(ctx), "--random-output-len", str(args.output_len),
           "--random-range-ratio", "0.0", "--ignore-eos", "--num-prompts", str(num_prompts),
           "--max-concurrency", str(conc), "--request-rate", "inf", "--seed", str(args.seed),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--disable-tqdm", "--save-result", "--result-dir", str(result_dir),
           "--result-filename", name + ".json"]
    log_path = result_dir / (name + ".client.log")
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(REPO))
        LIVE.add(proc)
        try:
            rc = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc, grace=5)
            return None, f"client timed out after {args.run_timeout:.0f}s"
        finally:
            kill_group(proc, grace=5)
    if rc != 0:
        return None, f"client rc={rc}: {log_tail(log_path)}"
    path = result_dir / (name + ".json")
    if not path.exists():
        return None, f"client wrote no result: {log_tail(log_path)}"
    return json.loads(path.read_text()), ""


# --------------------------------------------------------------------------------------------------
# the sweep


@dataclass
class Row:
    ranks: int
    context: int
    concurrency: int
    status: str = "ok"
    error: str = ""
    num_prompts: int = 0
    completed: int = 0
    failed: int = 0
    mean_input_len: float = math.nan
    output_len: int = 0
    duration_s: float = math.nan
    request_throughput: float = math.nan
    output_throughput: float = math.nan
    total_token_throughput: float = math.nan
    ttft_mean_ms: float = math.nan
    ttft_median_ms: float = math.nan
    ttft_p99_ms: float = math.nan
    tpot_mean_ms: float = math.nan
    tpot_median_ms: float = math.nan
    tpot_p99_ms: float = math.nan
    itl_mean_ms: float = math.nan
    itl_median_ms: float = math.nan
    itl_p99_ms: float = math.nan
    e2el_mean_ms: float = math.nan
    ranks_used: float = math.nan
    onboard_events: float = math.nan
    kv_usage_peak: float = math.nan
    block_size: int = 0
    bytes_per_block: int = 0
    kv_blocks_total_per_rank: float = math.nan
    kv_blocks_peak_per_rank: list = field(default_factory=list)
    kv_mib_peak_per_rank: list = field(default_factory=list)
    kv_mib_peak_max_rank: float = math.nan
    kv_mib_peak_total: float = math.nan
    server_start_s: float = math.nan
    wall_s: float = math.nan


def fill_from_result(row: Row, res: dict) -> None:
    row.completed = int(res.get("completed", 0))
    row.failed = int(res.get("failed", max(0, row.num_prompts - row.completed)))
    if row.completed:
        row.mean_input_len = res.get("total_input_tokens", 0) / row.completed
    row.duration_s = res.get("duration", math.nan)
    for k in ("request_throughput", "output_throughput", "total_token_throughput"):
        setattr(row, k, res.get(k, math.nan))
    for metric in ("ttft", "tpot", "itl"):
        setattr(row, f"{metric}_mean_ms", res.get(f"mean_{metric}_ms", math.nan))
        setattr(row, f"{metric}_median_ms", res.get(f"median_{metric}_ms", math.nan))
        setattr(row, f"{metric}_p99_ms", res.get(f"p99_{metric}_ms", math.nan))
    row.e2el_mean_ms = res.get("mean_e2el_ms", math.nan)
    if row.completed < row.num_prompts:
        row.status = "partial"
        errs = [e for e in res.get("errors", []) if e][:1]
        row.error = f"{row.num_prompts - row.completed} request(s) failed" + (f": {errs[0][:200]}" if errs else "")


def fill_kv(row: Row, poller: MetricsPoller, layout: dict, bytes_per_token: int, n: int,
            blocks_per_rank: int) -> None:
    bs = layout.get("block_size", CPU_BLOCK_SIZE)
    row.block_size = bs
    row.bytes_per_block = bytes_per_token * bs
    mib = row.bytes_per_block / 2**20
    if n > 1 and poller.peak_used:
        peaks = [poller.peak_used.get(r, 0.0) for r in range(n)]
        row.kv_blocks_total_per_rank = max(poller.total.values()) if poller.total else blocks_per_rank
        if poller.onboard_start is not None:
            row.onboard_events = poller.onboard_end - poller.onboard_start
    else:
        # N=1 (or no vllm_kvp series): vLLM's usage fraction, which counts all blocks but the null one.
        total = blocks_per_rank
        row.kv_blocks_total_per_rank = total
        peaks = [round(poller.peak_usage * (total - 1), 1)] if n == 1 else []
    row.kv_usage_peak = poller.peak_usage
    row.kv_blocks_peak_per_rank = peaks
    row.kv_mib_peak_per_rank = [round(b * mib, 3) for b in peaks]
    if peaks:
        row.kv_mib_peak_max_rank = max(row.kv_mib_peak_per_rank)
        row.kv_mib_peak_total = round(sum(row.kv_mib_peak_per_rank), 3)
        row.ranks_used = sum(1 for b in peaks if b > 0)


def fmt_s(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60}m{s % 60:02d}s"


def run_sweep(args) -> list[Row]:
    geo = model_geometry(args.model)
    bs = CPU_BLOCK_SIZE
    blocks_per_rank = math.ceil(args.kv_tokens_per_rank / bs)
    kv_bytes = blocks_per_rank * bs * geo["bytes_per_token"]
    max_n = max(args.ranks)
    contexts = args.contexts
    if not contexts:
        base = [1024] if args.quick else [1024, 4096, 8192]
        largest = largest_context(max_n, args.output_len, blocks_per_rank, bs)
        contexts = sorted({c for c in base if c < largest} | {largest})
    contexts = sorted(set(contexts))

    out_dir = Path(args.out_dir)
    run_dir = out_dir / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)

    def prompts_for(c: int) -> int:
        return args.num_prompts or (c if args.quick else max(2, c))

    # Plan: one server per (N, context) that fits; skipped pairs become rows straight away.
    plan, rows = [], []
    for n in args.ranks:
        for ctx in contexts:
            need = ranks_needed(ctx, args.output_len, blocks_per_rank, bs)
            if need > n:
                for c in args.concurrency:
                    rows.append(Row(n, ctx, c, status="skip",
                                    error=f"needs {need} ranks ({tokens_needed(ctx, args.output_len)} tokens "
                                          f"> {n} x {blocks_per_rank * bs})"))
            else:
                plan.append((n, ctx))

    print(f"model {args.model}: {geo['layers']} layers x {geo['kv_heads']} KV heads x {geo['head_dim']} dims "
          f"x fp32 -> {geo['bytes_per_token']} B/token, {geo['bytes_per_token'] * bs // 1024} KiB/block "
          f"(block size {bs})")
    print(f"KV per rank: {blocks_per_rank} blocks = {blocks_per_rank * bs} tokens = "
          f"--kv-cache-memory-bytes {kv_bytes} ({kv_bytes / 2**20:.1f} MiB); "
          f"--kvp-max-tokens-per-rank {args.max_tokens_per_rank}; placement {args.placement}")
    print(f"contexts {contexts}, ranks {args.ranks}, concurrency {args.concurrency}, "
          f"output {args.output_len} tokens, prompts per run "
          f"{ {c: prompts_for(c) for c in args.concurrency} }")
    print(f"{len(plan)} servers x {len(args.concurrency)} client runs; "
          f"{sum(1 for r in rows if r.status == 'skip')} runs skipped (context does not fit)\n")
    if args.dry_run:
        for n, ctx in plan:
            print(f"  N={n} ctx={ctx} max-model-len={tokens_needed(ctx, args.output_len)}")
        return rows

    # ETA: a simple cost model (start-up + prefill, quadratic in context) rescaled by measured time.
    def cost(n: int, ctx: int, c: int | None) -> float:
        if c is None:
            return 60.0 + 10.0 * n  # server start
        return prompts_for(c) * (ctx / 2000 + (ctx / 8000) ** 2 + args.output_len * 0.02) + 2
    total_cost = sum(cost(n, ctx, None) + sum(cost(n, ctx, c) for c in args.concurrency) for n, ctx in plan)
    done_cost = 0.0
    t_start = time.time()
    k, k_total = 0, len(plan) * len(args.concurrency)

    def progress(msg: str) -> None:
        elapsed = time.time() - t_start
        eta = elapsed / done_cost * (total_cost - done_cost) if done_cost else float("nan")
        eta_s = fmt_s(eta) if eta == eta else "?"
        print(f"[{k:>2}/{k_total}] elapsed {fmt_s(elapsed)} ETA {eta_s:>6}  {msg}", flush=True)

    for n, ctx in plan:
        tag = f"n{n}_ctx{ctx}"
        t0 = time.time()
        max_model_len = tokens_needed(ctx, args.output_len)
        server = Server(args, n, max_model_len, kv_bytes, run_dir / f"{tag}.server.log")
        progress(f"starting server N={n} ctx={ctx} (max-model-len {max_model_len}) on port {server.port}")
        try:
            start_err = ""
            try:
                server.wait_healthy(args.startup_timeout)
            except (RuntimeError, TimeoutError) as e:
                start_err = f"server failed to start: {e}"
            start_s = time.time() - t0
            done_cost += cost(n, ctx, None)
            layout = server.layout()
            if layout and layout["block_size"] != bs:
                print(f"  note: server block size {layout['block_size']} != assumed {bs}; "
                      f"KV bytes use the server's value", flush=True)
            for c in args.concurrency:
                k += 1
                row = Row(n, ctx, c, num_prompts=prompts_for(c), output_len=args.output_len,
                          server_start_s=round(start_s, 1))
                t1 = time.time()
                if start_err or not server.alive():
                    row.status, row.error = "error", start_err or f"server died: {log_tail(server.log_path)}"
                else:
                    poller = MetricsPoller(server.base, args.metrics_interval)
                    poller.start()
                    res, err = run_client(args, server, ctx, c, row.num_prompts, run_dir, f"{tag}_c{c}")
                    poller.finish()
                    if res is not None:
                        fill_from_result(row, res)
                    else:
                        row.status, row.error = "error", err
                    if not server.alive():
                        row.status = "error"
                        row.error = (row.error + "; " if row.error else "") + \
                            f"server died (rc={server.proc.returncode}): {log_tail(server.log_path)}"
                    fill_kv(row, poller, layout, geo["bytes_per_token"], n,
                            layout.get("blocks_per_rank", blocks_per_rank))
                row.wall_s = round(time.time() - t1, 1)
                done_cost += cost(n, ctx, c)
                rows.append(row)
                kv = "/".join(f"{m:.1f}" for m in row.kv_mib_peak_per_rank) or "-"
                if row.status in ("ok", "partial"):
                    progress(f"N={n} ctx={ctx:>6} c={c}: TTFT {row.ttft_mean_ms:9.1f} ms  TPOT "
                             f"{row.tpot_mean_ms:7.1f} ms  {row.output_throughput:7.1f} out tok/s  "
                             f"KV MiB/rank {kv}  ({row.wall_s:.0f}s){'  PARTIAL' if row.status == 'partial' else ''}")
                else:
                    progress(f"N={n} ctx={ctx:>6} c={c}: ERROR {row.error[:300]}")
                write_results(rows, out_dir, args, contexts, blocks_per_rank, kv_bytes)  # incremental
        finally:
            server.stop()
    return rows


# --------------------------------------------------------------------------------------------------
# output


def rows_frame(rows: list[Row]):
    import pandas as pd

    df = pd.DataFrame([r.__dict__ for r in rows])
    if df.empty:
        return df
    return df.sort_values(["concurrency", "ranks", "context"]).reset_index(drop=True)


def write_results(rows: list[Row], out_dir: Path, args, contexts, blocks_per_rank, kv_bytes) -> None:
    df = rows_frame(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_df = df.copy()
    for col in ("kv_blocks_peak_per_rank", "kv_mib_peak_per_rank"):
        if col in csv_df:
            csv_df[col] = csv_df[col].map(lambda v: "/".join(f"{x:g}" for x in v))
    csv_df.to_csv(out_dir / "sweep.csv", index=False)
    meta = {"model": args.model, "contexts": contexts, "ranks": args.ranks, "concurrency": args.concurrency,
            "output_len": args.output_len, "kv_tokens_per_rank": blocks_per_rank * CPU_BLOCK_SIZE,
            "kv_cache_memory_bytes_per_worker": kv_bytes, "kvp_max_tokens_per_rank": args.max_tokens_per_rank,
            "placement": args.placement}
    recs = json.loads(df.to_json(orient="records")) if not df.empty else []
    (out_dir / "sweep.json").write_text(json.dumps({"config": meta, "runs": recs}, indent=1))


def plot(rows: list[Row], path: Path, kv_cap_mib: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    df = rows_frame(rows)
    ok = df[df.status.isin(["ok", "partial"])] if not df.empty else df
    concs = sorted(df.concurrency.unique()) if not df.empty else []
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    colors = {n: f"C{i}" for i, n in enumerate(sorted(df.ranks.unique()) if not df.empty else [])}
    styles = ["-", "--", ":", "-."]
    for ax, metric, title in ((axes[0], "ttft_mean_ms", "TTFT (mean) vs context"),
                              (axes[1], "tpot_mean_ms", "TPOT (mean) vs context")):
        for i, c in enumerate(concs):
            for n in sorted(colors):
                d = ok[(ok.ranks == n) & (ok.concurrency == c)].sort_values("context")
                if len(d):
                    ax.plot(d.context, d[metric], styles[i % 4], marker="o", color=colors[n],
                            label=f"N={n}, conc={c}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel(("TTFT" if metric.startswith("ttft") else "TPOT") + " mean (ms, log)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    # Per-rank KV memory: peak MiB on each rank for every (N, context); filled bars at the lowest
    # concurrency (how one request spreads), black outlines at the highest (the pool under load).
    ax = axes[2]
    c_lo, c_hi = (concs[0], concs[-1]) if concs else (1, 1)
    pairs = ok[["ranks", "context"]].drop_duplicates().sort_values(["ranks", "context"])
    x, ticks, seen = 0.0, [], set()
    for n, ctx in pairs.itertuples(index=False):
        for c, filled in ((c_lo, True), (c_hi, False)):
            if not filled and c_hi == c_lo:
                continue
            sel = ok[(ok.ranks == n) & (ok.context == ctx) & (ok.concurrency == c)]
            vals = list(sel.iloc[0].kv_mib_peak_per_rank or []) if len(sel) else []
            w = 0.8 / max(1, n)
            for j, v in enumerate(vals):
                if filled:
                    lab = f"rank {j}" if f"rank {j}" not in seen else None
                    seen.add(f"rank {j}")
                    ax.bar(x + j * w, v, w, color=f"C{j}", label=lab)
                else:
                    lab = f"conc={c_hi} (outline)" if "hi" not in seen else None
                    seen.add("hi")
                    ax.bar(x + j * w, v, w, fill=False, edgecolor="k", lw=0.8, label=lab)
        ticks.append((x + 0.4 - 0.4 / max(1, n), f"N={n}\n{ctx}"))
        x += 1.2
    ax.axhline(kv_cap_mib, color="k", ls="--", lw=1, label=f"rank capacity {kv_cap_mib:.1f} MiB")
    ax.set_xticks([t for t, _ in ticks], [l for _, l in ticks], fontsize=7)
    ax.set_ylabel("peak KV memory per rank (MiB)")
    ax.set_title(f"per-rank KV memory (peak; filled conc={c_lo})")
    ax.legend(fontsize=7, loc="upper left")
    skipped = df[df.status == "skip"][["ranks", "context"]].drop_duplicates() if not df.empty else []
    if len(skipped):
        txt = "not fitting (skipped): " + ", ".join(f"N={a}@{b}" for a, b in skipped.itertuples(index=False))
        fig.text(0.01, 0.01, txt, fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[Row]) -> str:
    df = rows_frame(rows)
    if df.empty:
        return "(no runs)"
    lines = []
    hdr = (f"{'N':>2} {'ctx':>6} {'conc':>4} {'status':>7} {'in_len':>7} {'ok/n':>5} {'TTFT mean/p50/p99 ms':>26} "
           f"{'TPOT mean/p99 ms':>17} {'ITL mean/p50/p99 ms':>22} {'out tok/s':>9} {'req/s':>6} "
           f"{'ranks':>5} {'peak KV MiB per rank':>22}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    f = lambda v, p=0: "-" if v != v else f"{v:.{p}f}"  # noqa: E731
    for _, r in df.iterrows():
        if r.status == "skip":
            lines.append(f"{r.ranks:>2} {r.context:>6} {r.concurrency:>4} {'skip':>7}  {r.error}")
            continue
        if r.status == "error":
            lines.append(f"{r.ranks:>2} {r.context:>6} {r.concurrency:>4} {'ERROR':>7}  {r.error[:200]}")
            continue
        kv = "/".join(f"{m:.2f}" for m in r.kv_mib_peak_per_rank) or "-"
        lines.append(
            f"{r.ranks:>2} {r.context:>6} {r.concurrency:>4} {r.status:>7} {f(r.mean_input_len):>7} "
            f"{r.completed:>2}/{r.num_prompts:<2} "
            f"{f(r.ttft_mean_ms):>8}/{f(r.ttft_median_ms):>8}/{f(r.ttft_p99_ms):>8} "
            f"{f(r.tpot_mean_ms, 1):>8}/{f(r.tpot_p99_ms, 1):>8} "
            f"{f(r.itl_mean_ms, 1):>7}/{f(r.itl_median_ms, 1):>6}/{f(r.itl_p99_ms, 1):>7} "
            f"{f(r.output_throughput, 1):>9} {f(r.request_throughput, 3):>6} {f(r.ranks_used):>5} {kv:>22}")
        if r.status == "partial":
            lines.append(f"{'':>22}{r.error[:200]}")
    return "\n".join(lines)


def load_rows(out_dir: Path) -> list[Row]:
    data = json.loads((out_dir / "sweep.json").read_text())
    fields_ = Row.__dataclass_fields__
    return [Row(**{k: (math.nan if v is None and fields_[k].type == "float" else v)
                   for k, v in r.items() if k in fields_}) for r in data["runs"]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (Path(args.model) / "config.json").exists():
        print(f"error: no model in {args.model} (build it: vllm-kvp make-model {args.model})", file=sys.stderr)
        return 2
    # SIGTERM (e.g. from `timeout`) takes the same clean-up path as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # A background job of a non-interactive shell starts with SIGINT ignored; Ctrl-C must still work.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.time()
    rows: list[Row] = []
    interrupted = False
    if args.plot_only:
        rows = load_rows(Path(args.out_dir))
        blocks = math.ceil(args.kv_tokens_per_rank / CPU_BLOCK_SIZE)
        cap = json.loads((Path(args.out_dir) / "sweep.json").read_text())["config"].get(
            "kv_cache_memory_bytes_per_worker", blocks * CPU_BLOCK_SIZE * model_geometry(args.model)["bytes_per_token"])
        plot(rows, Path(args.out_dir) / "sweep.png", cap / 2**20)
        print(summary(rows) + f"\n\nplot: {Path(args.out_dir) / 'sweep.png'}")
        return 0
    try:
        rows = run_sweep(args)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping servers ...", file=sys.stderr)
    finally:
        kill_all()
    if args.dry_run:
        return 0
    out_dir = Path(args.out_dir)
    if not rows and (out_dir / "sweep.json").exists() and interrupted:
        # rows written incrementally survive an interrupt; reload them for the table and plot
        rows = load_rows(out_dir)
    geo = model_geometry(args.model)
    blocks_per_rank = math.ceil(args.kv_tokens_per_rank / CPU_BLOCK_SIZE)
    kv_bytes = blocks_per_rank * CPU_BLOCK_SIZE * geo["bytes_per_token"]
    if rows:
        write_results(rows, out_dir, args, args.contexts or sorted({r.context for r in rows}),
                      blocks_per_rank, kv_bytes)
        with contextlib.suppress(Exception):
            plot(rows, out_dir / "sweep.png", kv_bytes / 2**20)
    print("\n" + summary(rows))
    print(f"\n{'interrupted after' if interrupted else 'sweep took'} {fmt_s(time.time() - t0)}; "
          f"results: {out_dir / 'sweep.csv'}, {out_dir / 'sweep.json'}, {out_dir / 'sweep.png'}")
    errors = sum(1 for r in rows if r.status in ("error", "partial"))
    if errors:
        print(f"{errors} run(s) failed or were partial; see the table and {out_dir / 'runs'}")
    return 130 if interrupted else (1 if errors else 0)


if __name__ == "__main__":
    sys.exit(main())
