"""The CPU pipeline patch reaches vLLM's CPU runner, which is imported after the plugin loads."""

import subprocess
import sys

CHECK = """
import sys
import vllm_kvp
vllm_kvp.register()
vllm_kvp.register()  # idempotent
import vllm.v1.worker.cpu_model_runner as m
load = m.CPUModelRunner.load_model
assert getattr(load, "_vllm_kvp_pp_buffer", False), "not patched"
assert not getattr(load.__wrapped__, "_vllm_kvp_pp_buffer", False), "patched twice"
from vllm_kvp.patches.cpu_pipeline import _PatchOnImport
assert not any(isinstance(f, _PatchOnImport) for f in sys.meta_path), "import hook left behind"
print("ok")
"""


def test_runner_imported_after_register_is_patched_once():
    """As in a worker process: register() runs first, the CPU runner is imported later."""
    out = subprocess.run([sys.executable, "-c", CHECK],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
