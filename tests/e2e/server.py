"""Start and stop a real `vllm-kvp serve` on a free local port for the server tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    log_path: Path
    pid: int  # the server process (its engine core and workers are descendants)

    def log(self) -> str:
        return self.log_path.read_text()


@contextlib.contextmanager
def serve(model: str, *args: str, startup_timeout: float = 300.0, env: dict | None = None):
    """Yield a running server (its base URL and log file)."""
    port = free_port()
    cmd = [str(VENV_BIN / "vllm-kvp"), "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30),
           "--seed", "0", *args]
    log_path = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"vllm_kvp_server_{port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; log: {log_path}\n"
                                   + log_path.read_text()[-4000:])
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"server did not become healthy; log: {log_path}")
            time.sleep(1)
        yield Server(base, log_path, proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def metric_values(url: str, name: str) -> list[float]:
    """Values of every sample of `name` (any labels) in the server's /metrics."""
    text = requests.get(url + "/metrics", timeout=10).text
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{")]
