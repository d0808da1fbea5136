"""CPU pipeline parallelism: the receive buffer of a non-first stage exists before the first step.

Why: vLLM 0.32's V1 model runner allocates `intermediate_tensors` (the persistent buffer a
non-first pipeline stage copies the previous stage's hidden states into) lazily, only inside
`_dummy_run`. On CPU `_dummy_run` never runs in eager mode (`CPUModelRunner.warming_up_model`
returns at once when compilation is off), so the first real step of stage 1 fails with
`assert self.intermediate_tensors is not None`: PP > 1 cannot serve a single request on CPU.
What: after `CPUModelRunner.load_model`, a runner of a non-first stage allocates the buffer
(`max_num_batched_tokens` rows), exactly as `_dummy_run` would, and as vLLM's V2 runner does in
its own `load_model`. Plain PP and KV ranks x PP both go through this runner.
How it is applied: importing the CPU runner costs seconds and `register()` must stay cheap, so the
class is patched when its module is first imported (or at once if it already was).
Remove when: vLLM's CPU runner allocates the buffer itself (a stock PP = 2, enforce_eager CPU run
no longer crashes).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

MODULE = "vllm.v1.worker.cpu_model_runner"
_MARK = "_vllm_kvp_pp_buffer"


def allocate_pp_buffer(runner) -> None:
    """Give a non-first pipeline stage's runner its receive buffer, if it has none yet."""
    from vllm.distributed.parallel_state import get_pp_group

    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)


def patch_runner(module) -> None:
    cls = module.CPUModelRunner
    if getattr(cls.load_model, _MARK, False):
        return
    original = cls.load_model

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        allocate_pp_buffer(self)
        return result

    setattr(load_model, _MARK, True)
    cls.load_model = load_model


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of MODULE so the patch runs right after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != MODULE:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch_runner(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def apply() -> None:
    if MODULE in sys.modules:
        patch_runner(sys.modules[MODULE])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
