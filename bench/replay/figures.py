"""The figures of a replay, from its per-request results (pure).

Latency figures cover successful requests: TTFT and E2E each one value a request, TPOT one value
a request with more than one output token, ITL every gap between text chunks of every request.
Token counts and throughputs cover successful requests too, over the benchmark duration.

With `time_scale` K the workers' service times were divided by K, so every measured time (and
the duration) is multiplied by K and every throughput divided by K: the figures are in trace time.

Measured hit rate: sum of `usage.prompt_tokens_details.cached_tokens` / sum of prompt tokens, over
the successful requests that reported cached tokens (None if none did).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.replay.client import RequestResult

MAX_ERRORS_SHOWN = 5
MS = 1000.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    rank = q / 100.0 * (len(s) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (rank - lo)


@dataclass(frozen=True)
class Distribution:
    """Milliseconds; nan when there were no values."""

    count: int
    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Distribution:
        mean = sum(values_ms) / len(values_ms) if values_ms else math.nan
        return cls(
            len(values_ms),
            mean,
            percentile(values_ms, 50),
            percentile(values_ms, 90),
            percentile(values_ms, 99),
        )


@dataclass(frozen=True)
class CacheFigures:
    prompt_tokens: int  # of the requests that reported cached tokens
    cached_tokens: int
    reporting: int  # successful requests that reported cached tokens
    ideal: float  # the trace's, over every request sent (bench.replay.ideal)

    @property
    def measured(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.reporting and self.prompt_tokens else None

    @property
    def ratio(self) -> float | None:
        m = self.measured
        return m / self.ideal if m is not None and self.ideal > 0 else None


@dataclass(frozen=True)
class ReplayFigures:
    sent: int
    completed: int
    failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    cache: CacheFigures
    max_send_delay_ms: float  # the latest a request left after its scheduled time
    errors: tuple[str, ...]  # the first few distinct messages of failed requests

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def input_throughput(self) -> float:
        return self.input_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def total_throughput(self) -> float:
        return self.input_throughput + self.output_throughput


def compute_figures(
    results: Sequence[RequestResult], duration_s: float, ideal: float, time_scale: float = 1.0
) -> ReplayFigures:
    ok = [r for r in results if r.ok]
    k = time_scale * MS
    reporting = [r for r in ok if r.cached_tokens is not None]
    errors: list[str] = []
    for r in results:
        if not r.ok and r.error not in errors and len(errors) < MAX_ERRORS_SHOWN:
            errors.append(r.error)
    return ReplayFigures(
        sent=len(results),
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s * time_scale,
        input_tokens=sum(r.prompt_tokens for r in ok),
        output_tokens=sum(r.output_tokens for r in ok),
        ttft=Distribution.of([r.ttft_s * k for r in ok]),
        tpot=Distribution.of([t * k for r in ok if (t := r.tpot_s) is not None]),
        itl=Distribution.of([g * k for r in ok for g in r.itl_s]),
        e2e=Distribution.of([r.e2e_s * k for r in ok]),
        cache=CacheFigures(
            prompt_tokens=sum(r.prompt_tokens for r in reporting),
            cached_tokens=sum(r.cached_tokens or 0 for r in reporting),
            reporting=len(reporting),
            ideal=ideal,
        ),
        max_send_delay_ms=max((max(0.0, r.started_s - r.scheduled_s) * k for r in results), default=0.0),
        errors=tuple(errors),
    )
