"""TTFT of a long prompt's next turn on the tiny MiMo model: recompute vs an L1, L2 (host) or L3 (GCache) hit.

One engine per mode, same weights, same machine, one run. The prompt P (16k tokens; --quick 2k) was
served before; the next turn is P + 32 new tokens, whose time to first token is measured:

  recompute   no prefix cache: all of P + 32 is computed
  L1 hit      P is in the device pool's radix cache: 32 tokens (plus the page-aligned rest) computed
  L2 hit      P was evicted from the device pool (as other traffic would); the host tier restores
              P's full pages and the SWA tail at its end, then computes the rest; the restore runs
              layer by layer beside the forward (and, as a row, all before it: same engine, same P)
  L3 hit      P was served by *another* engine (another worker) that wrote it down to GCache (a real
              node process and redis-server, started here); this engine's L1 and L2 never saw it:
              the staged lookup fetches P's full blocks and tail from the node into L2, then as L2.
              Two reader engines take the same P, one over the same-host shared-memory path, one
              over the node's TCP data plane.

The model is mimo-tiny with its context raised to fit (RoPE has no limit of its own; weights are
the same seeded random ones). Reported: median TTFT of --reps runs, the ratio to recompute, and
the bytes each hit moved.

    python bench/kv_tiers.py [--quick] [--prompt-tokens 16384] [--reps 3]

The table is printed last; "from L2" / "from L3" are the cached tokens each tier supplied.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.redis_server import RedisServer  # noqa: E402
from services.common.sampling_params import SamplingParams  # noqa: E402
from services.engine.engine import Engine, EngineConfig  # noqa: E402
from services.gcache.client import GCacheClient  # noqa: E402
from services.models.model_init import init_model  # noqa: E402

ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
SUFFIX = 32
MODES = ("recompute", "L1 hit", "L2 hit", "L2 hit, blocking restore", "L3 hit, shared memory", "L3 hit, TCP")


def say(what: str) -> None:
    print(f"{what} ...", file=sys.stderr, flush=True)


def drop_device_cache(engine: Engine) -> None:
    """Evict everything the radix cache holds on the device (L2 keeps its copies)."""
    engine.cache.evict_swa(engine.swa_pool.num_pages)
    engine.cache.evict_full(engine.full_pool.num_pages)
    assert engine.cache.evictable_full_pages() == 0


def model_dir(tmp: Path, context: int) -> Path:
    path = Path(init_model(str(tmp / "mimo-long"), preset="mimo-tiny", seed=0))
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = context
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def ttft(engine: Engine, prompt: list[int]) -> tuple[float, int, int, int]:
    t = time.perf_counter()
    (req,) = engine.generate([prompt], ONE)
    return time.perf_counter() - t, req.cached_len, req.cached_l2, req.cached_l3


@contextmanager
def gcache_node(memory_bytes: int) -> Iterator[str]:
    """A redis-server and one GCache node process; yields the Redis URL the node registered in."""
    with RedisServer() as redis:
        cmd = [sys.executable, "-m", "services.gcache.main", "--host", "127.0.0.1", "--port", "0",
               "--advertise-host", "127.0.0.1", "--redis-url", redis.url, "--memory-bytes", str(memory_bytes),
               "--metrics-port", "0", "--log-level", "WARNING"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("GCACHE_READY"):
                raise RuntimeError(f"gcache node did not start: {line!r}")
            yield redis.url
        finally:
            proc.kill()
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 2k prompt, 1 rep (under a minute)")
    p.add_argument("--prompt-tokens", type=int, default=16384)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.prompt_tokens, args.reps = 2048, 1
    n = args.prompt_tokens
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(Path(tmp), 2 * n + 1024)
        page = 16
        device = (n + SUFFIX + page) // page * page + 2 * page  # holds one prompt: the next one evicts it
        base_cfg = EngineConfig(max_total_tokens=device, chunk_size=1024)
        tiered = replace(base_cfg, host_kv_tokens=4 * n)
        results: dict[str, list[tuple[float, int, int, int]]] = {m: [] for m in MODES}
        fresh = lambda k: [rng.randrange(100, 100_000) for _ in range(k)]  # noqa: E731
        with gcache_node(memory_bytes=8 << 30) as redis_url:
            clients = {
                "writer": GCacheClient(redis_url, shm=True, shm_bytes=1 << 30),
                "shm": GCacheClient(redis_url, shm=True, shm_bytes=1 << 30),
                "tcp": GCacheClient(redis_url, shm=False),
            }
            for c in clients.values():
                c.wait_for_nodes(1)
            say("recompute")
            plain = Engine.from_dir(path, replace(base_cfg, enable_prefix_cache=False))
            for _ in range(args.reps):
                results["recompute"].append(ttft(plain, fresh(n + SUFFIX)))
            del plain
            say("L1")
            l1 = Engine.from_dir(path, base_cfg)
            for _ in range(args.reps):
                prompt = fresh(n)
                l1.generate([prompt], ONE)  # the earlier turn
                results["L1 hit"].append(ttft(l1, prompt + fresh(SUFFIX)))
            del l1
            say("L2")
            l2 = Engine.from_dir(path, tiered)
            host_mb = l2.host_store.total_bytes() / 2**20 if l2.host_store is not None else 0.0
            for _ in range(args.reps):
                prompt = fresh(n)
                l2.generate([prompt], ONE)
                for mode, layerwise in (("L2 hit", True), ("L2 hit, blocking restore", False)):
                    drop_device_cache(l2)  # as if other traffic had taken the device pool
                    l2.cfg = replace(l2.cfg, layerwise_restore=layerwise)
                    results[mode].append(ttft(l2, prompt + fresh(SUFFIX)))  # restores P, not the suffix
            del l2
            say("L3")
            writer = Engine.from_dir(path, tiered)  # another worker computed and wrote P down
            writer.attach_l3(clients["writer"], "mimo-long")
            readers = {}
            for mode, key in (("L3 hit, shared memory", "shm"), ("L3 hit, TCP", "tcp")):
                readers[mode] = Engine.from_dir(path, tiered)
                readers[mode].attach_l3(clients[key], "mimo-long")
            for _ in range(args.reps):
                prompt = fresh(n)
                writer.generate([prompt], ONE)
                assert writer.l3 is not None
                writer.l3.flush(300)
                for mode, reader in readers.items():
                    results[mode].append(ttft(reader, prompt + fresh(SUFFIX)))
            for e in (writer, *readers.values()):
                if e.l3 is not None:
                    e.l3.close()
            for c in clients.values():
                c.close()
        base = statistics.median(r[0] for r in results["recompute"])
        for name, runs in results.items():
            med = statistics.median(r[0] for r in runs)
            rows.append((name, med, base / med, min(r[1] for r in runs), min(r[2] for r in runs),
                         min(r[3] for r in runs)))  # fmt: skip
    print(f"\n## KV tiers: TTFT of the next turn of a {n}-token prompt (+{SUFFIX} new tokens), mimo-tiny, "
          f"CPU, median of {args.reps}; L2 host buffers {host_mb:.0f} MiB; L3: one GCache node, same host")  # fmt: skip
    print("| mode | TTFT ms | speed-up vs recompute | cached tokens | from L2 | from L3 |")
    print("|---|---|---|---|---|---|")
    for name, med, speed, cached, from_l2, from_l3 in rows:
        print(f"| {name} | {med * 1e3:.1f} | {speed:.1f}x | {cached} | {from_l2} | {from_l3} |")


if __name__ == "__main__":
    main()
