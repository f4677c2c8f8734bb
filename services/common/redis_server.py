"""A local `redis-server` on a free port, for `swaserve up` and the test fixtures.

Nothing is persisted (`--save "" --appendonly no`): the registry and the cache index are rebuilt by
the workers' heartbeats and events, so a restarted Redis is empty and that is fine.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from services.common.netutil import free_port


class RedisNotInstalled(RuntimeError):
    """redis-server is not on PATH."""


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """Start with start() (or `with RedisServer() as r:`), connect to `r.url`, stop with stop()."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        executable: str = "redis-server",
        log_path: str | Path | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        """wrapper: argv prepended to the command (e.g. an exec shim that ties Redis to its parent)."""
        self.host = host
        self.port = port or free_port(host)
        self.executable = executable
        self.log_path = Path(log_path) if log_path else None
        self.wrapper = list(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        exe = shutil.which(self.executable)
        if exe is None:
            raise RedisNotInstalled(
                f"{self.executable!r} is not installed (or not on PATH): run `make setup` "
                "(it installs Debian's redis-server), or pass --redis-url of a running Redis"
            )
        return [
            *self.wrapper,
            exe,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.running():
            return self
        cmd = self.command()
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            # its own session: a Ctrl-C meant for the launcher does not kill Redis under the workers
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with code {self.proc.returncode} on port {self.port}"
                    + (f" (log: {self.log_path})" if self.log_path else "")
                )
            if _ping(self.host, self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING on {self.host}:{self.port} within {timeout}s")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
