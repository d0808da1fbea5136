"""The restart budget of dead-worker recovery (engine/recovery.py): a rank that keeps dying is
not restarted forever."""

from vllm_kvp.engine import recovery
from vllm_kvp.engine.recovery import Failure, RecoveryLog


def test_restarts_limited_per_window(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(recovery.time, "monotonic", lambda: now[0])
    log = RecoveryLog(max_restarts=2)
    for _ in range(2):
        assert log.may_restart()
        log.record_failure(Failure(1, 1, 123, -9, now[0]))
        log.record_restart(5.0)
    assert log.epoch == 2 and len(log.failures) == 2
    assert not log.may_restart()  # a third death within the window: the engine stops
    now[0] += recovery.RESTART_WINDOW_S + 1
    assert log.may_restart()  # old restarts age out


def test_zero_restarts_never_restart():
    assert not RecoveryLog(max_restarts=0).may_restart()


def test_one_log_per_engine_config():
    a, b = object(), object()
    assert recovery.recovery_log(a, 3) is recovery.recovery_log(a, 3)
    assert recovery.recovery_log(a, 3) is not recovery.recovery_log(b, 3)
