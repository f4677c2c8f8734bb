"""AttentionBackend over the paged pools: gathers each sequence's KV by slot, attends, writes back.

Per layer and sequence the order is fixed: read the old KV (a copy), then write the new KV. Pages
that leave an SWA window during the step may be re-used for the step's new positions (see
kv/req_pages.py), which is only sound because every read of a layer precedes its writes.

A sequence with one new token (decode) takes a short path: it writes its new KV first (ReqPages
never re-uses a page a one-token step still reads), then gathers exactly the slots it may see,
its own included, so it needs no mask. (Measured: per-sequence gathers beat one padded
[B, L, H, D] gather of all decode sequences by 3-4x on CPU: padding to the longest context and the
gather's copy dominate.)
"""

from __future__ import annotations

from typing import Protocol

import torch

from services.engine.kv.req_pages import StepSlots
from services.engine.models.attention import attention_reference
from services.engine.models.attention_backend import LayerAttn, SeqSegment
from services.engine.tensors.kv_store import KVStore


def _t(xs: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long, device=device)


class _SeqIndex:
    """One prefill-chunk sequence's slots as tensors."""

    def __init__(self, seg: SeqSegment, step: StepSlots, device: torch.device) -> None:
        self.rows = slice(seg.batch_start, seg.batch_start + seg.num_tokens)
        self.full_read, self.full_write = _t(step.full_read, device), _t(step.full_write, device)
        self.swa_read, self.swa_write = _t(step.swa_read, device), _t(step.swa_write, device)
        self.q_pos = torch.arange(step.start, step.end, device=device)
        self.full_k_pos = torch.arange(0, step.end, device=device)
        self.swa_k_pos = torch.arange(step.swa_read_start, step.end, device=device)
        self.swa_write_from = step.swa_write_start - step.start  # offset into this step's new tokens


class _Decodes:
    """All decode sequences of the step: their rows, one write per sequence per kind, and for each
    sequence the slots its new token sees (old context + its own, last)."""

    def __init__(self, segs: list[SeqSegment], steps: list[StepSlots], device: torch.device) -> None:
        self.rows = _t([s.batch_start for s in segs], device)
        self.full_ctx = [_t(st.full_read + st.full_write, device) for st in steps]
        self.swa_ctx = [_t(st.swa_read + st.swa_write, device) for st in steps]
        self.full_write = _t([w for st in steps for w in st.full_write], device)
        self.full_write_rows = _t(
            [s.batch_start for s, st in zip(segs, steps, strict=True) if st.full_write], device
        )
        self.swa_write = _t([w for st in steps for w in st.swa_write], device)
        self.swa_write_rows = _t(
            [s.batch_start for s, st in zip(segs, steps, strict=True) if st.swa_write], device
        )


class LayerWait(Protocol):
    def wait(self, layer: int) -> None: ...


class PagedBackend:
    def __init__(
        self,
        store: KVStore,
        segments: list[SeqSegment],
        steps: list[StepSlots],
        restore: LayerWait | None = None,
    ) -> None:
        device = store.k[0].device if store.k else torch.device("cpu")
        self.store = store
        self.restore = restore  # KV being restored into this step's pages, layer by layer
        self.segments = segments
        pairs = list(zip(segments, steps, strict=True))
        self.chunks = [_SeqIndex(seg, st, device) for seg, st in pairs if seg.num_tokens > 1]
        decodes = [(seg, st) for seg, st in pairs if seg.num_tokens == 1]
        self.decodes = _Decodes([d[0] for d in decodes], [d[1] for d in decodes], device) if decodes else None

    def attend(self, layer: LayerAttn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        swa = self.store.specs[layer.layer_id].kind == "swa"
        if self.restore is not None:
            self.restore.wait(layer.layer_id)
        if swa != (layer.window is not None):
            raise RuntimeError(f"layer {layer.layer_id}: pool kind and attention window disagree")
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        for ix in self.chunks:
            out[ix.rows] = self._attend_chunk(layer, swa, ix, q[ix.rows], k[ix.rows], v[ix.rows])
        if self.decodes is not None:
            out[self.decodes.rows] = self._attend_decodes(layer, swa, self.decodes, q, k, v)
        return out

    def _attend_decodes(
        self, layer: LayerAttn, swa: bool, d: _Decodes, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        kbuf, vbuf = self.store.k[layer.layer_id], self.store.v[layer.layer_id]
        write, write_rows, ctxs = (
            (d.swa_write, d.swa_write_rows, d.swa_ctx)
            if swa
            else (d.full_write, d.full_write_rows, d.full_ctx)
        )
        kbuf.index_copy_(0, write, k.index_select(0, write_rows).to(kbuf.dtype))
        vbuf.index_copy_(0, write, v.index_select(0, write_rows).to(vbuf.dtype))
        hq, hkv, dim = q.shape[1], k.shape[1], q.shape[2]
        qs = (q.index_select(0, d.rows).float() * layer.scale).reshape(
            -1, hkv, hq // hkv, dim
        )  # [B, Hkv, G, D]
        sinks = layer.sinks.float().reshape(hkv, hq // hkv, 1) if layer.sinks is not None else None
        outs = []
        for i, ctx in enumerate(ctxs):
            keys = kbuf.index_select(0, ctx).float()  # [L, Hkv, D], the new token last
            values = vbuf.index_select(0, ctx).float()
            scores = torch.matmul(qs[i], keys.permute(1, 2, 0))  # [Hkv, G, L]
            if sinks is not None:
                probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
            else:
                probs = torch.softmax(scores, dim=-1)
            outs.append(torch.matmul(probs, values.transpose(0, 1)))  # [Hkv, G, Dv]
        return torch.stack(outs).reshape(len(ctxs), hq, -1).to(q.dtype)

    def _attend_chunk(
        self, layer: LayerAttn, swa: bool, ix: _SeqIndex, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        kbuf, vbuf = self.store.k[layer.layer_id], self.store.v[layer.layer_id]
        ks, vs = k.to(kbuf.dtype), v.to(vbuf.dtype)
        if swa:
            read, write, k_pos, tail = ix.swa_read, ix.swa_write, ix.swa_k_pos, ix.swa_write_from
        else:
            read, write, k_pos, tail = ix.full_read, ix.full_write, ix.full_k_pos, 0
        k_ctx = torch.cat([kbuf.index_select(0, read), ks])
        v_ctx = torch.cat([vbuf.index_select(0, read), vs])
        kbuf.index_copy_(0, write, ks[tail:])
        vbuf.index_copy_(0, write, vs[tail:])
        return attention_reference(
            q,
            k_ctx.to(q.dtype),
            v_ctx.to(q.dtype),
            ix.q_pos,
            k_pos,
            window=layer.window,
            sinks=layer.sinks,
            scale=layer.scale,
        )
