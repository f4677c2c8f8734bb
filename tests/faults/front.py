"""A round-robin TCP front for router replicas (what an L4 load balancer does): each new connection goes
to the next backend; a backend that refuses the connection is skipped for that connection. Bytes are
piped both ways; nothing is parsed, retried or buffered once connected (an in-flight request dies with
its backend). Runs its asyncio loop in a thread on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import threading

from services.common.netutil import free_port


class RoundRobinFront:
    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.port = free_port()
        self.connections = 0  # accepted
        self.skipped = 0  # backend connects refused and passed on to the next backend
        self._next = itertools.cycle(range(len(backends)))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rr-front", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RoundRobinFront:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = next(self._next)
        for k in range(len(self.backends)):
            host, port = self.backends[(first + k) % len(self.backends)]
            try:
                back_r, back_w = await asyncio.open_connection(host, port)
                break
            except OSError:
                self.skipped += 1
        else:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, back_w), _pipe(back_r, client_w))


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        dst.close()
