"""Internal gRPC security (services/common/grpc_auth.py): real servers from make_server, real
channels from internal_channel / internal_aio_channel, certificates made by openssl in the test.
The served methods are an echo service of this file (bytes in, bytes out), one of each streaming
kind; the GCache node and the router are real processes in test_internal_services.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import grpc
import grpc.aio
import pytest

from services.common.grpc_auth import InternalSecurity, internal_aio_channel, internal_channel
from services.common.grpc_server import make_server
from tests.security.conftest import Certs

TOKEN = "internal-token-0123456789abcdef"


def _echo_handler(calls: list[str]) -> grpc.GenericRpcHandler:
    def uu(req: bytes, _: grpc.ServicerContext) -> bytes:
        calls.append("UU")
        return req

    def us(req: bytes, _: grpc.ServicerContext) -> Iterator[bytes]:
        calls.append("US")
        yield req
        yield req

    def su(reqs: Iterator[bytes], _: grpc.ServicerContext) -> bytes:
        calls.append("SU")
        return b"".join(reqs)

    def ss(reqs: Iterator[bytes], _: grpc.ServicerContext) -> Iterator[bytes]:
        calls.append("SS")
        yield from reqs

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "UU": grpc.unary_unary_rpc_method_handler(uu),
            "US": grpc.unary_stream_rpc_method_handler(us),
            "SU": grpc.stream_unary_rpc_method_handler(su),
            "SS": grpc.stream_stream_rpc_method_handler(ss),
        },
    )


def _health_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(lambda r, c: b"SERVING")}
    )


class EchoServer:
    def __init__(self, security: InternalSecurity) -> None:
        self.server, port = make_server("127.0.0.1", 0, max_workers=4, security=security)
        self.calls: list[str] = []  # the echo methods that ran
        self.server.add_generic_rpc_handlers((_echo_handler(self.calls), _health_handler()))
        self.server.start()
        self.addr = f"127.0.0.1:{port}"

    def close(self) -> None:
        self.server.stop(0)


@pytest.fixture
def serve() -> Iterator[type[EchoServer]]:
    made: list[EchoServer] = []

    class Tracked(EchoServer):
        def __init__(self, security: InternalSecurity) -> None:
            super().__init__(security)
            made.append(self)

    yield Tracked
    for s in made:
        s.close()


def call_all(addr: str, sec: InternalSecurity) -> list[bytes | grpc.StatusCode]:
    """The four kinds of call through a sync channel: each result, or the call's status code."""
    out: list[bytes | grpc.StatusCode] = []
    with internal_channel(addr, security=sec) as ch:
        calls = [
            lambda: ch.unary_unary("/test.Echo/UU")(b"a", timeout=5),
            lambda: b"".join(ch.unary_stream("/test.Echo/US")(b"b", timeout=5)),
            lambda: ch.stream_unary("/test.Echo/SU")(iter([b"c", b"d"]), timeout=5),
            lambda: b"".join(ch.stream_stream("/test.Echo/SS")(iter([b"e", b"f"]), timeout=5)),
        ]
        for call in calls:
            try:
                out.append(call())
            except grpc.RpcError as e:
                out.append(e.code())
    return out


async def _call_all_aio(addr: str, sec: InternalSecurity) -> list[bytes | grpc.StatusCode]:
    out: list[bytes | grpc.StatusCode] = []
    async with internal_aio_channel(addr, security=sec) as ch:

        async def us() -> bytes:
            return b"".join([m async for m in ch.unary_stream("/test.Echo/US")(b"b", timeout=5)])

        async def ss() -> bytes:
            return b"".join(
                [m async for m in ch.stream_stream("/test.Echo/SS")(iter([b"e", b"f"]), timeout=5)]
            )

        calls = [
            lambda: ch.unary_unary("/test.Echo/UU")(b"a", timeout=5),
            us,
            lambda: ch.stream_unary("/test.Echo/SU")(iter([b"c", b"d"]), timeout=5),
            ss,
        ]
        for call in calls:
            try:
                out.append(await call())
            except grpc.aio.AioRpcError as e:
                out.append(e.code())
    return out


def call_all_aio(addr: str, sec: InternalSecurity) -> list[bytes | grpc.StatusCode]:
    return asyncio.run(_call_all_aio(addr, sec))


OK = [b"a", b"bb", b"cd", b"ef"]
UNAVAILABLE = [grpc.StatusCode.UNAVAILABLE] * 4


def refused(server: EchoServer, call: Callable[[str, InternalSecurity], list[bytes | grpc.StatusCode]],
            sec: InternalSecurity) -> bool:  # fmt: skip
    """Every kind of call ends UNAUTHENTICATED and none reaches its method. (grpc.aio's client may
    report a stream of requests refused while it was still writing them as INTERNAL "Internal
    error from Core": what it says then is the client's; that the method never ran is the server's.)"""
    ran = len(server.calls)
    got = call(server.addr, sec)
    unauth = grpc.StatusCode.UNAUTHENTICATED
    aio_writing = {unauth, grpc.StatusCode.INTERNAL} if call is call_all_aio else {unauth}
    return (
        got[0] == got[1] == unauth and got[2] in aio_writing and got[3] in aio_writing
        and len(server.calls) == ran
    )  # fmt: skip


def test_token_required_on_every_kind_of_call(serve: type[EchoServer]) -> None:
    server = serve(InternalSecurity(token=TOKEN))
    for call in (call_all, call_all_aio):
        assert call(server.addr, InternalSecurity(token=TOKEN)) == OK
        assert refused(server, call, InternalSecurity())
        assert refused(server, call, InternalSecurity(token=TOKEN + "x"))
        assert refused(server, call, InternalSecurity(token=TOKEN[:-1]))
    assert call_all(server.addr, InternalSecurity()) == [grpc.StatusCode.UNAUTHENTICATED] * 4
    with internal_channel(server.addr, security=InternalSecurity()) as ch:  # kubelet's probes send no token
        assert ch.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5) == b"SERVING"


def test_no_token_configured_means_open(serve: type[EchoServer]) -> None:
    server = serve(InternalSecurity())
    assert call_all(server.addr, InternalSecurity()) == OK
    assert call_all(server.addr, InternalSecurity(token=TOKEN)) == OK  # a token nobody checks is harmless


def _pem(path: object) -> bytes:
    with open(str(path), "rb") as f:
        return f.read()


def test_tls_server_checked_by_clients(serve: type[EchoServer], certs: Certs) -> None:
    server = serve(InternalSecurity(cert=_pem(certs.server_cert), key=_pem(certs.server_key)))
    for call in (call_all, call_all_aio):
        assert call(server.addr, InternalSecurity(ca=_pem(certs.ca))) == OK
        assert call(server.addr, InternalSecurity()) == UNAVAILABLE  # plaintext to a TLS port
        assert call(server.addr, InternalSecurity(ca=_pem(certs.other_ca))) == UNAVAILABLE  # untrusted server
    # the name clients expect, when they dial an address the certificate does not name
    named = InternalSecurity(ca=_pem(certs.ca), server_name="swaserve-internal")
    assert call_all(server.addr.replace("127.0.0.1", "localhost"), named) == OK
    wrong = InternalSecurity(ca=_pem(certs.ca), server_name="not-in-the-certificate")
    assert call_all(server.addr, wrong) == UNAVAILABLE


def test_mutual_tls_and_token(serve: type[EchoServer], certs: Certs) -> None:
    ca = _pem(certs.ca)
    server = serve(
        InternalSecurity(token=TOKEN, cert=_pem(certs.server_cert), key=_pem(certs.server_key), ca=ca)
    )
    client = dict(cert=_pem(certs.client_cert), key=_pem(certs.client_key), ca=ca)
    for call in (call_all, call_all_aio):
        assert call(server.addr, InternalSecurity(token=TOKEN, **client)) == OK  # type: ignore[arg-type]
        assert refused(server, call, InternalSecurity(**client))  # type: ignore[arg-type]
        assert call(server.addr, InternalSecurity(token=TOKEN, ca=ca)) == UNAVAILABLE  # no client certificate
        other = InternalSecurity(
            token=TOKEN, cert=_pem(certs.other_client_cert), key=_pem(certs.other_client_key), ca=ca
        )
        assert call(server.addr, other) == UNAVAILABLE  # a client certificate from another CA


def test_settings_from_the_environment(tmp_path: object, certs: Certs) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    (d / "token").write_text(TOKEN + "\n")
    sec = InternalSecurity.from_env(
        {"SWASERVE_INTERNAL_TOKEN_FILE": str(d / "token"), "SWASERVE_TLS_CA": str(certs.ca),
         "SWASERVE_TLS_CERT": str(certs.client_cert), "SWASERVE_TLS_KEY": str(certs.client_key)}
    )  # fmt: skip
    assert sec.token == TOKEN and sec.ca == _pem(certs.ca) and sec.cert == _pem(certs.client_cert)
    assert InternalSecurity.from_env({}) == InternalSecurity()
    assert InternalSecurity.from_env({"SWASERVE_INTERNAL_TOKEN": "t"}).token == "t"
    with pytest.raises(ValueError, match="SWASERVE_INTERNAL_TOKEN_FILE=.*No such file"):
        InternalSecurity.from_env({"SWASERVE_INTERNAL_TOKEN_FILE": str(d / "missing")})
    (d / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        InternalSecurity.from_env({"SWASERVE_INTERNAL_TOKEN_FILE": str(d / "empty")})
    with pytest.raises(ValueError, match="both"):
        InternalSecurity.from_env({"SWASERVE_TLS_CERT": str(certs.client_cert)})
