"""What crosses from a prefill worker to a decode worker: one request's KV, window-aware.

Full-attention layers carry every prompt position [0, num_tokens); SWA layers carry only the last
`window` positions [max(0, num_tokens - window), num_tokens): the decode worker's next query (at
position num_tokens) sees exactly those. Nothing else of the SWA history ever crosses.

    bytes = num_tokens * sum(full layers' kv_heads * (k_dim + v_dim)) * itemsize
          + min(num_tokens, window) * sum(SWA layers' kv_heads * (k_dim + v_dim)) * itemsize
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from services.common.kv_spec import KVLayerSpec, dtype_itemsize, torch_dtype


@dataclass(frozen=True)
class KVMeta:
    """The payload's geometry. Its SWA layers' `window` is the payload's (`replace`d on creation):
    one window per model, carried once on the wire."""

    rid: str
    num_tokens: int  # the KV covers prompt positions [0, num_tokens) (SWA layers: only the window)
    window: int  # previous tokens an SWA query sees; 0 if the model has no SWA layer
    dtype: str  # a services/common/kv_spec.py DTYPE_ITEMSIZE name
    layers: tuple[KVLayerSpec, ...]

    def __post_init__(self) -> None:
        if any(m.kind == "swa" and m.window != self.window for m in self.layers):
            layers = tuple(replace(m, window=self.window) if m.kind == "swa" else m for m in self.layers)
            object.__setattr__(self, "layers", layers)

    def start(self, layer_id: int) -> int:
        """First position carried for a layer."""
        if self.layers[layer_id].kind == "swa":
            return max(0, self.num_tokens - self.window)
        return 0

    def positions(self, layer_id: int) -> int:
        return self.num_tokens - self.start(layer_id)

    def k_shape(self, layer_id: int) -> tuple[int, int, int]:
        m = self.layers[layer_id]
        return (self.positions(layer_id), m.kv_heads, m.k_dim)

    def v_shape(self, layer_id: int) -> tuple[int, int, int]:
        m = self.layers[layer_id]
        return (self.positions(layer_id), m.kv_heads, m.v_dim)

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

    @property
    def nbytes(self) -> int:
        """Expected payload bytes, from the geometry alone (the formula in the module docstring)."""
        return sum(self.positions(i) * m.bytes_per_token(self.dtype) for i, m in enumerate(self.layers))


@dataclass
class KVPayload:
    meta: KVMeta
    k: list[torch.Tensor]  # per layer, shape meta.k_shape(i), dtype meta.dtype, contiguous, on CPU
    v: list[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.k) != len(self.meta.layers) or len(self.v) != len(self.meta.layers):
            raise ValueError("one K and one V tensor per layer")
        dtype = torch_dtype(self.meta.dtype)
        for i in range(len(self.meta.layers)):
            for t, shape, name in ((self.k[i], self.meta.k_shape(i), "k"), (self.v[i], self.meta.v_shape(i), "v")):
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise ValueError(f"layer {i} {name}: expected {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
