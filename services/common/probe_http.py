"""A worker's small HTTP server: Prometheus metrics and the two Kubernetes probes.

    GET /health    liveness: 200 {"status": "alive"} while the process answers at all
    GET /ready     readiness: 200 {"status": "ready"} or 503 {"status": "not_ready", "reason": ...},
                   as the `ready()` callable says (a worker: engine loaded, gRPC serving, registered,
                   not shutting down)
    anything else  the Prometheus exposition of `registry` (/metrics), as before

It starts before the engine loads, so liveness and startup probes answer during a long load while
readiness still says no. Threads only; no torch.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

Readiness = Callable[[], "tuple[bool, str]"]  # (ready, reason when not)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class ProbeServer:
    def __init__(self, registry: CollectorRegistry, port: int, host: str, ready: Readiness) -> None:
        self._metrics = make_wsgi_app(registry)
        self._ready = ready
        self._server = make_server(host, port, self._app, server_class=_Server, handler_class=_QuietHandler)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="probe-http", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            return _json(start_response, "200 OK", {"status": "alive"})
        if path == "/ready":
            try:
                ok, reason = self._ready()
            except Exception as e:  # noqa: BLE001 - a probe answers, it never raises
                ok, reason = False, f"readiness check failed: {type(e).__name__}"
            if ok:
                return _json(start_response, "200 OK", {"status": "ready"})
            return _json(start_response, "503 Service Unavailable", {"status": "not_ready", "reason": reason})
        result: Iterable[bytes] = self._metrics(environ, start_response)
        return result


def _json(start_response: Callable[..., Any], status: str, body: dict[str, str]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
