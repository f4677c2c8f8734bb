"""Builds the tensors of one packed batch, runs the model, returns the logits that get sampled."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.engine.models.attention_backend import SeqSegment
from services.engine.models.causal_lm import CausalLM
from services.engine.models.paged_backend import LayerWait, PagedBackend
from services.engine.scheduler import ScheduledStep
from services.engine.tensors.kv_store import KVStore


class ModelRunner:
    def __init__(self, model: CausalLM, store: KVStore, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.store = store
        self.device = torch.device(device)

    @torch.inference_mode()
    def forward(self, batch: Sequence[ScheduledStep], restore: LayerWait | None = None) -> torch.Tensor:
        """Run one step; returns fp32 logits [n_sampled, vocab], one row per step with `samples`."""
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        segments: list[SeqSegment] = []
        for st in batch:
            s, e = st.slots.start, st.slots.end
            segments.append(SeqSegment(batch_start=len(ids), num_tokens=e - s, start_pos=s))
            ids.extend(st.req.all_ids[s:e])
            positions.append(torch.arange(s, e))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.cat(positions).to(self.device)
        backend = PagedBackend(self.store, segments, [st.slots for st in batch], restore)
        hidden = self.model(input_ids, pos, backend)
        rows = [seg.batch_start + seg.num_tokens - 1 for seg, st in zip(segments, batch, strict=True) if st.samples]
        if not rows:
            return torch.empty(0, 0)
        return self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)]).float()
