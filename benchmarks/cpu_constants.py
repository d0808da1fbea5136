#!/usr/bin/env python
"""Rates of one core of this CPU host for the step policy's cost model: FP32 GEMM FLOP/s and the
bandwidth of an all-gather's copies.

    python benchmarks/cpu_constants.py [--out docs/benchmarks/cpu_constants.json]

- flops: a [rows x 1024] @ [1024 x 8192] fp32 matmul (the bench model's gate/up projection) on
  one thread, rows = 64..512 (decode batches to prefill chunks); the median FLOP/s. A cross-check
  of the rate `benchmarks/step_kinds.py` fits to whole decode steps (which the profile uses: it
  also carries the core sharing the cost model stretches work by).
- allgather_bw: bytes received per second by one rank of a 2-rank all-gather on shared memory,
  modelled as what it does: the sender copies its slice into a shared buffer and the receiver
  copies it out (two copies per byte received, measured on one thread with buffers larger than
  the caches). `vllm_kvp/planner/gpus.py` (`CPU_ALLGATHER_BW`) holds this host's figure.
Run on a quiet machine, pinned to one core (`taskset -c 1`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _best(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_flops() -> dict:
    w = torch.randn(8192, 1024)
    out = {}
    for rows in (64, 128, 256, 512):
        x = torch.randn(rows, 1024)
        seconds = _best(lambda: torch.nn.functional.linear(x, w))
        out[rows] = 2 * rows * 1024 * 8192 / seconds
    return out


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    src = torch.empty(nbytes // 4)
    src.normal_()
    dst = torch.empty_like(src)
    seconds = _best(lambda: dst.copy_(src))
    return nbytes / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    flops = gemm_flops()
    copy = copy_bandwidth()
    result = {"gemm_flops_by_rows": flops,
              "flops": statistics.median(flops.values()),
              "copy_bytes_per_s": copy, "allgather_bw": copy / 2}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
