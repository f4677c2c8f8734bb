"""A grpc.Server set up the way every swaserve service wants it."""

from __future__ import annotations

from concurrent import futures

import grpc

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # KV travels in 1-4 MiB chunks; this only guards against misuse

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # two workers must never share a port by accident
]


def make_server(host: str, port: int, max_workers: int = 32) -> tuple[grpc.Server, int]:
    """A server bound to host:port (port 0: any free port), not started; returns it and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=SERVER_OPTIONS)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind a gRPC server to {host}:{port}")
    return server, bound
