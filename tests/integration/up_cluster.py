"""Start `swaserve up` as a real process group for integration tests, wait until it is healthy, stop it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from services.common.netutil import free_port


@contextmanager
def swaserve_up(log: Path, *args: str, prefill_workers: int = 1, timeout: float = 300) -> Iterator[str]:
    """Yields the router's base URL once /health says ok with `prefill_workers` prefill workers."""
    port = free_port()
    argv = [sys.executable, "-m", "swaserve", "up", "--port", str(port), *args]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"swaserve up exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                health = httpx.get(f"{base}/health", timeout=2).json()
                if health.get("status") == "ok" and health.get("prefill_workers") == prefill_workers:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"cluster not healthy in time:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def tiered_turns(tiered: Any, plain: Any, model: str, convs: list[list[int]], turns: int, new_tokens: int,
                 rng: random.Random) -> dict[str, int]:  # fmt: skip
    """Send `turns` turns of each conversation (token ids; each later turn adds `new_tokens`) to a
    tiered cluster and to a `plain` one without prefix cache (openai clients). Checks every answer
    equals the plain one, the usage's tiers add up, and that from the second turn on the previous
    turn's window-safe prefix (page 16) came back from some tier. Returns cached tokens by tier."""
    tiers = {"l1": 0, "l2": 0, "l3": 0}
    for turn in range(turns):
        for conv in convs:
            if turn:
                conv += [rng.randrange(100, 100_000) for _ in range(new_tokens)]
            kw = {"model": model, "prompt": conv, "max_tokens": 4, "temperature": 0}
            got = tiered.completions.create(**kw)
            want = plain.completions.create(**kw)
            assert got.choices[0].text == want.choices[0].text
            details = got.usage.prompt_tokens_details
            by_tier = (details.model_extra or {})["cached_tokens_by_tier"]
            assert by_tier["l1"] + by_tier["l2"] + by_tier["l3"] == details.cached_tokens
            for k in tiers:
                tiers[k] += by_tier[k]
            if turn:
                assert details.cached_tokens >= (len(conv) - new_tokens - 16) // 16 * 16 - 16, (len(conv), by_tier)
    return tiers
