"""Engine-args hook: `--kvp-*` flags and the `kvp` config turned into vLLM settings.

Why: vLLM 0.32 has no extension point for a general plugin to add CLI flags or to choose the
executor / worker / scheduler classes from its own config. Everything else in vllm_kvp uses vLLM's
pluggable classes; this is the one place that connects them to the user's `kvp` settings.
What: wraps three `EngineArgs` methods.
  - `add_cli_args`: adds the "KV parallelism" group (`--kvp-size`, `--kvp-placement`,
    `--kvp-max-tokens-per-rank`).
  - `from_cli_args`: folds those flags into `additional_config["kvp"]`, so a flag and the
    equivalent `additional_config` are the same thing from here on.
  - `create_engine_config`: validates the `kvp` config (in the front-end process, before any worker
    starts) and, when `size > 1`, selects vllm_kvp's executor, worker and scheduler classes.
Without a `kvp` config (or with size 1) nothing is changed.
Remove when: vLLM offers a plugin hook for CLI flags and for config post-processing.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from vllm_kvp.config import CONFIG_KEY, PLACEMENTS, KVPConfig, KVPConfigError

_FLAGS = {
    # flag dest -> KVPConfig field
    "kvp_size": "size",
    "kvp_placement": "placement",
    "kvp_max_tokens_per_rank": "max_tokens_per_rank",
}

_MARK = "_vllm_kvp_wrapped"


def add_kvp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    if any(a.dest == "kvp_size" for a in parser._actions):
        return parser
    group = parser.add_argument_group(
        "KV parallelism (vllm_kvp)",
        "Spread each request's KV cache over several KV ranks. Equivalent to "
        "--additional-config '{\"kvp\": {...}}'.",
    )
    group.add_argument("--kvp-size", type=int, default=None,
                       help="Number of KV ranks (each a full model replica). Default 1 (off).")
    group.add_argument("--kvp-placement", type=str, default=None, choices=PLACEMENTS,
                       help="Placement of a request's KV blocks over ranks. Default 'onboard'.")
    group.add_argument("--kvp-max-tokens-per-rank", type=int, default=None,
                       help="Tokens of one request a rank holds before the request onboards "
                            "another rank (placement 'onboard'). Default: a rank's capacity.")
    return parser


def merge_kvp_flags(args: argparse.Namespace, additional_config: dict | None) -> dict:
    """Return `additional_config` with the `--kvp-*` flags that were given merged into `kvp`."""
    given = {field: getattr(args, dest) for dest, field in _FLAGS.items()
             if getattr(args, dest, None) is not None}
    config = dict(additional_config or {})
    if given:
        kvp = dict(config.get(CONFIG_KEY) or {})
        kvp.update(given)
        config[CONFIG_KEY] = kvp
    return config


def resolve_kvp(engine_args: Any) -> KVPConfig:
    """Validate the `kvp` config and point vLLM at vllm_kvp's classes when it is enabled."""
    kvp = KVPConfig.from_additional_config(engine_args.additional_config)
    if not kvp.enabled:
        return kvp
    from vllm_kvp import layout

    layout.apply_to_engine_args(engine_args, kvp)
    return kvp


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, _MARK, False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__
    original_create = EngineArgs.create_engine_config

    @functools.wraps(original_add)
    def add_cli_args(parser, *a, **kw):
        return add_kvp_args(original_add(parser, *a, **kw))

    @functools.wraps(original_from)
    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        engine_args.additional_config = merge_kvp_flags(args, engine_args.additional_config)
        return engine_args

    @functools.wraps(original_create)
    def create_engine_config(self, *a, **kw):
        kvp = resolve_kvp(self)
        config = original_create(self, *a, **kw)
        if kvp.enabled:
            from vllm_kvp import layout

            layout.check_engine_config(config)
        return config

    for fn in (add_cli_args, from_cli_args, create_engine_config):
        setattr(fn, _MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config


__all__ = ["apply", "add_kvp_args", "merge_kvp_flags", "resolve_kvp", "KVPConfigError"]
