"""The executor half of dead-worker recovery (see recovery.py): notice, restart, carry on.

A watcher thread waits on the worker processes. When one exits, it records the failure (the
world rank and its KV rank), kills the rest of the world and cancels the message queues, so the
engine thread never waits on a dead worker. The engine thread then meets the error in the step it
is running (or in the next call it makes), restarts the workers, replays the start-up calls the
engine made before its first step (KV-cache specs, memory, cache layout, warm-up) and returns an
empty step output. The scheduler, seeing a new epoch, recomputes every unfinished request.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

from vllm_kvp.engine import vllm_compat
from vllm_kvp.engine.recovery import Failure, RecoveryLog, recovery_log

logger = logging.getLogger("vllm.vllm_kvp")

# Executor calls that run a step: after a restart they return the empty step output, and the
# scheduler recomputes. Every other call before the first step is replayed on restarted workers.
STEP_METHODS = frozenset({"execute_model", "sample_tokens", "execute_dummy_batch",
                          "take_draft_token_ids"})
# A failed call waits this long for the watcher to see a worker die (a survivor's collective may
# fail a moment before the dead process's exit is noticed); otherwise the error is vLLM's own.
DEATH_GRACE_S = 2.0
POLL_S = 0.2  # how often a step waiting on a remote reply checks for a death


class _RecoveringFuture(Future):
    """A step's future whose failure by a dead worker resolves to the empty step output."""

    def __init__(self, executor: "RestartingExecutorMixin", inner: Future, epoch: int) -> None:
        super().__init__()
        self._executor, self._inner, self._epoch = executor, inner, epoch
        self._poll = vllm_compat.reply_poller(executor)

    def done(self) -> bool:
        return self._inner.done() or self._executor._kvp_lost is not None

    def result(self, timeout: float | None = None) -> Any:
        ex = self._executor
        if self._poll is not None and not self._inner.done():
            while not self._poll(POLL_S):
                if ex._kvp_lost is not None or ex._kvp_recovery.epoch != self._epoch:
                    return ex._kvp_after_failure(RuntimeError("a worker died"), self._epoch)
        try:
            return self._inner.result(timeout)
        except Exception as e:  # noqa: BLE001 (re-raised unless a worker died)
            return self._executor._kvp_after_failure(e, self._epoch)


class RestartingExecutorMixin:
    """Mixed into the KVP executors (multiprocess and Ray), before vLLM's executor class."""

    _kvp_lost: Failure | None = None

    def _setup_restarts(self) -> None:
        self._kvp_recovery: RecoveryLog = recovery_log(self.vllm_config,
                                                       self.kvp.max_rank_restarts)
        self._kvp_lock = threading.RLock()
        self._kvp_lost = None
        self._kvp_setup_calls: list[tuple[Any, tuple, dict]] = []
        self._kvp_serving = False

    @property
    def _kvp_restarts(self) -> bool:
        return self.kvp.max_rank_restarts > 0

    def start_worker_monitor(self, inline: bool = False) -> None:
        if not self._kvp_restarts:
            return super().start_worker_monitor(inline)
        vllm_compat.watch_workers(self, self._kvp_on_death)

    def _kvp_on_death(self, world_rank: int, proc: Any) -> None:
        with self._kvp_lock:
            if self._kvp_lost is not None:
                return
            per_rank = self.vllm_config.parallel_config.world_size // self.kvp.size
            pid, exitcode = getattr(proc, "pid", None), getattr(proc, "exitcode", None)
            failure = Failure(world_rank, world_rank // per_rank, pid, exitcode, time.monotonic())
            self._kvp_recovery.record_failure(failure)
            logger.error(
                "vllm_kvp: worker %d (KV rank %d, pid %s) died with exit code %s; stopping the "
                "other workers, which restart with empty KV caches; unfinished requests recompute",
                world_rank, failure.kv_rank, pid, exitcode)
            vllm_compat.kill_workers(self)
            self._kvp_lost = failure

    def collective_rpc(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        if not self._kvp_restarts:
            return super().collective_rpc(method, *args, **kwargs)
        step = method in STEP_METHODS
        if step:
            self._kvp_serving = True
        elif not self._kvp_serving:
            self._kvp_setup_calls.append((method, args, kwargs))
        if self._kvp_lost is not None:  # a worker died between calls
            self._kvp_restart()
            if step:
                return self._kvp_done(vllm_compat.empty_step_output(), kwargs)
        epoch = self._kvp_recovery.epoch
        blocking = step and not kwargs.get("non_block")
        # A blocking step is sent as non-blocking and waited on below, where a death is noticed.
        send = {**kwargs, "non_block": True} if blocking else kwargs
        try:
            result = super().collective_rpc(method, *args, **send)
        except Exception as e:  # noqa: BLE001 (re-raised unless a worker died)
            if step:
                return self._kvp_done(self._kvp_after_failure(e, epoch), kwargs)
            self._kvp_after_failure(e, epoch, step=False)
            # Other calls (utilities, queries) are run again on the restarted workers.
            return super().collective_rpc(method, *args, **kwargs)
        if step and isinstance(result, Future):
            future = _RecoveringFuture(self, result, epoch)
            return future.result() if blocking else future
        return result

    @staticmethod
    def _kvp_done(value: Any, kwargs: dict) -> Any:
        if not kwargs.get("non_block"):
            return value
        future: Future = Future()
        future.set_result(value)
        return future

    def _kvp_after_failure(self, error: Exception, epoch: int, step: bool = True) -> Any:
        """A call failed: if a worker died (or a restart already replaced the world the call ran
        on), restart, and a step gets the empty output; otherwise it is vLLM's error."""
        if self._kvp_recovery.epoch == epoch:
            deadline = time.monotonic() + DEATH_GRACE_S
            while self._kvp_lost is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._kvp_lost is None:
                raise error
            self._kvp_restart()
        return vllm_compat.empty_step_output() if step else None

    def _kvp_restart(self) -> None:
        with self._kvp_lock:
            failure = self._kvp_lost
            if failure is None:
                return  # another caller restarted already
            if not self._kvp_recovery.may_restart():
                self._kvp_give_up(failure)
            started = time.monotonic()
            vllm_compat.kill_workers(self)
            vllm_compat.respawn_workers(self)
            for method, args, kwargs in self._kvp_setup_calls:
                vllm_compat.call_workers(self, method, *args, **kwargs)
            self._kvp_lost = None
            seconds = time.monotonic() - started
            self._kvp_recovery.record_restart(seconds)
            logger.warning(
                "vllm_kvp: restarted %d workers in %.1f s after KV rank %d died (restart %d)",
                self.vllm_config.parallel_config.world_size, seconds, failure.kv_rank, self._kvp_recovery.epoch)

    def _kvp_give_up(self, failure: Failure) -> None:
        from vllm_kvp.engine.recovery import RESTART_WINDOW_S

        logger.error("vllm_kvp: KV rank %d died again; %d restarts in the last %.0f s is the "
                     "limit (kvp max_rank_restarts), the engine stops", failure.kv_rank,
                     self._kvp_recovery.max_restarts, RESTART_WINDOW_S)
        self.is_failed = True
        callback, self.failure_callback = self.failure_callback, None
        self.shutdown()
        if callback is not None:
            callback()
        raise RuntimeError(f"vllm_kvp: KV rank {failure.kv_rank} died and the restart limit "
                           f"({self._kvp_recovery.max_restarts} in {RESTART_WINDOW_S:.0f} s) "
                           f"is reached")
