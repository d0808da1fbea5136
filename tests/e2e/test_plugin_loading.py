"""The plugin is loaded in every vLLM process, and loading it without a kvp config changes nothing.

VLLM_KVP_REGISTER_LOG makes `vllm_kvp.register()` append its process id to a file. The engine core
and the workers are spawned processes (the CPU platform forces spawn), so they inherit os.environ
as it is when the engine starts and run vLLM's plugin loading themselves.
"""

import contextlib
import os

import pytest

from engines import engine, generate, random_prompts

pytestmark = pytest.mark.e2e

ENGINE = dict(max_model_len=2048)
LENGTHS = [5, 37, 160, 600]
MAX_TOKENS = 32


@contextlib.contextmanager
def env(**values):
    """Set (value str) or unset (value None) environment variables; restore them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _logged(path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split()]


def _processes(llm):
    """(engine core pid, worker pids) of a running engine."""
    manager = llm.llm_engine.engine_core.resources.engine_manager
    (core,) = manager.processes
    assert core.is_alive()
    workers = llm.collective_rpc(lambda worker: os.getpid())
    return core.pid, workers


def _prompts():
    return random_prompts(LENGTHS, 4096, seed=3)


@pytest.fixture(scope="module")
def plugin_on(model_path, tmp_path_factory):
    """One engine with the plugin installed and no kvp config: its processes and its tokens."""
    log = tmp_path_factory.mktemp("on") / "register.log"
    # insecure serialization: collective_rpc ships a function to the workers
    with env(VLLM_KVP_REGISTER_LOG=str(log), VLLM_PLUGINS=None,
             VLLM_ALLOW_INSECURE_SERIALIZATION="1"):
        with engine(model_path, in_process=False, **ENGINE) as llm:
            core, workers = _processes(llm)
            result = generate(llm, _prompts(), MAX_TOKENS)
    return dict(log=_logged(log), core=core, workers=workers, result=result)


def test_plugin_registers_in_engine_core_and_worker(plugin_on):
    logged, core, workers = plugin_on["log"], plugin_on["core"], plugin_on["workers"]
    assert len(workers) == 1
    assert core != os.getpid()
    assert core in logged, f"engine core {core} did not register the plugin (log: {logged})"
    for pid in workers:
        assert pid != os.getpid()
        assert pid in logged, f"worker {pid} did not register the plugin (log: {logged})"
    # register() is idempotent: each process logs itself once at most
    assert len(logged) == len(set(logged))


def test_plugin_registers_in_every_kvp_process(model_path, tmp_path):
    log = tmp_path / "register.log"
    with env(VLLM_KVP_REGISTER_LOG=str(log), VLLM_PLUGINS=None,
             VLLM_ALLOW_INSECURE_SERIALIZATION="1"):
        with engine(model_path, kvp={"size": 2}, **ENGINE) as llm:
            core, workers = _processes(llm)
            ranks = llm.collective_rpc(lambda worker: worker.rank)
    logged = _logged(log)
    assert len(workers) == 2
    assert sorted(ranks) == [0, 1]
    assert len(set(workers)) == 2, f"the two KV ranks share a process: {workers}"
    # the KVP executor runs its workers in processes of their own
    assert core not in workers
    assert os.getpid() not in workers and core != os.getpid()
    assert core in logged, f"engine core {core} did not register the plugin (log: {logged})"
    for pid in workers:
        assert pid in logged, f"worker {pid} did not register the plugin (log: {logged})"
    assert len(logged) == len(set(logged))


def test_no_kvp_config_gives_the_tokens_of_plugin_disabled(model_path, plugin_on, tmp_path):
    log = tmp_path / "register.log"
    # VLLM_PLUGINS is a comma-separated allow list; "" allows only a plugin named "", i.e. none.
    with env(VLLM_KVP_REGISTER_LOG=str(log), VLLM_PLUGINS="",
             VLLM_ALLOW_INSECURE_SERIALIZATION="1"):
        with engine(model_path, in_process=False, **ENGINE) as llm:
            core, workers = _processes(llm)
            result = generate(llm, _prompts(), MAX_TOKENS)
    assert _logged(log) == [], "the plugin registered although VLLM_PLUGINS disabled it"
    assert core not in plugin_on["log"] and core != plugin_on["core"]

    on = plugin_on["result"]
    assert [len(t) for t in result.token_ids] == [MAX_TOKENS] * len(LENGTHS)
    assert result.token_ids == on.token_ids
    for a, b in zip(on.logprobs, result.logprobs):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
