"""Ray on CPU hosts: lets vLLM's Ray executor place CPU workers.

Why: vLLM 0.32's Ray executor (`RayExecutorV2`) sizes its placement group by
`current_platform.ray_device_key`, which the CPU platform leaves empty ("current platform cpu does
not support ray"), and each worker actor asks Ray for its accelerator ids. CPU clusters (and this
project's tests, which run KV ranks as CPU processes on a multi-node Ray cluster) need neither.
What: on the CPU platform only, sets `CpuPlatform.ray_device_key = "CPU"` (one CPU per worker in
the placement group) and makes the executor create `CPURayWorkerProc` actors, whose device lookup
returns the actor's node id and no accelerator ids. Applied by `KVPRayExecutor` in the engine-core
process, before it starts Ray actors; never on GPU hosts.
Remove when: vLLM's Ray executor supports the CPU platform.
"""

from __future__ import annotations

import ray
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.executor import ray_executor_v2

_ORIGINAL_WORKER_PROC = ray_executor_v2.RayWorkerProc


class CPURayWorkerProc(_ORIGINAL_WORKER_PROC):
    """A Ray worker actor on a CPU node: its node id, and no accelerator ids. Defined at module
    level so that Ray ships it to the actors by reference, not by value."""

    def get_node_and_physical_gpu_ids(self) -> tuple[str, list[int]]:
        return ray.get_runtime_context().get_node_id(), []


def apply() -> None:
    CpuPlatform.ray_device_key = "CPU"
    # RayExecutorV2._init_executor creates its actors from this module-level name.
    ray_executor_v2.RayWorkerProc = CPURayWorkerProc
