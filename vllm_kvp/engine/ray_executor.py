"""KVPRayExecutor: KV ranks over Ray, vLLM's multi-node engine.

vLLM's Ray executor is a MultiprocExecutor whose workers are Ray actors placed by a placement
group, so the same world-size override and pooled KV-cache sizing apply (KVPMixin). Ray places
bundles PACK by node, so consecutive ranks (one KV rank's TP group) share a node when they fit.
Start Ray in the driver (`ray.init(...)` or `RAY_ADDRESS`) and shut it down there.
"""

from __future__ import annotations

from vllm.platforms import current_platform
from vllm.v1.executor.ray_executor_v2 import RayExecutorV2

from vllm_kvp.engine.executor import KVPMixin
from vllm_kvp.engine.restart import RestartingExecutorMixin
from vllm_kvp.engine.vllm_compat import RayExecutorHooks


class KVPRayExecutor(RayExecutorHooks, KVPMixin, RestartingExecutorMixin, RayExecutorV2):
    """RayExecutorHooks: on CPU hosts the actors ask Ray for no GPU. A dead actor restarts the
    actors in the engine's placement group (restart.py)."""

    uses_ray: bool = True

    def _init_executor(self) -> None:
        self._setup_kvp()
        self._setup_restarts()
        if current_platform.is_cpu():
            from vllm_kvp.patches import ray_cpu

            ray_cpu.apply()
        super()._init_executor()
        self._pool_override()
