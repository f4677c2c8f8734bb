"""The seam between the model's math and where its KV lives.

The model computes q, k, v for the batch's *new* tokens (rotary applied, v already multiplied by
`attention_value_scale`) and hands them to a backend. The backend stores k and v wherever it keeps
KV (nowhere, a contiguous buffer, or paged pools) and returns the attention output. The model never
knows about pages; the pools never know about heads.

Tokens of several sequences are packed along dim 0 (`T` = sum of the sequences' new tokens);
`SeqSegment` says where each sequence's tokens sit and at which absolute position they start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SeqSegment:
    batch_start: int  # offset of this sequence's first new token in the packed batch
    num_tokens: int  # new tokens of this sequence in this forward
    start_pos: int  # absolute position of its first new token (= tokens already in its KV)

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_tokens


@dataclass(frozen=True)
class LayerAttn:
    """What a backend needs to know about one attention layer."""

    layer_id: int
    window: int | None  # None: full attention; else the query sees itself + `window` previous tokens
    sinks: torch.Tensor | None  # [num_q_heads] learned logits, an extra softmax column with no value
    scale: float  # softmax scale (1/sqrt(head_dim) unless the config says otherwise)


class AttentionBackend(Protocol):
    segments: list[SeqSegment]

    def attend(self, layer: LayerAttn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, Dk], k [T, Hkv, Dk], v [T, Hkv, Dv] for the new tokens -> out [T, Hq, Dv]."""
        ...
