"""Attention math for one sequence, and `DenseBackend`: whole-sequence KV in contiguous tensors.

Window rule (SGLang reference; transformers spells it `sliding_window = window + 1`): the query at
position p sees keys at positions p - window .. p, i.e. itself and `window` previous tokens.

    positions   ... p-window-1 | p-window ... p-1 | p | p+1 ...
    SWA query p      hidden    |      seen        |seen| hidden (future)

Sinks: one learned logit per query head joins the softmax as an extra column that has no value, so
it only drains probability mass. It is not multiplied by the softmax scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.engine.models.attention_backend import LayerAttn, SeqSegment


def in_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query may see: [Tq] x [Tk] positions -> bool [Tq, Tk]."""
    delta = q_pos[:, None] - k_pos[None, :]
    visible = delta >= 0
    if window is not None:
        visible &= delta <= window
    return visible


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    window: int | None,
    sinks: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Masked GQA attention of one sequence: q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] -> [Tq, Hq, Dv].

    Query head h reads KV head h // (Hq // Hkv). Scores and softmax are fp32. Every query must see
    at least one key (its own), which holds whenever its own position is among `k_pos`.
    """
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    keys = k.float().repeat_interleave(group, dim=1)
    values = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    scores = scores.masked_fill(~in_window(q_pos, k_pos, window)[None], float("-inf"))
    if sinks is not None:
        sink_column = sinks.float()[:, None, None].expand(num_heads, scores.shape[1], 1)
        probs = torch.softmax(torch.cat((scores, sink_column), dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)


@dataclass
class _SeqKV:
    """One sequence's KV: per layer, keys [L, Hkv, D] and values [L, Hkv, Dv] of positions 0..L-1."""

    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)


class DenseBackend:
    """An AttentionBackend that keeps every sequence's whole KV in contiguous per-layer tensors.

    No paging and no eviction: meant for reference runs, parity tests and a simple generation path.
    Usage per forward: `positions = backend.schedule([(seq_id, n_new), ...])`, then run the model
    with the packed tokens in that order. A sequence's next tokens continue where its KV ends.
    """

    def __init__(self) -> None:
        self.segments: list[SeqSegment] = []
        self._seq_ids: list[int] = []
        self._kv: dict[int, _SeqKV] = {}
        self._lengths: dict[int, int] = {}

    def seq_len(self, seq_id: int) -> int:
        return self._lengths.get(seq_id, 0)

    def schedule(self, batch: list[tuple[int, int]]) -> torch.Tensor:
        """Pack `num_new` tokens for each (seq_id, num_new), in order; returns their positions [T]."""
        seq_ids = [seq_id for seq_id, _ in batch]
        if not batch:
            raise ValueError("an empty batch")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"a sequence appears twice in one batch: {seq_ids}")
        segments, start = [], 0
        for seq_id, num_new in batch:
            if num_new <= 0:
                raise ValueError(f"sequence {seq_id}: a forward needs at least one new token")
            segments.append(SeqSegment(start, num_new, self.seq_len(seq_id)))
            start += num_new
        self.segments, self._seq_ids = segments, seq_ids
        for seg, seq_id in zip(segments, seq_ids, strict=True):
            self._lengths[seq_id] = seg.end_pos  # KV of every layer reaches end_pos after this forward
        return torch.cat([torch.arange(s.start_pos, s.end_pos) for s in segments])

    def release(self, seq_id: int) -> None:
        self._kv.pop(seq_id, None)
        self._lengths.pop(seq_id, None)

    def attend(self, layer: LayerAttn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs = []
        for seg, seq_id in zip(self.segments, self._seq_ids, strict=True):
            new = slice(seg.batch_start, seg.batch_start + seg.num_tokens)
            k_all, v_all = self._append(seq_id, layer.layer_id, seg, k[new], v[new])
            q_pos = torch.arange(seg.start_pos, seg.end_pos, device=q.device)
            k_pos = torch.arange(0, seg.end_pos, device=q.device)
            outs.append(
                attention_reference(
                    q[new],
                    k_all,
                    v_all,
                    q_pos,
                    k_pos,
                    window=layer.window,
                    sinks=layer.sinks,
                    scale=layer.scale,
                )
            )
        return torch.cat(outs)

    def _append(
        self, seq_id: int, layer_id: int, seg: SeqSegment, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self._kv.setdefault(seq_id, _SeqKV())
        old_k, old_v = kv.k.get(layer_id), kv.v.get(layer_id)
        cached = 0 if old_k is None else old_k.shape[0]
        if cached != seg.start_pos:
            raise RuntimeError(
                f"sequence {seq_id} layer {layer_id}: {cached} tokens cached, "
                f"but the new tokens start at position {seg.start_pos}"
            )
        kv.k[layer_id] = k if old_k is None else torch.cat((old_k, k))
        kv.v[layer_id] = v if old_v is None else torch.cat((old_v, v))
        return kv.k[layer_id], kv.v[layer_id]
