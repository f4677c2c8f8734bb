"""Run the router: `python -m services.router.main --port P --model NAME (--redis-url URL | --prefill ADDR --decode ADDR)`.

The router never builds a model (that imports torch): a known model name resolves to its directory
under the swaserve home, which the workers build; the router waits for it to appear.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import uvicorn

from services.engine.model_store import find_known, models_dir
from services.router.app import create_app
from services.router.settings import RouterSettings
from services.router.workers import StaticWorkerPool, WorkerPool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.router.main", description="swaserve OpenAI router")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--model", required=True, help="known model name (e.g. smollm2, mimo-tiny) or a model directory"
    )
    p.add_argument("--served-model-name", help="the id clients use (default: --model)")
    workers = p.add_mutually_exclusive_group(required=True)
    workers.add_argument("--redis-url", help="discover workers in the Redis registry")
    workers.add_argument(
        "--prefill", action="append", help="prefill worker host:port (repeat or comma-separate)"
    )
    p.add_argument("--decode", action="append", help="decode worker host:port (repeat or comma-separate)")
    p.add_argument("--max-context", type=int, help="override the model's max_position_embeddings")
    p.add_argument("--kv-transport", default="grpc", help="KV transport asked of prefill workers")
    p.add_argument(
        "--model-wait", type=float, default=600.0, help="seconds to wait for the workers to build the model"
    )
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if args.prefill and not args.decode:
        p.error("--prefill needs --decode")
    if args.decode and not args.prefill:
        p.error("--decode needs --prefill")
    return args


def model_dir_for(name: str, wait_s: float) -> tuple[Path, tuple[str, ...]]:
    """The model's directory and the other names it is known by; waits for a known model to be built."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path, ()
    known = find_known(name)
    if known is None:
        raise SystemExit(f"--model {name!r}: not a directory and not a known model")
    target = models_dir() / known.dir_name  # present only when complete (model_store builds atomically)
    deadline = time.monotonic() + wait_s
    if not target.is_dir():
        logging.getLogger("swaserve.router").info("waiting for the workers to build %s in %s", name, target)
    while not target.is_dir():
        if time.monotonic() > deadline:
            raise SystemExit(f"--model {name!r}: {target} did not appear within {wait_s:.0f}s")
        time.sleep(0.5)
    return target, tuple(a for a in (*known.aliases, known.dir_name) if a != name)


def worker_pool(args: argparse.Namespace, model: str) -> WorkerPool:
    """Static from the command line, or discovered in Redis (workers registered with `model`)."""
    if args.redis_url:
        try:
            from services.router.discovery import RedisWorkerPool
        except ImportError:
            raise SystemExit(
                "--redis-url: Redis discovery is not available in this build; use --prefill/--decode"
            ) from None
        pool: WorkerPool = RedisWorkerPool(args.redis_url, model=model)
        return pool
    return StaticWorkerPool(_split(args.prefill), _split(args.decode))


def _split(values: list[str]) -> list[str]:
    return [a.strip() for v in values for a in v.split(",") if a.strip()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_dir, aliases = model_dir_for(args.model, args.model_wait)
    served = args.served_model_name or args.model
    settings = RouterSettings(
        model_dir=model_dir,
        served_model=served,
        model_aliases=tuple(a for a in (args.model, *aliases) if a != served),
        max_context=args.max_context,
        kv_transport=args.kv_transport,
    )
    app = create_app(settings, worker_pool(args, args.model))
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5
    )


if __name__ == "__main__":
    main()
