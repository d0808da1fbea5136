"""Engine-args hook: `--kvp-*` flags and the `kvp` config turned into vLLM settings.

Why: vLLM 0.32 has no extension point for a general plugin to add CLI flags or to choose the
executor / worker / scheduler classes from its own config. Everything else in vllm_kvp uses vLLM's
pluggable classes; this is the one place that connects them to the user's `kvp` settings.
What: wraps four `EngineArgs` methods.
  - `add_cli_args`: adds the "KV parallelism" group (`--kvp-size`, `--kvp-placement`,
    `--kvp-max-tokens-per-rank`, `--kvp-stripe-min-tokens`, `--kvp-prefill-chunking`,
    `--kvp-step-mode`, `--kvp-split-step-tokens`, `--kvp-device`, `--kvp-split-min-bytes`,
    `--kvp-max-rank-restarts`).
  - `from_cli_args`: folds those flags into `additional_config["kvp"]`, so a flag and the
    equivalent `additional_config` are the same thing from here on.
  - `create_engine_config`: validates the `kvp` config (in the front-end process, before any worker
    starts) and, when `size > 1`, selects vllm_kvp's executor, worker and scheduler classes; with
    `size == 1` and `prefill_chunking="adaptive"`, only vllm_kvp's scheduler.
  - `_check_feature_supported`: lets pipeline parallelism through for vllm_kvp's executors, which
    vLLM's check does not recognise by their qualnames (they extend its "mp" and "ray" ones).
Without a `kvp` config (or with size 1 and fixed chunking) nothing is changed.
Remove when: vLLM offers a plugin hook for CLI flags and for config post-processing.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

from vllm_kvp.config import (CHUNKINGS, CONFIG_KEY, EXCHANGE_SCOPES, PLACEMENTS, STEP_MODES,
                             KVPConfig, KVPConfigError)

_FLAGS = {
    # flag dest -> KVPConfig field
    "kvp_size": "size",
    "kvp_placement": "placement",
    "kvp_max_tokens_per_rank": "max_tokens_per_rank",
    "kvp_stripe_min_tokens": "stripe_min_tokens",
    "kvp_prefill_chunking": "prefill_chunking",
    "kvp_step_mode": "step_mode",
    "kvp_split_step_tokens": "split_step_tokens",
    "kvp_split_min_bytes": "split_min_bytes",
    "kvp_device": "device",
    "kvp_exchange_scope": "exchange_scope",
    "kvp_max_rank_restarts": "max_rank_restarts",
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
                       help="Placement of a request's KV blocks over ranks: 'onboard' (fill one "
                            "rank, then the next), 'striped' (round robin) or 'auto' (long "
                            "prompts striped, the rest onboard). Default 'onboard'.")
    group.add_argument("--kvp-max-tokens-per-rank", type=int, default=None,
                       help="Tokens of one request a rank holds before the request onboards "
                            "another rank (placement 'onboard'). Default: a rank's capacity.")
    group.add_argument("--kvp-stripe-min-tokens", type=int, default=None,
                       help="Placement 'auto': requests with more tokens than this to prefill are "
                            "striped. Default: --max-num-batched-tokens.")
    group.add_argument("--kvp-prefill-chunking", type=str, default=None, choices=CHUNKINGS,
                       help="Prefill chunk sizes: 'fixed' (vLLM's token budget) or 'adaptive' "
                            "(later chunks of a long prompt shrink so each takes about as long "
                            "as the first). Works with any --kvp-size. Default 'fixed'.")
    group.add_argument("--kvp-step-mode", type=str, default=None, choices=STEP_MODES,
                       help="'owner': each token's dense layers run only on the rank holding its "
                            "KV. 'auto': also that, but a step whose tokens one rank owns (e.g. a "
                            "batch-1 decode) runs whole on every rank, saving each layer's query "
                            "exchange; so do small steps (--kvp-split-step-tokens) and uneven "
                            "ones, with large linear layers split by output columns over the "
                            "ranks. Default 'auto'.")
    group.add_argument("--kvp-split-step-tokens", type=int, default=None,
                       help="Fixed rule instead of the cost model: steps of at most this many "
                            "tokens run on every rank with large linear layers split by columns "
                            "(step mode 'auto'); 0: only one-owner and uneven steps. Default: "
                            "each step's kind is the one the cost model predicts faster.")
    group.add_argument("--kvp-device", type=str, default=None,
                       help="Hardware constants the cost model chooses step kinds with: a "
                            "'vllm-kvp plan --gpu' name (h100, h200, a100, b200, cpu) or a JSON "
                            "spec (vllm-kvp plan --calibrate ... --save-spec). Default: the "
                            "GPU's own name, or the CPU profile.")
    group.add_argument("--kvp-split-min-bytes", type=int, default=None,
                       help="Weight bytes from which a linear layer is split by columns in such "
                            "steps. Default 4 MiB on CPUs, 32 MiB on GPUs; 0 splits every one.")
    group.add_argument("--kvp-exchange-scope", type=str, default=None, choices=EXCHANGE_SCOPES,
                       help="With more than 2 KV ranks: 'holders' sends a spanning request's "
                            "queries only to the ranks holding its KV (all-to-alls), 'all' to "
                            "every rank (all-gathers), 'auto' whichever the cost model predicts "
                            "faster for the step. Default 'auto'.")
    group.add_argument("--kvp-max-rank-restarts", type=int, default=None,
                       help="When a worker dies, restart the workers and recompute the "
                            "unfinished requests, at most this many times in ten minutes. "
                            "Default 3; 0 stops the engine at the first death.")
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
    from vllm_kvp.engine import settings as layout

    if kvp.enabled:
        layout.apply_to_engine_args(engine_args, kvp)
    elif kvp.adaptive_chunking:
        layout.apply_chunking_to_engine_args(engine_args, kvp)
    return kvp


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, _MARK, False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__
    original_create = EngineArgs.create_engine_config
    original_check = EngineArgs._check_feature_supported

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
        from vllm_kvp.engine import settings as layout

        kvp = resolve_kvp(self)
        config = original_create(self, *a, **kw)
        if kvp.enabled:
            layout.check_engine_config(config)
        layout.finish_engine_config(config)
        return config

    @functools.wraps(original_check)
    def check_feature_supported(self, *a, **kw):
        # vLLM admits pipeline parallelism only for executors it knows by name ("mp", "ray") or
        # for classes flagged `supports_pp`; ours are named by qualname and subclass those two,
        # so the check sees the name of the executor they extend.
        from vllm_kvp.engine import settings as layout

        backend = self.distributed_executor_backend
        stands_for = {layout.EXECUTOR: "mp", layout.RAY_EXECUTOR: "ray"}.get(backend)
        if stands_for is None:
            return original_check(self, *a, **kw)
        self.distributed_executor_backend = stands_for
        try:
            return original_check(self, *a, **kw)
        finally:
            self.distributed_executor_backend = backend

    for fn in (add_cli_args, from_cli_args, create_engine_config, check_feature_supported):
        setattr(fn, _MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
    EngineArgs._check_feature_supported = check_feature_supported


__all__ = ["apply", "add_kvp_args", "merge_kvp_flags", "resolve_kvp", "KVPConfigError"]
