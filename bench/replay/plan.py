"""From a trace to the requests a replay sends: the slice of the trace, then the scaling factors.

Slice: requests arriving in [start, start + duration) seconds of the trace, at most `limit` of them.

Scaling, for machines smaller than the trace's:
  prompt_scale F   every 512-token block becomes round(512 / F) tokens, so prompts shrink by F
                   and blocks shared in the trace are still shared, block for block; a partial
                   last block of p tokens becomes ceil(p * block / 512) tokens.
  max_output N     caps output_length (0: no cap); an output of 0 in the trace asks for 1 token.
  rate_scale X     X times the request rate: arrival gaps / X.
  time_scale K     arrival gaps / K as well, for simulated workers whose service times are / K
                   too; the report multiplies measured times by K (queueing is unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.replay.traces import Trace, TraceRequest


@dataclass(frozen=True)
class TraceSlice:
    start_s: float = 0.0
    duration_s: float | None = None  # None: to the end of the trace
    limit: int | None = None  # None: every request in the window

    def __post_init__(self) -> None:
        if self.start_s < 0:
            raise ValueError(f"--start must be >= 0, got {self.start_s}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"--duration must be > 0, got {self.duration_s}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class Scaling:
    prompt_scale: float = 1.0
    max_output: int = 0
    rate_scale: float = 1.0
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("prompt_scale", "rate_scale", "time_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_output < 0:
            raise ValueError(f"--max-output must be >= 0, got {self.max_output}")

    def block_size(self, trace_block: int) -> int:
        block = round(trace_block / self.prompt_scale)
        if block < 1:
            raise ValueError(f"--prompt-scale {self.prompt_scale} leaves less than 1 token per block")
        return block

    @property
    def arrival_divisor(self) -> float:
        return self.rate_scale * self.time_scale


@dataclass(frozen=True)
class PlannedRequest:
    """A request as sent: `send_at_s` from the replay's first request, lengths after scaling.

    `hash_ids[i]` names tokens [i * block_size, min((i + 1) * block_size, input_length)).
    """

    index: int  # position in the trace
    send_at_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    block_size: int

    def __post_init__(self) -> None:
        if len(self.hash_ids) != math.ceil(self.input_length / self.block_size):
            raise ValueError(
                f"request {self.index}: {len(self.hash_ids)} blocks of {self.block_size} "
                f"do not cover {self.input_length} tokens"
            )
        if self.output_length < 1:
            raise ValueError(f"request {self.index}: output_length must be >= 1")


def select(trace: Trace, window: TraceSlice) -> list[tuple[int, TraceRequest]]:
    """(index in the trace, request) of the slice, in arrival order."""
    end = math.inf if window.duration_s is None else window.start_s + window.duration_s
    chosen = [(i, r) for i, r in enumerate(trace.requests) if window.start_s <= r.arrival_s < end]
    return chosen if window.limit is None else chosen[: window.limit]


def plan(trace: Trace, window: TraceSlice, scaling: Scaling) -> list[PlannedRequest]:
    block = scaling.block_size(trace.block_size)
    chosen = select(trace, window)
    t0 = chosen[0][1].arrival_s if chosen else 0.0  # the replay starts with its first request
    out = []
    for index, r in chosen:
        last = r.input_length - (len(r.hash_ids) - 1) * trace.block_size
        last_scaled = max(1, math.ceil(last * block / trace.block_size))
        output = max(1, r.output_length)
        out.append(
            PlannedRequest(
                index=index,
                send_at_s=(r.arrival_s - t0) / scaling.arrival_divisor,
                input_length=(len(r.hash_ids) - 1) * block + last_scaled,
                output_length=min(output, scaling.max_output) if scaling.max_output else output,
                hash_ids=r.hash_ids,
                block_size=block,
            )
        )
    return out
