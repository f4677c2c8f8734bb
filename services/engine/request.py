"""A request inside the engine, and its lengths.

    0            cached_len       computed_len                 seq_len
    |--- prefix cache ---|-- computed here --|-- not yet in KV --|
    prompt_ids + output_ids = all tokens; KV exists for [0, computed_len).

`cached_len <= computed_len <= seq_len` always. Prefill is done when computed_len reaches seq_len;
then each decode step computes the last token (the one sampled before) and samples the next.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the bookkeeping (scheduler, bench's simulated workers) imports no torch
    from services.common.sampling_params import SamplingParams


class ReqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # eos, stop token or stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"


@dataclass
class Req:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    status: ReqStatus = ReqStatus.WAITING
    finish_reason: FinishReason | None = None
    matched_stop: str | int | None = None
    cached_len: int = 0  # tokens whose KV came from the prefix cache at admission
    computed_len: int = 0  # tokens whose KV is in the pools
    num_preemptions: int = 0
    first_token_time: float | None = None
    prompt_tail_cached: bool = False  # the prompt's page-aligned prefix is in the radix cache
    cached_l2: int = 0  # of cached_len, tokens restored from the host tier (L2) rather than L1
    cached_l3: int = 0  # of cached_len, tokens that came from L3 (GCache), through L2
    l3_span: tuple[int, int] | None = None  # pages an L3 lookup installed into L2 for this request
    checkpoint: int = 0  # a branch point to cache with its SWA tail when computed_len reaches it
    # engine-owned handles (page table, radix lock, L2 restore to run before the forward); opaque here
    pages: Any = None
    cache_node: Any = None
    restore: Any = None
    page_hashes: list[int] = field(default_factory=list)  # block hashes of all_ids' full pages, so far

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt must contain at least one token")
        self.check()

    def check(self) -> None:
        assert 0 <= self.cached_len <= self.computed_len <= self.seq_len, (
            self.rid,
            self.cached_len,
            self.computed_len,
            self.seq_len,
        )

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def in_prefill(self) -> bool:
        return self.computed_len < self.seq_len - 1 or not self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is ReqStatus.FINISHED

    def finish(self, reason: FinishReason, matched: str | int | None = None) -> None:
        self.status = ReqStatus.FINISHED
        self.finish_reason = reason
        self.matched_stop = matched
