"""Workload traces as the replay reads them: Mooncake JSONL and Azure LLM inference 2023 CSV.

Both become a `Trace`: requests in time order, each with an arrival time in seconds from the
trace's first request, the prompt and output lengths, and the prompt's blocks as `hash_ids`.

Mooncake `hash_ids` are chained ids of 512-token blocks: an equal id at position i means the
first (i + 1) * 512 tokens are identical. There are ceil(input_length / 512) of them and the last
block is partial:

    input_length = 1300, block 512:   | id0: 512 | id1: 512 | id2: 276 |

Azure 2023 has no prefix information, so every block of every request gets a fresh id (nothing
is shared, the ideal hit rate is 0).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

TraceFormat = Literal["mooncake", "azure"]
FORMATS: tuple[TraceFormat, ...] = ("mooncake", "azure")
TRACE_BLOCK = 512  # tokens per hash id in both formats


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace; `arrival_s` counts from the trace's first request."""

    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.input_length < 1:
            raise ValueError(f"input_length must be >= 1, got {self.input_length}")
        if self.output_length < 0:
            raise ValueError(f"output_length must be >= 0, got {self.output_length}")
        if self.arrival_s < 0:
            raise ValueError(f"arrival must be >= 0, got {self.arrival_s}")


@dataclass(frozen=True)
class Trace:
    path: str
    format: TraceFormat
    requests: tuple[TraceRequest, ...]
    block_size: int = TRACE_BLOCK

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0


def num_blocks(input_length: int, block_size: int) -> int:
    return math.ceil(input_length / block_size)


def guess_format(path: str | Path) -> TraceFormat:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "mooncake"
    if suffix == ".csv":
        return "azure"
    raise ValueError(f"cannot tell the trace format of {path}: pass --format mooncake|azure")


def load_trace(path: str | Path, fmt: TraceFormat | None = None) -> Trace:
    fmt = fmt or guess_format(path)
    with open(path, newline="") as f:
        if fmt == "mooncake":
            requests = parse_mooncake(f)
        elif fmt == "azure":
            requests = parse_azure(f)
        else:
            raise ValueError(f"unknown trace format {fmt!r}; one of {', '.join(FORMATS)}")
    if not requests:
        raise ValueError(f"{path}: the trace has no requests")
    return Trace(str(path), fmt, tuple(sorted(requests, key=lambda r: r.arrival_s)))


def parse_mooncake(lines: Iterable[str]) -> list[TraceRequest]:
    """`{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}` per line."""
    rows: list[tuple[float, int, int, tuple[int, ...]]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            row = (
                float(obj["timestamp"]) / 1000.0,
                int(obj["input_length"]),
                int(obj["output_length"]),
                tuple(int(h) for h in obj["hash_ids"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"line {lineno}: not a Mooncake trace record ({e})") from e
        if len(row[3]) != num_blocks(row[1], TRACE_BLOCK):
            raise ValueError(
                f"line {lineno}: {len(row[3])} hash_ids for input_length {row[1]} "
                f"(expected ceil({row[1]}/{TRACE_BLOCK}) = {num_blocks(row[1], TRACE_BLOCK)})"
            )
        rows.append(row)
    t0 = min((r[0] for r in rows), default=0.0)
    return [_request(lineno, t - t0, n, m, ids) for lineno, (t, n, m, ids) in enumerate(rows, 1)]


def parse_azure(lines: Iterable[str]) -> list[TraceRequest]:
    """CSV `TIMESTAMP,ContextTokens,GeneratedTokens`; wall-clock timestamps, 7-digit fractions."""
    reader = csv.DictReader(lines)
    missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"not an Azure LLM trace: missing column(s) {', '.join(sorted(missing))}")
    rows: list[tuple[float, int, int]] = []
    for lineno, rec in enumerate(reader, 2):
        try:
            rows.append(
                (_wall_seconds(rec["TIMESTAMP"]), int(rec["ContextTokens"]), int(rec["GeneratedTokens"]))
            )
        except ValueError as e:
            raise ValueError(f"line {lineno}: not an Azure trace record ({e})") from e
    t0 = min((r[0] for r in rows), default=0.0)
    requests, next_id = [], 0
    for lineno, (t, n, m) in enumerate(rows, 2):
        k = num_blocks(n, TRACE_BLOCK)
        requests.append(_request(lineno, t - t0, n, m, tuple(range(next_id, next_id + k))))
        next_id += k
    return requests


def _request(lineno: int, arrival_s: float, n: int, m: int, ids: Sequence[int]) -> TraceRequest:
    try:
        return TraceRequest(arrival_s, n, m, tuple(ids))
    except ValueError as e:
        raise ValueError(f"line {lineno}: {e}") from e


def _wall_seconds(stamp: str) -> float:
    """Seconds of a naive timestamp read as UTC (no DST jumps); fractions of any length (Azure: 7 digits)."""
    stamp = stamp.strip()
    head, _, frac = stamp.partition(".")
    base = datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp()
    return base + (float(f"0.{frac}") if frac else 0.0)
