"""`python -m services.prefill.main --model NAME_OR_DIR --port P --redis-url URL [...]`: a prefill worker."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import grpc

from services.prefill.metrics import PrefillMetrics
from services.prefill.server import add_prefill_servicer
from services.prefill.worker import PrefillWorker
from services.worker.engine_loop import EngineLoop
from services.worker.flags import add_engine_args
from services.worker.serve import Built, serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swaserve-prefill", description=__doc__)
    add_engine_args(p, queue_policy="uncached-first")
    p.add_argument("--kv-transport", default="grpc", help="default KV transport (a request may name another)")
    p.add_argument("--timeout", type=float, default=600.0, help="max seconds for one prefill")
    p.add_argument("--no-kv-events", action="store_true", help="do not publish KV cache events to Redis")
    p.add_argument(
        "--bucket",
        default="",
        help="the prompt-length pool this worker serves (a router --length-buckets name); "
        "empty: every length",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def build(loop: EngineLoop, server: grpc.Server, metrics: PrefillMetrics) -> Built:
        worker = PrefillWorker(
            loop, args.model, default_transport=args.kv_transport, metrics=metrics, timeout=args.timeout
        )
        add_prefill_servicer(server, worker)

        def load() -> dict[str, int]:
            s = loop.stats
            return {"running": s.running, "waiting": s.waiting, "free_kv_tokens": s.free_tokens,
                    "queued_tokens": s.queued_tokens}  # fmt: skip

        return Built(
            close=worker.close, load=load,
            labels={"kv_transport": args.kv_transport, **({"bucket": args.bucket} if args.bucket else {})},
            kv_events=not args.no_kv_events,
        )  # fmt: skip

    return serve("prefill", args, build, PrefillMetrics(bucket=args.bucket or "all"))


if __name__ == "__main__":
    raise SystemExit(main())
