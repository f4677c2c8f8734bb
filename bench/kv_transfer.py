"""KV transfer benchmark: each transport's GB/s moving one prompt's KV, prefill process -> decode
process, next to ceilings measured in the same run on the same bytes.

Payload: the KV of a 4k- and a 32k-token prompt of the real MiMo-V2-Flash geometry (48 layers:
9 full-attention layers with 4 KV heads, 39 SWA layers with 8 KV heads and window 128; K dim 192,
V dim 128; bf16, random bits), window-aware: full layers every token, SWA layers the last window.
"naive" is the same model shipping SWA KV for every token.

Ceilings, measured in the same run on the same bytes, each twice: into fresh pages (what every
transport's receiver does: the KV lands in memory it did not have) and into one buffer reused
across reps (no page faults: the copy or the socket alone, what FACTS.md quotes):
  memcpy, fresh / reused    torch copy_ of the payload tensors into a new anonymous mapping / into
                            one preallocated buffer (torch clone lands on either, by glibc's whim)
  TCP, fresh / reused       loopback socket between the two processes, sendall of the tensors'
                            bytes -> recv_into a new buffer / the previous one; 1-byte ack
Transports time `sender.send()` from call to ack: the receiver has allocated, filled and handed the
payload to a no-op on_payload. "shm zero-copy" is shm with a receiver that maps the segments instead
of copying them. GB/s = payload bytes / seconds (1 GB = 1e9 B); a path's median over the reps is
compared with a ceiling's best rep (fresh-page figures swing 3x between reps on this VM); frees
happen outside the timed region for the ceilings, on a background thread for the transports.
Goals: shm >= 50% of memcpy, grpc >= 50% of TCP; the table checks both against either ceiling.

    python bench/kv_transfer.py [--quick] [--reps N] [--chunk-mib M]
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import socket
import statistics
import sys
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.kv_payload import KVMeta, KVPayload  # noqa: E402
from services.common.kv_transport import GRPC_OPTIONS, add_kv_receiver, make_sender  # noqa: E402
from services.common.kv_wire import payload_views  # noqa: E402

CEILINGS = {"shm": "memcpy", "shm zero-copy": "memcpy", "grpc": "TCP", "torch": "TCP"}
GOALS = {"shm": 0.5, "shm zero-copy": 0.5, "grpc": 0.5}


def flash_meta(num_tokens: int) -> KVMeta:
    from services.models.config import ModelConfig
    from services.models.presets import get_preset

    cfg = ModelConfig.from_dict(get_preset("mimo-v2-flash").config())
    return KVMeta(f"bench-{num_tokens}", num_tokens, int(cfg.window or 0), "bfloat16", cfg.kv_specs)


def naive_bytes(meta: KVMeta) -> int:
    return meta.num_tokens * sum(m.kv_heads * (m.k_dim + m.v_dim) for m in meta.layers) * meta.itemsize


def random_payload(meta: KVMeta) -> KVPayload:
    def rand(shape: tuple[int, int, int]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.int16).random_().view(torch.bfloat16)

    n = len(meta.layers)
    return KVPayload(meta, [rand(meta.k_shape(i)) for i in range(n)], [rand(meta.v_shape(i)) for i in range(n)])


# ---- the receiving process ---------------------------------------------------------------------


def _tcp_sink(sock: socket.socket) -> None:
    """Raw-socket ceiling, receiving side: 8-byte length, 1-byte reuse flag, then that many bytes
    into fresh memory (or into the buffer of the previous transfer)."""
    while True:
        conn, _ = sock.accept()
        kept = memoryview(b"")
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = conn.recv(9, socket.MSG_WAITALL)
                if len(head) < 9:
                    break
                size = int.from_bytes(head[:8], "little")
                if not head[8] or len(kept) != size:
                    kept = torch.empty(size, dtype=torch.uint8).numpy().data
                view = kept
                got = 0
                while got < size:
                    got += conn.recv_into(view[got:], size - got)
                conn.sendall(b"k")


def receiver_main(ready: mp.Queue) -> None:  # type: ignore[type-arg]
    """The decode side: a KV receiver (shm copies), another with zero-copy shm, a TCP sink."""
    import threading

    import grpc

    servers, ports = [], []
    for zero_copy in (False, True):
        server = grpc.server(futures.ThreadPoolExecutor(4), options=GRPC_OPTIONS)
        add_kv_receiver(server, lambda payload: None, shm={"zero_copy": zero_copy})
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)  # a dropped grpc.Server stops
    sock = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_tcp_sink, args=(sock,), daemon=True).start()
    ready.put((*ports, sock.getsockname()[1]))
    threading.Event().wait()


# ---- measurements ------------------------------------------------------------------------------


def timed(fn: Callable[[], object], reps: int) -> list[float]:
    fn()  # warm-up: connections, process groups, allocator
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t0)
        del result
    return out


def memcpy(payload: KVPayload, reuse: bool) -> Callable[[], object]:
    """Copy the payload's bytes into one buffer: a new anonymous mapping each time, or the same."""
    kept = torch.empty(payload.nbytes, dtype=torch.uint8)

    def run() -> object:
        dst = kept if reuse else torch.frombuffer(mmap.mmap(-1, payload.nbytes), dtype=torch.uint8)
        off = 0
        for t in payload.k + payload.v:
            n = t.numel() * t.element_size()
            dst[off : off + n].copy_(t.reshape(-1).view(torch.uint8))
            off += n
        return dst  # freed after the clock stopped

    return run


def raw_tcp(port: int, payload: KVPayload, reuse: bool) -> Callable[[], object]:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    views = payload_views(payload)

    def run() -> None:
        conn.sendall(payload.nbytes.to_bytes(8, "little") + bytes([reuse]))
        for v in views:
            conn.sendall(v)
        assert conn.recv(1) == b"k"

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one measured rep each (under a minute)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-mib", type=float, default=1.0, help="grpc data chunk size")
    args = ap.parse_args()
    reps = 1 if args.quick else args.reps

    ctx = mp.get_context("spawn")
    ready: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    proc = ctx.Process(target=receiver_main, args=(ready,), daemon=True)
    proc.start()
    grpc_port, zero_copy_port, tcp_port = ready.get(timeout=120)
    addr, zero_copy_addr = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{zero_copy_port}"
    senders = {  # path -> (sender, decode address)
        "grpc": (make_sender("grpc", chunk_bytes=int(args.chunk_mib * (1 << 20))), addr),
        "shm": (make_sender("shm"), addr),
        "shm zero-copy": (make_sender("shm"), zero_copy_addr),
        "torch": (make_sender("torch"), addr),
    }
    rows = []
    for n in (4096, 32768):
        meta = flash_meta(n)
        payload = random_payload(meta)
        results = {
            "memcpy, fresh": timed(memcpy(payload, reuse=False), reps),
            "memcpy, reused": timed(memcpy(payload, reuse=True), reps),
            "TCP, fresh": timed(raw_tcp(tcp_port, payload, reuse=False), reps),
            "TCP, reused": timed(raw_tcp(tcp_port, payload, reuse=True), reps),
        }
        for name, (sender, to) in senders.items():
            results[name] = timed(lambda s=sender, a=to, p=payload: s.send(a, p), reps)  # type: ignore[misc]
        gbps = {k: payload.nbytes / statistics.median(v) / 1e9 for k, v in results.items()}
        best = {k: payload.nbytes / min(v) / 1e9 for k, v in results.items()}
        for k in results:
            print(f"  {n:>6} tokens {k:<20} {gbps[k]:6.2f} GB/s (best {best[k]:.2f})", flush=True)
            rows.append((n, payload.nbytes, naive_bytes(meta), k, gbps[k], best[k], best))
        del payload
    for s, _ in senders.values():
        s.close()
    proc.terminate()

    print(f"\nKV transfer, MiMo-V2-Flash geometry, bf16, {reps} rep(s) after a warm-up, GB/s median and best "
          f"(1 GB = 1e9 B), grpc chunks {args.chunk_mib:g} MiB, 2 processes on one host; "
          "vs ceiling = median / the ceiling's best\n")
    print("| prompt | KV sent | naive (all SWA) | naive / sent | path | GB/s | best "
          "| vs ceiling fresh / reused | goal >= 50% fresh / reused |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, sent, naive, k, g, b, allb in rows:
        vs, goal = "", ""
        if k in CEILINGS:
            fracs = {m: g / allb[f"{CEILINGS[k]}, {m}"] for m in ("fresh", "reused")}  # vs the ceiling's best
            vs = f"{CEILINGS[k]} " + " / ".join(f"{fracs[m]:.0%}" for m in fracs)
            if k in GOALS:
                goal = " / ".join("met" if fracs[m] >= GOALS[k] else "MISSED" for m in fracs)
        print(f"| {n // 1024}k | {sent / 2**20:.1f} MiB | {naive / 2**20:.1f} MiB | {naive / sent:.2f}x | {k} "
              f"| {g:.2f} | {b:.2f} | {vs} | {goal} |")


if __name__ == "__main__":
    main()
