"""Simulated time: the wall clock times `time_scale`, so sleeping S simulated seconds takes S / K real ones."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class SimClock:
    time_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")

    def now(self) -> float:
        """Simulated seconds (monotonic)."""
        return time.monotonic() * self.time_scale

    def real(self, sim_seconds: float) -> float:
        return sim_seconds / self.time_scale

    async def sleep_until(self, sim_deadline: float) -> None:
        """Sleep until the simulated clock reads `sim_deadline` (at once if it has passed)."""
        await asyncio.sleep(max(0.0, (sim_deadline - self.now()) / self.time_scale))
