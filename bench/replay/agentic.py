"""A seeded generator of agentic-like workloads in the Mooncake trace format (SYNTHETIC data).

    .venv/bin/python -m bench.replay.agentic --out bench/out/agentic_trace.jsonl            # ~10 min of trace
    .venv/bin/python -m bench.replay.agentic --out FILE --duration 120 --session-rate 0.05 --seed 2

No agentic trace is public in a form we can read here (Mooncake's toolagent trace is too large for
the snapshots: ../shared/traces/README.md), so this writes one with the shape that makes routers
work hardest: few long tool-using sessions whose prompts grow by every tool result.

A session is a coding/tool agent:

    turn 1   [ shared system prompt + tools (S) ][ task (U) ]
    turn 2   [ turn 1's prompt ............................ ][ call + result ]
    turn k   [ turn k-1's prompt ............................................ ][ call + result ]

- every session starts with the same S tokens (block ids 0 .. S/512 - 1: one system prompt);
- each next turn is the previous prompt exactly, then the previous turn's output (the tool call,
  `output_length` tokens) and the tool's result; the session ends when the next prompt would pass
  `--max-prompt`, or after a geometric number of turns;
- turns of a session follow each other by the previous turn's think time plus the tool's run time
  (`--turn-gap` seconds, uniform); sessions start as a Poisson process of `--session-rate` per second.

Mooncake's convention for ids is kept: chained ids of 512-token blocks, the full blocks a turn shares
with the previous one keep their ids, the block where the previous prompt ended gets a new id (it
grew), so bench.replay's `continue` builder turns it into an exact continuation (bench/replay/prompts.py).

With the defaults the prompts average ~85k tokens (printed on exit, with the request count and rate).
The file is written where `--out` says (bench/out/ is ignored by git); it is data, never committed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.replay.traces import TRACE_BLOCK


@dataclass(frozen=True)
class AgenticSpec:
    duration_s: float = 600.0  # session starts fall in [0, duration); their later turns may run past it
    session_rate: float = 0.05  # new sessions per second (Poisson)
    system_tokens: int = 12 * TRACE_BLOCK  # shared by every session (a multiple of the block: exact ids)
    task_tokens: tuple[int, int] = (1_000, 8_000)  # the session's own first message, uniform
    first_context: tuple[int, int] = (40_000, 70_000)  # repository context read before the first turn
    growth_tokens: tuple[int, int] = (800, 6_000)  # each tool result, uniform
    output_tokens: tuple[int, int] = (40, 400)  # each tool call / answer, uniform
    turn_gap_s: tuple[float, float] = (2.0, 12.0)  # think + tool time between turns, uniform
    mean_turns: float = 12.0  # geometric number of turns
    max_prompt: int = 131_072
    seed: int = 0

    def __post_init__(self) -> None:
        if self.system_tokens % TRACE_BLOCK or self.system_tokens < 2 * TRACE_BLOCK:
            raise ValueError(f"system_tokens must be a multiple of {TRACE_BLOCK}, at least 2 blocks")
        if self.duration_s <= 0 or self.session_rate <= 0 or self.mean_turns < 1:
            raise ValueError("duration, session rate must be > 0 and mean turns >= 1")
        for name in ("task_tokens", "first_context", "growth_tokens", "output_tokens", "turn_gap_s"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}: need 0 <= low <= high, got {(lo, hi)}")
        if self.system_tokens + self.task_tokens[1] + self.first_context[1] >= self.max_prompt:
            raise ValueError("max_prompt must exceed the largest first prompt")


@dataclass(frozen=True)
class Record:
    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def json(self) -> str:
        return json.dumps({"timestamp": self.timestamp_ms, "input_length": self.input_length,
                           "output_length": self.output_length, "hash_ids": list(self.hash_ids)})  # fmt: skip


def generate(spec: AgenticSpec) -> list[Record]:
    """Every request of the workload, in time order."""
    rng = np.random.default_rng(spec.seed)
    shared = spec.system_tokens // TRACE_BLOCK
    ids = iter(range(shared, 2**62))  # fresh ids; 0 .. shared-1 are the system prompt's blocks
    records: list[Record] = []
    t = float(rng.exponential(1 / spec.session_rate))
    while t < spec.duration_s:
        records += _session(spec, rng, t, ids, shared)
        t += float(rng.exponential(1 / spec.session_rate))
    records.sort(key=lambda r: r.timestamp_ms)
    return records


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _session(
    spec: AgenticSpec, rng: np.random.Generator, start: float, ids: Iterator[int], shared: int
) -> list[Record]:
    turns = int(rng.geometric(1 / spec.mean_turns))
    length = (
        spec.system_tokens + int(_uniform(rng, spec.task_tokens)) + int(_uniform(rng, spec.first_context))
    )
    blocks = list(range(shared))  # ids of the full blocks so far
    out, t = [], start
    for _ in range(turns):
        full = length // TRACE_BLOCK
        blocks += [next(ids) for _ in range(full - len(blocks))]
        tail = [next(ids)] if length % TRACE_BLOCK else []  # a partial last block: its own id, never reused
        output = int(_uniform(rng, spec.output_tokens))
        out.append(Record(round(1000 * t), length, output, tuple(blocks + tail)))
        nxt = length + output + int(_uniform(rng, spec.growth_tokens))
        if nxt > spec.max_prompt:
            break
        length, t = nxt, t + _uniform(rng, spec.turn_gap_s)
    return out


def summary(records: list[Record]) -> str:
    n = len(records)
    lengths = sorted(r.input_length for r in records)
    span = (records[-1].timestamp_ms - records[0].timestamp_ms) / 1000 if n > 1 else 0.0
    return (
        f"{n} requests over {span:.0f} s ({n / span if span else 0:.2f} req/s); prompt tokens mean "
        f"{sum(lengths) / n:,.0f}, median {lengths[n // 2]:,}, max {lengths[-1]:,}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = AgenticSpec()
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds in which sessions start")
    p.add_argument("--session-rate", type=float, default=d.session_rate, help="new sessions per second")
    p.add_argument("--mean-turns", type=float, default=d.mean_turns)
    p.add_argument("--system-tokens", type=int, default=d.system_tokens)
    p.add_argument("--max-prompt", type=int, default=d.max_prompt)
    p.add_argument("--seed", type=int, default=d.seed)
    a = p.parse_args(argv)
    try:
        spec = AgenticSpec(duration_s=a.duration, session_rate=a.session_rate, mean_turns=a.mean_turns,
                           system_tokens=a.system_tokens, max_prompt=a.max_prompt, seed=a.seed)  # fmt: skip
    except ValueError as e:
        print(f"agentic: {e}", file=sys.stderr)
        return 2
    records = generate(spec)
    if not records:
        print("agentic: no session started in --duration; raise it or --session-rate", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(r.json() + "\n" for r in records))
    print(f"{a.out}: {summary(records)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
