"""A grpc.Server set up the way every swaserve service wants it."""

from __future__ import annotations

from concurrent import futures

import grpc

from services.common.grpc_auth import InternalSecurity, process_security

MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # KV travels in 1-4 MiB chunks; this only guards against misuse

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # two workers must never share a port by accident
]


def make_server(
    host: str, port: int, max_workers: int = 32, security: InternalSecurity | None = None
) -> tuple[grpc.Server, int]:
    """A server bound to host:port (port 0: any free port), not started; returns it and its port.
    `security` (default: this process's, grpc_auth.process_security) adds the token check and TLS."""
    sec = security or process_security()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=SERVER_OPTIONS,
        interceptors=sec.server_interceptors(),
    )
    creds = sec.server_credentials()
    addr = f"{host}:{port}"
    bound = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
    if bound == 0:
        raise OSError(f"could not bind a gRPC server to {host}:{port}")
    return server, bound
