"""The embedded default model: deterministic, cached, GQA/long-context config, peaked greedy logits.

Runs with transformers only (no vLLM engine), in well under a minute.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from vllm_kvp import model as kvp_model


def _hashes(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return kvp_model.build_default_model(tmp_path_factory.mktemp("m") / "model", seed=0)


def test_build_is_deterministic(built, tmp_path):
    again = kvp_model.build_default_model(tmp_path / "again", seed=0)
    assert _hashes(built) == _hashes(again)
    other = kvp_model.build_default_model(tmp_path / "other", seed=1)
    assert _hashes(other)["model.safetensors"] != _hashes(built)["model.safetensors"]
    assert _hashes(other)["tokenizer.json"] == _hashes(built)["tokenizer.json"]


def test_config_is_small_gqa_long_context(built):
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["head_dim"] in (32, 64, 80, 96, 112, 128)  # sizes the vLLM CPU attention kernel takes
    assert cfg["max_position_embeddings"] >= 131072
    assert cfg["tie_word_embeddings"] is False
    assert cfg["dtype"] == "float32"
    assert 2048 <= cfg["vocab_size"] <= 4096


def test_tokenizer_round_trips_and_chats(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    text = "Once upon a time, 42 birds sang quietly near the old river!\nThe end?"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token == "</s>" and tok.bos_token == "<s>"
    assert len(tok) == json.loads((built / "config.json").read_text())["vocab_size"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n") and "hi" in chat


def test_cached_build_is_reused_and_incomplete_rebuilt(tmp_path):
    path = kvp_model.build_default_model(tmp_path / "m", seed=0)
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert kvp_model.build_default_model(path, seed=0) == path
    assert weights.stat().st_mtime_ns == mtime  # reused, not rebuilt

    (path / "tokenizer.json").write_text("{}")  # a damaged build no longer matches its marker
    kvp_model.build_default_model(path, seed=0)
    assert json.loads((path / "tokenizer.json").read_text())  # rebuilt

    marker = json.loads((path / kvp_model.MARKER).read_text())
    marker["format_version"] = -1
    (path / kvp_model.MARKER).write_text(json.dumps(marker))
    mtime = weights.stat().st_mtime_ns
    kvp_model.build_default_model(path, seed=0)
    assert weights.stat().st_mtime_ns != mtime  # other format version: rebuilt


def test_refuses_to_overwrite_foreign_dir(tmp_path):
    (tmp_path / "precious.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        kvp_model.build_default_model(tmp_path, seed=0)
    assert (tmp_path / "precious.txt").exists()


def test_greedy_margins_are_large(built):
    r = kvp_model.measure_margins(built, max_tokens=32)
    assert r["positions"] == 32 * len(kvp_model.MARGIN_PROMPTS)
    assert r["median"] > 0.8
    assert r["min"] > 1e-4
    # No collapse into one repeated token: most generated tokens differ.
    assert min(r["distinct_tokens_per_prompt"]) > 16
    assert len(set(r["texts"])) == len(r["texts"])
    assert all(t.isascii() for t in r["texts"])


def test_make_model_cli_does_not_import_vllm(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from vllm_kvp.cli import main; main(['make-model', sys.argv[1]]); "
            "assert 'vllm' not in sys.modules, 'make-model imported vllm'")
    env = dict(os.environ, VLLM_PLUGINS="")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], check=True, env=env, timeout=120)
    assert (tmp_path / "m" / kvp_model.MARKER).exists()


def test_bench_size_is_a_separate_even_layered_build(built, tmp_path):
    from vllm_kvp.planner.chunking import attention_ratio_from_hf_config
    from transformers import AutoConfig

    path = kvp_model.build_default_model(tmp_path / "bench", seed=0, size="bench")
    cfg = json.loads((path / "config.json").read_text())
    assert {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "intermediate_size")} == {
        "hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 4096}
    assert _hashes(path)["tokenizer.json"] == _hashes(built)["tokenizer.json"]
    # A build of one size is never taken for the other.
    assert not kvp_model._is_complete(path, 0, kvp_model.ARCH)
    ratio = attention_ratio_from_hf_config(AutoConfig.from_pretrained(path))
    assert ratio == pytest.approx(2048 / 15_204_352)
