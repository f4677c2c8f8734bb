"""The KV tensors: one K and one V buffer per layer, indexed by flat slot (page * page_size + offset).

Full-attention layers index the full pool's pages, SWA layers the SWA pool's: the two pools are
ordinary page pools (services/engine/kv/page_pool.py) that only hand out ids; this is the one place
that holds the bytes. Page ids mean the same thing in every layer of a kind.
"""

from __future__ import annotations

import torch

from services.common.kv_spec import KVLayerSpec


class KVStore:
    def __init__(
        self,
        specs: list[KVLayerSpec],
        num_full_pages: int,
        num_swa_pages: int,
        page_size: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        self.specs = specs
        self.page_size = page_size
        self.dtype = dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for spec in specs:
            slots = (num_full_pages if spec.kind == "full" else num_swa_pages) * page_size
            self.k.append(torch.zeros(slots, spec.kv_heads, spec.k_dim, dtype=dtype, device=device))
            self.v.append(torch.zeros(slots, spec.kv_heads, spec.v_dim, dtype=dtype, device=device))

    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
