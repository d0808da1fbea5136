"""The embedded default model: a tiny Llama checkpoint with seeded random weights, built on the spot.

Why: nothing can be downloaded at run time, and exactness tests want a model whose greedy tokens change
whenever attention is computed wrongly but never because of float rounding. So the weights are random
(seeded, byte-identical across builds), attention is sharp (any missing or misplaced KV changes the
output) and the lm_head is scaled so the top-1 logit clearly beats the top-2 one.
The tokenizer is a byte-level BPE trained here on a deterministic English-ish corpus.
Only torch/transformers/tokenizers/safetensors are imported (lazily): building must not import vLLM.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Bump when anything below changes the files produced: cached builds with another version are rebuilt.
FORMAT_VERSION = 2
MARKER = "vllm_kvp_model.json"
DEFAULT_MODEL_DIR = Path(os.environ.get("VLLM_KVP_MODEL_DIR", "~/.cache/vllm_kvp/models/default"))

ARCH = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    max_position_embeddings=131072, rope_theta=1e6, vocab_size=4096,
)
# Benchmark size: dense work per token large enough that step times are compute, not overhead,
# and an even layer count that splits over 2 or 4 pipeline stages. Same tokenizer and init recipe.
BENCH_ARCH = dict(ARCH, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                  head_dim=128)
SIZES = {"default": ARCH, "bench": BENCH_ARCH}
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MARGIN_PROMPTS = [
    "The quick brown fox", "Once upon a time there was", "In the morning the market",
    "Water flows down the river and", "She opened the old book", "Numbers like 12 and 7",
    "The engine of the train", "A small garden near the house", "Why do birds sing",
    "They walked to the city at night",
]

_WORDS = (
    "the a an of to and in is was for on with as by at from that this it he she they we you "
    "time year day night morning city river house garden market book letter road train engine "
    "light water fire stone tree bird fox dog cat horse child people world story music song "
    "quick brown old new small large green red blue quiet bright dark warm cold long short "
    "walk walked run runs open opened read reads write wrote sing sings flows grow grew build "
    "built find found keep kept turn turned speak spoke think thought carry carried watch "
    "slowly quickly often never always again together under over between across after before "
    "because while when where why how there here very more most some many every each other"
).split()
_SYLLABLES = "ka lo mi ne ru ta ven sor dal pri ost mun gel fa zi tor bel chan quo rin".split()


def _corpus(n_sentences: int = 20000) -> list[str]:
    """Deterministic English-ish text (fixed seed, independent of the weight seed)."""
    rng = random.Random(1234)
    # Invented words give BPE enough distinct pairs to fill the vocabulary.
    invented = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(2000)]
    words = _WORDS + invented
    out = []
    for _ in range(n_sentences):
        toks = [rng.choice(words) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.1:  # a few numbers, small range: numbers should not eat the vocabulary
            toks.insert(rng.randrange(len(toks)), str(rng.randint(0, 99)))
        s = " ".join(toks)
        out.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ","]))
    return out


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Completions (add_special_tokens=True) get a BOS; the chat template writes its own.
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def _suppressed_ids(tok) -> list[int]:
    """Tokens the model never picks: specials (so greedy runs to max_tokens) and tokens that do not
    decode to printable ASCII (so generated text is always valid, readable UTF-8)."""
    ids = []
    for i in range(tok.get_vocab_size()):
        s = tok.decode([i], skip_special_tokens=False)
        if tok.id_to_token(i) in SPECIAL_TOKENS or not s or not all(c == "\n" or " " <= c <= "~" for c in s):
            ids.append(i)
    return ids


def _init_weights(model, seed: int, suppressed: list[int], arch: dict = ARCH) -> None:
    """Explicit seeded init, independent of transformers' own init order.

    Scales (hidden 256, inputs RMS-normed to ~1): embeddings N(0,1) keep the residual O(1); q/k std
    0.125 gives attention scores of std ~4, i.e. sharp attention where each attended key matters;
    v/o/mlp ~1/sqrt(fan_in) so every layer moves the residual; lm_head std 1 gives logits of std ~16,
    so top-1/top-2 margins are O(1) (median ~3). Float noise in the logits grows with the same scale,
    so the margin/noise ratio is set by the vocabulary's Gaussian order statistics, not by this std.
    Other sizes scale the same way with their hidden and MLP widths (exactly the numbers above at
    hidden 256, MLP 768).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    fan_in = 1 / math.sqrt(arch["hidden_size"])
    std = {"q_proj": 2 * fan_in, "k_proj": 2 * fan_in, "v_proj": fan_in, "o_proj": fan_in,
           "gate_proj": fan_in, "up_proj": fan_in, "down_proj": arch["intermediate_size"] ** -0.5,
           "embed_tokens": 1.0, "lm_head": 1.0}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            kind = name.split(".")[-2]
            if "norm" in kind:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std[kind])
        model.lm_head.weight[suppressed] = 0.0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_complete(path: Path, seed: int, arch: dict = ARCH) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
        return (marker.get("format_version") == FORMAT_VERSION and marker.get("seed") == seed
                and marker.get("arch") == arch
                and all(_sha256(path / f) == h for f, h in marker["files"].items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _write_model(out: Path, seed: int, base_arch: dict = ARCH) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = _train_tokenizer(base_arch["vocab_size"])
    arch = dict(base_arch, vocab_size=tok.get_vocab_size())  # exact: every id the model emits decodes
    rope_theta = arch.pop("rope_theta")
    config = LlamaConfig(
        **arch, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="float32",
        bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
        pad_token_id=tok.token_to_id("<pad>"), architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)  # transformers' own init is overwritten, but keep it reproducible anyway
    model = LlamaForCausalLM(config).to(torch.float32)
    _init_weights(model, seed, _suppressed_ids(tok), base_arch)
    model.save_pretrained(out, safe_serialization=True)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE, model_max_length=base_arch["max_position_embeddings"],
    )
    hf_tok.save_pretrained(out)


def build_default_model(path: str | os.PathLike | None = None, seed: int = 0, force: bool = False,
                        size: str = "default") -> Path:
    """Build (or reuse) the default model (or another of `SIZES`) at `path`; returns the path.

    A complete build (marker present, same seed and format version, file hashes match) is reused.
    The build happens in a sibling temp dir renamed into place, so a killed build never looks complete.
    """
    arch = SIZES[size]
    if path is None:
        path = DEFAULT_MODEL_DIR if size == "default" else DEFAULT_MODEL_DIR.parent / size
    path = Path(path).expanduser().resolve()
    if not force and _is_complete(path, seed, arch):
        return path
    if path.exists():
        ours = {MARKER, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}
        foreign = [p.name for p in path.iterdir() if p.name not in ours]
        if foreign:  # never delete what we did not write
            raise FileExistsError(f"{path} exists and holds files not written by vllm_kvp: {foreign[:5]}")
    print(f"vllm_kvp: building {size} model (seed {seed}) at {path} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))
    try:
        _write_model(tmp, seed, arch)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        marker = {"format_version": FORMAT_VERSION, "seed": seed, "arch": arch, "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"vllm_kvp: model built in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return path


def measure_margins(path, prompts=MARGIN_PROMPTS, max_tokens: int = 64) -> dict:
    """Greedy-decode each prompt with plain transformers (fp32) and report the top-1 minus top-2 logit
    margin at every generated position: the float headroom an exact implementation has."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    margins, distinct, texts = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model(ids, use_cache=True)
            generated = []
            for _ in range(max_tokens):
                logits = out.logits[0, -1].float()
                top2 = torch.topk(logits, 2).values
                margins.append(float(top2[0] - top2[1]))
                nxt = int(torch.argmax(logits))
                generated.append(nxt)
                out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
            distinct.append(len(set(generated)))
            texts.append(tok.decode(generated))
    return {"positions": len(margins), "median": statistics.median(margins), "min": min(margins),
            "mean": statistics.fmean(margins), "distinct_tokens_per_prompt": distinct, "texts": texts}
