"""What one long prompt costs the router's CPU, step by step, in one process (no servers).

    .venv/bin/python bench/prompt_cpu.py [--quick] [--tokens 85000] [--page-size 16] [--rounds 40]

Steps (each timed over interleaved rounds, so that they share the machine's load alike): parsing
the request body (orjson, `--tokens` ids), the schema's id check (array("I") + the bool check),
and hashing every page: page by page as before issue 10 (one hashlib BLAKE2b per page over a
reused buffer, an int each), the numpy-packed hashlib loop, the C chain (block_hash_native.c) as
bytes, `hash_blocks` (ints), and `PageHashes` read whole (what the router does to record a routed
prompt's residency). Prints min and median ms, and each over the page-by-page hashing's (the min
is the steadier figure on a shared machine).
"""

from __future__ import annotations

import argparse
import array
import hashlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common import block_hash as bh  # noqa: E402
from services.router.page_hashes import PageHashes  # noqa: E402


def page_by_page(tokens: array.array[int], page: int) -> list[int]:
    """hash_blocks as it was before issue 10: one BLAKE2b per page, an int per page (the baseline)."""
    packed = array.array("I", tokens[: len(tokens) // page * page])
    if sys.byteorder == "little":
        packed.byteswap()
    raw = memoryview(packed).cast("B")
    base = hashlib.blake2b(b"swaserve.block.v1", digest_size=16)
    step, out, h = 4 * page, [], 0
    msg = bytearray(16 + 4 + step + 1)
    msg[16:20] = page.to_bytes(4, "big")
    for i in range(len(tokens) // page):
        d = base.copy()
        msg[:16] = h.to_bytes(16, "big")
        msg[20 : 20 + step] = raw[i * step : (i + 1) * step]
        d.update(msg)
        h = int.from_bytes(d.digest(), "big")
        out.append(h)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 rounds (a few seconds)")
    p.add_argument("--tokens", type=int, default=85_000)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=40)
    a = p.parse_args(argv)
    if a.tokens < a.page_size or a.page_size < 1:
        p.error("need --tokens >= --page-size >= 1")
    rounds = 10 if a.quick else a.rounds
    rng = random.Random(0)
    ids = [rng.randrange(100, 150_000) for _ in range(a.tokens)]
    tokens = array.array("I", ids)
    body = orjson.dumps({"model": "m", "prompt": ids, "max_tokens": 8, "stream": True})
    pages, usable = a.tokens // a.page_size, (a.tokens - 1) // a.page_size
    msgs = bh._page_messages(bh._uint32(tokens, pages * a.page_size), a.page_size)
    steps: dict[str, Callable[[], object]] = {
        f"orjson.loads of the body ({a.tokens:,} ids)": lambda: orjson.loads(body),
        'array("I") + the bool check': lambda: (array.array("I", ids), b"e" in orjson.dumps(ids)),
        f"hash {pages:,} pages, before: page by page (ints)": lambda: page_by_page(tokens, a.page_size),
        "numpy + hashlib loop (bytes)": lambda: bh._chain_python(msgs, bytes(16)),
        "numpy + C chain (bytes, block_digests)": lambda: bh.block_digests(tokens, a.page_size),
        "hash_blocks (ints)": lambda: bh.hash_blocks(tokens, a.page_size),
        f"PageHashes read whole ({usable:,} usable pages, ints)": lambda: list(
            PageHashes(tokens, a.page_size, usable)
        ),
    }
    if bh.hash_blocks(tokens, a.page_size) != page_by_page(tokens, a.page_size):
        raise SystemExit("hash_blocks disagrees with the page-by-page baseline")
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    ref = times[next(k for k in steps if k.startswith("hash "))]
    print(
        f"load average {os.getloadavg()[0]:.1f}; C chain {'built' if bh._NATIVE else 'NOT built'}; {rounds} rounds"
    )
    print("| step | min ms | median ms | over page-by-page hashing: min, median |\n|---|---|---|---|")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"| {k} | {1e3 * min(v):.2f} | {1e3 * med:.2f} | {min(v) / min(ref):.2f}, "
              f"{med / statistics.median(ref):.2f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
