"""KVPConfig: the one validated configuration of KV parallelism.

It is read from `additional_config={"kvp": {...}}` (offline `LLM(...)`) and from the `--kvp-*` flags
of `vllm serve` / `vllm-kvp serve`; both end up in `KVPConfig.from_dict`, so they are equivalent and
fail the same way, in the front-end process, before any worker starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

PLACEMENTS = ("onboard", "striped", "auto")
CHUNKINGS = ("fixed", "adaptive")
STEP_MODES = ("auto", "owner")
EXCHANGE_SCOPES = ("auto", "holders", "all")
CONFIG_KEY = "kvp"


class KVPConfigError(ValueError):
    """A `kvp` setting is invalid; the message names the field and the accepted values."""


@dataclass(frozen=True)
class KVPConfig:
    """KV-parallel layout of one engine.

    size: number of KV ranks. Each rank holds a full (TP/PP-sharded) replica of the weights and
        the KV blocks it wrote; the world is `size x pp x tp` workers. 1 means plain vLLM.
    placement: which rank a request's next KV block goes to.
        "onboard": a request starts on the rank with the least compute in hand (fewest blocks
        handed out this step, then fewest requests growing there, then most free blocks), fills
        it up to `max_tokens_per_rank`, then onboards the least-loaded rank it does not use yet.
        "striped": block i of a request goes to rank i % size (balances decode attention work).
        "auto": a request with more than `stripe_min_tokens` tokens to prefill is striped (its
        prefill chunks run on all ranks at once), any other starts as under "onboard" (it stays
        whole on one rank while it fits, and its steps exchange nothing).
    stripe_min_tokens: the "auto" threshold. None: the step's token budget
        (`max_num_batched_tokens`), so the prompts striped are those that need several steps.
    max_tokens_per_rank: onboarding threshold in tokens per request per rank. None: the rank's
        whole KV capacity.
    prefill_chunking: how a long prompt is cut into prefill chunks.
        "fixed": vLLM's own chunks (the step's token budget, `max_num_batched_tokens`).
        "adaptive": each chunk is sized so its predicted time (dense work plus attention over the
        context so far) stays near the first chunk's; later chunks of a long prompt get shorter.
        Works with any `size`, including 1 (then only the scheduler is vllm_kvp's).
    step_mode: how a step's dense layers are split over the KV ranks.
        "owner": each token runs only on the rank that owns its KV slot; queries and partial
        outputs are exchanged in every attention layer.
        "auto": the same for balanced steps of many tokens. A step that one rank owns whole (a
        batch-1 decode, a prompt chunk on one rank), a small step (at most `split_step_tokens`
        tokens: decode batches, whose dense layers are bound by reading the weights), and a step
        whose busiest rank owns at least 1.5x its share run on every rank instead, with each
        large linear layer (weights of at least `split_min_bytes`) computing 1/size of its output
        columns for all the step's tokens and the columns all-gathered. Each rank then reads
        1/size of those weights and the work of an uneven step is shared; column slices keep
        every output element's dot product whole, so results are those of the unsplit layer.
        Final hidden states still come from the owners, so every rank samples from the same bits.
    split_step_tokens: None (default): with step_mode "auto", each step's kind is the one the
        cost model predicts faster for it (see `device`). A number: the fixed rule instead, steps
        of at most this many tokens shared (0 leaves only one-owner and uneven steps to it).
    device: the hardware constants the cost model predicts step kinds with: a name of
        `vllm-kvp plan --gpu` ("h100", "h200", "a100", "b200", "cpu") or a JSON spec file (as
        `--gpu-spec`; `vllm-kvp plan --calibrate ... --save-spec` writes one). None: the GPU's
        own name, or the CPU profile on CPU hosts.
    split_min_bytes: weight bytes from which a linear layer is split by columns in such steps
        (smaller ones run whole on every rank: an all-gather costs more than reading them).
        None: 4 MiB on CPUs, 32 MiB on GPUs, whose collectives cost more reads; 0 splits all.
    exchange_scope: with more than 2 ranks, where a routed step sends the queries of a request
        that spans ranks (and whence their partial outputs come back).
        "holders": only to the ranks holding KV of that request, with all-to-alls of variable
        sizes (torch.distributed: gloo on CPUs, NCCL on GPUs).
        "all": to every rank, with all-gathers (ranks holding nothing return empty partials);
        on CPU hosts these run over vLLM's shared memory, much faster per call than gloo.
        "auto" (default): "holders" for the steps where the cost model predicts the
        all-to-alls faster (`device`'s constants), "all" for the others.
    max_rank_restarts: when a worker dies, the engine restarts its workers and recomputes the
        unfinished requests (see docs/design.md, "Rank failure"), at most this many times in ten
        minutes; then it stops as plain vLLM does. 0: stop at the first death (vLLM's behaviour).
    """

    size: int = 1
    placement: str = "onboard"
    max_tokens_per_rank: int | None = None
    stripe_min_tokens: int | None = None
    prefill_chunking: str = "fixed"
    step_mode: str = "auto"
    split_step_tokens: int | None = None
    device: str | None = None
    split_min_bytes: int | None = None
    exchange_scope: str = "auto"
    max_rank_restarts: int = 3

    def __post_init__(self) -> None:
        _check_int("size", self.size, minimum=1)
        if self.placement not in PLACEMENTS:
            raise KVPConfigError(
                f"kvp.placement must be one of {', '.join(map(repr, PLACEMENTS))}, "
                f"got {self.placement!r}"
            )
        if self.max_tokens_per_rank is not None:
            _check_int("max_tokens_per_rank", self.max_tokens_per_rank, minimum=1)
        if self.stripe_min_tokens is not None:
            _check_int("stripe_min_tokens", self.stripe_min_tokens, minimum=0)
        if self.prefill_chunking not in CHUNKINGS:
            raise KVPConfigError(
                f"kvp.prefill_chunking must be one of {', '.join(map(repr, CHUNKINGS))}, "
                f"got {self.prefill_chunking!r}"
            )
        if self.step_mode not in STEP_MODES:
            raise KVPConfigError(
                f"kvp.step_mode must be one of {', '.join(map(repr, STEP_MODES))}, "
                f"got {self.step_mode!r}"
            )

        if self.exchange_scope not in EXCHANGE_SCOPES:
            raise KVPConfigError(
                f"kvp.exchange_scope must be one of {', '.join(map(repr, EXCHANGE_SCOPES))}, "
                f"got {self.exchange_scope!r}"
            )
        if self.split_step_tokens is not None:
            _check_int("split_step_tokens", self.split_step_tokens, minimum=0)
        if self.device is not None:
            self._check_device()
        if self.split_min_bytes is not None:
            _check_int("split_min_bytes", self.split_min_bytes, minimum=0)
        _check_int("max_rank_restarts", self.max_rank_restarts, minimum=0)

    def _check_device(self) -> None:
        from vllm_kvp.planner import gpus

        if not isinstance(self.device, str):
            raise KVPConfigError(f"kvp.device must be a string, got {self.device!r}")
        try:
            if self.device.endswith(".json"):
                gpus.load_gpu_spec(self.device)
            else:
                gpus.get_gpu(self.device)
        except gpus.GPUSpecError as e:
            raise KVPConfigError(f"kvp.device: {e}") from None

    @property
    def enabled(self) -> bool:
        """KV ranks are on: vllm_kvp's executor, worker and scheduler run the engine."""
        return self.size > 1

    @property
    def adaptive_chunking(self) -> bool:
        return self.prefill_chunking == "adaptive"

    @property
    def replicates_steps(self) -> bool:
        """step_mode "auto": some steps run on every rank (shared steps, see `step_policy`), with
        split linear layers."""
        return self.step_mode == "auto"

    def stripe_threshold(self, max_num_batched_tokens: int) -> int:
        """Tokens to prefill above which placement "auto" stripes a request."""
        if self.stripe_min_tokens is not None:
            return self.stripe_min_tokens
        return max_num_batched_tokens

    def min_split_bytes(self, cuda: bool) -> int:
        """`split_min_bytes`, or the platform's default."""
        if self.split_min_bytes is not None:
            return self.split_min_bytes
        return (32 if cuda else 4) << 20

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "KVPConfig":
        """Build from the `kvp` entry of `additional_config`, rejecting unknown keys."""
        if raw is None:
            return cls()
        if isinstance(raw, KVPConfig):
            return raw
        if not isinstance(raw, Mapping):
            raise KVPConfigError(
                f"additional_config['kvp'] must be a mapping such as {{'size': 2}}, "
                f"got {type(raw).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise KVPConfigError(
                f"unknown kvp setting(s) {unknown}; accepted keys are {sorted(known)}"
            )
        return cls(**dict(raw))

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "KVPConfig":
        if not additional_config or not isinstance(additional_config, Mapping):
            return cls()
        return cls.from_dict(additional_config.get(CONFIG_KEY))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items()}


_PARSED: dict[int, tuple[Any, KVPConfig]] = {}


def kvp_config(vllm_config: Any) -> KVPConfig:
    """The KVPConfig of an engine's VllmConfig, parsed once per process (and per config object:
    the parse is keyed by its `additional_config`, which is kept alive with it)."""
    raw = getattr(vllm_config, "additional_config", None)
    hit = _PARSED.get(id(raw))
    if hit is None or hit[0] is not raw:
        hit = (raw, KVPConfig.from_additional_config(raw))
        _PARSED[id(raw)] = hit
    return hit[1]


def _check_int(name: str, value: Any, minimum: int) -> None:
    # bool is an int subclass; `size=True` is a typo, not a request for one rank.
    if isinstance(value, bool) or not isinstance(value, int):
        raise KVPConfigError(
            f"kvp.{name} must be an integer >= {minimum}, got {value!r} "
            f"({type(value).__name__})"
        )
    if value < minimum:
        raise KVPConfigError(f"kvp.{name} must be an integer >= {minimum}, got {value}")
