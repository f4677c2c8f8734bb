"""TTFT of a long prompt's next turn on the tiny MiMo model: recompute vs an L1 hit vs an L2 (host) hit.

One engine per mode, same weights, same machine, one run. The prompt P (16k tokens; --quick 4k) was
served before; the next turn is P + 32 new tokens, whose time to first token is measured:

  recompute   no prefix cache: all of P + 32 is computed
  L1 hit      P is in the device pool's radix cache: 32 tokens (plus the page-aligned rest) computed
  L2 hit      other traffic pushed P out of the device pool (sized to hold about one prompt); the
              host tier restores P's full pages and the SWA tail at its end, then computes the rest

The model is mimo-tiny with its context raised to fit (RoPE has no limit of its own; weights are
the same seeded random ones). Reported: median TTFT of --reps runs, the ratio to recompute, and
the bytes each hit moved.

    python bench/kv_tiers.py [--quick] [--prompt-tokens 16384] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.engine.engine import Engine, EngineConfig  # noqa: E402
from services.engine.model_init import init_model  # noqa: E402
from services.engine.sampling import SamplingParams  # noqa: E402

ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
SUFFIX = 32


def model_dir(tmp: Path, context: int) -> Path:
    path = Path(init_model(str(tmp / "mimo-long"), preset="mimo-tiny", seed=0))
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = context
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def ttft(engine: Engine, prompt: list[int]) -> tuple[float, int, int]:
    t = time.perf_counter()
    (req,) = engine.generate([prompt], ONE)
    return time.perf_counter() - t, req.cached_len, req.cached_l2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 4k prompt, 2 reps (under a minute)")
    p.add_argument("--prompt-tokens", type=int, default=16384)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.quick:
        args.prompt_tokens, args.reps = 4096, 2
    n = args.prompt_tokens
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(Path(tmp), 2 * n + 1024)
        page = 16
        device = (n + SUFFIX + page) // page * page + 2 * page  # holds one prompt: the next one evicts it
        modes = {
            "recompute": EngineConfig(max_total_tokens=device, enable_prefix_cache=False, chunk_size=1024),
            "L1 hit": EngineConfig(max_total_tokens=device, chunk_size=1024),
            "L2 hit": EngineConfig(max_total_tokens=device, chunk_size=1024, host_kv_tokens=4 * n),
        }
        results: dict[str, list[tuple[float, int, int]]] = {}
        for name, cfg in modes.items():
            engine = Engine.from_dir(path, cfg)
            results[name] = []
            for _ in range(args.reps):
                prompt = [rng.randrange(100, 100_000) for _ in range(n)]
                engine.generate([prompt], ONE)  # the earlier turn
                if name == "L2 hit":  # another conversation takes the device pool
                    engine.generate([[rng.randrange(100, 100_000) for _ in range(n)]], ONE)
                results[name].append(
                    ttft(engine, prompt + [rng.randrange(100, 100_000) for _ in range(SUFFIX)])
                )
            if engine.host_store is not None:
                host_mb = engine.host_store.total_bytes() / 2**20
            del engine
        base = statistics.median(t for t, _, _ in results["recompute"])
        for name, runs in results.items():
            med = statistics.median(t for t, _, _ in runs)
            cached = min(c for _, c, _ in runs)
            l2 = min(x for _, _, x in runs)
            rows.append((name, med, base / med, cached, l2))
    print(f"\n## KV tiers: TTFT of the next turn of a {n}-token prompt (+{SUFFIX} new tokens), mimo-tiny, "
          f"CPU, median of {args.reps}; L2 host buffers {host_mb:.0f} MiB")  # fmt: skip
    print("| mode | TTFT ms | speed-up vs recompute | cached tokens | from L2 |")
    print("|---|---|---|---|---|")
    for name, med, speed, cached, l2 in rows:
        print(f"| {name} | {med * 1e3:.1f} | {speed:.1f}x | {cached} | {l2} |")


if __name__ == "__main__":
    main()
