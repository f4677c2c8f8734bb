"""KV pages as flat bytes: the value format of an L3 (GCache) block.

A value holds n pages of one kind (full or SWA), page after page; inside a page, the layers of
that kind in model order, each as K then V of the page's `page_size` slots:

    value = page_0 | page_1 | ...        page = L0.K | L0.V | L1.K | L1.V | ...    (kind's layers only)

A full-attention block is one page; an SWA tail is the pages of the window before a prefix's end.
Both stores (device KVStore: [slots, heads, dim]; host: [pages, page_size, heads, dim]) read and
write this format through a per-page view, so a value written from a device can be installed into
another worker's host tier unchanged. The dtype and geometry are part of the L3 namespace
(services/engine/l3_tier.py), never of the value.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from services.common.kv_spec import KVLayerSpec, dtype_name


def page_nbytes(specs: Sequence[KVLayerSpec], kind: str, page_size: int, dtype: torch.dtype) -> int:
    """Bytes one page of `kind` takes in a value."""
    name = dtype_name(dtype)
    return page_size * sum(s.bytes_per_token(name) for s in specs if s.kind == kind)


def _paged(t: torch.Tensor, page_size: int) -> torch.Tensor:
    return t.view(-1, page_size, *t.shape[-2:])


@torch.inference_mode()
def read_pages(
    k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], specs: Sequence[KVLayerSpec], kind: str,
    page_size: int, pages: Sequence[int],
) -> torch.Tensor:  # fmt: skip
    """The pages' bytes as a CPU uint8 tensor [len(pages), page_nbytes]: row i is page i's value."""
    device = k[0].device
    idx = torch.tensor(list(pages), dtype=torch.long, device=device)
    parts = []
    for i, spec in enumerate(specs):
        if spec.kind != kind:
            continue
        for buf in (k[i], v[i]):
            sel = _paged(buf, page_size).index_select(0, idx)  # [n, P, H, D]
            parts.append(sel.reshape(len(pages), -1).contiguous().view(torch.uint8))
    return torch.cat(parts, dim=1).cpu()


@torch.inference_mode()
def write_pages(
    k: Sequence[torch.Tensor], v: Sequence[torch.Tensor], specs: Sequence[KVLayerSpec], kind: str,
    page_size: int, pages: Sequence[int], data: torch.Tensor | memoryview | bytes,
) -> None:  # fmt: skip
    """Install `data` (len(pages) values' worth of bytes, read_pages' layout) into the pages."""
    if not isinstance(data, torch.Tensor):
        with warnings.catch_warnings():  # a read-only buffer: only read here, copied into the store
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(data, dtype=torch.uint8)
    n = len(pages)
    want = n * sum(
        _paged(t, page_size)[0].numel() * t.element_size()
        for i, spec in enumerate(specs) if spec.kind == kind for t in (k[i], v[i])
    )  # fmt: skip
    if data.numel() != want:
        raise ValueError(f"{data.numel()} bytes for {n} pages of {kind!r}; the layers need {want}")
    rows = data.view(n, -1)
    idx = torch.tensor(list(pages), dtype=torch.long, device=k[0].device)
    off = 0
    for i, spec in enumerate(specs):
        if spec.kind != kind:
            continue
        for buf in (k[i], v[i]):
            paged = _paged(buf, page_size)
            width = paged[0].numel() * paged.element_size()
            chunk = rows[:, off : off + width].contiguous().view(paged.dtype).view(n, *paged.shape[1:])
            paged.index_copy_(0, idx, chunk.to(paged.device))
            off += width
