"""Exactness does not hinge on the default model: a Qwen2-architecture model with multi-query
attention (one KV head, biased projections, head_dim 128) gives the same greedy tokens and the same
seeded samples with KV ranks as on one plain worker."""

import json
import shutil
from pathlib import Path

import pytest

from engines import assert_same_generation, engine, generate, random_prompts

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def qwen_mqa(model_path, tmp_path_factory):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = json.loads((Path(model_path) / "config.json").read_text())["vocab_size"]
    config = Qwen2Config(vocab_size=vocab, hidden_size=512, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                         max_position_embeddings=32768, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2, torch_dtype="float32")
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
        model.lm_head.weight.normal_(0, 1.0)  # peaked logits: greedy is a sharp check
    path = tmp_path_factory.mktemp("qwen_mqa")
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(model_path) / name, path)
    return str(path)


def _sample(llm, prompts):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=24, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def test_qwen2_mqa_greedy_and_seeded_sampling(qwen_mqa):
    prompts = random_prompts([9, 400, 1300], 4000, seed=51)
    kw = dict(max_model_len=4096, max_num_batched_tokens=512)
    with engine(qwen_mqa, **kw) as llm:
        reference, ref_samples = generate(llm, prompts, 32), _sample(llm, prompts)
    with engine(qwen_mqa, kvp={"size": 2, "max_tokens_per_rank": 256}, **kw) as llm:
        got, samples = generate(llm, prompts, 32), _sample(llm, prompts)
    assert_same_generation(reference, got, "qwen2 mqa, kvp=2")
    assert got.kvp_ranks[2] is not None and len(got.kvp_ranks[2]) == 2
    assert samples == ref_samples
