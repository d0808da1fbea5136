"""`--kvp-*` flags on vLLM's real argument parser and the create_engine_config hook."""

import json
import os

import psutil
import pytest

import vllm_kvp
from vllm_kvp.engine import settings as layout
from vllm_kvp.config import KVPConfigError

vllm_kvp.register()

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

FULL = ["--kvp-size", "2", "--kvp-placement", "striped", "--kvp-max-tokens-per-rank", "4096",
        "--kvp-stripe-min-tokens", "3000", "--kvp-prefill-chunking", "adaptive", "--kvp-step-mode", "owner",
        "--kvp-split-step-tokens", "64", "--kvp-split-min-bytes", "0",
        "--kvp-max-rank-restarts", "5", "--kvp-device", "a100", "--kvp-exchange-scope", "holders"]


@pytest.fixture(scope="module")
def parser():
    p = FlexibleArgumentParser()
    AsyncEngineArgs.add_cli_args(p)
    return p


def _engine_args(parser, argv, model="x"):
    return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", model, *argv]))


def test_flags_fold_into_additional_config(parser):
    args = _engine_args(parser, FULL)
    assert isinstance(args, AsyncEngineArgs)
    assert args.additional_config["kvp"] == {"size": 2, "placement": "striped",
                                             "max_tokens_per_rank": 4096,
                                             "stripe_min_tokens": 3000,
                                             "prefill_chunking": "adaptive",
                                             "step_mode": "owner", "split_step_tokens": 64,
                                             "split_min_bytes": 0, "max_rank_restarts": 5,
                                             "device": "a100", "exchange_scope": "holders"}


def test_only_given_flags_are_folded(parser):
    args = _engine_args(parser, ["--kvp-size", "3"])
    assert args.additional_config == {"kvp": {"size": 3}}


def test_flags_merge_with_and_override_additional_config(parser):
    extra = {"kvp": {"size": 3, "placement": "onboard", "max_tokens_per_rank": 1024}, "other": 7}
    args = _engine_args(parser, ["--additional-config", json.dumps(extra),
                                 "--kvp-placement", "striped", "--kvp-size", "4"])
    assert args.additional_config == {
        "kvp": {"size": 4, "placement": "striped", "max_tokens_per_rank": 1024}, "other": 7}


def test_additional_config_alone_is_kept(parser):
    extra = {"kvp": {"size": 2, "placement": "striped"}}
    args = _engine_args(parser, ["--additional-config", json.dumps(extra)])
    assert args.additional_config == extra


def test_no_flags_leave_additional_config_unchanged(parser):
    assert "kvp" not in _engine_args(parser, []).additional_config
    extra = {"other": {"a": 1}}
    args = _engine_args(parser, ["--additional-config", json.dumps(extra)])
    assert args.additional_config == extra


def test_flag_defaults_are_unset(parser):
    ns = parser.parse_args(["--model", "x"])
    assert (ns.kvp_size, ns.kvp_placement, ns.kvp_max_tokens_per_rank, ns.kvp_prefill_chunking,
            ns.kvp_step_mode, ns.kvp_split_step_tokens, ns.kvp_split_min_bytes,
            ns.kvp_max_rank_restarts, ns.kvp_stripe_min_tokens, ns.kvp_device) == (None,) * 10


@pytest.mark.parametrize("argv", [
    ["--kvp-placement", "bogus"],
    ["--kvp-size", "two"],
    ["--kvp-max-tokens-per-rank", "1.5"],
    ["--kvp-prefill-chunking", "medha"],
])
def test_argparse_rejects_malformed_flags(parser, argv, capsys):
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--model", "x", *argv])
    assert info.value.code != 0
    assert argv[0] in capsys.readouterr().err


def test_flags_are_in_help(parser):
    text = parser.format_help()
    for flag in ("--kvp-size", "--kvp-placement", "--kvp-max-tokens-per-rank",
                 "--kvp-stripe-min-tokens", "--kvp-prefill-chunking"):
        assert flag in text


def test_add_cli_args_twice_does_not_duplicate():
    p = FlexibleArgumentParser()
    AsyncEngineArgs.add_cli_args(p)
    from vllm_kvp.patches.engine_args import add_kvp_args

    add_kvp_args(p)  # no argparse conflict error
    assert sum(a.dest == "kvp_size" for a in p._actions) == 1


# --- create_engine_config ----------------------------------------------------------------------

def _children():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_size_zero_parses_but_create_engine_config_refuses(parser, model_path):
    args = _engine_args(parser, ["--kvp-size", "0"], model=model_path)
    assert args.additional_config == {"kvp": {"size": 0}}
    before = _children()
    with pytest.raises(KVPConfigError, match=r"kvp\.size") as info:
        args.create_engine_config()
    assert ">= 1" in str(info.value)
    assert _children() == before


def test_invalid_kvp_fails_in_calling_process_before_engine_starts(model_path, tmp_path,
                                                                    monkeypatch):
    """LLM(...) with a bad kvp config raises here; no engine core process ever registered."""
    from vllm import LLM

    log = tmp_path / "register.log"
    monkeypatch.setenv("VLLM_KVP_REGISTER_LOG", str(log))
    before = _children()
    with pytest.raises(KVPConfigError, match=r"kvp\.placement"):
        LLM(model=model_path, dtype="float32", additional_config={"kvp": {"size": 2,
                                                                          "placement": "x"}})
    assert _children() == before
    # register() in the test process already ran (module import), so any pid here would be a
    # freshly started engine process.
    assert not log.exists() or log.read_text().strip() == ""


@pytest.mark.parametrize("extra, field", [
    (dict(scheduler_cls="my.Sched"), "scheduler_cls"),
    (dict(data_parallel_size=2), "data_parallel_size"),
    (dict(worker_cls="my.Worker"), "worker_cls"),
    (dict(distributed_executor_backend="external_launcher"), "distributed_executor_backend"),
    (dict(enable_lora=True), "enable_lora"),
    (dict(kv_transfer_config={"kv_connector": "ExampleConnector", "kv_role": "kv_both"}),
     "kv_transfer_config"),
    (dict(runner="pooling", convert="embed"), "pooling"),
])
def test_incompatible_settings_are_refused(model_path, extra, field):
    args = EngineArgs(model=model_path, dtype="float32", additional_config={"kvp": {"size": 2}},
                      **extra)
    with pytest.raises(KVPConfigError) as info:
        args.create_engine_config()
    message = str(info.value)
    assert "kvp.size > 1" in message
    assert field in message


def test_incompatible_settings_are_fine_without_kvp(model_path):
    config = EngineArgs(model=model_path, dtype="float32",
                        scheduler_cls="my.Sched").create_engine_config()
    assert config.scheduler_config.scheduler_cls == "my.Sched"


def _selected(config):
    return (config.parallel_config.distributed_executor_backend,
            config.parallel_config.worker_cls,
            config.scheduler_config.scheduler_cls)


@pytest.mark.parametrize("kvp", [{"size": 2}, {"size": 4, "placement": "striped",
                                                "max_tokens_per_rank": 512}])
def test_valid_kvp_selects_vllm_kvp_classes(model_path, kvp):
    config = EngineArgs(model=model_path, dtype="float32",
                        additional_config={"kvp": kvp}).create_engine_config()
    assert _selected(config) == (layout.EXECUTOR, layout.WORKER, layout.SCHEDULER)
    # the validated, normalised dict is what every process will read
    assert config.additional_config["kvp"] == {"placement": "onboard",
                                                "max_tokens_per_rank": None,
                                                "stripe_min_tokens": None,
                                                "prefill_chunking": "fixed",
                                                "step_mode": "auto", "split_step_tokens": None,
                                                "device": None, "split_min_bytes": None,
                                                "exchange_scope": "auto",
                                                "max_rank_restarts": 3, **kvp}
    assert config.scheduler_config.async_scheduling is False


def test_cli_flags_select_vllm_kvp_classes(parser, model_path):
    args = _engine_args(parser, [*FULL, "--dtype", "float32"], model=model_path)
    config = args.create_engine_config()
    assert _selected(config) == (layout.EXECUTOR, layout.WORKER, layout.SCHEDULER)
    assert config.additional_config["kvp"] == {"size": 2, "placement": "striped",
                                                "max_tokens_per_rank": 4096,
                                                "stripe_min_tokens": 3000,
                                                "prefill_chunking": "adaptive",
                                             "step_mode": "owner", "split_step_tokens": 64,
                                             "split_min_bytes": 0, "max_rank_restarts": 5,
                                             "device": "a100", "exchange_scope": "holders"}


@pytest.mark.parametrize("additional_config", [None, {"kvp": {"size": 1}}])
def test_without_kvp_vllm_defaults_are_kept(model_path, additional_config):
    kwargs = dict(model=model_path, dtype="float32")
    if additional_config is not None:
        kwargs["additional_config"] = additional_config
    hooked = EngineArgs(**kwargs).create_engine_config()
    # vLLM's own create_engine_config, without the plugin's hook
    original = EngineArgs.create_engine_config.__wrapped__
    stock = original(EngineArgs(model=model_path, dtype="float32"))
    assert _selected(hooked) == _selected(stock)
    for value in _selected(hooked):
        assert "vllm_kvp" not in str(value)


# --- adaptive chunking with one KV rank, pipeline parallelism ------------------------------------

def test_adaptive_chunking_alone_selects_only_the_scheduler(parser, model_path):
    args = _engine_args(parser, ["--kvp-prefill-chunking", "adaptive", "--dtype", "float32"],
                        model=model_path)
    config = args.create_engine_config()
    stock = EngineArgs.create_engine_config.__wrapped__(EngineArgs(model=model_path,
                                                                   dtype="float32"))
    executor, worker, scheduler = _selected(config)
    assert (executor, worker) == _selected(stock)[:2]
    assert config.additional_config["kvp"]["prefill_chunking"] == "adaptive"
    # vLLM's CPU platform always schedules synchronously; where vLLM schedules asynchronously
    # (CUDA, one worker) the adaptive scheduler's asynchronous twin is chosen instead.
    assert config.scheduler_config.async_scheduling is False
    assert scheduler == layout.CHUNK_SCHEDULER
    config.scheduler_config.async_scheduling = True
    layout.finish_engine_config(config)
    assert _selected(config)[2] == layout.ASYNC_CHUNK_SCHEDULER


@pytest.mark.parametrize("kvp", [{"prefill_chunking": "adaptive"},
                                 {"size": 2, "prefill_chunking": "adaptive"}])
def test_adaptive_chunking_needs_chunked_prefill(model_path, kvp):
    before = _children()
    args = EngineArgs(model=model_path, dtype="float32", enable_chunked_prefill=False,
                      additional_config={"kvp": kvp})
    with pytest.raises(KVPConfigError, match="enable_chunked_prefill") as info:
        args.create_engine_config()
    assert "kvp.prefill_chunking" in str(info.value)
    assert _children() == before


def test_adaptive_chunking_refuses_a_foreign_scheduler(model_path):
    args = EngineArgs(model=model_path, dtype="float32", scheduler_cls="my.Sched",
                      additional_config={"kvp": {"prefill_chunking": "adaptive"}})
    with pytest.raises(KVPConfigError, match="scheduler_cls"):
        args.create_engine_config()


def test_kv_ranks_with_pipeline_parallelism_are_accepted(model_path):
    # vLLM admits PP only for executors it knows; the KVP executor extends its "mp" one.
    config = EngineArgs(model=model_path, dtype="float32", pipeline_parallel_size=2,
                        additional_config={"kvp": {"size": 2}}).create_engine_config()
    assert _selected(config) == (layout.EXECUTOR, layout.WORKER, layout.SCHEDULER)
    assert config.parallel_config.pipeline_parallel_size == 2


def test_more_stages_than_layers_is_refused_with_kv_ranks(model_path):
    before = _children()
    args = EngineArgs(model=model_path, dtype="float32", pipeline_parallel_size=3,
                      additional_config={"kvp": {"size": 2}})
    with pytest.raises(KVPConfigError, match="pipeline_parallel_size=3") as info:
        args.create_engine_config()
    assert "2 layers" in str(info.value)
    assert _children() == before



# --- settings resolved by vLLM that KVP rewrites or refuses -------------------------------------

def _kvp_config(model_path, **kw):
    return EngineArgs(model=model_path, additional_config={"kvp": {"size": 2}},
                      **{"dtype": "float32", **kw}).create_engine_config()


def test_kv_cache_dtype_equal_to_the_model_dtype_reaches_vllm_as_auto(model_path):
    config = _kvp_config(model_path, dtype="bfloat16", kv_cache_dtype="bfloat16")
    assert config.cache_config.cache_dtype == "auto"


def test_kv_cache_dtype_unchanged_without_kvp(model_path):
    config = EngineArgs(model=model_path, dtype="bfloat16",
                        kv_cache_dtype="bfloat16").create_engine_config()
    assert config.cache_config.cache_dtype == "bfloat16"


def test_kv_cache_dtype_other_than_the_model_dtype_is_refused_before_workers(model_path):
    before = _children()
    with pytest.raises(KVPConfigError, match="kv_cache_dtype='bfloat16' differs"):
        _kvp_config(model_path, dtype="float32", kv_cache_dtype="bfloat16")
    assert _children() == before


def test_settings_forcing_model_runner_v2_are_refused(model_path):
    # vLLM uses Model Runner V2 with HiSparse or watermarking whatever VLLM_USE_V2_MODEL_RUNNER
    # says (VllmConfig.use_v2_model_runner); the resolved config is checked.
    config = _kvp_config(model_path)
    config.watermark_config = object()
    with pytest.raises(KVPConfigError, match="watermark_config makes vLLM use Model Runner V2"):
        layout.check_engine_config(config)
    config.watermark_config = None
    config.attention_config.hisparse_config = object()
    with pytest.raises(KVPConfigError, match="attention_config.hisparse_config"):
        layout.check_engine_config(config)
    config.attention_config.hisparse_config = None
    layout.check_engine_config(config)


def test_backend_per_kind_is_refused(model_path):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    config = _kvp_config(model_path)
    config.attention_config.backend_per_kind = {"full_attention": AttentionBackendEnum.FLASH_ATTN}
    with pytest.raises(KVPConfigError, match="backend_per_kind"):
        layout.check_engine_config(config)


def test_backend_per_kind_through_engine_args_is_refused(model_path):
    with pytest.raises(KVPConfigError, match="backend_per_kind"):
        _kvp_config(model_path, attention_config={"backend_per_kind": {"full_attention":
                                                                        "FLASH_ATTN"}})
