"""What one replay is: the trace, its slice, the scaling, the endpoint and the prompt recipe."""

from __future__ import annotations

from dataclasses import dataclass

from bench.replay.client import Endpoint
from bench.replay.plan import Scaling, TraceSlice
from bench.replay.prompts import BlockMode, VocabRange
from bench.replay.traces import TraceFormat


@dataclass(frozen=True)
class ReplayConfig:
    trace_path: str
    trace_format: TraceFormat | None  # None: from the file's extension
    window: TraceSlice
    scaling: Scaling
    endpoint: Endpoint  # model "" until /v1/models answers
    vocab: VocabRange = VocabRange()
    blocks: BlockMode = "continue"  # continue earlier prompts (bench/replay/prompts.py) or ids only
    seed: int = 0
    concurrency: int | None = None
    json_path: str | None = None
    detailed: bool = False  # per-request rows in the JSON
    progress: bool = True

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")


@dataclass(frozen=True)
class ReplaySetup:
    """The config plus what the trace made of it, as the report states it."""

    config: ReplayConfig
    trace_format: TraceFormat
    trace_requests: int  # in the whole file
    sent: int  # requests in the slice
    first_arrival_s: float  # trace time of the slice's first and last request
    last_arrival_s: float
    block_size: int  # tokens per hash id after --prompt-scale
