"""How a `kvp` config maps onto vLLM's engine settings (front-end side, before workers start)."""

from __future__ import annotations

import os
from typing import Any

from vllm_kvp.config import KVPConfig, KVPConfigError
from vllm_kvp.engine import vllm_compat

EXECUTOR = "vllm_kvp.engine.executor.KVPExecutor"
RAY_EXECUTOR = "vllm_kvp.engine.ray_executor.KVPRayExecutor"
WORKER = "vllm_kvp.engine.worker.KVPWorker"
SCHEDULER = "vllm_kvp.engine.scheduler.KVPScheduler"
CHUNK_SCHEDULER = "vllm_kvp.engine.chunk_scheduler.AdaptiveChunkScheduler"
ASYNC_CHUNK_SCHEDULER = "vllm_kvp.engine.chunk_scheduler.AdaptiveChunkAsyncScheduler"


def apply_to_engine_args(engine_args: Any, kvp: KVPConfig) -> None:
    """Select vllm_kvp's executor, worker and scheduler; refuse what KVP cannot serve yet.

    Runs in the process that builds the engine config, so every error here is raised before any
    worker process exists.
    """
    _refuse_unsupported(engine_args)
    _refuse_unchunked_prefill(engine_args, kvp)
    ray = engine_args.distributed_executor_backend in ("ray", RAY_EXECUTOR)
    engine_args.distributed_executor_backend = RAY_EXECUTOR if ray else EXECUTOR
    engine_args.worker_cls = WORKER
    engine_args.scheduler_cls = SCHEDULER
    # The KVP scheduler is the synchronous one: every rank must run exactly the batch it is given.
    engine_args.async_scheduling = False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        _apply_cuda_settings(engine_args)
    # Normalise so every process (engine core, workers) parses the same validated dict.
    engine_args.additional_config = {**engine_args.additional_config, "kvp": kvp.to_dict()}


def _apply_cuda_settings(engine_args: Any) -> None:
    """The KVP backend in vLLM's CUSTOM slot (every worker registers it), eager execution, and
    Model Runner V1, whose `_model_forward` is the hook owner computes runs the model through."""
    chosen = getattr(engine_args.attention_backend, "name", engine_args.attention_backend)
    if chosen not in (None, vllm_compat.CUSTOM_BACKEND):
        raise KVPConfigError(
            f"kvp.size > 1 runs its own attention backend; attention_backend={chosen!r} cannot be "
            f"combined with it (leave it unset)")
    engine_args.attention_backend = vllm_compat.CUSTOM_BACKEND
    # CUDA graphs are off: docs/design.md, "CUDA graphs under owner computes", says what blocks them.
    engine_args.enforce_eager = True
    # vLLM reads this variable whenever it asks which runner to use (front end, engine core and
    # workers); they all start from this process's environment, Ray actors included (vLLM copies
    # its registered variables to them).
    current = vllm_compat.selected_model_runner_v2()
    if current is not None:
        raise KVPConfigError(
            f"kvp.size > 1 runs on vLLM's Model Runner V1; {vllm_compat.MODEL_RUNNER_ENV}="
            f"{current!r} selects V2 (unset it or set it to 0)")
    vllm_compat.force_model_runner_v1()


def apply_chunking_to_engine_args(engine_args: Any, kvp: KVPConfig) -> None:
    """`size == 1` with adaptive chunking: vLLM's engine with vllm_kvp's scheduler only."""
    if engine_args.scheduler_cls not in (None, CHUNK_SCHEDULER, ASYNC_CHUNK_SCHEDULER):
        raise KVPConfigError(
            f"kvp.prefill_chunking='adaptive' runs on vllm_kvp's scheduler; scheduler_cls="
            f"{engine_args.scheduler_cls!r} cannot be combined with it"
        )
    _refuse_unchunked_prefill(engine_args, kvp)
    engine_args.scheduler_cls = CHUNK_SCHEDULER
    engine_args.additional_config = {**engine_args.additional_config, "kvp": kvp.to_dict()}


def finish_engine_config(config: Any) -> None:
    """Choices that need vLLM's resolved config (still before any worker starts): vLLM decides
    asynchronous scheduling only while it builds the config (off on CPU and with PP, on for one
    CUDA worker), so the adaptive scheduler's asynchronous twin is chosen here."""
    sched = config.scheduler_config
    if sched.scheduler_cls == CHUNK_SCHEDULER and sched.async_scheduling:
        sched.scheduler_cls = ASYNC_CHUNK_SCHEDULER


def _refuse_unchunked_prefill(engine_args: Any, kvp: KVPConfig) -> None:
    # Without chunked prefill vLLM schedules whole prompts, which a chunk cap would silently undo.
    if kvp.adaptive_chunking and engine_args.enable_chunked_prefill is False:
        raise KVPConfigError(
            "kvp.prefill_chunking='adaptive' sizes prefill chunks and needs chunked prefill; "
            "enable_chunked_prefill=False cannot be combined with it (use prefill_chunking='fixed')"
        )


def _refuse_unsupported(engine_args: Any) -> None:
    backend = engine_args.distributed_executor_backend
    if backend not in (None, "mp", "ray", EXECUTOR, RAY_EXECUTOR):
        raise KVPConfigError(
            f"kvp.size > 1 runs on vllm_kvp's own executors; distributed_executor_backend="
            f"{backend!r} is not supported with it (use the default, 'mp' or 'ray')"
        )
    for field, ours, default in (("worker_cls", WORKER, "auto"), ("scheduler_cls", SCHEDULER, None)):
        value = getattr(engine_args, field)
        if value not in (default, ours):
            raise KVPConfigError(
                f"kvp.size > 1 needs vllm_kvp's {field}; {field}={value!r} cannot be combined with it"
            )
    if (engine_args.data_parallel_size or 1) > 1:
        raise KVPConfigError("kvp.size > 1 cannot be combined with data_parallel_size > 1 yet")
    if engine_args.speculative_config:
        raise KVPConfigError("kvp.size > 1 cannot be combined with speculative decoding yet")
    # Owner computes runs each rank's model on its own tokens only; these features index state by
    # the step's full token list, or move KV that is now spread over ranks.
    if getattr(engine_args, "enable_lora", False):
        raise KVPConfigError("kvp.size > 1 cannot be combined with LoRA adapters (enable_lora) yet")
    if getattr(engine_args, "kv_transfer_config", None):
        raise KVPConfigError(
            "kvp.size > 1 cannot be combined with a KV connector (kv_transfer_config): each KV "
            "rank holds only part of a request's KV cache")
    if (getattr(engine_args, "decode_context_parallel_size", 1) or 1) > 1:
        raise KVPConfigError(
            "kvp.size > 1 replaces decode context parallelism; set decode_context_parallel_size=1"
        )


def check_engine_config(vllm_config: Any) -> None:
    """Refusals (and the one rewrite, of kv_cache_dtype) that need the resolved config
    (front-end side, before any worker starts)."""
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    cache.cache_dtype = kv_cache_dtype_for(cache.cache_dtype, model.dtype)
    # Owner computes runs through Model Runner V1 (`_model_forward`); these settings make vLLM
    # use V2 whatever VLLM_USE_V2_MODEL_RUNNER says, and V2 would run the model unsplit, wrongly.
    forcers = vllm_compat.model_runner_v2_forcers(vllm_config)
    if forcers:
        raise KVPConfigError(
            f"kvp.size > 1 runs on vLLM's Model Runner V1; {', '.join(forcers)} makes vLLM use "
            f"Model Runner V2 (unset it)")
    overrides = vllm_compat.attention_backend_overrides(vllm_config)
    if overrides:
        raise KVPConfigError(
            f"kvp.size > 1 runs its own attention backend for every layer; "
            f"attention_config.backend_per_kind={overrides!r} would replace it for some layers "
            f"(leave it empty)")
    if getattr(model, "runner_type", "generate") != "generate":
        raise KVPConfigError(
            f"kvp.size > 1 serves generative models; this one runs as {model.runner_type!r}")
    if getattr(model, "is_multimodal_model", False):
        raise KVPConfigError(
            "kvp.size > 1 does not support multimodal models yet (their encoder inputs are "
            "indexed by the step's full token list)")
    # Every pipeline stage must hold attention layers: a stage without any would have no KV
    # cache for the ranks to share.
    pp = vllm_config.parallel_config.pipeline_parallel_size
    layers = model.get_total_num_hidden_layers()
    if pp > layers:
        raise KVPConfigError(
            f"kvp.size > 1 needs attention layers on every pipeline stage; "
            f"pipeline_parallel_size={pp} exceeds the model's {layers} layers")


# Names of unquantized KV cache dtypes (vLLM's CacheDType, plus torch's aliases).
_PLAIN_KV_DTYPES = {"float16": "float16", "half": "float16", "bfloat16": "bfloat16",
                    "float32": "float32", "float": "float32"}


def kv_cache_dtype_for(cache_dtype: str | None, model_dtype: Any) -> str:
    """The kv_cache_dtype KVP hands vLLM: "auto" for the model's own dtype, named or not.

    KVP stores K/V in the model's dtype: its kernels read the cache in the queries' dtype and
    refuse quantized caches. vLLM's cache write (`reshape_and_cache_flash`) accepts only "auto"
    and fp8 names, so an explicit "bfloat16" equal to the model's dtype (which users of
    checkpoints with an fp8 KV scheme pass to turn it off) becomes "auto"; any other dtype is
    refused here, before workers start.
    """
    import torch

    if cache_dtype in (None, "auto"):
        return "auto"
    plain = _PLAIN_KV_DTYPES.get(cache_dtype)
    if plain is None:
        raise KVPConfigError(
            f"kvp.size > 1 does not support a quantized KV cache; kv_cache_dtype={cache_dtype!r} "
            f"cannot be combined with it (use 'auto')")
    if getattr(torch, plain) != model_dtype:
        raise KVPConfigError(
            f"kvp.size > 1 stores the KV cache in the model's dtype ({model_dtype}); "
            f"kv_cache_dtype={cache_dtype!r} differs (use 'auto')")
    return "auto"


def cpu_thread_binding(num_workers: int, allowed_cpus: list[int]) -> str:
    """A `VLLM_CPU_OMP_THREADS_BIND` value giving each of `num_workers` CPU workers its cores.

    vLLM's automatic binding needs one NUMA node per worker; KV ranks on one CPU host share a node,
    so the node's cores are split evenly (round-robin when there are more workers than cores).
    """
    if num_workers <= len(allowed_cpus):
        share = len(allowed_cpus) // num_workers
        groups = [allowed_cpus[i * share:(i + 1) * share] for i in range(num_workers)]
    else:
        groups = [[allowed_cpus[i % len(allowed_cpus)]] for i in range(num_workers)]
    return "|".join(",".join(map(str, g)) for g in groups)


def ensure_cpu_thread_binding(num_workers: int) -> None:
    current = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    if current not in ("", "auto"):
        return  # the user's explicit binding wins
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(
        num_workers, sorted(os.sched_getaffinity(0))
    )
