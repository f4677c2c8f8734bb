"""Layer-wise restore: copy restored KV (L2 -> device) one layer at a time while the forward runs.

    loader thread:  load layer 0 | load layer 1 | load layer 2 | ...
    forward:                 wait(0) attend 0 | wait(1) attend 1 | ...

The forward's attention of layer i waits only for layer i's pages, so layer i+1's copy overlaps
layer i's compute (and the MLP/MoE after it). Before the step's pages can change again the engine
joins the loader (`finish`), also when the forward failed.

On CUDA the loader enqueues each layer's copies on a side stream and records an event; wait(i)
makes the compute stream wait for that event (the host thread does not block on the copy). On CPU
the copies run on the loader thread (torch releases the GIL in them) and wait(i) blocks until that
layer is in place. Only the CPU path runs in this repository's tests.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from services.engine.kv.host_tier import RestoreJob
from services.engine.tensors.host_store import HostKVStore
from services.engine.tensors.kv_store import KVStore


class LayerwiseRestore:
    def __init__(
        self, host: HostKVStore, device: KVStore, jobs: Sequence[RestoreJob], pool: ThreadPoolExecutor
    ) -> None:
        self.host, self.device, self.jobs = host, device, list(jobs)
        self.layers = len(device.specs)
        self._ready = [threading.Event() for _ in range(self.layers)]
        self._cuda = device.k[0].is_cuda if device.k else False
        self._events: list[torch.cuda.Event | None] = [None] * self.layers
        self._stream = torch.cuda.Stream(device=device.k[0].device) if self._cuda else None
        self._failed: BaseException | None = None
        self._future: Future[None] = pool.submit(self._load_all)

    def _load_all(self) -> None:
        try:
            with torch.inference_mode():
                for i in range(self.layers):
                    if self._stream is not None:
                        with torch.cuda.stream(self._stream):
                            self._load(i)
                            ev = torch.cuda.Event()
                            ev.record(self._stream)
                            self._events[i] = ev
                    else:
                        self._load(i)
                    self._ready[i].set()
        except BaseException as e:  # noqa: BLE001 - re-raised in the forward's thread by wait()
            self._failed = e
            for ready in self._ready:
                ready.set()

    def _load(self, layer: int) -> None:
        kind = self.device.specs[layer].kind
        for job in self.jobs:
            host_pages, dev_pages = (
                (job.full_host, job.full_device) if kind == "full" else (job.swa_host, job.swa_device)
            )
            self.host.load_layer(self.device, layer, host_pages, dev_pages)

    def wait(self, layer: int) -> None:
        """Block (CPU) / make the compute stream wait (CUDA) until `layer`'s restored pages are in place."""
        self._ready[layer].wait()
        if self._failed is not None:
            raise RuntimeError(f"restoring KV from host memory failed: {self._failed}") from self._failed
        ev = self._events[layer]
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)

    def finish(self) -> None:
        """Wait for every layer (the step's end, or a failed forward)."""
        self._future.result()
        if self._stream is not None:
            self._stream.synchronize()
