"""One layer's KV as every part of swaserve describes it, the two KV kinds, and the KV dtypes.

A `KVLayerSpec` is what a page pool, a transfer payload, an L2/L3 key and the byte formula need to
know about one layer: its kind ("full": every token; "swa": the last `window` tokens a query sees),
its KV heads and K / V head dims. The model config makes them (services/models/config.py), the
engine's KV buffers are shaped by them, and a prefill -> decode payload carries them.

The dtype table is names -> itemsize, torch-free; `torch_dtype` is the one bridge to torch's
objects, for the torch side only. No torch is imported here: the router reads `KVKind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

if TYPE_CHECKING:
    import torch

KVKind = Literal["full", "swa"]
KV_KINDS: tuple[KVKind, ...] = ("full", "swa")

DTYPE_ITEMSIZE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}  # name -> bytes per element


def kv_kind(value: object) -> KVKind:
    """`value` as a KVKind; anything else is a ValueError."""
    if value not in KV_KINDS:
        raise ValueError(f"kind must be one of {KV_KINDS}, got {value!r}")
    return cast(KVKind, value)


def dtype_itemsize(name: str) -> int:
    try:
        return DTYPE_ITEMSIZE[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_ITEMSIZE)}, got {name!r}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a KV dtype name (torch is imported only by those who ask)."""
    import torch

    dtype_itemsize(name)
    return cast("torch.dtype", getattr(torch, name))


def dtype_name(dtype: torch.dtype) -> str:
    """The KV dtype name of a torch dtype ("torch.bfloat16" -> "bfloat16")."""
    name = str(dtype).removeprefix("torch.")
    dtype_itemsize(name)
    return name


@dataclass(frozen=True)
class KVLayerSpec:
    kind: KVKind
    kv_heads: int
    k_dim: int
    v_dim: int
    window: int | None = None  # "swa": previous tokens a query sees (None: not known here); "full": None

    def __post_init__(self) -> None:
        kv_kind(self.kind)
        if min(self.kv_heads, self.k_dim, self.v_dim) <= 0:
            raise ValueError(f"a KV layer needs positive heads and dims, got {self}")
        if self.kind == "full" and self.window is not None:
            raise ValueError("a full-attention layer has no window")

    def bytes_per_token(self, dtype: str) -> int:
        """K and V of one token in this layer, in `dtype` (a DTYPE_ITEMSIZE name)."""
        return self.kv_heads * (self.k_dim + self.v_dim) * dtype_itemsize(dtype)

