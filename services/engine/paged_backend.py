"""AttentionBackend over the paged pools: gathers each sequence's KV by slot, attends, writes back.

Per layer and sequence the order is fixed: read the old KV (a copy), then write the new KV. Pages
that leave an SWA window during the step may be re-used for the step's new positions (see
kv/req_pages.py), which is only sound because every read of a layer precedes its writes.

Sequences with one new token (decode) are attended together: their KV is gathered into one
padded [B, L, H, D] tensor per layer, so a decode step costs a few large ops per layer instead of
a few small ones per request. Sequences with several new tokens (prefill chunks) go one by one.
"""

from __future__ import annotations

import torch

from services.engine.attention import attention_reference
from services.engine.attention_backend import LayerAttn, SeqSegment
from services.engine.kv.req_pages import StepSlots
from services.engine.kv_store import KVStore


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


class _DecodeKind:
    """Padded gather indices of all decode sequences for one pool kind."""

    def __init__(self, reads: list[list[int]], writes: list[list[int]], device: torch.device) -> None:
        width = max((len(r) for r in reads), default=0)
        padded = [r + [0] * (width - len(r)) for r in reads]  # padding reads slot 0, masked out
        self.gather = torch.tensor(padded, dtype=torch.long, device=device).reshape(len(reads), width)
        valid = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in reads], device=device)
        self.valid = torch.cat([valid.reshape(len(reads), width), torch.ones(len(reads), 1, dtype=torch.bool,
                                                                            device=device)], dim=1)
        has_write = [bool(w) for w in writes]
        self.write_rows = _t([i for i, h in enumerate(has_write) if h], device)
        self.write_slots = _t([w[0] for w in writes if w], device)


class _DecodeGroup:
    def __init__(self, segs: list[SeqSegment], steps: list[StepSlots], device: torch.device) -> None:
        self.rows = _t([s.batch_start for s in segs], device)
        self.full = _DecodeKind([st.full_read for st in steps], [st.full_write for st in steps], device)
        self.swa = _DecodeKind([st.swa_read for st in steps], [st.swa_write for st in steps], device)


class PagedBackend:
    def __init__(self, store: KVStore, segments: list[SeqSegment], steps: list[StepSlots]) -> None:
        device = store.k[0].device if store.k else torch.device("cpu")
        self.store = store
        self.segments = segments
        pairs = list(zip(segments, steps, strict=True))
        self.chunks = [_SeqIndex(seg, st, device) for seg, st in pairs if seg.num_tokens > 1]
        decode = [(seg, st) for seg, st in pairs if seg.num_tokens == 1]
        self.decode = _DecodeGroup([d[0] for d in decode], [d[1] for d in decode], device) if decode else None

    def attend(self, layer: LayerAttn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        swa = self.store.specs[layer.layer_id].kind == "swa"
        if swa != (layer.window is not None):
            raise RuntimeError(f"layer {layer.layer_id}: pool kind and attention window disagree")
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
        for ix in self.chunks:
            out[ix.rows] = self._attend_chunk(layer, swa, ix, q[ix.rows], k[ix.rows], v[ix.rows])
        if self.decode is not None:
            rows = self.decode.rows
            out[rows] = self._attend_decode(layer, swa, q[rows], k[rows], v[rows])
        return out

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
            q, k_ctx.to(q.dtype), v_ctx.to(q.dtype), ix.q_pos, k_pos,
            window=layer.window, sinks=layer.sinks, scale=layer.scale,
        )

    def _attend_decode(
        self, layer: LayerAttn, swa: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, Dv]: one new token per sequence."""
        assert self.decode is not None
        kind = self.decode.swa if swa else self.decode.full
        kbuf, vbuf = self.store.k[layer.layer_id], self.store.v[layer.layer_id]
        b, width = kind.gather.shape
        # the gathered context is exactly the positions the new token may see (its window, or all)
        k_ctx = kbuf[kind.gather.reshape(-1)].reshape(b, width, *kbuf.shape[1:])
        v_ctx = vbuf[kind.gather.reshape(-1)].reshape(b, width, *vbuf.shape[1:])
        if kind.write_rows.numel():
            kbuf.index_copy_(0, kind.write_slots, k.index_select(0, kind.write_rows).to(kbuf.dtype))
            vbuf.index_copy_(0, kind.write_slots, v.index_select(0, kind.write_rows).to(vbuf.dtype))
        k_all = torch.cat([k_ctx.float(), k.float()[:, None]], dim=1)  # [B, L+1, Hkv, D]
        v_all = torch.cat([v_ctx.float(), v.float()[:, None]], dim=1)
        hq, hkv = q.shape[1], k.shape[1]
        qg = q.float().reshape(b, hkv, hq // hkv, q.shape[2])  # [B, Hkv, G, D]
        scores = torch.einsum("bkgd,blkd->bkgl", qg, k_all) * layer.scale
        scores = scores.masked_fill(~kind.valid[:, None, None, :], float("-inf"))
        if layer.sinks is not None:
            sink = layer.sinks.float().reshape(1, hkv, hq // hkv, 1).expand(b, hkv, hq // hkv, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("bkgl,blkd->bkgd", probs, v_all)
        return out.reshape(b, hq, v.shape[2]).to(q.dtype)
