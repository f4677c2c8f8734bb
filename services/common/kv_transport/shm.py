"""Same-host transport: the payload's bytes in a /dev/shm segment, only the header over gRPC.

    sender                                          receiver
    connect (nothing written if unreachable)
    create /dev/shm/swaserve-kv-<pid>-<uuid>, pwritev the tensors in wire order
    Push(header{shm.segment}) --------------------> open the segment, UNLINK it at once,
                                                    check its size, preadv into fresh tensors,
                                                    close (the memory is freed), on_payload
    ack <--------------------------------------------
    unlink (normally already gone)

Ownership of the segment name: the sender's until the receiver opens it, the receiver's from
then on, and the receiver's first act is to unlink it -- so whatever follows (a refusal, a
truncated segment, on_payload raising, the receiver dying) leaves no name behind; the memory goes
with the last open file descriptor. The sender unlinks in a `finally` too, for the cases where the
receiver never opened it (refused the header, unreachable after connect, timeout). A sender that
dies between writing and the receiver's open leaves an orphan: names carry the creator's pid, and
`sweep_orphans` (run by every receiver at most once per `sweep_interval`, and by every new sender)
removes segments whose creator is gone, or older than `max_age` whatever their pid says (pid
namespaces that differ between containers sharing /dev/shm).

Copies: one on each side, by the kernel (pwritev/preadv, no page faults on a mapping).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from services.common.kv_payload import KVMeta, KVPayload
from services.common.kv_transport.base import KVReceiver, KVSender, register_transport
from services.common.kv_wire import (
    KVWireError,
    PayloadAssembler,
    encode_header_chunk,
    header_from_meta,
    payload_views,
)
from services.proto_gen import kv_pb2

SHM_DIR = Path("/dev/shm")
PREFIX = "swaserve-kv-"
IOV_MAX = 1024


def segment_pid(name: str) -> int | None:
    """The creator's pid encoded in a segment name, None if the name is not ours."""
    if not name.startswith(PREFIX):
        return None
    pid, _, rest = name[len(PREFIX) :].partition("-")
    return int(pid) if pid.isdigit() and rest else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_orphans(shm_dir: Path = SHM_DIR, max_age: float = 600.0) -> list[str]:
    """Unlink segments whose creator died, or older than max_age seconds. Returns their names."""
    removed = []
    now = time.time()
    for entry in os.scandir(shm_dir):
        pid = segment_pid(entry.name)
        if pid is None:
            continue
        try:
            stale = not _alive(pid) or now - entry.stat().st_mtime > max_age
            if stale:
                os.unlink(entry.path)
                removed.append(entry.name)
        except FileNotFoundError:  # its receiver or sender got there first
            pass
    return removed


def _io_all(op: Callable[[int, list[memoryview], int], int], fd: int, views: list[memoryview]) -> int:
    """Run pwritev/preadv until every view is done (they may stop short, and take <= IOV_MAX)."""
    pending = deque(v for v in views if len(v))
    offset = 0
    while pending:
        n = op(fd, [pending[i] for i in range(min(IOV_MAX, len(pending)))], offset)
        if n <= 0:
            raise KVWireError(f"shm segment ended after {offset} bytes")
        offset += n
        while n:
            head = pending[0]
            if n >= len(head):
                n -= len(head)
                pending.popleft()
            else:
                pending[0] = head[n:]
                n = 0
    return offset


def write_segment(payload: KVPayload, shm_dir: Path = SHM_DIR) -> Path:
    """Create a new segment holding the payload's bytes in wire order (removed again on failure)."""
    path = shm_dir / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _io_all(os.pwritev, fd, payload_views(payload))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return path


class ShmSender(KVSender):
    def __init__(self, timeout: float = 60.0, connect_timeout: float = 5.0, shm_dir: str | Path = SHM_DIR) -> None:
        super().__init__(timeout, connect_timeout)
        self.shm_dir = Path(shm_dir)
        sweep_orphans(self.shm_dir)

    def _send(self, decode_addr: str, payload: KVPayload) -> kv_pb2.KVAck:
        push = self.push_callable(decode_addr)  # connect first: nothing is written for a dead address
        path = write_segment(payload, self.shm_dir)
        try:
            header = header_from_meta(payload.meta, self.name)
            header.shm.segment = path.name
            ack: kv_pb2.KVAck = push(iter([encode_header_chunk(header)]), timeout=self.timeout)
            return ack
        finally:
            path.unlink(missing_ok=True)  # normally the receiver did already


class ShmReceiver(KVReceiver):
    def __init__(self, shm_dir: str | Path = SHM_DIR, sweep_interval: float = 30.0, max_age: float = 600.0) -> None:
        self.shm_dir = Path(shm_dir)
        self.sweep_interval = sweep_interval
        self.max_age = max_age
        self._last_sweep = -float("inf")
        self._lock = threading.Lock()

    def _maybe_sweep(self) -> None:
        with self._lock:
            if time.monotonic() - self._last_sweep < self.sweep_interval:
                return
            self._last_sweep = time.monotonic()
        sweep_orphans(self.shm_dir, self.max_age)

    def receive(
        self, header: kv_pb2.KVHeader, meta: KVMeta, rest: Iterator[bytes], active: Callable[[], bool]
    ) -> KVPayload:
        self._maybe_sweep()
        name = header.shm.segment
        if segment_pid(name) is None or "/" in name:
            raise KVWireError(f"not a KV segment name: {name!r}")
        path = self.shm_dir / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise KVWireError(f"shm segment {name} not found (is the sender on this host?)") from None
        try:
            path.unlink(missing_ok=True)  # the segment is ours now: no name survives this transfer
            size = os.fstat(fd).st_size
            if size != meta.nbytes:
                raise KVWireError(f"shm segment of {meta.rid!r} holds {size} bytes, header says {meta.nbytes}")
            asm = PayloadAssembler(meta)
            _io_all(os.preadv, fd, asm.views)
            asm.mark_filled()
        finally:
            os.close(fd)
        if next(rest, None) is not None:
            raise KVWireError(f"shm transfer of {meta.rid!r} carries data chunks")
        return asm.finish()


register_transport("shm", ShmSender, ShmReceiver)
