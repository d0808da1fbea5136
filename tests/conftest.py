import os

import pytest

# Small KV cache per CPU worker: several engines run side by side on a 24 GiB machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """The embedded default model, built once per test session (seconds)."""
    from vllm_kvp.model import build_default_model

    cache = os.environ.get("VLLM_KVP_TEST_MODEL_DIR")
    path = cache or str(tmp_path_factory.mktemp("model") / "default")
    return str(build_default_model(path))
