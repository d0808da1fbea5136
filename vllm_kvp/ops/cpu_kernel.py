"""The C++ CPU kernel of :func:`vllm_kvp.ops.paged_attention.paged_attention_lse`, built on first use.

``vllm_kvp/csrc/paged_attention_cpu.cpp`` (with ``step_routing_cpu.cpp``, a step's routing) is compiled with ``torch.utils.cpp_extension.load``
(-O3 -march=native -fopenmp) into ``~/.cache/vllm_kvp/torch_extensions/<name>`` (or
``$VLLM_KVP_EXTENSIONS_DIR``), once per machine: the name carries a hash of the source, the torch and
Python versions and the CPU's feature flags, so a home directory shared by different hosts or
environments never loads a build made for another. Worker processes that start together wait on
torch's file lock in that directory while one of them compiles; the others then load its result.

The kernel runs on ATen's thread pool (``at::parallel_for``), so ``torch.set_num_threads`` and the
thread binding vLLM's CPU workers apply hold for it too. If the build or the load fails (no compiler,
no ninja, ...), one warning is issued and :func:`paged_attention_lse_cpu` returns None for every call,
which sends the caller to the torch implementation. ``VLLM_KVP_CPU_KERNEL=0`` skips the kernel.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys
import threading
import warnings

import torch

__all__ = ["load", "merge_gathered_rows_cpu", "paged_attention_lse_cpu", "step_routing_cpu", "supported",
           "write_kv_rank_cpu"]

_CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = [_CSRC / "paged_attention_cpu.cpp", _CSRC / "step_routing_cpu.cpp"]
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_lock = threading.Lock()
_module = None
_failed: str | None = None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    import platform

    return platform.processor() + platform.machine()


def _build_name_and_dir() -> tuple[str, str]:
    h = hashlib.sha256()
    for part in (*(src.read_bytes() for src in _SOURCES), torch.__version__.encode(), sys.version.encode(),
                 _cpu_flags().encode(), " ".join(_CFLAGS).encode()):
        h.update(part)
    name = f"vllm_kvp_paged_attention_cpu_{h.hexdigest()[:16]}"
    root = os.environ.get("VLLM_KVP_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "vllm_kvp", "torch_extensions")
    return name, os.path.join(root, name)


def load(verbose: bool = False):
    """The compiled module, building it on the first call; None (after one warning) if it cannot be
    built or loaded, or if VLLM_KVP_CPU_KERNEL=0."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        if os.environ.get("VLLM_KVP_CPU_KERNEL", "1") == "0":
            _failed = "disabled by VLLM_KVP_CPU_KERNEL=0"
            return None
        try:
            from torch.utils import cpp_extension

            name, build_dir = _build_name_and_dir()
            os.makedirs(build_dir, exist_ok=True)
            _module = cpp_extension.load(name=name, sources=[str(src) for src in _SOURCES], extra_cflags=_CFLAGS,
                                         extra_ldflags=["-fopenmp"], build_directory=build_dir, verbose=verbose)
        except Exception as e:  # noqa: BLE001 - any build or load failure means: use the torch path
            _failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"vllm_kvp: the C++ CPU attention kernel is unavailable ({_failed.splitlines()[0][:300]}); "
                          "using the slower torch implementation", RuntimeWarning, stacklevel=2)
        return _module


def failure() -> str | None:
    """Why the kernel is unavailable (None while it is, or before the first load)."""
    return _failed


def paged_attention_lse_cpu(q, kv_cache, block_table, kv_lens, query_start_loc, scale, q_pos=None, block_pos=None,
                            out=None, lse=None, num_splits: int = 0):
    """The contract of paged_attention_lse on CPU tensors, or None when the kernel is unavailable or
    does not cover the inputs (the caller then uses the torch implementation). num_splits > 0 forces
    that many key splits per request (tests); 0 chooses from the thread count."""
    m = _module if _module is not None else load()
    if m is None:
        return None
    t, hq, d = q.shape
    if kv_cache.dim() != 4 or kv_cache.shape[3] != 2 * d or kv_cache.shape[1] == 0 or hq % kv_cache.shape[1] \
            or (q_pos is None) != (block_pos is None):
        raise ValueError(f"q {tuple(q.shape)} / kv_cache {tuple(kv_cache.shape)} / q_pos, block_pos do not fit")
    if out is None:
        out = torch.empty((t, hq, d), dtype=q.dtype)
    if lse is None:
        lse = torch.empty((t, hq), dtype=torch.float32)
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or not m.supports(kv_cache.dtype, q.dtype, out.dtype, d) \
            or lse.dtype != torch.float32:
        return None
    if t == 0:
        return out, lse
    m.paged_attention_lse(q, kv_cache, block_table, kv_lens, query_start_loc, float(scale), q_pos, block_pos,
                          out, lse, int(num_splits))
    return out, lse


def merge_gathered_rows_cpu(gathered, rows, h: int, d: int, out) -> bool:
    """The C++ merge of :func:`vllm_kvp.ops.merge.merge_gathered_rows` into `out`; False when the
    kernel is unavailable (the caller then merges with torch)."""
    m = _module if _module is not None else load()
    if m is None:
        return False
    m.merge_gathered_rows(gathered, rows, int(h), int(d), out)
    return True


def write_kv_rank_cpu(kv_cache, key, value, slot_mapping, rank: int, ranks) -> int | None:
    """Store the rows whose logical slot is on `rank` of `ranks` (a RankMap; see
    :func:`vllm_kvp.step.shard_map.local_slots`) into this rank's `kv_cache`; returns how many, or None
    when the kernel is unavailable or does not cover the tensors (the caller then uses the torch
    path)."""
    m = _module if _module is not None else load()
    if (m is None or key.dtype != kv_cache.dtype or value.dtype != kv_cache.dtype
            or slot_mapping.dtype != torch.int64 or kv_cache.stride(-1) != 1):
        return None
    return m.write_kv_rank(kv_cache, key, value, slot_mapping, ranks.first_slot(rank),
                           ranks.tokens_per_rank)


def step_routing_cpu(slot_mapping, query_start_loc, seq_lens, block_table, rank: int, world: int,
                     blocks_per_rank: int, block_size: int):
    """:func:`vllm_kvp.step.routing.route_step`'s routing and :func:`vllm_kvp.step.shard_map.local_blocks`'
    table of one step, computed in one C++ pass: (counts, span_counts, the tensors
    :data:`vllm_kvp.step.routing.ROUTING_TENSORS` names in order, local_table, shard_lens,
    block_pos), or None when the kernel is unavailable (the caller then uses those torch
    functions)."""
    m = _module if _module is not None else load()
    if m is None:
        return None
    return m.step_routing(slot_mapping, query_start_loc, seq_lens, block_table, int(rank), int(world),
                          int(blocks_per_rank), int(block_size))
