"""Internal gRPC security: a shared token in every call's metadata, TLS or mTLS when certificates
are given (docs/security.md). Set once per process from the environment, the same on every service:

    SWASERVE_INTERNAL_TOKEN_FILE   a file holding the token (or SWASERVE_INTERNAL_TOKEN: the token)
    SWASERVE_TLS_CERT, _KEY        this service's certificate and key (PEM): servers speak TLS
    SWASERVE_TLS_CA                the CA that signed every service's certificate: clients speak TLS
                                   and check the server's; servers with a CA require a client
                                   certificate it signed (mTLS)
    SWASERVE_TLS_SERVER_NAME       the name clients expect in servers' certificates (default: the
                                   host of the address dialled; in a cluster, one name every
                                   certificate carries, since pods are dialled by IP)

A server given a token answers a call without it (or with another) UNAUTHENTICATED; the gRPC
health service stays open (kubelet's gRPC probes send no metadata). Nothing set: plaintext, no
token, as before. Every server is made by grpc_server.make_server and every channel by
internal_channel / internal_aio_channel, so one place decides.
"""

from __future__ import annotations

import functools
import hmac
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

TOKEN_FILE_ENV = "SWASERVE_INTERNAL_TOKEN_FILE"
TOKEN_ENV = "SWASERVE_INTERNAL_TOKEN"
CERT_ENV, KEY_ENV, CA_ENV = "SWASERVE_TLS_CERT", "SWASERVE_TLS_KEY", "SWASERVE_TLS_CA"
SERVER_NAME_ENV = "SWASERVE_TLS_SERVER_NAME"
METADATA_KEY = "authorization"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)

Options = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class InternalSecurity:
    token: str | None = None
    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError(f"TLS needs both {CERT_ENV} and {KEY_ENV}")
        if self.token is not None and not self.token:
            raise ValueError("the internal token is empty")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> InternalSecurity:
        env = os.environ if env is None else env
        token = env.get(TOKEN_ENV) or None
        if env.get(TOKEN_FILE_ENV):
            token = _read(env[TOKEN_FILE_ENV], TOKEN_FILE_ENV).decode().strip()
            if not token:
                raise ValueError(f"{TOKEN_FILE_ENV}={env[TOKEN_FILE_ENV]}: the file is empty")

        def pem(name: str) -> bytes | None:
            return _read(env[name], name) if env.get(name) else None

        return cls(token, pem(CERT_ENV), pem(KEY_ENV), pem(CA_ENV), env.get(SERVER_NAME_ENV) or None)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((METADATA_KEY, f"Bearer {self.token}"),) if self.token else ()

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.cert is None or self.key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.ca is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self, options: Options | None) -> list[tuple[str, Any]]:
        out = list(options or ())
        if self.server_name and self.ca is not None:
            out.append(("grpc.ssl_target_name_override", self.server_name))
        return out

    def server_interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenCheck(self.token)] if self.token else []


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{name}={path}: {e.strerror}") from None


@functools.cache
def process_security() -> InternalSecurity:
    """This process's settings, read from the environment once."""
    return InternalSecurity.from_env()


class TokenCheck(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call whose metadata lacks `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._want = f"Bearer {token}".encode()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:  # fmt: skip
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        got = next((v for k, v in (details.invocation_metadata or ()) if k == METADATA_KEY), "")
        got_b = got.encode() if isinstance(got, str) else bytes(got)
        if hmac.compare_digest(got_b, self._want):
            return handler
        return _refusal(handler)


def _deny(_: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal token")


def _deny_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
    _deny(request, context)  # raises; a generator, so the server aborts the stream it expects
    yield from ()


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that refuses the call."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(_deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(_deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(_deny_stream)
    return grpc.unary_unary_rpc_method_handler(_deny)


def internal_channel(
    addr: str, options: Options | None = None, security: InternalSecurity | None = None
) -> grpc.Channel:
    """A channel to another swaserve service: TLS when a CA is set, the token on every call."""
    sec = security or process_security()
    creds, opts = sec.channel_credentials(), sec.channel_options(options)
    ch = (
        grpc.secure_channel(addr, creds, options=opts) if creds else grpc.insecure_channel(addr, options=opts)
    )
    return grpc.intercept_channel(ch, _SyncToken(sec.metadata)) if sec.metadata else ch


def internal_aio_channel(
    addr: str, options: Options | None = None, security: InternalSecurity | None = None
) -> grpc.aio.Channel:
    sec = security or process_security()
    creds, opts = sec.channel_credentials(), sec.channel_options(options)
    interceptors = _aio_token_interceptors(sec.metadata) if sec.metadata else None
    if creds:
        return grpc.aio.secure_channel(addr, creds, options=opts, interceptors=interceptors)
    return grpc.aio.insecure_channel(addr, options=opts, interceptors=interceptors)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
):  # fmt: skip
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._md = metadata

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _Details(d, [*(d.metadata or ()), *self._md])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)


def _aio_details(
    d: grpc.aio.ClientCallDetails, md: tuple[tuple[str, str], ...]
) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(tuple(d.metadata) if d.metadata else ()), *md)
    return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


def _aio_token_interceptors(md: tuple[tuple[str, str], ...]) -> list[grpc.aio.ClientInterceptor]:
    class UU(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(_aio_details(details, md), request)

    class US(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return await continuation(_aio_details(details, md), request)

    class SU(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
            return await continuation(_aio_details(details, md), request_iterator)

    class SS(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(
            self, continuation: Any, details: Any, request_iterator: Any
        ) -> Any:
            return await continuation(_aio_details(details, md), request_iterator)

    return [UU(), US(), SU(), SS()]
