"""Sampling parameters (validated once, at the boundary) and the sampler.

Greedy is `temperature == 0`. Each request with a `seed` owns a torch.Generator, so its samples do
not depend on what else is in the batch; requests without a seed draw from the engine's generator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, lo=1)
        _check_number("temperature", self.temperature, lo=0.0)
        _check_number("top_p", self.top_p, lo=0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, lo=0)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop accepts at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError("stop_token_ids must be a list of non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamplingParams:
        """Build from user input; unknown keys and wrong types are a ValueError naming the field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        kw = dict(d)
        for key in ("stop", "stop_token_ids"):
            if key in kw:
                val = kw[key]
                if isinstance(val, str) and key == "stop":
                    val = [val]
                if not isinstance(val, list | tuple):
                    raise ValueError(f"{key} must be a list, got {type(val).__name__}")
                kw[key] = tuple(val)
        return cls(**kw)


def _check_int(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _check_number(name: str, value: Any, lo: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


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
