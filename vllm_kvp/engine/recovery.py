"""Recovery from a dead worker, shared by the executor and the scheduler of one engine.

A worker that dies (killed, out of memory, a lost GPU, a dead Ray actor) takes its KV rank with it,
and the other ranks cannot be trusted to leave the collective they may be in: vLLM's CPU
collectives spin on shared memory with no timeout, and NCCL's hang until its watchdog tears the
process down. So the executor restarts the whole worker set, and the requests recompute: the
scheduler resets every unfinished request to its prompt plus the tokens it has generated
(vLLM's recompute preemption, with fresh workers), and the workers re-fill their KV from the
tokens before they sample the next one. Greedy outputs are those of an undisturbed run; streams
see a delay, never an error. See docs/design.md ("Rank failure").

The two halves meet in this process-local `RecoveryLog` (one per engine config): the executor
counts failures and restarts, the scheduler sees a new epoch and resets its requests.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

from prometheus_client import Counter, Histogram

logger = logging.getLogger("vllm.vllm_kvp")

RESTART_WINDOW_S = 600.0  # restarts are limited per this many seconds


@dataclasses.dataclass
class Failure:
    world_rank: int
    kv_rank: int
    pid: int | None
    exitcode: int | None
    detected_at: float  # time.monotonic()


class RecoveryMetrics:
    """Created without a registry, like `metrics.KVPMetrics` (multiprocess mode under serve)."""

    def __init__(self) -> None:
        self.failures = Counter("vllm_kvp:rank_failures",
                                "Workers that died; each took its KV rank down.", registry=None)
        self.recovered = Counter(
            "vllm_kvp:requests_recovered",
            "Unfinished requests recomputed after a worker died.", registry=None)
        self.recovery_seconds = Histogram(
            "vllm_kvp:recovery_seconds",
            "From a worker's death to a recomputed request's next token.",
            buckets=[0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf")], registry=None)
        self.restart_seconds = Histogram(
            "vllm_kvp:worker_restart_seconds",
            "Time to restart the workers after a death (spawn, load weights, KV cache).",
            buckets=[1, 2, 5, 10, 20, 30, 60, 120, 300, float("inf")], registry=None)


class RecoveryLog:
    """Failures and restarts of one engine. `epoch` counts completed restarts."""

    def __init__(self, max_restarts: int) -> None:
        self.max_restarts = max_restarts
        self.epoch = 0
        self.failures: list[Failure] = []
        self.last_failure: Failure | None = None
        self._restarts: collections.deque[float] = collections.deque()
        self._metrics: RecoveryMetrics | None = None

    @property
    def metrics(self) -> RecoveryMetrics:
        if self._metrics is None:
            self._metrics = RecoveryMetrics()
        return self._metrics

    def record_failure(self, failure: Failure) -> None:
        self.failures.append(failure)
        self.last_failure = failure
        self.metrics.failures.inc()

    def may_restart(self) -> bool:
        """Whether another restart is allowed: at most `max_restarts` in `RESTART_WINDOW_S`, so a
        rank that keeps dying (a bad GPU, a crash on every start) is not restarted forever."""
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        return len(self._restarts) < self.max_restarts

    def record_restart(self, seconds: float) -> None:
        self._restarts.append(time.monotonic())
        self.epoch += 1
        self.metrics.restart_seconds.observe(seconds)


_LOGS: dict[int, RecoveryLog] = {}
_LOCK = threading.Lock()


def recovery_log(vllm_config, max_restarts: int) -> RecoveryLog:
    """The log of the engine built from `vllm_config` (the executor and the scheduler of one
    engine core receive the same config object)."""
    with _LOCK:
        log = _LOGS.get(id(vllm_config))
        if log is None:
            log = _LOGS[id(vllm_config)] = RecoveryLog(max_restarts)
        return log
