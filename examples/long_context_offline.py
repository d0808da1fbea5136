"""One long prompt, offline, with its KV cache spread over 2 KV ranks.

    python examples/long_context_offline.py [--model DIR] [--kvp-size 2] [--prompt-tokens 6000]
                                            [--max-tokens-per-rank 4096] [--max-tokens 32]

`max_tokens_per_rank` is the onboarding threshold: the request fills its first rank up to that many
tokens, then onboards the next one. It is set well below the prompt length here so the request
really spans ranks; the ranks that held it are reported in
`outputs[0].kv_transfer_params["kvp_ranks"]` (with the first token each rank holds in
`["kvp_rank_starts"]`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SENTENCES = [
    "The river bends twice before it reaches the old mill.",
    "Every morning the baker counts the loaves and writes the number on the wall.",
    "A lighthouse keeper once kept a logbook of every ship that passed in the fog.",
    "The library on the hill lends maps, lanterns and umbrellas as well as books.",
    "In winter the market moves indoors, and the musicians play near the fish stalls.",
]


def parse_args() -> argparse.Namespace:
    from vllm_kvp.model import DEFAULT_MODEL_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR.expanduser()))
    p.add_argument("--kvp-size", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=6000, help="approximate prompt length in tokens")
    p.add_argument("--max-tokens-per-rank", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")
    return p.parse_args()


def long_prompt(tokenizer, target_tokens: int) -> str:
    """Repeat numbered sentences until the prompt has about `target_tokens` tokens."""
    parts, n, i = [], 0, 0
    while n < target_tokens:
        s = f"{i}. {SENTENCES[i % len(SENTENCES)]} "
        parts.append(s)
        n += len(tokenizer.encode(s, add_special_tokens=False))
        i += 1
    return "".join(parts) + "\nSummary of the notes above:"


def main() -> int:
    args = parse_args()
    model = Path(args.model).expanduser()
    if not (model / "config.json").exists():
        print(f"error: no model in {model} (build it: vllm-kvp make-model {model})", file=sys.stderr)
        return 2

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    prompt = long_prompt(AutoTokenizer.from_pretrained(str(model)), args.prompt_tokens)
    max_model_len = args.prompt_tokens + args.max_tokens + 1024

    t0 = time.perf_counter()
    llm = LLM(
        model=str(model), dtype="float32", enforce_eager=True, seed=0,
        max_model_len=max_model_len, max_num_seqs=4,
        # KV memory per worker (= per KV rank): 64 MiB is ~65k tokens of the default model.
        kv_cache_memory_bytes=64 << 20,
        additional_config={"kvp": {"size": args.kvp_size, "max_tokens_per_rank": args.max_tokens_per_rank}},
    )
    load_s = time.perf_counter() - t0

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outputs = llm.generate([prompt], params)
    gen_s = time.perf_counter() - t0

    out = outputs[0]
    comp = out.outputs[0]
    kvp = out.kv_transfer_params or {}
    print(f"\nprompt: {len(out.prompt_token_ids)} tokens (...{out.prompt[-60:]!r})")
    print(f"output: {comp.text!r}")
    print(f"kvp_size={args.kvp_size}  max_tokens_per_rank={args.max_tokens_per_rank}  "
          f"load {load_s:.1f}s  generate {gen_s:.2f}s  ({len(comp.token_ids)} tokens, "
          f"{len(comp.token_ids) / gen_s:.1f} tok/s incl. prefill)")
    print(f"kvp_ranks: {kvp.get('kvp_ranks')}  kvp_rank_starts: {kvp.get('kvp_rank_starts')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
