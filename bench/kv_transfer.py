"""KV transfer benchmark: each transport's GB/s moving one prompt's KV, prefill process -> decode
process, next to ceilings measured in the same run on the same bytes.

Payload: the KV of a 4k- and a 32k-token prompt of the real MiMo-V2-Flash geometry (48 layers:
9 full-attention layers with 4 KV heads, 39 SWA layers with 8 KV heads and window 128; K dim 192,
V dim 128; bf16, random bits), window-aware: full layers every token, SWA layers the last window.
"naive" is the same model shipping SWA KV for every token.

Ceilings, each between the same two processes or in one:
  memory copy   clone of the payload tensors into fresh memory (a receiver has to allocate too)
  raw TCP       loopback socket, sendall of the tensors' bytes -> recv_into fresh memory, 1-byte ack
Transports time `sender.send()` from call to ack: the receiver has allocated, filled and handed the
payload to a no-op on_payload. GB/s = payload bytes / seconds (1 GB = 1e9 B); median of the reps.

    python bench/kv_transfer.py [--quick] [--reps N] [--chunk-mib M]
"""

from __future__ import annotations

import argparse
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

from services.common.kv_payload import KVMeta, KVPayload, LayerMeta  # noqa: E402
from services.common.kv_transport import GRPC_OPTIONS, add_kv_receiver, make_sender  # noqa: E402
from services.common.kv_wire import payload_views  # noqa: E402

GOALS = {"shm": ("memory copy", 0.5), "grpc": ("raw TCP", 0.5)}


def flash_meta(num_tokens: int) -> KVMeta:
    from services.engine.config import ModelConfig
    from services.engine.presets import get_preset

    cfg = ModelConfig.from_dict(get_preset("mimo-v2-flash").config())
    layers = tuple(
        LayerMeta("swa" if g.window else "full", g.kv_heads, g.k_head_dim, g.v_head_dim) for g in cfg.kv_geometries
    )
    return KVMeta(f"bench-{num_tokens}", num_tokens, int(cfg.window or 0), "bfloat16", layers)


def naive_bytes(meta: KVMeta) -> int:
    return meta.num_tokens * sum(m.kv_heads * (m.k_dim + m.v_dim) for m in meta.layers) * meta.itemsize


def random_payload(meta: KVMeta) -> KVPayload:
    def rand(shape: tuple[int, int, int]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.int16).random_().view(torch.bfloat16)

    n = len(meta.layers)
    return KVPayload(meta, [rand(meta.k_shape(i)) for i in range(n)], [rand(meta.v_shape(i)) for i in range(n)])


# ---- the receiving process ---------------------------------------------------------------------


def _tcp_sink(sock: socket.socket) -> None:
    """Raw-socket ceiling, receiving side: 8-byte length, then that many bytes into fresh memory."""
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = conn.recv(8, socket.MSG_WAITALL)
                if len(head) < 8:
                    break
                size = int.from_bytes(head, "little")
                view = memoryview(torch.empty(size, dtype=torch.uint8).numpy())
                got = 0
                while got < size:
                    got += conn.recv_into(view[got:], size - got)
                conn.sendall(b"k")


def receiver_main(ready: mp.Queue) -> None:  # type: ignore[type-arg]
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(4), options=GRPC_OPTIONS)
    add_kv_receiver(server, lambda payload: None)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    sock = socket.create_server(("127.0.0.1", 0))
    import threading

    threading.Thread(target=_tcp_sink, args=(sock,), daemon=True).start()
    ready.put((grpc_port, sock.getsockname()[1]))
    server.wait_for_termination()


# ---- measurements ------------------------------------------------------------------------------


def timed(fn: Callable[[], object], reps: int) -> list[float]:
    fn()  # warm-up: connections, process groups, allocator
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def memory_copy(payload: KVPayload) -> Callable[[], object]:
    return lambda: [t.clone() for t in payload.k + payload.v]


def raw_tcp(port: int, payload: KVPayload) -> Callable[[], object]:
    conn = socket.create_connection(("127.0.0.1", port))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    views = payload_views(payload)

    def run() -> None:
        conn.sendall(payload.nbytes.to_bytes(8, "little"))
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
    grpc_port, tcp_port = ready.get(timeout=120)
    addr = f"127.0.0.1:{grpc_port}"
    senders = {
        "grpc": make_sender("grpc", chunk_bytes=int(args.chunk_mib * (1 << 20))),
        "shm": make_sender("shm"),
        "torch": make_sender("torch"),
    }
    rows = []
    for n in (4096, 32768):
        meta = flash_meta(n)
        payload = random_payload(meta)
        results = {
            "memory copy": timed(memory_copy(payload), reps),
            "raw TCP": timed(raw_tcp(tcp_port, payload), reps),
        }
        for name, sender in senders.items():
            results[name] = timed(lambda s=sender: s.send(addr, payload), reps)  # type: ignore[misc]
        gbps = {k: payload.nbytes / statistics.median(v) / 1e9 for k, v in results.items()}
        best = {k: payload.nbytes / min(v) / 1e9 for k, v in results.items()}
        for k in results:
            print(f"  {n:>6} tokens {k:<12} {gbps[k]:6.2f} GB/s (best {best[k]:.2f})", flush=True)
            rows.append((n, payload.nbytes, naive_bytes(meta), k, gbps[k], best[k], gbps))
        del payload
    for s in senders.values():
        s.close()
    proc.terminate()

    print(f"\nKV transfer, MiMo-V2-Flash geometry, bf16, {reps} rep(s) after a warm-up, median GB/s "
          f"(1 GB = 1e9 B), grpc chunks {args.chunk_mib:g} MiB, 2 processes on one host\n")
    print("| prompt | KV sent | naive (all SWA) | naive / sent | path | GB/s | best | vs ceiling | goal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, sent, naive, k, g, b, allg in rows:
        vs, goal = "", ""
        if k in GOALS:
            ceiling, need = GOALS[k]
            frac = g / allg[ceiling]
            vs = f"{frac:.0%} of {ceiling}"
            goal = f">= {need:.0%}: {'met' if frac >= need else 'MISSED'}"
        elif k == "torch":
            vs = f"{g / allg['raw TCP']:.0%} of raw TCP"
        print(f"| {n // 1024}k | {sent / 2**20:.1f} MiB | {naive / 2**20:.1f} MiB | {naive / sent:.2f}x | {k} "
              f"| {g:.2f} | {b:.2f} | {vs} | {goal} |")


if __name__ == "__main__":
    main()
