"""Prompts of exactly `input_length` tokens whose shared blocks are identical across requests.

The tokens of a block depend only on (seed, block size, hash_id): a seeded hash of them seeds a generator
that draws a full block of ids from the vocabulary range, and a partial last block is the first
tokens of that draw. So an equal hash id gives identical tokens wherever it appears, and different
ids give unrelated tokens (equal by chance with probability 1 / range per token).

    hash_ids  [ 7 ][ 9 ][ 4 ]          block 32, input_length 80
    tokens    [ 32 of id 7 ][ 32 of id 9 ][ first 16 of id 4 ]

Two ways to send them: token ids (OpenAI completions accept a list of ints), or text of one word
per token (`bench.word_tokens`: "t<N>"), whose length is exact only on servers that count one
word as one token, i.e. the simulated workers; a real tokenizer splits "t12345" into several.

The seed matters against a long-lived server: prompts of an earlier run with the same seed and
scale are still in its cache, so the replay draws a fresh seed unless one is given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bench.replay.plan import PlannedRequest
from bench.word_tokens import ids_to_text

PromptMode = Literal["ids", "text"]
PROMPT_MODES: tuple[PromptMode, ...] = ("ids", "text")


@dataclass(frozen=True)
class VocabRange:
    """Token ids are drawn from [low, high)."""

    low: int = 100
    high: int = 100_000

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"vocabulary range must satisfy 0 <= low < high, got [{self.low}, {self.high})")

    @classmethod
    def parse(cls, spec: str) -> VocabRange:
        """`LOW:HIGH`, e.g. `100:49152` for SmolLM2's vocabulary."""
        low, sep, high = spec.partition(":")
        if not sep:
            raise ValueError(f"vocabulary range {spec!r}: expected LOW:HIGH")
        return cls(int(low), int(high))


@dataclass(frozen=True)
class PromptBuilder:
    vocab: VocabRange = VocabRange()
    seed: int = 0

    def block_tokens(self, hash_id: int, block_size: int, length: int | None = None) -> list[int]:
        """The first `length` (default all) tokens of the block named `hash_id`."""
        key = f"{self.seed}:{block_size}:{hash_id}".encode()  # other scales, other seeds: other tokens
        digest = hashlib.blake2b(key, digest_size=16).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
        draw = rng.integers(self.vocab.low, self.vocab.high, size=block_size)  # always a whole block
        return draw[: block_size if length is None else length].tolist()  # type: ignore[no-any-return]

    def token_ids(self, req: PlannedRequest) -> list[int]:
        ids: list[int] = []
        for i, h in enumerate(req.hash_ids):
            take = min(req.block_size, req.input_length - i * req.block_size)
            ids += self.block_tokens(h, req.block_size, take)
        return ids

    def prompt(self, req: PlannedRequest, mode: PromptMode) -> list[int] | str:
        ids = self.token_ids(req)
        return ids if mode == "ids" else ids_to_text(ids)
