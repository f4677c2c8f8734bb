"""The bytes of L2: host-memory copies of KV pages, one buffer per layer, in the device store's layout.

services/engine/kv/host_tier.py decides which host page holds what; this copies whole pages
between the device KVStore and here: every full-attention layer for a full page, every SWA layer
for an SWA page. On CUDA the buffers are pinned (faster transfers); the copies are synchronous,
on the engine's thread, between steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.common.kv_spec import KVLayerSpec
from services.engine.tensors.kv_store import KVStore


class HostKVStore:
    def __init__(
        self,
        specs: list[KVLayerSpec],
        num_full_pages: int,
        num_swa_pages: int,
        page_size: int,
        dtype: torch.dtype,
    ) -> None:
        pin = torch.cuda.is_available()
        self.specs = specs
        self.page_size = page_size
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for spec in specs:
            pages = num_full_pages if spec.kind == "full" else num_swa_pages
            shape_k = (pages, page_size, spec.kv_heads, spec.k_dim)
            shape_v = (pages, page_size, spec.kv_heads, spec.v_dim)
            self.k.append(torch.zeros(shape_k, dtype=dtype, pin_memory=pin))
            self.v.append(torch.zeros(shape_v, dtype=dtype, pin_memory=pin))

    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @torch.inference_mode()
    def save(
        self, device: KVStore, kind: str, device_pages: Sequence[int], host_pages: Sequence[int]
    ) -> None:
        """Copy device pages of `kind` into host pages (same order)."""
        if not device_pages:
            return
        dev_idx = torch.tensor(list(device_pages), device=device.k[0].device)
        host_idx = torch.tensor(list(host_pages))
        for i, spec in enumerate(self.specs):
            if spec.kind != kind:
                continue
            for src, dst in ((device.k[i], self.k[i]), (device.v[i], self.v[i])):
                pages = src.view(-1, self.page_size, *src.shape[1:]).index_select(0, dev_idx)
                dst.index_copy_(0, host_idx, pages.cpu())

    @torch.inference_mode()
    def load(
        self, device: KVStore, kind: str, host_pages: Sequence[int], device_pages: Sequence[int]
    ) -> None:
        """Copy host pages of `kind` into device pages (same order), every layer of that kind."""
        for i, spec in enumerate(self.specs):
            if spec.kind == kind:
                self.load_layer(device, i, host_pages, device_pages)

    @torch.inference_mode()
    def load_layer(
        self, device: KVStore, layer: int, host_pages: Sequence[int], device_pages: Sequence[int]
    ) -> None:
        """Copy host pages of one layer into device pages (same order): layer_restore.py's unit."""
        if not host_pages:
            return
        target = device.k[layer].device
        dev_idx = torch.tensor(list(device_pages), device=target)
        host_idx = torch.tensor(list(host_pages))
        for src, dst in ((self.k[layer], device.k[layer]), (self.v[layer], device.v[layer])):
            pages = src.index_select(0, host_idx).to(target)
            dst.view(-1, self.page_size, *dst.shape[1:]).index_copy_(0, dev_idx, pages)
