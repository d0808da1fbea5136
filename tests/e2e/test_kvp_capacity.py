"""Capacity and residency of KV-parallel decode (issue: KV-parallel decode).

Each KV rank holds P blocks (num_gpu_blocks_override keeps its per-worker meaning). A prompt of
about 1.8 x P blocks does not fit one rank, is served by two with the tokens of an unconstrained
single-worker run, and each worker allocates only its own share. The counters of every rank show
that each new token's K/V is written exactly once, that each token is computed on one rank, and
that ranks exchange only queries, partial attention outputs and hidden states, whose size does not
depend on the context.
"""

import json
from pathlib import Path

import pytest

from vllm.exceptions import VLLMValidationError

from engines import assert_same_generation, engine, generate, random_prompts

pytestmark = pytest.mark.e2e

P = 24  # blocks per rank
BLOCK = 128  # vLLM's CPU block size
PROMPT_LEN = int(1.8 * P * BLOCK)  # 5529 tokens, 44 blocks with the generated ones
MAX_TOKENS = 32
MAX_MODEL_LEN = 44 * BLOCK
ENGINE = dict(max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=1024)


def _model_dims(model_path):
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim


def _hidden_size(model_path):
    return json.loads((Path(model_path) / "config.json").read_text())["hidden_size"]


@pytest.fixture(scope="module")
def prompt():
    return random_prompts([PROMPT_LEN], 4096, seed=3)


@pytest.fixture(scope="module")
def reference(model_path, prompt):
    with engine(model_path, **ENGINE) as llm:  # one worker, enough memory
        return generate(llm, prompt, MAX_TOKENS)


def test_one_rank_refuses(model_path, capfd):
    with pytest.raises(Exception):
        with engine(model_path, num_gpu_blocks_override=P, in_process=False, **ENGINE):
            pass
    err = capfd.readouterr().err
    assert "max_model_len" in err or "max seq len" in err, err[-3000:]


def test_two_ranks_serve_it_with_per_rank_memory(model_path, prompt, reference):
    layers, q_heads, kv_heads, head_dim = _model_dims(model_path)
    with engine(model_path, kvp={"size": 2, "placement": "onboard"},
                num_gpu_blocks_override=P, **ENGINE) as llm:
        before = llm.collective_rpc("kvp_stats")
        got = generate(llm, prompt, MAX_TOKENS)
        after = llm.collective_rpc("kvp_stats")
        # Beyond what all ranks hold together: vLLM's clear error, and the engine keeps serving.
        with pytest.raises(VLLMValidationError, match="maximum context length"):
            generate(llm, random_prompts([MAX_MODEL_LEN + 500], 4096, seed=4), 4)
        assert generate(llm, random_prompts([50], 4096, seed=5), 4).token_ids[0]

    assert_same_generation(reference, got, "kvp=2 at 1.8x one rank's capacity")
    assert sorted(got.kvp_ranks[0]) == [0, 1], f"the request should span both ranks: {got.kvp_ranks}"

    # Memory: each worker holds its own P blocks, not the pool.
    bytes_per_block = 2 * layers * kv_heads * head_dim * 4 * BLOCK
    assert sorted(s["kvp_rank"] for s in after) == [0, 1]
    for s in after:
        assert s["num_blocks"] == P
        assert s["kv_cache_bytes"] == P * bytes_per_block

    # Residency: every processed token's K/V is written on exactly one rank ...
    written = [a["kv_tokens_written"] - b["kv_tokens_written"] for a, b in zip(after, before)]
    sent = [a["exchanged_bytes"] - b["exchanged_bytes"] for a, b in zip(after, before)]
    tokens_processed = PROMPT_LEN + MAX_TOKENS - 1
    assert sum(written) == tokens_processed * layers
    assert all(w > 0 for w in written)
    # ... each token is computed on exactly one rank ...
    computed = [a["tokens_computed"] - b["tokens_computed"] for a, b in zip(after, before)]
    assert sum(computed) == tokens_processed
    # ... and the only traffic is queries, partial outputs and final hidden states: no KV moves.
    # Until the request onboards the second rank its steps are local (nothing but hidden states
    # travels); after, every rank sends its partial (out, lse) of every token, head and layer;
    # queries (each layer) and hidden states (each step) travel for the same rows, each rank's
    # padded to the largest.
    steps = [a["step_log"][len(b["step_log"]):] for a, b in zip(after, before)]
    assert [k for k, *_ in steps[0]] == [k for k, *_ in steps[1]]  # every rank: the same kinds
    spanning = sum(tokens for kind, _, _, tokens, *_ in steps[0] if kind != "local")
    assert any(kind == "local" for kind, *_ in steps[0]) and spanning >= MAX_TOKENS - 1
    diff = {k: [a[k] - b[k] for a, b in zip(after, before)]
            for k in ("exchanged_bytes", "query_bytes", "partial_bytes", "hidden_bytes",
                      "logits_bytes")}
    hidden_size = _hidden_size(model_path)
    assert diff["partial_bytes"] == [spanning * layers * q_heads * (head_dim + 1) * 4] * 2
    query_rows = [q // (layers * q_heads * head_dim * 4) for q in diff["query_bytes"]]
    hidden_rows = [h // (hidden_size * 4) for h in diff["hidden_bytes"]]
    assert all(tokens_processed // 2 <= r <= tokens_processed for r in hidden_rows)
    # Queries travel only in routed steps. A step one rank owns is shared (step_mode auto) once
    # the request spans both ranks: every decode step, and every prefill chunk but the one that
    # crosses from one rank to the next.
    assert all(q <= h - (MAX_TOKENS - 1)
               for q, h in zip(query_rows, hidden_rows)), (query_rows, hidden_rows)
    # (one request: its logits are one row a step, which the CPU host's costs keep whole)
    assert diff["logits_bytes"] == [0, 0]
    assert sent == [q + p + h for q, p, h in zip(diff["query_bytes"], diff["partial_bytes"],
                                                 diff["hidden_bytes"])]
