"""The sampler: logits -> one token per request, as its SamplingParams (services/common) ask.

Greedy is `temperature == 0`. Each request with a `seed` owns a torch.Generator, so its samples do
not depend on what else is in the batch; requests without a seed draw from the engine's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.common.sampling_params import SamplingParams


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float  # log-probability of the token under the unmodified distribution


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k tokens and outside the smallest top-p nucleus."""
    out = logits.clone()
    if top_k > 0 and top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep a token if the mass strictly before it is < top_p (the first token is always kept)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop = mass_before >= top_p
        out[order[drop]] = float("-inf")
    return out


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._default = torch.Generator().manual_seed(seed)
        self._per_request: dict[str, torch.Generator] = {}

    def forget(self, rid: str) -> None:
        self._per_request.pop(rid, None)

    def _generator(self, rid: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._default
        gen = self._per_request.get(rid)
        if gen is None:
            gen = torch.Generator().manual_seed(params.seed)
            self._per_request[rid] = gen
        return gen

    def skip(self, rid: str, params: SamplingParams, vocab_size: int) -> None:
        """Advance a seeded request's generator by the draw another worker already made (its first
        token was sampled at prefill), so a disaggregated request samples exactly as a local one.
        A multinomial draw consumes the generator the same way whatever the probabilities."""
        if params.seed is not None and not params.greedy:
            torch.multinomial(torch.ones(vocab_size), 1, generator=self._generator(rid, params))

    def sample(self, logits: torch.Tensor, rids: Sequence[str], params: Sequence[SamplingParams]) -> list[Sampled]:
        """logits [B, V] (fp32) -> one token per row."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out: list[Sampled] = []
        for row, (rid, p) in enumerate(zip(rids, params, strict=True)):
            if p.greedy:
                tok = int(torch.argmax(logits[row]))
            else:
                filtered = filter_logits(logits[row] / p.temperature, p.top_k, p.top_p)
                probs = torch.softmax(filtered, dim=-1)
                tok = int(torch.multinomial(probs, 1, generator=self._generator(rid, p)))
            out.append(Sampled(tok, float(logprobs[row, tok])))
        return out
