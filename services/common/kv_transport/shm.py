"""Same-host transport: the payload's bytes in /dev/shm segments, only the header over gRPC.

    sender                                          receiver
    connect (nothing written if unreachable)
    create /dev/shm/swaserve-kv-<pid>-<uuid>-<i>,
    pwritev its share of the tensors (in parallel)
    Push(header{shm.segments}) -------------------> open every segment, UNLINK each at once,
                                                    check sizes, read into fresh tensors (or map
                                                    them: zero_copy), on_payload
    ack <--------------------------------------------
    unlink (normally already gone)

Segments: the payload is cut at tensor boundaries into up to `writers` segments of similar size,
written by as many threads: tmpfs allocates pages under a per-file lock, so one file fills at
~2.7 GB/s here and two at twice that.

Ownership of a segment name: the sender's until the receiver opens it, the receiver's from then
on, and the receiver's first act is to unlink it -- so whatever follows (a refusal, a bad size,
on_payload raising, the receiver dying) leaves no name behind; the memory goes with the last file
descriptor or mapping. The sender unlinks in a `finally` too, for the cases where the receiver
never opened them (refused the header, unreachable after connect, timeout). A sender that dies
between writing and the receiver's open leaves orphans: names carry the creator's pid, and
`sweep_orphans` (run by every receiver at most once per `sweep_interval`, and by every new sender)
removes segments whose creator is gone, or older than `max_age` whatever their pid says (pid
namespaces that differ between containers sharing /dev/shm).

Receiving: by default the bytes are copied into fresh tensors (preadv, one thread per segment).
With `zero_copy=True` the tensors are views of private (copy-on-write) mappings of the unlinked
segments: no copy, and the memory is freed when the payload's tensors are -- right for a decode
worker that copies the KV into its pools at once. Nobody else can reach those pages any more:
the sender closed its descriptors before sending the header and the names are gone.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

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
MIN_SEGMENT_BYTES = 8 << 20  # below this a thread costs more than it saves
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux value; Python 3.11 lacks the name


def segment_pid(name: str) -> int | None:
    """The creator's pid encoded in a segment name, None if the name is not ours."""
    if not name.startswith(PREFIX) or "/" in name:
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
            if not _alive(pid) or now - entry.stat().st_mtime > max_age:
                os.unlink(entry.path)
                removed.append(entry.name)
        except FileNotFoundError:  # its receiver or sender got there first
            pass
    return removed


def split_sizes(sizes: Sequence[int], parts: int) -> list[range]:
    """Cut consecutive items into at most `parts` non-empty runs of similar total size."""
    total, bounds, acc = sum(sizes), [0], 0
    for i, s in enumerate(sizes):
        acc += s
        if total and len(bounds) < parts and acc * parts >= total * len(bounds) and i + 1 < len(sizes):
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a] or [range(0, 0)]


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


def _write_one(path: Path, views: list[memoryview]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _io_all(os.pwritev, fd, views)
    finally:
        os.close(fd)


def write_segments(payload: KVPayload, shm_dir: Path = SHM_DIR, writers: int = 2,
                   pool: ThreadPoolExecutor | None = None) -> list[Path]:
    """Write the payload into new segments (all removed again if any write fails)."""
    views = payload_views(payload)
    parts = split_sizes([len(v) for v in views], max(1, min(writers, payload.nbytes // MIN_SEGMENT_BYTES)))
    base = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    paths = [shm_dir / f"{base}-{i}" for i in range(len(parts))]
    jobs = [(p, [views[i] for i in r]) for p, r in zip(paths, parts, strict=True)]
    try:
        if pool is None or len(jobs) == 1:
            for p, vs in jobs:
                _write_one(p, vs)
        else:
            for f in [pool.submit(_write_one, p, vs) for p, vs in jobs]:
                f.result()
    except BaseException:
        for p in paths:
            p.unlink(missing_ok=True)
        raise
    return paths


class ShmSender(KVSender):
    def __init__(self, timeout: float = 60.0, connect_timeout: float = 5.0, shm_dir: str | Path = SHM_DIR,
                 writers: int = 2) -> None:
        super().__init__(timeout, connect_timeout)
        self.shm_dir = Path(shm_dir)
        self.writers = writers
        self._pool = ThreadPoolExecutor(writers, thread_name_prefix="kv-shm-write")
        sweep_orphans(self.shm_dir)

    def _send(self, decode_addr: str, payload: KVPayload) -> kv_pb2.KVAck:
        push = self.push_callable(decode_addr)  # connect first: nothing is written for a dead address
        paths = write_segments(payload, self.shm_dir, self.writers, self._pool)
        try:
            header = header_from_meta(payload.meta, self.name)
            header.shm.segments.extend(p.name for p in paths)
            ack: kv_pb2.KVAck = push(iter([encode_header_chunk(header)]), timeout=self.timeout)
            return ack
        finally:
            for p in paths:
                p.unlink(missing_ok=True)  # normally the receiver did already

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=False)


class ShmReceiver(KVReceiver):
    def __init__(self, shm_dir: str | Path = SHM_DIR, zero_copy: bool = False, readers: int = 2,
                 sweep_interval: float = 30.0, max_age: float = 600.0) -> None:
        self.shm_dir = Path(shm_dir)
        self.zero_copy = zero_copy
        self.sweep_interval = sweep_interval
        self.max_age = max_age
        self._pool = ThreadPoolExecutor(readers, thread_name_prefix="kv-shm-read")
        self._last_sweep = -float("inf")
        self._lock = threading.Lock()

    def _maybe_sweep(self) -> None:
        with self._lock:
            if time.monotonic() - self._last_sweep < self.sweep_interval:
                return
            self._last_sweep = time.monotonic()
        sweep_orphans(self.shm_dir, self.max_age)

    def _open_all(self, names: Sequence[str]) -> list[int]:
        """Open and unlink every segment (an unopened one is left to the sender's cleanup)."""
        fds: list[int] = []
        try:
            for name in names:
                if segment_pid(name) is None:
                    raise KVWireError(f"not a KV segment name: {name!r}")
                try:
                    fds.append(os.open(self.shm_dir / name, os.O_RDONLY))
                except FileNotFoundError:
                    raise KVWireError(f"shm segment {name} not found (is the sender on this host?)") from None
                (self.shm_dir / name).unlink(missing_ok=True)  # ours now: no name survives this transfer
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def receive(
        self, header: kv_pb2.KVHeader, meta: KVMeta, rest: Iterator[bytes], active: Callable[[], bool]
    ) -> KVPayload:
        self._maybe_sweep()
        fds = self._open_all(header.shm.segments)
        try:
            asm = PayloadAssembler(meta, allocate=not self.zero_copy)
            groups = _segment_groups(meta, [os.fstat(fd).st_size for fd in fds], asm.sizes)
            if self.zero_copy:
                maps = list(self._pool.map(_map_private, fds, [sum(asm.sizes[i] for i in g) for g in groups]))
                for m, g in zip(maps, groups, strict=True):
                    asm.adopt(_views_of(m, [asm.sizes[i] for i in g]), g)
            else:
                jobs = [self._pool.submit(_io_all, os.preadv, fd, [asm.views[i] for i in g])
                        for fd, g in zip(fds, groups, strict=True)]
                for j in jobs:
                    j.result()
            asm.mark_filled()
        finally:
            for fd in fds:  # closing frees the pages of a read segment: off the sender's clock
                self._pool.submit(os.close, fd)
        if next(rest, None) is not None:
            raise KVWireError(f"shm transfer of {meta.rid!r} carries data chunks")
        return asm.finish()

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _segment_groups(meta: KVMeta, seg_sizes: list[int], sizes: list[int]) -> list[range]:
    """Which tensors each segment holds: consecutive whole tensors, all of them, nothing more."""
    if sum(seg_sizes) != meta.nbytes:
        raise KVWireError(f"shm segments of {meta.rid!r} hold {sum(seg_sizes)} bytes, header says {meta.nbytes}")
    groups, i = [], 0
    for s in seg_sizes:
        start, acc = i, 0
        while acc < s and i < len(sizes):
            acc += sizes[i]
            i += 1
        if acc != s:
            raise KVWireError(f"shm segment of {meta.rid!r} does not end on a tensor boundary")
        groups.append(range(start, i))
    return groups


def _map_private(fd: int, size: int) -> mmap.mmap | None:
    """A copy-on-write mapping, page tables filled: writable tensors that cannot touch the segment.

    MAP_POPULATE would break copy-on-write on every page of a writable private mapping (a full
    copy); MADV_POPULATE_READ (Linux 5.14) maps the segment's own pages, copying nothing."""
    if size == 0:
        return None
    m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        m.madvise(MADV_POPULATE_READ)
    except OSError:  # older kernel: pages are mapped on first touch instead
        pass
    return m


def _views_of(m: mmap.mmap | None, sizes: list[int]) -> list[torch.Tensor]:
    """Consecutive uint8 tensors over a mapping (they keep it alive; it unmaps with the last one)."""
    if m is None:
        return [torch.empty(0, dtype=torch.uint8) for _ in sizes]
    whole = torch.frombuffer(m, dtype=torch.uint8)
    out, off = [], 0
    for s in sizes:
        out.append(whole[off : off + s])
        off += s
    return out


register_transport("shm", ShmSender, ShmReceiver)
