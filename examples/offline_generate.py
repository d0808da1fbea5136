"""`make demo`: offline greedy generation with vLLM on the embedded default model.

    python examples/offline_generate.py [--model PATH] [--kvp-size N] [--max-tokens T]

With --kvp-size 1 (default) this is stock vLLM with the plugin loaded but inactive; N > 1 spreads each
request's KV cache over N ranks via `additional_config={"kvp": {"size": N}}`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

PROMPTS = [
    "The quick brown fox",
    "Once upon a time there was a small garden near the river, and",
    "In the morning the market opened",
    "Why do birds sing at night?",
]


def parse_args() -> argparse.Namespace:
    from vllm_kvp.model import DEFAULT_MODEL_DIR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="model dir (built if it is the default and missing)")
    p.add_argument("--kvp-size", type=int, default=1, help="KV-parallel ranks per request (1 = stock vLLM)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=16384)
    p.add_argument("--prompt", action="append", help="prompt (repeatable); default: a built-in list")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    # Must precede the vLLM import: the CPU KV cache defaults to a large share of RAM; 2 GiB is plenty
    # for this model (2 layers x 2 KV heads x 32 dims x 4 B x 2 = 1 KiB/token, ~2M tokens).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm_kvp.model import DEFAULT_MODEL_DIR, build_default_model

    model = Path(args.model).expanduser()
    if model.resolve() == DEFAULT_MODEL_DIR.expanduser().resolve():
        build_default_model(model)  # reuses a complete build, so this is cheap after `make model`
    elif not (model / "config.json").exists():
        print(f"error: {model} holds no model (build one with `vllm-kvp make-model {model}`)", file=sys.stderr)
        return 2

    from vllm import LLM, SamplingParams

    kwargs = {}
    if args.kvp_size > 1:
        kwargs["additional_config"] = {"kvp": {"size": args.kvp_size}}
    t0 = time.perf_counter()
    llm = LLM(
        model=str(model), dtype="float32", enforce_eager=True, max_model_len=args.max_model_len,
        max_num_seqs=4, seed=0, **kwargs,
    )
    load_s = time.perf_counter() - t0

    prompts = args.prompt or PROMPTS
    # ignore_eos: the model is random; fixed-length outputs make timings comparable.
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    gen_s = time.perf_counter() - t0

    n_prompt = n_out = 0
    for out in outputs:
        comp = out.outputs[0]
        n_prompt += len(out.prompt_token_ids)
        n_out += len(comp.token_ids)
        print(f"\nPrompt: {out.prompt!r}\nOutput: {comp.text!r}")
    print(f"\nkvp_size={args.kvp_size}  load {load_s:.1f}s  generate {gen_s:.2f}s  "
          f"({len(outputs)} prompts, {n_prompt} prompt + {n_out} generated tokens, "
          f"{n_out / gen_s:.1f} generated tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
