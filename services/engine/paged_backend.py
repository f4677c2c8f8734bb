"""AttentionBackend over the paged pools: gathers each sequence's KV by slot, attends, writes back.

Per layer and sequence the order is fixed: read the old KV (a copy), then write the new KV. Pages
that leave an SWA window during the step may be re-used for the step's new positions (see
kv/req_pages.py), which is only sound because every read of a layer precedes its writes.
"""

from __future__ import annotations

import torch

from services.engine.attention import attention_reference
from services.engine.attention_backend import LayerAttn, SeqSegment
from services.engine.kv.req_pages import StepSlots
from services.engine.kv_store import KVStore


class _SeqIndex:
    def __init__(self, step: StepSlots, device: torch.device) -> None:
        def t(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=device)

        self.step = step
        self.full_read, self.full_write = t(step.full_read), t(step.full_write)
        self.swa_read, self.swa_write = t(step.swa_read), t(step.swa_write)
        self.q_pos = torch.arange(step.start, step.end, device=device)
        self.full_k_pos = torch.arange(0, step.end, device=device)
        self.swa_k_pos = torch.arange(step.swa_read_start, step.end, device=device)
        self.swa_write_from = step.swa_write_start - step.start  # offset into this step's new tokens


class PagedBackend:
    def __init__(self, store: KVStore, segments: list[SeqSegment], steps: list[StepSlots]) -> None:
        device = store.k[0].device if store.k else torch.device("cpu")
        self.store = store
        self.segments = segments
        self.index = [_SeqIndex(st, device) for st in steps]

    def attend(self, layer: LayerAttn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kbuf, vbuf = self.store.k[layer.layer_id], self.store.v[layer.layer_id]
        swa = self.store.specs[layer.layer_id].kind == "swa"
        if swa != (layer.window is not None):
            raise RuntimeError(f"layer {layer.layer_id}: pool kind and attention window disagree")
        kbuf_dtype = kbuf.dtype
        outs = []
        for seg, ix in zip(self.segments, self.index, strict=True):
            sl = slice(seg.batch_start, seg.batch_start + seg.num_tokens)
            qs, ks, vs = q[sl], k[sl].to(kbuf_dtype), v[sl].to(kbuf_dtype)
            if swa:
                read, write, k_pos = ix.swa_read, ix.swa_write, ix.swa_k_pos
            else:
                read, write, k_pos = ix.full_read, ix.full_write, ix.full_k_pos
            k_ctx = torch.cat([kbuf.index_select(0, read), ks])
            v_ctx = torch.cat([vbuf.index_select(0, read), vs])
            tail = ix.swa_write_from if swa else 0
            kbuf.index_copy_(0, write, ks[tail:])
            vbuf.index_copy_(0, write, vs[tail:])
            outs.append(
                attention_reference(
                    qs,
                    k_ctx.to(q.dtype),
                    v_ctx.to(q.dtype),
                    ix.q_pos,
                    k_pos,
                    window=layer.window,
                    sinks=layer.sinks,
                    scale=layer.scale,
                )
            )
        return torch.cat(outs)
