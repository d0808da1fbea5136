"""The engine's child processes skip the final garbage collection at exit; other processes do
not."""

import multiprocessing
import os

from vllm_kvp.engine import process_exit


class _Cycle:
    """A reference cycle whose collection leaves a mark on disk."""

    def __init__(self, path: str) -> None:
        # Builtins may be gone when the final collection runs: hold what __del__ calls.
        self.fd, self.write, self.me = os.open(path, os.O_WRONLY | os.O_CREAT), os.write, self

    def __del__(self) -> None:
        self.write(self.fd, b"collected")


def _child(path: str, skip: bool) -> None:
    import gc

    gc.disable()  # the cycle survives until the interpreter's final collection
    if skip:
        process_exit.skip_final_collection()
    _Cycle(path)


def _run(tmp_path, skip: bool) -> bool:
    path = str(tmp_path / f"mark-{skip}")
    proc = multiprocessing.get_context("spawn").Process(target=_child, args=(path, skip))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    with open(path) as f:
        return f.read() == "collected"


def test_child_exit_skips_the_final_collection(tmp_path):
    assert _run(tmp_path, skip=False), "the reference child should collect its cycle at exit"
    assert not _run(tmp_path, skip=True)


def test_a_process_without_a_parent_keeps_the_default_exit(monkeypatch):
    registered = []
    monkeypatch.setattr(process_exit, "_ARMED", False)
    monkeypatch.setattr(process_exit.atexit, "register", registered.append)
    monkeypatch.setattr(process_exit.multiprocessing, "parent_process", lambda: None)
    process_exit.skip_final_collection()
    assert registered == []
