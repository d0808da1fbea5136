"""Patches to vLLM 0.32, applied idempotently by `vllm_kvp.register()`.

Each module says why it exists, what it changes and how to remove it; README.md in this folder is
the ledger. They are installed as `vllm_kvp.patches`.
"""

from __future__ import annotations

_applied = False


def apply_all() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    from vllm_kvp.patches import cpu_pipeline, engine_args

    engine_args.apply()
    cpu_pipeline.apply()
