"""`python -m services.decode.main --model NAME_OR_DIR --port P --redis-url URL [...]`: a decode worker.

The KV receiver (services/common/kv_transport) shares the worker's gRPC server and port.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import grpc

from services.decode.metrics import DecodeMetrics
from services.decode.server import add_decode_servicer
from services.decode.worker import DecodeWorker
from services.worker.engine_loop import EngineLoop
from services.worker.flags import add_engine_args
from services.worker.serve import Built, serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swaserve-decode", description=__doc__)
    add_engine_args(p, queue_policy="fcfs")
    p.add_argument("--reserve-ttl", type=float, default=30.0, help="seconds a reservation waits for its KV")
    p.add_argument("--pending-ttl", type=float, default=60.0, help="seconds received KV waits for its Decode")
    p.add_argument(
        "--kv-wait", type=float, default=30.0, help="seconds Decode waits for KV still on the wire"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def build(loop: EngineLoop, server: grpc.Server, metrics: DecodeMetrics) -> Built:
        from services.common.kv_transport import add_kv_receiver

        worker = DecodeWorker(
            loop, args.model, reserve_ttl=args.reserve_ttl, pending_ttl=args.pending_ttl,
            kv_wait=args.kv_wait, metrics=metrics,
        ).start()  # fmt: skip
        add_decode_servicer(server, worker)
        receiver = add_kv_receiver(server, worker.on_payload)

        def close() -> None:
            worker.close()
            receiver.close()

        return Built(close=close, load=worker.load, labels={})

    return serve("decode", args, build, DecodeMetrics())


if __name__ == "__main__":
    raise SystemExit(main())
