"""Start `vllm-kvp serve --kvp-size 2`, query it with the `openai` client, stop it.

    python examples/serve_and_query.py [--model DIR] [--kvp-size 2] [--port 0]

Shows a completion, a chat completion and a streamed completion, then the plugin's per-rank KV
metrics from /metrics. The server runs in its own process group and is always stopped (also on
Ctrl-C); its log is written to a temporary file whose path is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def parse_args() -> argparse.Namespace:
    from vllm_kvp.model import DEFAULT_MODEL_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR.expanduser()))
    p.add_argument("--kvp-size", type=int, default=2)
    p.add_argument("--port", type=int, default=0, help="0 = a free port")
    p.add_argument("--startup-timeout", type=float, default=420.0)
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model: str, kvp_size: int, port: int, timeout: float):
    port = port or free_port()
    cmd = [str(VENV_BIN / "vllm-kvp"), "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "8192",
           "--kv-cache-memory-bytes", str(32 << 20),  # per KV rank
           "--kvp-size", str(kvp_size), "--kvp-max-tokens-per-rank", "2048", "--seed", "0"]
    log = tempfile.NamedTemporaryFile("w", prefix="vllm_kvp_serve_", suffix=".log", delete=False)
    print(f"starting: {' '.join(cmd)}\n  log: {log.name}", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.time() - t0 > timeout:
                raise TimeoutError(f"server not healthy after {timeout:.0f}s; see {log.name}")
            time.sleep(1)
        print(f"server ready at {base} after {time.time() - t0:.0f}s\n", flush=True)
        yield base
    finally:
        print("\nstopping server ...", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # workers that outlived the leader
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def main() -> int:
    args = parse_args()
    model = str(Path(args.model).expanduser())
    if not (Path(model) / "config.json").exists():
        print(f"error: no model in {model} (build it: vllm-kvp make-model {model})", file=sys.stderr)
        return 2
    from openai import OpenAI

    with serve(model, args.kvp_size, args.port, args.startup_timeout) as base:
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY")

        # A completion whose prompt (~3000 tokens) is longer than one rank's 2048-token share.
        long_prompt = "The lighthouse keeper wrote down every ship that passed. " * 300
        t0 = time.perf_counter()
        c = client.completions.create(model=model, prompt=long_prompt, max_tokens=24, temperature=0)
        print(f"[completion] {c.usage.prompt_tokens} prompt tokens -> {c.choices[0].text!r} "
              f"({time.perf_counter() - t0:.2f}s)")

        t0 = time.perf_counter()
        chat = client.chat.completions.create(
            model=model, temperature=0, max_tokens=24,
            messages=[{"role": "system", "content": "You are a terse assistant."},
                      {"role": "user", "content": "Name three things found in a harbour."}])
        print(f"[chat] {chat.choices[0].message.content!r} ({time.perf_counter() - t0:.2f}s)")

        t0 = time.perf_counter()
        print("[stream] ", end="", flush=True)
        first = None
        n = 0
        for chunk in client.completions.create(model=model, prompt="Once upon a time", max_tokens=32,
                                               temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].text:
                first = first or time.perf_counter() - t0
                n += 1
                print(chunk.choices[0].text, end="", flush=True)
        print(f"\n         {n} chunks, first after {first or 0:.3f}s, total {time.perf_counter() - t0:.2f}s")

        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            lines = [l for l in r.read().decode().splitlines() if l.startswith("vllm_kvp:")]
        print("\n/metrics (vllm_kvp):\n  " + "\n  ".join(lines or ["(none)"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
