"""What the simulation itself costs: the process's CPU time per request served, across its workers.

A benchmark reports this next to its results to show that the simulator was not the bottleneck
(a sim that needs a whole core per worker would slow the timeline it claims to simulate).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field


def process_cpu_seconds() -> float:
    """User + system CPU of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class SimStats:
    started_wall: float = field(default_factory=time.monotonic)
    started_cpu: float = field(default_factory=process_cpu_seconds)
    requests: int = 0  # requests served to the end (prefill, decode, or whole completions)

    def served(self, n: int = 1) -> None:
        self.requests += n

    def snapshot(self) -> dict[str, float]:
        cpu = process_cpu_seconds() - self.started_cpu
        wall = time.monotonic() - self.started_wall
        return {
            "process_cpu_seconds": round(cpu, 3),
            "wall_seconds": round(wall, 3),
            "cpu_utilization": round(cpu / wall, 4) if wall > 0 else 0.0,
            "requests": self.requests,
            "cpu_seconds_per_request": round(cpu / self.requests, 6) if self.requests else 0.0,
        }

    def summary(self) -> str:
        s = self.snapshot()
        return (
            f"simulated workers: {s['requests']} requests, {s['process_cpu_seconds']:.2f} s CPU in "
            f"{s['wall_seconds']:.1f} s ({100 * s['cpu_utilization']:.1f}% of one core), "
            f"{1000 * s['cpu_seconds_per_request']:.3f} ms CPU per request"
        )
