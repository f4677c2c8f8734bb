"""The small types that cross the router's layers: a job (sampled with common SamplingParams), token chunks, results."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from services.common.sampling_params import SamplingParams
from services.router.textstream import TokenLogprob
from services.router.toolcalls.pieces import Piece

if TYPE_CHECKING:
    from services.router.assistant import OutputParsing

FINISH_REASONS = ("stop", "length")  # what a worker may end with; "abort" is an error


@dataclass(frozen=True)
class CompletionJob:
    """One API request: every prompt sampled n times. Choice index = prompt index * n + j.
    The prompts are not modified once in a job (the router holds them as array("I"))."""

    prompts: tuple[Sequence[int], ...]
    sampling: SamplingParams
    n: int = 1
    output: OutputParsing | None = None  # chat: reasoning / tool calls read from the text; None: plain text

    def __post_init__(self) -> None:
        if not self.prompts or any(not p for p in self.prompts):
            raise ValueError("a job needs at least one non-empty prompt")
        if self.n < 1:
            raise ValueError("n must be >= 1")

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def choice_sampling(self, j: int) -> SamplingParams:
        """Sampling of the j-th sample of a prompt: with a seed, sample j uses seed + j."""
        if self.sampling.seed is None or j == 0:
            return self.sampling
        seed = (self.sampling.seed + j) % 2**63
        return replace(self.sampling, seed=seed)


@dataclass(frozen=True)
class TokenChunk:
    """New tokens of one sequence, as a worker reported them."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    matched_stop: str | None = None


@dataclass
class ChoiceEvent:
    """What a client is told about one choice: new text (stop strings cut), and the end."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    pieces: list[Piece] | None = None  # the text as message pieces, when the job has `output`


@dataclass
class ChoiceResult:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    pieces: list[Piece] | None = None

    def add(self, ev: ChoiceEvent) -> None:
        if ev.pieces is not None:
            self.pieces = self.pieces if self.pieces is not None else []
            self.pieces.extend(ev.pieces)
        self.text += ev.text
        self.token_ids.extend(ev.token_ids)
        self.logprobs.extend(ev.logprobs)
        if ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cached_tokens_l2: int = 0  # of cached_tokens, restored from a worker's host tier (L2)
    cached_tokens_l3: int = 0  # of cached_tokens, fetched from GCache (L3) through the host tier
    reasoning_tokens: int = 0  # of completion_tokens, those of the reasoning (<think> ... </think>)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
