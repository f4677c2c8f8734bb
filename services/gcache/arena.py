"""The same-host path: a client's shared-memory arena that co-located nodes map too.

    client                                              node (same host, same /dev/shm)
    create /dev/shm/swaserve-gcache-<pid>-<hex>,
    map it, cut it into slots
    put:  copy values into a slot, BatchPut with  ───>  map the arena (first time), copy the
          items {in_shm, offset} and no data            values out of the slot into its store
    get:  BatchGet with the slot as ShmRegion     ───>  copy found values into the region,
          copy values out of the slot             <───  items {in_shm, offset}; the rest as data

One arena per client, made once: its pages stay allocated between calls, so the copies into and
out of it run at warm-memory speed, and only the copy the receiver keeps lands on fresh pages. A
call holds a slot until its reply arrives; a call that failed (timeout, dead node) leaves its slot
in quarantine for `quarantine` seconds, since the node may still be copying into or out of it.

Names: the client keeps its arena's name until close() (a node that joins later maps it by name)
and unlinks it then. A client killed with -9 leaves the file: every node sweeps arenas whose
creator pid is gone (and drops its mappings of arenas whose name disappeared). The pid test
assumes the nodes see the clients' pids (same pid namespace, as on one host without containers,
or with hostPID); otherwise orphans go when the host's /dev/shm is cleaned.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "swaserve-gcache-"
NAME_RE = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]{{32}}$")
ALIGN = 64


class ArenaError(RuntimeError):
    """An arena that cannot be created, mapped, or addressed as asked."""


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def creator_pid(name: str) -> int | None:
    m = NAME_RE.match(name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink arenas whose creator is dead; returns their names."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(shm_dir))
    except OSError:
        return removed
    for entry in entries:
        pid = creator_pid(entry.name)
        if pid is not None and not pid_alive(pid):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    return removed


# ---- client side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    index: int
    offset: int
    length: int


class ClientArena:
    """A shared file in /dev/shm cut into `slots` equal slots; thread-safe acquire/release."""

    def __init__(self, size: int, slots: int = 4, shm_dir: Path = SHM_DIR, quarantine: float = 10.0) -> None:
        if slots <= 0 or size < slots * ALIGN:
            raise ValueError("need at least one slot of at least 64 bytes")
        sweep_orphans(shm_dir)
        self.name = f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        self.path = shm_dir / self.name
        self.slot_bytes = size // slots // ALIGN * ALIGN
        self.size = self.slot_bytes * slots
        self.quarantine = quarantine
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.size)
            self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)
        self.view = memoryview(self._map)
        self._free = list(range(slots))
        self._quarantined: dict[int, float] = {}
        self._lock = threading.Lock()

    def acquire(self) -> Slot | None:
        """A free slot, or None (every slot busy or quarantined): the caller uses gRPC instead."""
        with self._lock:
            now = time.monotonic()
            for i, until in list(self._quarantined.items()):
                if until <= now:
                    del self._quarantined[i]
                    self._free.append(i)
            if not self._free:
                return None
            i = self._free.pop()
            return Slot(i, i * self.slot_bytes, self.slot_bytes)

    def release(self, slot: Slot, failed: bool = False) -> None:
        with self._lock:
            if failed:
                self._quarantined[slot.index] = time.monotonic() + self.quarantine
            else:
                self._free.append(slot.index)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.view.release()
            self._map.close()
        except BufferError:  # a value view still points into the map: leave it to the GC
            pass


# ---- node side -----------------------------------------------------------------------------------


class ArenaMap:
    """The arenas this node has mapped, by name (mapped on first use, dropped when their name goes)."""

    def __init__(self, shm_dir: Path = SHM_DIR, sweep_interval: float = 10.0) -> None:
        self.shm_dir = shm_dir
        self.sweep_interval = sweep_interval
        self._maps: dict[str, tuple[mmap.mmap, memoryview]] = {}
        self._lock = threading.Lock()
        self._last_sweep = time.monotonic()

    def view(self, name: str) -> memoryview:
        """The whole arena as a writable view; ArenaError if it is not a client arena we can map."""
        self._maybe_sweep()
        with self._lock:
            got = self._maps.get(name)
            if got is not None:
                return got[1]
        if creator_pid(name) is None:
            raise ArenaError(f"not a GCache arena name: {name!r}")
        try:
            fd = os.open(self.shm_dir / name, os.O_RDWR)
        except OSError as e:
            raise ArenaError(f"cannot open arena {name} (is the client on this host?): {e.strerror}") from e
        try:
            size = os.fstat(fd).st_size
            if size <= 0:
                raise ArenaError(f"arena {name} is empty")
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        with self._lock:
            if name in self._maps:  # another thread mapped it meanwhile
                m.close()
                return self._maps[name][1]
            view = memoryview(m)
            self._maps[name] = (m, view)
            return view

    def region(self, name: str, offset: int, length: int) -> memoryview:
        view = self.view(name)
        if offset < 0 or length < 0 or offset + length > len(view):
            raise ArenaError(
                f"region [{offset}, {offset + length}) outside arena {name} of {len(view)} bytes"
            )
        return view[offset : offset + length]

    def _maybe_sweep(self) -> None:
        if time.monotonic() - self._last_sweep >= self.sweep_interval:
            self.sweep()

    def sweep(self) -> None:
        """Remove orphaned arenas; unmap those whose name is gone (their client closed)."""
        self._last_sweep = time.monotonic()
        sweep_orphans(self.shm_dir)
        with self._lock:
            gone = [n for n in self._maps if not (self.shm_dir / n).exists()]
            for n in gone:
                m, view = self._maps.pop(n)
                try:
                    view.release()
                    m.close()
                except BufferError:  # a slice is still in use by a call: the GC unmaps it later
                    pass

    def __len__(self) -> int:
        return len(self._maps)

    def close(self) -> None:
        with self._lock:
            maps, self._maps = list(self._maps.values()), {}
        for m, view in maps:
            try:
                view.release()
                m.close()
            except BufferError:
                pass
