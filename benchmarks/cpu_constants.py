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
- a2a_latency, a2a_bw (`--all-to-all`): what a scoped step's exchanges (`kvp.exchange_scope`)
  cost: torch.distributed's all-to-all over gloo (vLLM's shared memory has no all-to-all), 3
  processes pinned round robin to the cores, each sending to one peer. Latency: per peer, from a
  1-row exchange (4 KiB); bandwidth: bytes received per second at 8 MiB. Then vLLM's
  shared-memory all-gather in the same 3 processes (more workers than cores): its mean per hop,
  the scheduler's switches included, is `spin_wait`. `CPU_A2A_LATENCY`, `CPU_A2A_BW` and
  `CPU_SPIN_WAIT` in `vllm_kvp/planner/gpus.py` hold this host's figures.
Run on a quiet machine, pinned to one core (`taskset -c 1`; `--all-to-all` pins its own).
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


def _a2a_worker(rank: int, world: int, port: int, queue) -> None:
    import os

    import torch.distributed as dist

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[rank % len(cores)]})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    width = 1024  # float32 values a row: 4 KiB
    result = {}
    for rows in (1, 2048):
        x = torch.randn(rows, width)
        out = torch.empty(rows, width)
        sends = [rows if p == (rank + 1) % world else 0 for p in range(world)]
        recvs = [rows if p == (rank - 1) % world else 0 for p in range(world)]
        times = []
        for i in range(60):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(out, x, recvs, sends)
            if i >= 10:
                times.append(time.perf_counter() - t0)
        result[rows] = statistics.median(times)
    # vLLM's shared-memory all-gather in the same processes (2 hops with 3 ranks), with a small
    # GEMM between calls as a layer has: the mean, which the scheduler's switches dominate.
    import vllm._C  # noqa: F401  (registers torch.ops._C)

    name = f"kvp-constants-{port}"
    handle = torch.ops._C.init_shm_manager(name, world, rank, 1)
    dist.barrier()
    torch.ops._C.join_shm_manager(handle, name)
    dist.barrier()
    x, w = torch.randn(1, width), torch.randn(64, width)
    out = torch.empty(world, width)
    times = []
    for i in range(120):
        torch.nn.functional.linear(w, w)
        t0 = time.perf_counter()
        torch.ops._C.shm_all_gather(handle, x, out)
        if i >= 20:
            times.append(time.perf_counter() - t0)
    result["shm"] = statistics.mean(times)
    dist.barrier()
    if rank == 0:
        queue.put(result)
    dist.destroy_process_group()


def all_to_all(world: int = 3) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_a2a_worker, args=(r, world, 29611, queue)) for r in range(world)]
    for p in procs:
        p.start()
    times = queue.get()
    for p in procs:
        p.join()
    small, large = times[1], times[2048]
    return {"a2a_world": world, "a2a_small_s": small, "a2a_large_s": large,
            "a2a_latency": small / (world - 1),
            "a2a_bw": 2048 * 1024 * 4 / max(large - small, 1e-9),
            "shm_allgather_mean_s": times["shm"],
            "spin_wait": times["shm"] / (world - 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--all-to-all", action="store_true",
                    help="measure gloo's all-to-all (3 processes) instead")
    args = ap.parse_args()
    if args.all_to_all:
        result = all_to_all()
        print(json.dumps(result, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
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
