#!/usr/bin/env python
"""Where a long prefill spends its time, per worker: torch profiler tables for each layout.

    python benchmarks/profile_prefill.py --layouts tp2,kvp2-striped --out bench_results/profile

One engine per layout (its own process and CPU binding, as in `owner_computes.py`): a warm-up
prompt, one timed prefill of --len tokens, then the same length again (a fresh prompt) under the
torch profiler. Each worker writes `<worker>.profiler_out.txt` (operators by self CPU time) in
--out/<layout>/; this script prints the top rows of each and the timed TTFTs. The profiler adds
overhead of its own: compare layouts by the shares of their tables, and by the unprofiled TTFT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from owner_computes import LAYOUTS, _engine, _generate, _prompts  # noqa: E402


def child(layout: str, model: str, length: int, chunk: int, out: Path) -> dict:
    extra = dict(LAYOUTS[layout][1])
    extra["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(out),
                                "torch_profiler_with_stack": False,
                                "torch_profiler_use_gzip": True}
    llm = _engine(model, extra, length + 64, chunk)
    _generate(llm, _prompts(1, 512, 1), 1)
    ttft = [_generate(llm, _prompts(1, length, 2 + i), 1) for i in range(2)]
    llm.start_profile()
    profiled = _generate(llm, _prompts(1, length, 9), 1)
    llm.stop_profile()
    return {"ttft_s": ttft, "profiled_s": profiled}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/vllm_kvp/models/bench"))
    ap.add_argument("--layouts", default="tp2,kvp2-striped")
    ap.add_argument("--len", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default="bench_results/profile")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out = Path(args.out) / args.child
        print("RESULT " + json.dumps(child(args.child, args.model, args.len, args.chunk, out)),
              flush=True)
        return 0
    for layout in args.layouts.split(","):
        out = Path(args.out).resolve() / layout
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=LAYOUTS[layout][0])
        cmd = [sys.executable, __file__, "--child", layout, "--model", args.model, "--len",
               str(args.len), "--chunk", str(args.chunk), "--out", str(Path(args.out).resolve())]
        time.sleep(5)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{layout} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        print(f"== {layout}: {lines[-1][len('RESULT '):]}")
        for table in sorted(out.glob("*.profiler_out.txt")):
            print(f"-- {table.name}")
            print("\n".join(table.read_text().splitlines()[: args.rows + 4]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
