"""One step under KV parallelism: its routing, its kind (`vllm_kvp.step_policy`), attention
(`attention`, with the device backends), split linear layers, the exchanges (`comm`) and the
counters (`stats`).

The Step and the worker's rank context live in `build`; they are re-exported here.
"""

from vllm_kvp.step.build import (
    RankContext, Step, build_step, configure, current_step, publish, rank_context, step_of)

__all__ = ["RankContext", "Step", "build_step", "configure", "current_step", "publish",
           "rank_context", "step_of"]
