"""torch.distributed point-to-point: a two-rank process group per (sender, receiver) pair.

No global world: every sender process hosts one TCPStore (port chosen by the OS) and, per decode
address, builds `ProcessGroupGloo(PrefixStore(pair_id, store), rank=0, size=2)`; the receiver
joins the same group as rank 1 when a header says `new_pair`. The group then serves every later
transfer of that pair, so N senders give a receiver N small groups, each set up once (~ms).

One transfer (the Push stream carries only the header):

    sender                                   receiver
    Push(header{torch: store, pair, tag}) -> [new pair: connect to the sender's store, join rank 1]
    [new pair: join rank 0]                  validate, allocate, post recv(tensor i, tag + i)
    wait for store key go/<tag>  <---------  set go/<tag>
    send(tensor i, tag + i), wait            wait for the recvs, on_payload
    ack <-----------------------------------

The go key means no send is ever posted that the receiver will not match: a header the receiver
refuses ends the Push before `go`, and the sender sees the ack instead. Failure rule: any error
before the data has moved drops the pair on both sides, and the next transfer builds a new one
(the receiver refuses a pair id it does not know, so the two sides never disagree for long).
A refusal after the data moved (on_payload raised) keeps the pair: both sides completed the
same operations. Transfers of one pair are serialized; different pairs run concurrently.

Gloo does not notice a peer that died: its pending send/recv wait for the group's timeout, and
abort() does not cut them short. So each side waits for its operations on a helper thread while
watching the other side through gRPC (the Push call ends when either process dies), and gives up
at once when it is gone; the helper thread keeps the abandoned operations' buffers alive until
gloo times them out.

Limits: a receiver keeps at most `max_pairs` groups (least recently used dropped first); a dead
sender's group lingers until evicted. backend="nccl" stages the tensors through the GPU with the
same code path (not exercised on this CPU-only machine).
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from services.common.kv_payload import KVMeta, KVPayload
from services.common.kv_transport.base import KVReceiver, KVSender, KVTransferError, register_transport
from services.common.kv_wire import (
    KVWireError,
    PayloadAssembler,
    encode_header_chunk,
    header_from_meta,
    payload_tensors,
)
from services.proto_gen import kv_pb2

TAG_SPAN = 1 << 30  # gloo tags are non-negative int32


@dataclass
class _Pair:
    pair_id: str
    pg: Any  # ProcessGroupGloo | ProcessGroupNCCL
    store: Any  # the PrefixStore of the pair
    device: torch.device
    next_tag: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_group(backend: str, store: Any, rank: int, timeout: float) -> tuple[Any, torch.device]:
    """A two-rank process group over `store` (blocks until the other rank joins) and its device."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timedelta(seconds=timeout)), torch.device("cpu")
    if backend == "nccl" and dist.is_nccl_available() and torch.cuda.is_available():
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(store, rank, 2, opts), torch.device("cuda", torch.cuda.current_device())
    raise KVTransferError(f"torch.distributed backend {backend!r} not available here")


def join_group(backend: str, store: Any, rank: int, timeout: float, active: Callable[[], bool]) -> Any:
    """make_group on a helper thread, abandoned (None) as soon as the other side is gone."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["group"] = make_group(backend, store, rank, timeout)
        except BaseException as exc:  # reported below
            out["error"] = exc

    th = threading.Thread(target=run, name="kv-pair-join", daemon=True)
    th.start()
    while th.is_alive():
        th.join(0.002)
        if th.is_alive() and not active():
            return None  # the thread ends at the group's timeout
    if "error" in out:
        raise KVTransferError(f"process group between prefill and decode worker not established: {out['error']}")
    return out["group"]


ENDED_GRACE_S = 1.0  # how long wait_works lets its works finish after the other side answered


def wait_works(
    pg: Any, works: list[Any], buffers: list[torch.Tensor], active: Callable[[], bool], deadline: float
) -> bool:
    """Wait for every operation; False as soon as the other side is gone. Raises on a failed one.

    Gloo's send/recv works only complete inside wait(), so a helper thread waits on them. When
    the other side is gone the caller returns at once; the thread keeps the group, works and
    buffers alive (gloo may still touch them) until gloo times the operations out."""
    done = threading.Event()
    errors: list[BaseException] = []

    def run(_pg: Any, _works: list[Any], _buffers: list[torch.Tensor]) -> None:
        try:
            for w in _works:
                w.wait()
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, args=(pg, works, buffers), name="kv-torch-wait", daemon=True).start()
    while not done.wait(0.01):
        if not active():
            # gone, or done: a receiver that got every tensor answers at once, possibly before
            # this side's works report completion; those complete right after, so wait briefly
            if not done.wait(ENDED_GRACE_S):
                return False
            break
        if time.monotonic() > deadline:
            raise KVTransferError("tensors not moved before the transfer's deadline")
    if errors:
        raise KVTransferError(f"torch.distributed transfer failed: {errors[0]}") from errors[0]
    return True


def _send_buffer(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tensor's bytes as one flat uint8 tensor on the group's device (a view on CPU)."""
    flat = t.reshape(-1).view(torch.uint8)
    return flat if device.type == "cpu" else flat.to(device)


def _recv_buffer(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Where the tensor's bytes land: the tensor itself on CPU, a staging buffer on a GPU."""
    flat = t.view(-1).view(torch.uint8)
    return flat if device.type == "cpu" else torch.empty_like(flat, device=device)


def local_host_towards(addr: str) -> str:
    """The address of this host that `addr`'s host routes back to (loopback for a local address)."""
    host = addr.rsplit(":", 1)[0].strip("[]") if ":" in addr else addr
    if host in ("", "localhost", "127.0.0.1", "::1", "0.0.0.0"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # no packet is sent: just asks the routing table
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


class TorchSender(KVSender):
    def __init__(
        self,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        backend: str = "gloo",
        advertise_host: str | None = None,
    ) -> None:
        super().__init__(timeout, connect_timeout)
        self.backend = backend
        self.advertise_host = advertise_host
        self._store: Any = None
        self._pairs: dict[str, _Pair] = {}
        self._addr_locks: dict[str, threading.Lock] = {}

    def _master_store(self) -> Any:
        with self._lock:
            if self._store is None:
                self._store = dist.TCPStore(
                    "0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=self.timeout)
                )
            return self._store

    def _addr_lock(self, addr: str) -> threading.Lock:
        with self._lock:
            return self._addr_locks.setdefault(addr, threading.Lock())

    def _send(self, decode_addr: str, payload: KVPayload) -> kv_pb2.KVAck:
        push = self.push_callable(decode_addr)
        store = self._master_store()
        deadline = time.monotonic() + self.timeout
        with self._addr_lock(decode_addr):
            pair = self._pairs.pop(decode_addr, None)  # put back only once the transfer left it consistent
            header = header_from_meta(payload.meta, self.name)
            r = header.torch
            r.store_host = self.advertise_host or local_host_towards(decode_addr)
            r.store_port = store.port
            r.pair_id = pair.pair_id if pair else uuid.uuid4().hex
            r.tag = pair.next_tag if pair else 0
            r.backend = self.backend
            r.new_pair = pair is None
            fut = push.future(iter([encode_header_chunk(header)]), timeout=self.timeout)
            try:
                if pair is None:
                    prefix = dist.PrefixStore(r.pair_id, store)
                    group = join_group(self.backend, prefix, 0, self.timeout, lambda: not fut.done())
                    pair = _Pair(r.pair_id, group[0], prefix, group[1]) if group else None
                if pair is None or not _wait_go(pair.store, r.tag, fut, deadline):
                    return _early_ack(fut)  # refused before any data moved: the pair is dropped
                bufs = [_send_buffer(t, pair.device) for t in payload_tensors(payload)]
                works = [pair.pg.send([b], 1, r.tag + i) for i, b in enumerate(bufs) if b.numel()]
                if not wait_works(pair.pg, works, bufs, lambda: not fut.done(), deadline):
                    return _early_ack(fut)  # the receiver died or gave up mid-transfer
                ack: kv_pb2.KVAck = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            finally:
                fut.cancel()  # no-op once done
            pair.next_tag = (r.tag + len(bufs)) % TAG_SPAN
            self._pairs[decode_addr] = pair
            return ack

    def close(self) -> None:
        super().close()
        with self._lock:
            self._pairs.clear()
            self._store = None


def _wait_go(store: Any, tag: int, fut: Any, deadline: float) -> bool:
    """Wait until the receiver posted its recvs (True) or the Push ended without (False)."""
    key = f"go/{tag}"
    delay = 5e-5
    while not store.check([key]):
        if fut.done():
            return False
        if time.monotonic() > deadline:
            raise KVTransferError("decode worker did not get ready for the tensors in time")
        time.sleep(delay)
        delay = min(2 * delay, 2e-3)
    store.delete_key(key)
    return True


def _early_ack(fut: Any) -> kv_pb2.KVAck:
    ack: kv_pb2.KVAck = fut.result()  # raises grpc.RpcError if the call itself failed
    if ack.ok:  # cannot happen with a well-behaved receiver
        return kv_pb2.KVAck(ok=False, error="decode worker acknowledged before the tensors were sent")
    return ack


class TorchReceiver(KVReceiver):
    def __init__(self, timeout: float = 60.0, max_pairs: int = 64) -> None:
        self.timeout = timeout
        self.max_pairs = max_pairs
        self._pairs: OrderedDict[str, _Pair] = OrderedDict()
        self._lock = threading.Lock()

    def _pair(self, r: kv_pb2.TorchRendezvous, active: Callable[[], bool]) -> _Pair:
        with self._lock:
            pair = self._pairs.get(r.pair_id)
            if pair is not None and not r.new_pair:
                self._pairs.move_to_end(r.pair_id)
                return pair
        if not r.new_pair:
            raise KVWireError(f"unknown torch pair {r.pair_id}: the sender must set up a new one")
        if pair is not None:
            raise KVWireError(f"torch pair {r.pair_id} set up twice")
        client = dist.TCPStore(
            r.store_host, r.store_port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=self.timeout)
        )
        prefix = dist.PrefixStore(r.pair_id, client)
        group = join_group(r.backend, prefix, 1, self.timeout, active)
        if group is None:
            raise KVTransferError("sender went away while the process group was set up")
        pair = _Pair(r.pair_id, group[0], prefix, group[1])
        with self._lock:
            self._pairs[r.pair_id] = pair
            while len(self._pairs) > self.max_pairs:
                self._pairs.popitem(last=False)
        return pair

    def receive(
        self, header: kv_pb2.KVHeader, meta: KVMeta, rest: Iterator[bytes], active: Callable[[], bool]
    ) -> KVPayload:
        if header.WhichOneof("rendezvous") != "torch":
            raise KVWireError(f"torch transfer of {meta.rid!r} without rendezvous")
        r = header.torch
        pair = self._pair(r, active)
        deadline = time.monotonic() + self.timeout
        with pair.lock:
            try:
                asm = PayloadAssembler(meta)
                slots = [(r.tag + i, t, _recv_buffer(t, pair.device)) for i, t in enumerate(asm.allocated()) if t.numel()]
                works = [pair.pg.recv([buf], 0, tag) for tag, _, buf in slots]
                pair.store.set(f"go/{r.tag}", b"1")
                if not wait_works(pair.pg, works, [buf for _, _, buf in slots], active, deadline):
                    raise KVTransferError(f"sender of {meta.rid!r} went away mid-transfer")
                for _, t, buf in slots:
                    if buf.data_ptr() != t.data_ptr():  # staged on a GPU
                        t.view(-1).view(torch.uint8).copy_(buf)
            except BaseException:
                with self._lock:
                    self._pairs.pop(r.pair_id, None)
                raise
        asm.mark_filled()
        if next(rest, None) is not None:
            raise KVWireError(f"torch transfer of {meta.rid!r} carries data chunks")
        return asm.finish()

    def close(self) -> None:
        with self._lock:
            self._pairs.clear()


register_transport("torch", TorchSender, TorchReceiver)
