"""CPU time of a process from /proc, for the benchmarks that charge work to a process."""

from __future__ import annotations

import os


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
