"""GPU catalogue for the capacity planner: datasheet peaks, and the effective rates predictions use.

Datasheet values (vendor product pages, SXM parts, dense bf16 without sparsity). Link bandwidths are
per GPU and per direction: NVLink "900 GB/s" is the two directions together, so 450 GB/s each way;
InfiniBand "400 Gb/s" per GPU is 50 GB/s. Per-hop latencies are not on datasheets: they are the
small-message latencies one typically measures with NCCL (a few microseconds per hop), and are
the first constants `--calibrate` replaces. So is the per-step overhead (host-side scheduling,
input preparation and sampling around each engine step), which no datasheet gives either.

A custom GPU comes from `--gpu-spec FILE.json` with the same field names as `GPU`, in SI units
(bytes, bytes/s, FLOP/s, seconds).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from vllm_kvp.planner.cost_model import Hardware

GB = 1e9
TB = 1e12

# Datasheet peaks are not reached by real kernels; these are typical achieved fractions
# (memory-bound decode streams at ~80% of HBM bandwidth, large bf16 GEMMs/attention reach ~50%).
HBM_EFFICIENCY = 0.8
FLOPS_EFFICIENCY = 0.5
# vLLM's host-side work per decode step with CUDA graphs: a few hundred microseconds.
STEP_OVERHEAD = 0.5e-3
# The CPU host (see CPU_HOST): weight bytes/s and fp32 FLOP/s of a decode step, all-gather
# bytes/s received.
CPU_WEIGHT_BW = 31.8e9
CPU_FLOPS = 138e9
CPU_ALLGATHER_BW = 6.2e9
CPU_A2A_LATENCY = 0.16e-3  # s per peer of a gloo all-to-all, 3 workers on 2 cores
CPU_A2A_BW = 1.1e9  # bytes/s received through it (sockets: ~1/5 of the shared memory's rate)
# s a shared-memory collective waits per hop, on average, when the workers outnumber the cores:
# its ranks spin until every peer arrives, and a peer that shares a core with a spinning one runs
# only when the scheduler switches (3 workers on 2 cores: 3.0-3.9 ms an all-gather of 2 hops,
# against 0.005-0.2 ms with a core each; gloo's all-to-all blocks instead: 0.27 ms).
CPU_SPIN_WAIT = 1.6e-3


@dataclass(frozen=True)
class GPU:
    """One GPU model. Units: bytes, bytes/s, FLOP/s, seconds."""

    name: str
    memory_bytes: float     # HBM capacity
    hbm_bw: float           # HBM bandwidth, bytes/s
    flops: float            # dense bf16 peak, FLOP/s
    intra_bw: float         # NVLink, bytes/s per GPU per direction
    inter_bw: float         # network between nodes, bytes/s per GPU per direction
    intra_latency: float    # s per hop of a small collective inside a node
    inter_latency: float    # s per hop of a small collective across nodes
    gpus_per_node: int = 8
    step_overhead: float = STEP_OVERHEAD   # s per engine step outside the kernels
    cpus: int = 0           # cores a node's workers share (a CPU host); 0: a device per worker
    measured: bool = False  # the rates are achieved ones already (no efficiency applied)
    a2a_latency: float = 0.0  # s per peer of a small all-to-all; 0: intra_latency
    a2a_bw: float = 0.0     # bytes/s received through an all-to-all; 0: intra_bw
    spin_wait: float = 0.0  # s a spinning collective's hop adds when workers outnumber `cpus`

    def effective(self, hbm_efficiency: float = HBM_EFFICIENCY,
                  flops_efficiency: float = FLOPS_EFFICIENCY) -> Hardware:
        """The rates a prediction uses: peaks times achievable fractions (measured rates as
        they are)."""
        if self.measured:
            hbm_efficiency = flops_efficiency = 1.0
        return Hardware(
            memory_bytes=self.memory_bytes, hbm_bw=self.hbm_bw * hbm_efficiency,
            flops=self.flops * flops_efficiency, intra_bw=self.intra_bw, inter_bw=self.inter_bw,
            intra_latency=self.intra_latency, inter_latency=self.inter_latency,
            gpus_per_node=self.gpus_per_node, step_overhead=self.step_overhead, cpus=self.cpus,
            a2a_latency=self.a2a_latency, a2a_bw=self.a2a_bw, spin_wait=self.spin_wait)

    def peak(self) -> Hardware:
        """Datasheet rates and no latency or overhead: the physical floor of a prediction."""
        return dataclasses.replace(self.effective(1.0, 1.0), intra_latency=0.0, inter_latency=0.0,
                                   step_overhead=0.0, a2a_latency=0.0)


CATALOGUE = {
    # A100 SXM 80 GB: 2.039 TB/s, 312 TFLOP/s bf16, NVLink 600 GB/s, HDR IB 200 Gb/s per GPU.
    "a100": GPU("A100 SXM 80GB", 80 * GB, 2.039 * TB, 312e12, 300 * GB, 25 * GB, 2.0e-6, 5.0e-6),
    # H100 SXM 80 GB: 3.35 TB/s, ~989 TFLOP/s bf16, NVLink 900 GB/s, NDR IB 400 Gb/s per GPU.
    "h100": GPU("H100 SXM 80GB", 80 * GB, 3.35 * TB, 989e12, 450 * GB, 50 * GB, 1.5e-6, 4.0e-6),
    # H200 SXM 141 GB: 4.8 TB/s, ~989 TFLOP/s bf16, NVLink 900 GB/s, NDR IB 400 Gb/s per GPU.
    "h200": GPU("H200 SXM 141GB", 141 * GB, 4.8 * TB, 989e12, 450 * GB, 50 * GB, 1.5e-6, 4.0e-6),
    # B200 (HGX) 180 GB: 8 TB/s, 2.25 PFLOP/s bf16, NVLink 1.8 TB/s, 400 Gb/s per GPU.
    "b200": GPU("B200 180GB", 180 * GB, 8.0 * TB, 2.25e15, 900 * GB, 50 * GB, 1.5e-6, 4.0e-6),
}


# The CPU host the plugin is developed and tested on (2 cores, fp32; one worker per core), with
# rates measured there. The weights' streaming rate and FLOP/s are fitted to decode steps kept on
# their owners and shared (`benchmarks/step_kinds.py`, docs/benchmarks/step_kinds/: on the cost
# model's own terms, so the FLOP/s is one core's stretched by core sharing, and reading weights
# mostly hides behind the GEMMs); per-step overhead and hop latency are the decode calibration's
# (`--calibrate` on docs/benchmarks/decode_step_contexts.json, docs/planner.md); the all-gather
# rate is `benchmarks/cpu_constants.py`'s (two copies per byte received). A CPU engine's step
# policy uses it with the host's core count (`runtime_hardware`); other CPUs: fit your own and
# pass it as `--kvp-device FILE.json` (`vllm-kvp plan --calibrate ... --save-spec` writes one).
# All-to-alls (a scoped step's exchanges, `kvp.exchange_scope`) go through gloo's sockets rather
# than shared memory: `benchmarks/cpu_constants.py --all-to-all` measures their cost per peer,
# and the shared-memory all-gather's with more workers than cores (`spin_wait`).
CPU_HOST = GPU("CPU host", 24 * GB, CPU_WEIGHT_BW, CPU_FLOPS, CPU_ALLGATHER_BW, CPU_ALLGATHER_BW,
               0.113e-3, 0.113e-3, gpus_per_node=1 << 16, step_overhead=0.87e-3, cpus=2,
               measured=True, a2a_latency=CPU_A2A_LATENCY, a2a_bw=CPU_A2A_BW,
               spin_wait=CPU_SPIN_WAIT)
CATALOGUE["cpu"] = CPU_HOST


class GPUSpecError(ValueError):
    """An unknown GPU name or an unusable spec file; the message says which and why."""


def get_gpu(name: str) -> GPU:
    """Catalogue entry by name (case-insensitive, e.g. "h100")."""
    gpu = CATALOGUE.get(name.strip().lower())
    if gpu is None:
        raise GPUSpecError(f"unknown GPU {name!r}; known: {', '.join(CATALOGUE)} "
                           f"(or describe one with --gpu-spec FILE.json)")
    return gpu


def load_gpu_spec(path: str | Path) -> GPU:
    """A GPU from a JSON object with `GPU`'s fields (SI units); `name` and the fields with defaults
    (`gpus_per_node`, `step_overhead`, `cpus`, `measured`) are optional."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GPUSpecError(f"cannot read GPU spec {path}: {e}") from None
    if not isinstance(spec, dict):
        raise GPUSpecError(f"GPU spec {path} must be a JSON object with the fields of a GPU")
    fields = dataclasses.fields(GPU)
    names = [f.name for f in fields]
    optional = {f.name for f in fields if f.default is not dataclasses.MISSING} | {"name"}
    unknown = sorted(set(spec) - set(names))
    missing = [n for n in names if n not in spec and n not in optional]
    if unknown or missing:
        raise GPUSpecError(f"GPU spec {path}: unknown fields {unknown}, missing fields {missing}; "
                           f"fields are {names}")
    spec.setdefault("name", Path(path).stem)
    may_be_zero = ("intra_latency", "inter_latency", "step_overhead", "cpus", "a2a_latency",
                   "a2a_bw", "spin_wait")
    if not isinstance(spec.get("measured", False), bool):
        raise GPUSpecError(f"GPU spec {path}: measured must be true or false, "
                           f"got {spec['measured']!r}")
    for key in names[1:]:
        if key not in spec or key == "measured":
            continue
        value = spec[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
                or (value == 0 and key not in may_be_zero):
            need = "a number >= 0" if key in may_be_zero else "a positive number"
            raise GPUSpecError(f"GPU spec {path}: {key} must be {need}, got {value!r}")
    for key in ("gpus_per_node", "cpus"):
        if key in spec:
            spec[key] = int(spec[key])
    return GPU(**spec)


def runtime_hardware(device: str | None, cuda_name: str | None, cpus: int) -> tuple[Hardware, str]:
    """The hardware constants a KV rank's step policy predicts with, and their name. `device`:
    `kvp.device` (a catalogue name or a spec file, as `--gpu` / `--gpu-spec`); None: the GPU
    named `cuda_name` (the catalogue entry whose key it contains, else H100's rates), or on a CPU
    host (`cuda_name` None) the CPU profile. `cpus`: the host's cores (CPU hosts only)."""
    if device is not None:
        gpu = load_gpu_spec(device) if device.endswith(".json") else get_gpu(device)
    elif cuda_name is None:
        gpu = CPU_HOST
    else:
        lowered = cuda_name.lower()
        gpu = next((g for k, g in CATALOGUE.items() if k != "cpu" and k in lowered),
                   CATALOGUE["h100"])
    if gpu.cpus:
        gpu = dataclasses.replace(gpu, cpus=max(1, cpus))
    return gpu.effective(), gpu.name
