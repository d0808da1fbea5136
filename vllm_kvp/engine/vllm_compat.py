"""Every private vLLM detail vllm_kvp relies on, behind one narrow function, in one place.

vLLM's public extension points (plugins, `scheduler_cls`, `worker_cls`, executor classes, the
attention backend registry) do not reach everything KV parallelism needs, so the plugin also reads
and overrides a few of vLLM's internals: argument order of a method, a private hook it overrides,
an attribute it swaps. Each of those *touch points* is here:
  - the code that touches vLLM (a function, a constant, or a mixin whose private-named override
    calls a public-named hook the plugin implements), so the rest of the plugin never spells a
    private vLLM name;
  - a `TouchPoint` record in `TOUCH_POINTS`: what it relies on, why the plugin needs it, how to
    remove it, and a check that the installed vLLM still has what it relies on
    (tests/unit/test_vllm_coupling.py runs every check and names every touch point that changed;
    the ledger table in patches/README.md is generated from the same records, `python -m
    vllm_kvp.engine.vllm_compat`, and the test keeps the two equal).
The checks read signatures, attributes and, where vLLM's behaviour lives only in a method body,
its source (parsed from the file, never imported, so the CUDA backends are checked on CPU too).
Written against vLLM 0.32.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

# ---------------------------------------------------------------------------------------------
# The touch point table


@dataclass(frozen=True)
class TouchPoint:
    name: str
    relies_on: str  # what of vLLM the plugin reads, overrides or assumes
    why: str
    remove: str  # how to remove it (what vLLM would need to offer)
    check: Callable[[], list[str]]  # the problems found on the installed vLLM ([] = unchanged)


TOUCH_POINTS: list[TouchPoint] = []


def _touch_point(name: str, relies_on: str, why: str, remove: str):
    """Register the decorated function as the check of touch point `name`."""
    def register(check: Callable[[], list[str]]) -> Callable[[], list[str]]:
        TOUCH_POINTS.append(TouchPoint(name, relies_on, why, remove, check))
        return check
    return register


def check_all() -> list[str]:
    """`name: problem` for every touch point whose reliance no longer holds (a check that raises
    counts as changed: a moved module or class is a change too)."""
    problems = []
    for tp in TOUCH_POINTS:
        try:
            found = tp.check()
        except Exception as e:  # noqa: BLE001 - report every touch point, not the first failure
            found = [f"check raised {type(e).__name__}: {e}"]
        problems += [f"{tp.name}: {p}" for p in found]
    return problems


def ledger_rows() -> list[str]:
    """The "private touch points" table of patches/README.md, one markdown row per touch point."""
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")
    head = ["| touch point | relies on | why | how to remove |", "|---|---|---|---|"]
    return head + [f"| `{tp.name}` | {cell(tp.relies_on)} | {cell(tp.why)} | {cell(tp.remove)} |"
                   for tp in TOUCH_POINTS]


# ---------------------------------------------------------------------------------------------
# Helpers of the checks


def _obj(path: str) -> Any:
    """`pkg.module:Class.attr` -> the object (imports the module)."""
    module, _, attr = path.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


def _params(path: str, expected: list[str]) -> list[str]:
    """The leading parameters of a function (after self/cls) must be `expected`, in order."""
    fn = _obj(path)
    names = [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]
    if names[: len(expected)] != expected:
        return [f"{path} parameters are {names}, expected {expected} first"]
    return []


def _has(path: str, *attrs: str) -> list[str]:
    obj = _obj(path)
    return [f"{path} has no attribute {a!r}" for a in attrs if not hasattr(obj, a)]


@functools.lru_cache(maxsize=None)
def _module_text(module: str) -> str:
    """A module's source, read from its file (not imported: CUDA-only modules too)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ImportError(f"no module {module}")
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def _source(module: str, qualname: str) -> str:
    """Source of `Class.method` (or a function) in `module`, found by parsing its file."""
    text = _module_text(module)
    node: Any = ast.parse(text)
    for part in qualname.split("."):
        node = next((n for n in node.body if getattr(n, "name", None) == part), None)
        if node is None:
            raise LookupError(f"{module}.{qualname} not found")
    return ast.get_source_segment(text, node) or ""


def _contains(module: str, qualname: str, *snippets: str) -> list[str]:
    src = _source(module, qualname) if qualname else _module_text(module)
    where = f"{module}.{qualname}" if qualname else module
    return [f"{where} no longer contains {s!r}" for s in snippets if s not in src]


# =============================================================================================
# Scheduler (vllm_kvp/engine/scheduler.py)

_ALLOCATE_ARGS = ["num_new_computed_tokens", "new_computed_blocks", "num_lookahead_tokens",
                  "num_external_computed_tokens"]


@functools.lru_cache(maxsize=1)
def _allocate_signature() -> inspect.Signature:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    return inspect.signature(KVCacheManager.allocate_slots)


def allocate_slots_args(request: Any, num_new_tokens: int, args: tuple, kwargs: dict
                        ) -> dict[str, Any]:
    """The arguments of one `KVCacheManager.allocate_slots(request, num_new_tokens, ...)` call by
    name, defaults filled in (vLLM's scheduler passes some positionally, some by keyword)."""
    bound = _allocate_signature().bind(None, request, num_new_tokens, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


@_touch_point(
    "allocate_slots arguments",
    "`KVCacheManager.allocate_slots(request, num_new_tokens, num_new_computed_tokens, "
    "new_computed_blocks, num_lookahead_tokens, num_external_computed_tokens, ...)`: the names of "
    "its parameters, and that it is called once per request needing blocks, on the manager "
    "instance (which KVPScheduler wraps)",
    "placement must know how many blocks a request is about to take, and which prefix-cache hits "
    "it reuses, before vLLM pops them from the free queue",
    "a block-pool or KV-cache-manager hook that receives the request with each allocation")
def _check_allocate_slots() -> list[str]:
    return (_params("vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots",
                    ["request", "num_new_tokens", *_ALLOCATE_ARGS])
            + _contains("vllm.v1.core.sched.scheduler", "",
                        "self.kv_cache_manager.allocate_slots("))


def computed_blocks(new_computed_blocks: Any) -> list:
    """The blocks of a prefix-cache hit (`KVCacheBlocks`, one list per KV cache group; KVP runs
    one group), or [] for None."""
    return [] if new_computed_blocks is None else list(new_computed_blocks.blocks[0])


def blocks_held(manager: Any, req_id: str) -> int:
    """Blocks a request holds now (the single KV cache group's manager's `req_to_blocks`)."""
    return len(manager.coordinator.single_type_managers[0].req_to_blocks.get(req_id, ()))


@_touch_point(
    "blocks held by a request",
    "`KVCacheManager.coordinator.single_type_managers[0].req_to_blocks` (request id -> list of "
    "blocks), `KVCacheBlocks.blocks[group]`, `KVCacheBlock.block_id` / `is_null`",
    "the placement estimate of a request's new blocks subtracts what it already holds and its "
    "prefix-cache hits",
    "a public `num_blocks_held(request_id)` on the KV cache manager")
def _check_blocks_held() -> list[str]:
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

    block = KVCacheBlock(block_id=1)
    return (_contains("vllm.v1.core.kv_cache_coordinator", "", "self.single_type_managers")
            + _contains("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager",
                        "self.req_to_blocks: defaultdict[str, list[KVCacheBlock]]")
            + _contains("vllm.v1.core.kv_cache_manager", "KVCacheBlocks",
                        "blocks: tuple[Sequence[KVCacheBlock], ...]")
            + [f"KVCacheBlock lacks {a}" for a in ("block_id", "is_null")
               if not hasattr(block, a)])


# The methods vLLM's block pool calls on its free queue: a replacement must implement them all.
FREE_QUEUE_METHODS = ("popleft", "popleft_n", "remove", "append", "append_n", "prepend_n",
                      "get_all_free_blocks", "num_free_blocks")


def replace_free_block_queue(pool: Any, make_queue: Callable[[list], Any]) -> Any:
    """Replace `pool`'s free block queue by `make_queue(free blocks in eviction order)`; returns
    the new queue."""
    queue = make_queue(pool.free_block_queue.get_all_free_blocks())
    pool.free_block_queue = queue
    return queue


@_touch_point(
    "free block queue swap",
    "`BlockPool.free_block_queue`, an attribute the pool reads at every call, and the methods "
    "the pool calls on it (`FREE_QUEUE_METHODS`); `FreeKVCacheBlockQueue.get_all_free_blocks`",
    "KVPScheduler keeps one free queue per KV rank so that a request's new blocks come from the "
    "ranks placement chose (rank_pool.RankedFreeQueue)",
    "a block-pool hook choosing which free block to pop for a request")
def _check_free_queue() -> list[str]:
    import re

    text = _module_text("vllm.v1.core.block_pool")
    used = set(re.findall(r"free_block_queue\.(\w+)", text))
    out = [f"BlockPool now calls free_block_queue.{m}" for m in sorted(used)
           if m not in FREE_QUEUE_METHODS]
    out += _has("vllm.v1.core.kv_cache_utils:FreeKVCacheBlockQueue", "get_all_free_blocks")
    return out + _contains("vllm.v1.core.block_pool", "BlockPool.__init__",
                           "self.free_block_queue = FreeKVCacheBlockQueue(")


def wrap_manager_methods(manager: Any, wrap: Callable[[Callable], Callable]) -> None:
    """Wrap the KV cache manager's methods that release a request's blocks (on this instance)."""
    for name in ("free", "pop_blocks_for_free"):
        setattr(manager, name, wrap(getattr(manager, name)))


@_touch_point(
    "block release methods",
    "`KVCacheManager.free(request)` and `pop_blocks_for_free(request)` are the only ways a "
    "request's blocks go back to the pool, called on the manager instance",
    "placement forgets a request when its blocks are released (finish, abort, preemption)",
    "a scheduler or manager callback on block release")
def _check_release() -> list[str]:
    return (_params("vllm.v1.core.kv_cache_manager:KVCacheManager.free", ["request"])
            + _params("vllm.v1.core.kv_cache_manager:KVCacheManager.pop_blocks_for_free",
                      ["request"])
            + _has("vllm.v1.core.kv_cache_manager:KVCacheManager", "get_block_ids",
                   "take_new_block_ids"))


class SchedulerHooks:
    """Mixed into a vLLM `Scheduler` subclass, before it in the bases: vLLM's private scheduler
    hooks KVP needs, delegating to public-named methods the subclass implements."""

    def kvp_finished_params(self, request: Any) -> dict | None:
        """Called as a request finishes, before vLLM frees it; a dict returned here reaches the
        caller as the request's `kv_transfer_params` when no KV connector set any."""
        return None

    def kvp_zero_new_blocks(self) -> bool:
        """Whether vLLM may zero newly allocated blocks (their ids are logical pool ids)."""
        return True

    def _free_request(self, request: Any, *args: Any, **kwargs: Any):
        extra = self.kvp_finished_params(request)
        kv_params, ec_params = super()._free_request(request, *args, **kwargs)
        return (extra if kv_params is None else kv_params), ec_params

    def _get_new_block_ids_to_zero(self):
        if self.kvp_zero_new_blocks():
            return super()._get_new_block_ids_to_zero()
        # vLLM drains the list every step so it cannot grow; do the same, zero nothing.
        self.kv_cache_manager.take_new_block_ids()
        return None

    def _reserve_prefill_lookahead(self, request: Any, num_computed_tokens: int,
                                   num_new_tokens: int) -> int:
        num_new_tokens = self.kvp_cap_prefill(request, num_computed_tokens, num_new_tokens)
        return super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)

    def kvp_cap_prefill(self, request: Any, num_computed_tokens: int, num_new_tokens: int) -> int:
        """The tokens `request` may take this step (vLLM's count by default)."""
        return num_new_tokens


@_touch_point(
    "finished-request kv_transfer_params",
    "`Scheduler._free_request(request, delay_free_blocks=False) -> (kv_transfer_params, "
    "ec_transfer_params)`, whose first element becomes `RequestOutput.kv_transfer_params`",
    "a finished request reports the KV ranks it used (`inspect.rank_span`) without a KV "
    "connector; the field is free when none is configured (KVP refuses connectors)",
    "a public per-request output field for scheduler plugins")
def _check_free_request() -> list[str]:
    return (_params("vllm.v1.core.sched.scheduler:Scheduler._free_request",
                    ["request", "delay_free_blocks"])
            + _contains("vllm.v1.core.sched.scheduler", "Scheduler._free_request",
                        "return kv_xfer_params, ec_xfer_params"))


@_touch_point(
    "new block zeroing",
    "`Scheduler._get_new_block_ids_to_zero()` (called once per schedule step) and "
    "`KVCacheManager.take_new_block_ids()` (drains the list)",
    "the ids of new blocks are logical over all KV ranks, not a worker's local ids, and KVP "
    "attention never reads a block's stale contents, so nothing is zeroed",
    "zeroing ids mapped through a plugin hook, or a switch to turn zeroing off")
def _check_zeroing() -> list[str]:
    return (_params("vllm.v1.core.sched.scheduler:Scheduler._get_new_block_ids_to_zero", [])
            + _contains("vllm.v1.core.sched.scheduler", "Scheduler._get_new_block_ids_to_zero",
                        "self.kv_cache_manager.take_new_block_ids()")
            + _contains("vllm.v1.core.sched.scheduler", "",
                        "new_block_ids_to_zero=self._get_new_block_ids_to_zero()"))


@_touch_point(
    "prefill chunk cap",
    "`Scheduler._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens) -> int`, "
    "through which `schedule()` passes every request's token count, running and waiting alike",
    "adaptive prefill chunking (chunk_scheduler.py) caps a long prompt's chunk per request",
    "a per-request token-budget hook for scheduler plugins")
def _check_prefill_cap() -> list[str]:
    return _params("vllm.v1.core.sched.scheduler:Scheduler._reserve_prefill_lookahead",
                   ["request", "num_computed_tokens", "num_new_tokens"])


def pooled_scheduler_kv_config(vllm_config: Any, kv_cache_config: Any, num_ranks: int
                               ) -> tuple[Any, int]:
    """The KVCacheConfig the scheduler's block pool is built from: the executor planned about
    N x P blocks; trimmed to exactly N x P (P = each worker's blocks). Returns (config, P)."""
    from vllm_kvp.rank_map import RankMap

    config = copy.deepcopy(kv_cache_config)
    block_size = config.kv_cache_groups[0].kv_cache_spec.block_size
    ranks = RankMap.from_pooled(config.num_blocks, num_ranks, block_size)
    per_rank = ranks.blocks_per_rank
    config.num_blocks = ranks.pooled_blocks
    vllm_config.cache_config.num_gpu_blocks = config.num_blocks
    return config, per_rank


# =============================================================================================
# Executor (vllm_kvp/engine/executor.py, ray_executor.py)


class ExecutorHooks:
    """Mixed into vLLM's MultiprocExecutor / RayExecutorV2 subclasses, before them in the bases."""

    def kvp_parallel_sizes(self, tp: int, pp: int, pcp: int) -> tuple[int, int, int]:
        return tp, pp, pcp

    def _get_parallel_sizes(self) -> tuple[int, int, int]:
        return self.kvp_parallel_sizes(*super()._get_parallel_sizes())


@_touch_point(
    "executor parallel sizes",
    "`MultiprocExecutor._get_parallel_sizes() -> (tp, pp, pcp)` (also used by RayExecutorV2), "
    "whose product the executors assert equals `parallel_config.world_size`; the world size is "
    "read from `parallel_config` before the workers start",
    "the world is KVP x PP x TP workers, the KV ranks being vLLM's ExternalDP replicas; the "
    "executors report tp x KVP so their check holds",
    "an executor-level notion of replicas (world size not derived from tp x pp x pcp)")
def _check_parallel_sizes() -> list[str]:
    out = _params("vllm.v1.executor.multiproc_executor:MultiprocExecutor._get_parallel_sizes", [])
    for module in ("vllm.v1.executor.multiproc_executor", "vllm.v1.executor.ray_executor_v2"):
        out += _contains(module, "", "tp_size, pp_size, pcp_size = self._get_parallel_sizes()",
                         "assert self.world_size == tp_size * pp_size * pcp_size")
    return out


def ray_actor_resources(default: Callable[[], dict]) -> dict:
    """Ray actor resources of a worker: on CPU no GPU (the placement group bundle reserves the
    CPU, and Ray refuses "CPU" as a custom resource); vLLM's otherwise."""
    from vllm.platforms import current_platform

    return {"num_gpus": 0} if current_platform.is_cpu() else default()


class RayExecutorHooks(ExecutorHooks):
    """ExecutorHooks plus RayExecutorV2's actor resources."""

    def _get_actor_resource_kwargs(self) -> dict[str, Any]:
        return ray_actor_resources(super()._get_actor_resource_kwargs)


@_touch_point(
    "ray actor resources",
    "`RayExecutorV2._get_actor_resource_kwargs()`, called on the executor instance when it "
    "creates the worker actors",
    "on CPU hosts vLLM would ask Ray for GPUs or a custom 'CPU' resource",
    "Ray executor support for the CPU platform (see also patches/ray_cpu.py)")
def _check_ray_resources() -> list[str]:
    return (_has("vllm.v1.executor.ray_executor_v2:RayExecutorV2", "_get_actor_resource_kwargs")
            + _contains("vllm.v1.executor.ray_executor_v2", "",
                        "self._get_actor_resource_kwargs()"))


def shrink_to_rank_share(config: Any, per_rank: int) -> None:
    """Turn the pooled KVCacheConfig (N x P blocks) into one worker's share (P blocks).

    Byte sizes and strides that span all blocks of a layer scale with the block count; the
    per-block page and a block-outermost stride do not.
    """
    if len(config.kv_cache_groups) != 1:
        raise NotImplementedError(
            "vllm_kvp supports models with one KV cache group (uniform full attention); this "
            f"model has {len(config.kv_cache_groups)}")
    total = config.num_blocks
    for tensor in config.kv_cache_tensors:
        if tensor.layer_stride >= tensor.block_stride * total:  # layer-outermost layout
            tensor.layer_stride = tensor.layer_stride // total * per_rank
        tensor.offset = tensor.offset // total * per_rank
        tensor.size = tensor.size // total * per_rank
    config.num_blocks = per_rank


@_touch_point(
    "KVCacheConfig rewrite",
    "`KVCacheConfig.num_blocks`, `kv_cache_groups`, `kv_cache_tensors` of `KVCacheTensor(size, "
    "layers, layer_stride, block_stride, offset)` (byte placement of block b of layer l at "
    "offset + l * layer_stride + b * block_stride); `Executor.determine_available_memory()` and "
    "`initialize_from_config(kv_cache_configs)`; `cache_config.num_gpu_blocks`",
    "vLLM plans the cache with the memory of all KV ranks (N x P blocks); each worker allocates "
    "its share (P) and the scheduler's pool holds exactly N x P",
    "a KV cache planning hook that knows of ranks holding disjoint blocks of one pool")
def _check_kv_cache_config() -> list[str]:
    import dataclasses

    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheTensor

    fields = [f.name for f in dataclasses.fields(KVCacheTensor)]
    out = [] if fields[:5] == ["size", "layers", "layer_stride", "block_stride", "offset"] else [
        f"KVCacheTensor fields are {fields}"]
    cfg = {f.name for f in dataclasses.fields(KVCacheConfig)}
    out += [f"KVCacheConfig has no {f}" for f in ("num_blocks", "kv_cache_tensors",
                                                   "kv_cache_groups") if f not in cfg]
    out += _params("vllm.v1.executor.abstract:Executor.initialize_from_config",
                   ["kv_cache_configs"])
    return out + _params("vllm.v1.executor.abstract:Executor.determine_available_memory", [])


# =============================================================================================
# Worker and runner (vllm_kvp/engine/worker.py, runner.py, comm.py, step.py)


def swap_runner_class(runner: Any, mixin: type) -> None:
    """Give an already built model runner `mixin` (which only adds or overrides methods), by
    swapping its class for a subclass; vLLM's own runner classes stay untouched."""
    cls = type(runner)
    if not issubclass(cls, mixin):
        runner.__class__ = type(f"KVP{cls.__name__}", (mixin, cls), {})


@_touch_point(
    "model runner overrides",
    "the V1 `GPUModelRunner` (also the base of `CPUModelRunner`) calls "
    "`self._model_forward(input_ids=, positions=, intermediate_tensors=, inputs_embeds=, "
    "**model_kwargs)` for every scheduled step, and `sync_and_gather_intermediate_tensors("
    "num_tokens, intermediate_tensors, sync_self)` on a non-first pipeline stage; the worker's "
    "runner is `worker.model_runner`, whose class can be swapped after construction",
    "owner computes: each rank runs the model on its own rows (`_model_forward`), and a pipeline "
    "stage receives only its replica's rows",
    "a model-runner plugin class (`model_runner_cls`) or a forward hook with the step's tokens")
def _check_runner() -> list[str]:
    path = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
    out = _params(f"{path}._model_forward",
                  ["input_ids", "positions", "intermediate_tensors", "inputs_embeds"])
    out += _params(f"{path}.sync_and_gather_intermediate_tensors",
                   ["num_tokens", "intermediate_tensors", "sync_self"])
    out += _contains("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model",
                     "self._model_forward(")
    cpu = _module_text("vllm.v1.worker.cpu_model_runner")
    if "class CPUModelRunner(GPUModelRunner)" not in cpu or "def _model_forward" in cpu:
        out.append("CPUModelRunner no longer inherits GPUModelRunner._model_forward")
    return out


# The environment variable that selects vLLM's model runner; KVP needs V1 (`_model_forward`).
MODEL_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def selected_model_runner_v2() -> str | None:
    """The user's value of MODEL_RUNNER_ENV when it selects Model Runner V2, else None."""
    current = os.environ.get(MODEL_RUNNER_ENV)
    return current if current not in (None, "") and current.strip() != "0" else None


def force_model_runner_v1() -> None:
    """Select Model Runner V1 in this process and the processes it starts (vLLM reads the
    variable in the front end, the engine core and every worker; Ray actors get a copy)."""
    os.environ[MODEL_RUNNER_ENV] = "0"


def model_runner_v2_forcers(vllm_config: Any) -> list[str]:
    """The settings of `vllm_config` that make vLLM use Model Runner V2 whatever the variable."""
    out = []
    if getattr(vllm_config.attention_config, "hisparse_config", None) is not None:
        out.append("attention_config.hisparse_config")
    if getattr(vllm_config, "watermark_config", None) is not None:
        out.append("watermark_config")
    return out


@_touch_point(
    "model runner V1",
    "`VllmConfig.use_v2_model_runner`: V2 is used when `attention_config.hisparse_config` or "
    "`watermark_config` is set (whatever the variable), else as `VLLM_USE_V2_MODEL_RUNNER` says "
    "(default V2 where Triton runs)",
    "owner computes overrides the V1 runner's `_model_forward`, which V2 never calls: KVP sets "
    "the variable to 0 and refuses the settings that force V2",
    "a runner-independent forward hook (or the same hook on V2)")
def _check_runner_choice() -> list[str]:
    src = _source("vllm.config.vllm", "VllmConfig.use_v2_model_runner")
    head, found, _ = src.partition("envs.VLLM_USE_V2_MODEL_RUNNER\n")
    if not found:
        return ["VllmConfig.use_v2_model_runner no longer reads envs.VLLM_USE_V2_MODEL_RUNNER"]
    known = ("if self.attention_config.hisparse_config is not None:",
             'if getattr(self, "watermark_config", None) is not None:',
             "if envs.VLLM_USE_V2_MODEL_RUNNER is False:")
    ifs = [line.strip() for line in head.splitlines() if line.strip().startswith("if ")]
    return [f"use_v2_model_runner now also forces V2 on {c!r}" for c in ifs if c not in known]


def publish_step(step: Any) -> None:
    """Make `step` the current step of the running forward (read by `current_step`)."""
    from vllm.forward_context import get_forward_context

    get_forward_context().additional_kwargs["kvp_step"] = step


def current_step() -> Any:
    """The step published for the running forward (None outside a forward or when none is)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    return get_forward_context().additional_kwargs.get("kvp_step")


def forward_attn_metadata() -> Any:
    """The running forward's attention metadata (dict layer name -> metadata, a list of them for
    micro-batches, or None for dummy runs)."""
    from vllm.forward_context import get_forward_context

    return get_forward_context().attn_metadata


@contextlib.contextmanager
def narrowed_forward_context(row_slots: Any, rows: Any) -> Iterator[None]:
    """While the model runs on a subset of the step's rows: every layer's slot mapping is
    `row_slots` (one slot per row run) and `is_padding` keeps the rows `rows`; both restored
    after."""
    from vllm.forward_context import get_forward_context

    fc = get_forward_context()
    saved = fc.slot_mapping, fc.is_padding
    fc.slot_mapping = {name: row_slots for name in (fc.slot_mapping or {})}
    if fc.is_padding is not None:
        fc.is_padding = fc.is_padding[rows]
    try:
        yield
    finally:
        fc.slot_mapping, fc.is_padding = saved


@_touch_point(
    "forward context",
    "`vllm.forward_context.ForwardContext` fields `attn_metadata`, `slot_mapping` (layer name -> "
    "slots, read by `unified_kv_cache_update` for the KV write), `is_padding` and "
    "`additional_kwargs` (a free dict); `get_forward_context`, `is_forward_context_available`",
    "the runner narrows the KV write to the rows a rank runs, and publishes the step for the "
    "layers (attention, split linear) to read",
    "a documented per-forward plugin state slot and a per-row KV write mask")
def _check_forward_context() -> list[str]:
    import dataclasses

    from vllm.forward_context import ForwardContext

    fields = {f.name for f in dataclasses.fields(ForwardContext)}
    out = [f"ForwardContext has no field {f}" for f in
           ("attn_metadata", "slot_mapping", "is_padding", "additional_kwargs") if f not in fields]
    out += _has("vllm.forward_context:", "get_forward_context", "is_forward_context_available")
    return out + _contains("vllm.model_executor.layers.attention.attention",
                           "get_attention_context", "forward_context.slot_mapping")


@_touch_point(
    "attention metadata fields",
    "`CommonAttentionMetadata` fields `num_reqs`, `num_actual_tokens`, `query_start_loc`, "
    "`seq_lens`, `slot_mapping`, `block_table_tensor`, `max_seq_len`, `max_query_len` (what the "
    "KVP metadata builders read to build a step)",
    "the step's routing and this rank's block table are derived from vLLM's logical ones",
    "none needed while the builder API stays (it is the backend extension point)")
def _check_common_metadata() -> list[str]:
    import dataclasses

    from vllm.v1.attention.backend import CommonAttentionMetadata

    fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    return [f"CommonAttentionMetadata has no field {f}" for f in
            ("num_reqs", "num_actual_tokens", "query_start_loc", "seq_lens", "slot_mapping",
             "block_table_tensor", "max_seq_len", "max_query_len") if f not in fields]


# vLLM's CPU communicator moves the collectives of groups whose name starts with "tp" or "pp"
# over shared memory instead of gloo's sockets; the name has no other effect.
KVP_GROUP_NAME = "tp_kvp"


@_touch_point(
    "KVP group name",
    "`CpuCommunicator` uses its shared-memory path (`_CPUSHMDistributed`) for groups whose "
    "unique name starts with 'tp' or 'pp'; `init_model_parallel_group(group_ranks, local_rank, "
    "backend, ..., group_name=)`",
    "the per-layer KVP exchanges on CPU are several times faster over shared memory than gloo",
    "a communicator option to request shared memory for any group")
def _check_group_name() -> list[str]:
    return (_contains("vllm.distributed.device_communicators.cpu_communicator", "",
                      'unique_name.startswith("tp")')
            + _params("vllm.distributed.parallel_state:init_model_parallel_group",
                      ["group_ranks", "local_rank", "backend"])
            + ([] if "group_name" in inspect.signature(
                _obj("vllm.distributed.parallel_state:init_model_parallel_group")).parameters
               else ["init_model_parallel_group has no group_name"]))


def register_attention_backend(cpu: bool, class_path: str) -> None:
    """Point the attention backend the engine selects at `class_path` in this process. CPU: the
    platform's only backend, CPU_ATTN, is overridden. CUDA: vLLM's CUSTOM slot (which the front
    end selects), so other FLASH_ATTN lookups still get vLLM's class."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    member = AttentionBackendEnum.CPU_ATTN if cpu else AttentionBackendEnum.CUSTOM
    register_backend(member, class_path)


# The value of `attention_backend` that selects the backend registered under CUSTOM.
CUSTOM_BACKEND = "CUSTOM"


def attention_backend_overrides(vllm_config: Any) -> dict:
    """Per-layer-kind backend choices that would override the selected backend."""
    return dict(getattr(vllm_config.attention_config, "backend_per_kind", None) or {})


@_touch_point(
    "attention backend slot",
    "`register_backend(AttentionBackendEnum member, class_path)`; the CPU platform always returns "
    "`AttentionBackendEnum.CPU_ATTN.get_path()` (honouring an override); on CUDA "
    "`attention_backend=CUSTOM` selects the class registered under CUSTOM, unless "
    "`attention_config.backend_per_kind` names another backend for a layer kind",
    "KVP attention replaces the backend of every decoder layer, in every worker process",
    "a CPU platform that honours `--attention-backend`, and plugin-registered backend names "
    "that survive process spawning")
def _check_backend_slot() -> list[str]:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    out = [f"AttentionBackendEnum has no {m}" for m in ("CPU_ATTN", "CUSTOM")
           if not hasattr(AttentionBackendEnum, m)]
    out += _params("vllm.v1.attention.backends.registry:register_backend", ["backend"])
    out += _contains("vllm.platforms.cpu", "", "AttentionBackendEnum.CPU_ATTN.get_path()")
    return out + _contains("vllm.v1.attention.selector", "",
                           "attention_config.backend_per_kind.get(")


# Attributes of FlashAttentionImpl that its do_kv_cache_update (and vLLM's layer) read.
FLASH_IMPL_ATTRS = ("num_heads", "head_size", "num_kv_heads", "scale", "num_queries_per_kv",
                    "kv_cache_dtype", "attn_type", "alibi_slopes", "sinks", "logits_soft_cap",
                    "sliding_window", "kv_sharing_target_layer_name")


def init_flash_impl_for_kv_update(impl: Any, *, num_heads: int, head_size: int,
                                  num_kv_heads: int, scale: float, kv_cache_dtype: str,
                                  attn_type: str) -> None:
    """Set what `FlashAttentionImpl.do_kv_cache_update` and vLLM's attention layer read, without
    running `FlashAttentionImpl.__init__` (which picks and announces a FlashAttention version the
    KVP impl never uses). Plain attention only: no ALiBi, sinks, soft cap, window or sharing."""
    impl.num_heads, impl.head_size = num_heads, head_size
    impl.num_kv_heads, impl.scale = num_kv_heads, float(scale)
    impl.num_queries_per_kv = num_heads // num_kv_heads
    impl.kv_cache_dtype = kv_cache_dtype or "auto"
    impl.attn_type = attn_type
    impl.alibi_slopes, impl.sinks, impl.logits_soft_cap = None, None, 0
    impl.sliding_window = (-1, -1)
    impl.kv_sharing_target_layer_name = None


@_touch_point(
    "FlashAttentionImpl without __init__",
    "`FlashAttentionImpl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)` reads only "
    "`self.attn_type`, `self.head_size`, `self.kv_cache_dtype` and `layer._k_scale` / "
    "`layer._v_scale`, and writes through `reshape_and_cache_flash` (slots < 0 skipped); the "
    "logical cache view `(num_blocks, Hkv, block_size, 2D)` split by `transpose(1, 2)`",
    "the CUDA KVP impl reuses vLLM's cache write and layout, not FA's kernels",
    "a public cache-write helper taking (layer, key, value, kv_cache, slots, kv_cache_dtype)")
def _check_flash_impl() -> list[str]:
    import re

    mod = "vllm.v1.attention.backends.flash_attn"
    src = _source(mod, "FlashAttentionImpl.do_kv_cache_update")
    reads = set(re.findall(r"self\.(\w+)", src))
    out = [f"do_kv_cache_update now reads self.{a}" for a in sorted(reads - set(FLASH_IMPL_ATTRS))]
    out += _contains(mod, "FlashAttentionImpl.do_kv_cache_update",
                     "kv_cache.transpose(1, 2).split(self.head_size, dim=-1)",
                     "reshape_and_cache_flash(", "layer._k_scale", "layer._v_scale")
    sig = ast.parse(src).body[0].args.args  # type: ignore[attr-defined]
    names = [a.arg for a in sig][1:]
    if names != ["layer", "key", "value", "kv_cache", "slot_mapping"]:
        out.append(f"do_kv_cache_update parameters are {names}")
    return out + _contains(mod, "FlashAttentionBackend", "forward_includes_kv_cache_update")


# =============================================================================================
# Linear layers (split_linear.py, patches/cpu_linear_slices.py)


def unquantized_gemm(layer: Any) -> Callable:
    """The GEMM vLLM's unquantized linear method runs for `layer`: gemm(layer, x, weight, bias)."""
    return layer.quant_method._gemm_impl


@_touch_point(
    "unquantized GEMM",
    "`UnquantizedLinearMethod.__init__` sets `self._gemm_impl` and `apply` calls "
    "`self._gemm_impl(layer, x, layer.weight, bias)` (except under VLLM_BATCH_INVARIANT)",
    "a split linear layer on GPUs computes its column slice with vLLM's own GEMM on a view of the "
    "weight's rows",
    "a public `gemm(layer, x, weight, bias)` on the linear method")
def _check_gemm() -> list[str]:
    mod = "vllm.model_executor.layers.linear"
    return (_contains(mod, "UnquantizedLinearMethod.__init__", "self._gemm_impl = ")
            + _contains(mod, "UnquantizedLinearMethod.apply",
                        "self._gemm_impl(layer, x, layer.weight, bias)"))


def head_gemm() -> Callable:
    """The GEMM vLLM's unquantized embedding method runs for an lm_head: gemm(layer, x, weight,
    bias)."""
    from vllm.model_executor.layers.utils import dispatch_unquantized_gemm

    return dispatch_unquantized_gemm()


@_touch_point(
    "gated MLP layout",
    "linear layers keep their `prefix`; `MergedColumnParallelLinear` keeps `output_sizes`; "
    "`RowParallelLinear.forward` passes its input to `quant_method.apply(self, input_parallel, "
    "bias_)`; Llama-style MLPs run `gate_up_proj`, then `act_fn` (`SiluAndMul`: "
    "silu(x[..., :d]) * x[..., d:]), then `down_proj`",
    "a gated MLP splits like a TP layer in shared steps (`split_linear`): the gate_up slice "
    "keeps its intermediate columns on the rank, and the down projection takes them as its "
    "input columns",
    "a model-level hook for sharding an MLP over a second group")
def _check_gated_mlp() -> list[str]:
    linear = "vllm.model_executor.layers.linear"
    return (_contains(linear, "LinearBase.__init__", "self.prefix = prefix")
            + _contains(linear, "MergedColumnParallelLinear.__init__", "self.output_sizes")
            + _contains(linear, "RowParallelLinear.forward",
                        "self.quant_method.apply(self, input_parallel, bias_)")
            + _contains("vllm.model_executor.models.llama", "LlamaMLP.forward",
                        "self.gate_up_proj(x)", "self.act_fn", "self.down_proj(x)")
            + _contains("vllm.model_executor.layers.activation", "SiluAndMul.forward_native",
                        "F.silu(x[..., :d]) * x[..., d:]"))


def warm_vocab_masks(model: Any) -> int:
    """Compile, in this worker alone, the masking function vLLM's TP-sharded embeddings compile on
    their first call (`get_masked_input_and_mask`, `torch.compile(dynamic=True)`); returns how
    many embeddings were warmed. Left to the first step, it compiles (seconds of CPU) while the
    other ranks spin in shared-memory collectives on the same cores: with KV ranks x TP on a
    2-core host, a first step was measured taking 80 s instead of 10."""
    import torch
    from vllm.model_executor.layers import vocab_parallel_embedding as vpe

    n = 0
    for m in model.modules():
        if (not isinstance(m, vpe.VocabParallelEmbedding) or getattr(m, "tp_size", 1) == 1
                or getattr(m, "use_fused_embedding", False)):
            continue
        si = m.shard_indices
        # The compiler specialises size 1 (a one-row step, or a rank's placeholder row) and
        # compiles a general size from the second shape on: warm both.
        for size in (1, 2, 3):
            vpe.get_masked_input_and_mask(
                torch.zeros(size, dtype=torch.int32), si.org_vocab_start_index,
                si.org_vocab_end_index, si.num_org_vocab_padding, si.added_vocab_start_index,
                si.added_vocab_end_index)
        n += 1
    return n


@_touch_point(
    "TP embedding mask compile",
    "`VocabParallelEmbedding.forward` with `tp_size > 1` (unfused) calls the module-level "
    "`get_masked_input_and_mask(input_, org_vocab_start_index, org_vocab_end_index, "
    "num_org_vocab_padding, added_vocab_start_index, added_vocab_end_index)`, compiled with "
    "`torch.compile(dynamic=True)` on first use; input ids are int32",
    "each worker compiles it while loading, not in the first step while its peers spin in "
    "shared-memory collectives (KV ranks x TP on few cores)",
    "vLLM warming its compiled helpers at load time")
def _check_vocab_mask() -> list[str]:
    vpe = "vllm.model_executor.layers.vocab_parallel_embedding"
    return (_params(f"{vpe}:get_masked_input_and_mask",
                    ["input_", "org_vocab_start_index", "org_vocab_end_index",
                     "num_org_vocab_padding", "added_vocab_start_index", "added_vocab_end_index"])
            + _contains(vpe, "VocabParallelEmbedding.forward", "get_masked_input_and_mask(")
            + _contains(vpe, "", "@torch.compile(dynamic=True"))


def build_cpu_gemm(module: Any) -> None:
    """vLLM's CPU kernel for `module.weight`, left as `module.cpu_linear(x, weight, bias)` with
    the weight kept (as vLLM builds an lm_head's)."""
    from vllm.model_executor.layers import utils

    utils.dispatch_cpu_unquantized_gemm(module, remove_weight=False)


@_touch_point(
    "lm_head GEMM",
    "`LogitsProcessor._apply_head` calls `lm_head.quant_method.apply(lm_head, hidden_states, "
    "embedding_bias)`; `UnquantizedEmbeddingMethod.apply` runs `dispatch_unquantized_gemm()(layer, "
    "x, layer.weight, bias)` and, on CPUs, `process_weights_after_loading` keeps the weight "
    "(`remove_weight=False`)",
    "the lm_head splits its vocab columns over the KV ranks by standing in for its quant method, "
    "with vLLM's own GEMM on a slice of the weight",
    "a public hook to shard the logits computation")
def _check_head_gemm() -> list[str]:
    emb = "vllm.model_executor.layers.vocab_parallel_embedding"
    return (_contains("vllm.model_executor.layers.logits_processor",
                      "LogitsProcessor._apply_head", "lm_head.quant_method.apply(")
            + _contains(emb, "UnquantizedEmbeddingMethod.apply",
                        "dispatch_unquantized_gemm()(layer, x, layer.weight, bias)")
            + _contains(emb, "UnquantizedEmbeddingMethod.process_weights_after_loading",
                        "remove_weight=False"))


@contextlib.contextmanager
def wrapped_cpu_gemm_dispatch(make: Callable[[Callable], Callable]) -> Iterator[None]:
    """While active, vLLM's CPU linear layers are dispatched by `make(original)` (a function
    `(layer, remove_weight) -> None`); restored after."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    utils.dispatch_cpu_unquantized_gemm = make(original)
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = original


@_touch_point(
    "CPU GEMM dispatch",
    "`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm(layer, remove_weight)`, "
    "looked up in that module at call time by `UnquantizedLinearMethod."
    "process_weights_after_loading`, leaving `layer.cpu_linear(x, weight, bias)`",
    "CPU column slices of split linear layers must be packed while the weight still exists "
    "(patches/cpu_linear_slices.py)",
    "vLLM keeping CPU linear weights, or a post-load hook that sees them")
def _check_cpu_dispatch() -> list[str]:
    return (_params("vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm",
                    ["layer", "remove_weight"])
            + _contains("vllm.model_executor.layers.linear",
                        "UnquantizedLinearMethod.process_weights_after_loading",
                        "from vllm.model_executor.layers.utils import "
                        "dispatch_cpu_unquantized_gemm")
            + _contains("vllm.model_executor.layers.utils", "", "layer.cpu_linear = "))


# =============================================================================================
# Patches (patches/*.py: each is a row of the ledger's first table; these check their ground)


@_touch_point(
    "engine args hook",
    "`EngineArgs.add_cli_args(parser)`, `from_cli_args(args)`, `create_engine_config(...)`, "
    "`_check_feature_supported(...)` (wrapped by patches/engine_args.py); "
    "`argparse.ArgumentParser._actions`",
    "see patches/engine_args.py",
    "see the patch table")
def _check_engine_args() -> list[str]:
    return _has("vllm.engine.arg_utils:EngineArgs", "add_cli_args", "from_cli_args",
                "create_engine_config", "_check_feature_supported")


@_touch_point(
    "CPU pipeline buffer",
    "`CPUModelRunner.load_model`, the runner's `intermediate_tensors`, `max_num_tokens`, "
    "`model.make_empty_intermediate_tensors(batch_size, dtype, device)` (patches/cpu_pipeline.py)",
    "see patches/cpu_pipeline.py",
    "see the patch table")
def _check_cpu_pipeline() -> list[str]:
    return (_has("vllm.v1.worker.cpu_model_runner:CPUModelRunner", "load_model")
            + _contains("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._dummy_run",
                        "self.intermediate_tensors = ",
                        "self.model.make_empty_intermediate_tensors("))


@_touch_point(
    "Ray on CPU",
    "`Platform.ray_device_key`, the module-level `ray_executor_v2.RayWorkerProc` the executor "
    "instantiates, its `get_node_and_physical_gpu_ids()` (patches/ray_cpu.py)",
    "see patches/ray_cpu.py",
    "see the patch table")
def _check_ray_cpu() -> list[str]:
    return (_has("vllm.platforms.interface:Platform", "ray_device_key")
            + _contains("vllm.v1.executor.ray_executor_v2", "", "ray.remote(RayWorkerProc)",
                        "def get_node_and_physical_gpu_ids"))


# =============================================================================================
# Dead-worker recovery (vllm_kvp/engine/restart.py, scheduler.py, runner.py; see recovery.py)


def watch_workers(executor: Any, on_death: Callable[[int, Any], None]) -> None:
    """In a daemon thread, wait for the first worker of `executor`'s current world to die and call
    `on_death(world_rank, process or None)` (vLLM's own monitors would shut the executor down and
    fail the engine instead). Worker processes, or Ray actors (their `run()` refs resolve)."""
    import threading

    if getattr(executor, "uses_ray", False):
        import ray

        handles = list(executor.ray_worker_handles)
        refs = {h.run_ref: h.rank for h in handles if h.run_ref is not None}

        def watch() -> None:
            while ray.is_initialized():
                done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                if (getattr(executor, "shutting_down", False)
                        or executor.ray_worker_handles != handles):
                    return
                if done:
                    on_death(refs[done[0]], None)
                    return
    else:
        import multiprocessing.connection

        workers = list(executor.workers)

        def watch() -> None:
            sentinels = [w.proc.sentinel for w in workers]
            died = multiprocessing.connection.wait(sentinels)
            if getattr(executor, "shutting_down", False) or executor.workers != workers:
                return  # a shutdown, or a world already replaced
            index = sentinels.index(died[0])
            on_death(index, workers[index].proc)

    threading.Thread(target=watch, daemon=True, name="KVPWorkerMonitor").start()


def kill_workers(executor: Any) -> None:
    """Kill every worker of the executor's current world (SIGKILL, or `ray.kill`) and cancel its
    message queues, so an engine thread waiting for a reply gets an error instead of waiting
    forever. The survivors are killed too: one may spin in a collective with the dead one, and
    vLLM's CPU shared-memory collectives never time out. Idempotent."""
    if getattr(executor, "uses_ray", False):
        import ray

        for h in getattr(executor, "ray_worker_handles", None) or []:
            with contextlib.suppress(Exception):
                ray.kill(h.actor)
    workers = list(getattr(executor, "workers", None) or [])
    for w in workers:
        if w.death_writer is not None:
            w.death_writer.close()
            w.death_writer = None
        if w.proc.is_alive():
            w.proc.kill()
    for w in workers:
        w.proc.join(timeout=30)
        if w.worker_response_mq is not None:
            w.worker_response_mq.shutdown()
            w.worker_response_mq = None
    for mq in getattr(executor, "response_mqs", None) or []:
        mq.shutdown()
    executor.response_mqs = []
    if getattr(executor, "rpc_broadcast_mq", None) is not None:
        executor.rpc_broadcast_mq.shutdown()
        executor.rpc_broadcast_mq = None


def respawn_workers(executor: Any) -> None:
    """Start a fresh world of workers in place of a killed one: vLLM's own start-up of the
    executor (new message queues, new distributed rendezvous, weights loaded; Ray actors go in
    the placement group the engine already holds)."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    finalizer = getattr(executor, "_finalizer", None)
    if finalizer is not None:
        finalizer.detach()  # _init_executor registers a new one
    if getattr(executor, "uses_ray", False):
        from vllm.v1.executor.ray_executor_v2 import RayExecutorV2

        RayExecutorV2._init_executor(executor)
    else:
        MultiprocExecutor._init_executor(executor)


def call_workers(executor: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
    """vLLM's collective_rpc, bypassing the executor subclasses' overrides."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor.collective_rpc(executor, method, *args, **kwargs)


def reply_poller(executor: Any) -> Callable[[float], bool] | None:
    """For a step whose reply comes over a remote (zmq) queue, as from a Ray actor on another
    node: `poll(seconds) -> bool`, whether the reply is there, without reading it. Cancelling the
    queue does not wake a read of such a queue, so the engine thread polls and watches for a
    death in between. None for shared-memory queues (cancelling wakes those)."""
    mqs = getattr(executor, "response_mqs", None) or []
    rank = getattr(executor, "output_rank", None)
    if rank is None or not 0 <= rank < len(mqs):
        return None
    mq = mqs[rank]
    if not getattr(mq, "_is_remote_reader", False):
        return None
    socket = mq.remote_socket
    return lambda seconds: bool(socket.poll(timeout=int(seconds * 1000)))


def empty_step_output() -> Any:
    from vllm.v1.outputs import ModelRunnerOutput

    return ModelRunnerOutput(req_ids=[], req_id_to_index={})


@_touch_point(
    "worker restart",
    "`MultiprocExecutor` and `RayExecutorV2` (`ray_worker_handles[i].run_ref` / `.actor` / "
    "`.rank`): `start_worker_monitor()` (called by `_init_executor`), `workers[i]."
    "proc` / `.death_writer` / `.worker_response_mq`, `response_mqs`, `rpc_broadcast_mq`, "
    "`MessageQueue.shutdown()` cancelling a blocked `dequeue` of a shared-memory queue (a remote "
    "queue's `remote_socket` is polled instead), `_init_executor()` building a "
    "whole new world when called again, `_finalizer`, `collective_rpc(method, ..., non_block=)` "
    "returning a `concurrent.futures.Future`; the engine core treats a `ModelRunnerOutput` "
    "with no requests as a step that sampled nothing",
    "a dead worker restarts the workers instead of failing the engine (recovery.py)",
    "an executor-level restart hook in vLLM (its fault-tolerance sentinel aborts every request)")
def _check_worker_restart() -> list[str]:
    ray = "vllm.v1.executor.ray_executor_v2"
    out = _contains(ray, "RayExecutorV2._init_executor", "initialize_ray_cluster(",
                    "self.start_worker_monitor()", "self._finalizer = weakref.finalize(")
    out += _contains(ray, "RayExecutorV2.start_worker_monitor", "h.run_ref", "ray.wait(")
    out += _contains(ray, "", "self.ray_worker_handles", "ray.kill(handle.actor)")
    path = "vllm.v1.executor.multiproc_executor:MultiprocExecutor"
    out += _has(path, "start_worker_monitor", "_init_executor", "collective_rpc", "shutdown")
    out += _params(f"{path}.start_worker_monitor", ["inline"])
    out += _contains("vllm.v1.executor.multiproc_executor", "MultiprocExecutor._init_executor",
                     "self._finalizer = weakref.finalize(self, self.shutdown)",
                     "self.start_worker_monitor()", "self.response_mqs = []",
                     "self.rpc_broadcast_mq = MessageQueue(")
    out += _contains("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.shutdown",
                     "w.death_writer.close()", "w.worker_response_mq.shutdown()")
    out += _contains("vllm.distributed.device_communicators.shm_broadcast",
                     "MessageQueue.acquire_read", "if self.shutting_down:")
    out += _contains("vllm.distributed.device_communicators.shm_broadcast", "MessageQueue.dequeue",
                     "elif self._is_remote_reader:",
                     "obj = MessageQueue.recv(self.remote_socket, timeout)")
    return out


def reset_for_recompute(scheduler: Any) -> list[Any]:
    """After the workers restarted empty: every unfinished request goes back to the waiting
    queue with nothing computed and no blocks, as a *new* request (fresh workers know none of
    them; vLLM's "resumed" path assumes they do), and the prefix cache is emptied. Returns the
    requests the workers must replay output tokens for (those that generated some)."""
    from vllm.v1.request import RequestStatus

    for request in reversed(list(scheduler.running)):
        scheduler.kv_cache_manager.free(request)
        scheduler.encoder_cache_manager.free(request)
        inflight = getattr(scheduler, "_inflight_prefills", None)
        if inflight is not None:
            inflight.discard(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_output_placeholders = 0
        request.status = RequestStatus.WAITING
        scheduler.waiting.prepend_request(request)
    scheduler.running.clear()
    replay = []
    for request in scheduler.waiting:
        if request.status == RequestStatus.PREEMPTED:
            request.status = RequestStatus.WAITING
        if request.num_output_tokens > 0:
            replay.append(request)
    prev = getattr(scheduler, "prev_step_scheduled_req_ids", None)
    if prev is not None:
        prev.clear()
    if not scheduler.kv_cache_manager.reset_prefix_cache():
        raise RuntimeError("vllm_kvp: KV blocks still in use after every request was reset")
    return replay


def mark_replay(new_request_data: Any, all_token_ids: list[int]) -> None:
    """Send a recomputed request's prompt *and* generated tokens to the workers (V2 runners'
    `prefill_token_ids` field, which the V1 runner leaves unread; `replayed_outputs` reads it)."""
    new_request_data.prefill_token_ids = list(all_token_ids)


@contextlib.contextmanager
def replayed_outputs(runner: Any, scheduler_output: Any) -> Iterator[None]:
    """While vLLM's runner adds this step's new requests to its batch: a recomputed request
    (`mark_replay`) enters with the output tokens it had generated, so its prefill re-fills the
    KV of prompt and outputs, penalties see them, and no prompt logprobs are sent twice."""
    replay = {}
    for new in scheduler_output.scheduled_new_reqs:
        tokens, prompt = new.prefill_token_ids, new.prompt_token_ids
        if tokens is not None and prompt is not None and len(tokens) > len(prompt):
            replay[new.req_id] = tokens[len(prompt):]
    if not replay:
        yield
        return
    batch = runner.input_batch
    add = batch.add_request

    def add_request(req_state: Any, *args: Any, **kwargs: Any) -> Any:
        outputs = replay.get(req_state.req_id)
        if outputs is not None and not req_state.output_token_ids:
            req_state.output_token_ids.extend(outputs)
            runner.num_prompt_logprobs.pop(req_state.req_id, None)
        return add(req_state, *args, **kwargs)

    batch.add_request = add_request
    try:
        yield
    finally:
        del batch.add_request


@_touch_point(
    "recompute after restart",
    "`Scheduler.running` / `waiting.prepend_request` / `kv_cache_manager.free` / "
    "`.reset_prefix_cache()` / `encoder_cache_manager.free`, `Request.num_computed_tokens`, "
    "`num_output_placeholders`, `spec_token_ids`, `status`; WAITING requests are sent as "
    "`NewRequestData` (PREEMPTED ones as resumed); the V1 runner's `_update_states` creates a new "
    "request's state with `output_token_ids=[]` and adds it with `input_batch.add_request(state)`, "
    "and ignores `NewRequestData.prefill_token_ids`",
    "requests recompute on restarted workers with the tokens they had generated",
    "a scheduler API to re-submit a request with its outputs to fresh workers")
def _check_recompute() -> list[str]:
    import dataclasses

    from vllm.v1.core.sched.output import NewRequestData

    out = _has("vllm.v1.core.sched.scheduler:Scheduler", "update_from_output", "schedule")
    out += _has("vllm.v1.request:RequestStatus", "WAITING", "PREEMPTED")
    if "prefill_token_ids" not in {f.name for f in dataclasses.fields(NewRequestData)}:
        out.append("NewRequestData has no field prefill_token_ids")
    out += _contains("vllm.v1.core.sched.scheduler", "Scheduler._preempt_request",
                     "request.num_computed_tokens = 0", "self.waiting.prepend_request(request)",
                     "request.num_output_placeholders = 0")
    out += _contains("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states",
                     "output_token_ids=[],", "self.input_batch.add_request(request)",
                     "self.num_prompt_logprobs[req_id]")
    runner = _source("vllm.v1.worker.gpu_model_runner", "GPUModelRunner")
    if "prefill_token_ids" in runner:
        out.append("the V1 runner now reads prefill_token_ids")
    return out


if __name__ == "__main__":  # print the ledger table (patches/README.md, "private touch points")
    print("\n".join(ledger_rows()))
