"""Engine benchmark: swaserve's engine vs transformers `generate`, same machine, same weights, one run.

Workload: the first N requests of the Azure LLM inference trace (conversation), prompt lengths
scaled to fit a small CPU model (ContextTokens / 8, clipped to [16, 512]), random token ids, a fixed
number of output tokens (eos ignored, so every system generates the same amount).

Modes compared:
  swaserve          all requests submitted at once: continuous batching, chunked prefill
  hf-batch1         transformers generate, one request at a time
  hf-batch8         transformers generate, padded batches of 8 (left padding)
Prefill tok/s comes from a separate pass with one output token per request.

A second table reports KV bytes per token at 4k and 32k context for the real MiMo-V2-Flash and
MiMo-V2.5-Pro geometries, measured from the engine's page pools (pages held x bytes per page) for
one request, against the same model with full attention on every layer.

    python bench/engine.py [--quick] [--model smollm2|mimo-tiny|DIR]
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.kv_spec import KVLayerSpec  # noqa: E402
from services.common.sampling_params import SamplingParams  # noqa: E402
from services.engine.engine import Engine, EngineConfig  # noqa: E402
from services.engine.kv.page_pool import PagePool  # noqa: E402
from services.engine.kv.req_pages import ReqPages  # noqa: E402
from services.engine.tensors.kv_bytes import page_nbytes  # noqa: E402
from services.models.config import ModelConfig  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_len: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(n: int, output_len: int, vocab: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    lengths: list[int] = []
    if TRACE.exists():
        with TRACE.open() as f:
            for row in csv.DictReader(f):
                lengths.append(min(512, max(16, int(row["ContextTokens"]) // 8)))
                if len(lengths) == n:
                    break
    while len(lengths) < n:  # no trace beside the checkout: same shape, drawn log-uniformly
        lengths.append(int(math.exp(rng.uniform(math.log(16), math.log(512)))))
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(length)] for length in lengths]
    return Workload(prompts, output_len)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def run_swaserve(model_dir: Path, wl: Workload, max_tokens: int) -> dict[str, float]:
    eng = Engine.from_dir(model_dir, EngineConfig(max_total_tokens=65536, max_running=64, chunk_size=512,
                                                  max_batch_tokens=2048))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    eng.generate([wl.prompts[0][:16]], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    eng.cache.reset()
    t0 = time.perf_counter()
    reqs = [eng.add_request(p, params) for p in wl.prompts]
    token_times: dict[str, list[float]] = {r.rid: [] for r in reqs}
    while eng.has_work():
        for r in eng.step():
            token_times[r.rid].append(time.perf_counter())
    wall = time.perf_counter() - t0
    ttft = [token_times[r.rid][0] - t0 for r in reqs]
    itl = [b - a for r in reqs for a, b in zip(token_times[r.rid], token_times[r.rid][1:], strict=False)]
    tpot = [(ts[-1] - ts[0]) / (len(ts) - 1) for ts in token_times.values() if len(ts) > 1]
    return {"wall": wall, "out": sum(len(r.output_ids) for r in reqs), "ttft_p50": pct(ttft, 50),
            "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "e2e_p50": pct([ts[-1] - t0 for ts in token_times.values()], 50)}


def run_hf(model_dir: Path, wl: Workload, max_tokens: int, batch: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pad = 0
    model.generation_config.pad_token_id = pad
    with torch.inference_mode():
        model.generate(torch.tensor([wl.prompts[0][:16]]), max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = 0
        for i in range(0, len(wl.prompts), batch):
            group = wl.prompts[i : i + batch]
            width = max(len(p) for p in group)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False)
            out += (gen.shape[1] - width) * len(group)
    return {"wall": time.perf_counter() - t0, "out": out}


def kv_bytes_table(page_size: int = 16) -> list[tuple[str, int, float, float, float, float]]:
    from services.models.presets import get_preset

    rows = []
    for name in ("mimo-v2-flash", "mimo-v2.5-pro"):
        cfg = ModelConfig.from_dict(get_preset(name).config())
        hybrid = list(cfg.kv_specs)
        full_everywhere = [KVLayerSpec("full", s.kv_heads, s.k_dim, s.v_dim) for s in hybrid]
        for ctx in (4096, 32768):
            measured = measured_kv_bytes(hybrid, int(cfg.window or 0), ctx, page_size)
            baseline = measured_kv_bytes(full_everywhere, 0, ctx, page_size)
            theory = theoretical_ratio(hybrid, int(cfg.window or 0), ctx)
            rows.append((name, ctx, measured / ctx, baseline / ctx, baseline / measured, theory))
    return rows


def measured_kv_bytes(specs: list[KVLayerSpec], window: int, ctx: int, page_size: int) -> float:
    """Run one request of ctx tokens through real ReqPages over real pools; bytes = pages held x page bytes."""
    full_pool = PagePool(ctx // page_size + 2, page_size, "full")
    swa_pool = PagePool(window // page_size + 4, page_size, "swa")
    pages = ReqPages(full_pool, swa_pool, window)
    end = 0
    while end < ctx:  # chunked prefill of 512 then the pools are read as they stand
        end = min(ctx, end + 512)
        pages.plan_step(end)
        pages.commit_step(end)
    per_page = {kind: page_nbytes(specs, kind, page_size, torch.bfloat16) for kind in ("full", "swa")}
    return full_pool.num_used * per_page["full"] + swa_pool.num_used * per_page["swa"]


def theoretical_ratio(specs: list[KVLayerSpec], window: int, ctx: int) -> float:
    dims = [s.kv_heads * (s.k_dim + s.v_dim) for s in specs]
    hybrid = sum(d * (ctx if s.kind == "full" else min(ctx, window)) for d, s in zip(dims, specs, strict=True))
    return sum(dims) * ctx / hybrid


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 requests, 8 output tokens (under a minute)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    n, out_len = (8, 8) if args.quick else (args.requests, args.output_len)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from services.models.model_store import resolve_model

    model_dir = resolve_model(args.model)
    cfg = ModelConfig.from_dict(__import__("json").loads((model_dir / "config.json").read_text()))
    wl = make_workload(n, out_len, cfg.vocab_size)
    print(f"model {model_dir.name}; {n} requests, {wl.prompt_tokens} prompt tokens, {out_len} output tokens each",
          file=sys.stderr)

    results: dict[str, dict[str, float]] = {}
    prefill: dict[str, float] = {}
    results["swaserve"] = run_swaserve(model_dir, wl, out_len)
    prefill["swaserve"] = wl.prompt_tokens / run_swaserve(model_dir, wl, 1)["wall"]
    if not args.skip_hf:
        for name, b in (("hf-batch1", 1), ("hf-batch8", 8)):
            results[name] = run_hf(model_dir, wl, out_len, b)
            prefill[name] = wl.prompt_tokens / run_hf(model_dir, wl, 1, b)["wall"]

    best_hf = max((r["out"] / r["wall"] for k, r in results.items() if k.startswith("hf")), default=float("nan"))
    print("\n## KV bytes per token (bf16, page 16), measured from the pools for one request")
    print("| model | context | hybrid B/token | full-attn B/token | measured ratio | theoretical ratio |")
    print("|---|---|---|---|---|---|")
    for name, ctx, hb, fb, ratio, theory in kv_bytes_table():
        print(f"| {name} | {ctx} | {hb:,.0f} | {fb:,.0f} | {ratio:.2f}x | {theory:.2f}x |")
    s = results["swaserve"]
    print(f"\nswaserve latencies: TTFT p50 {s['ttft_p50']*1e3:.0f} ms p99 {s['ttft_p99']*1e3:.0f} ms; "
          f"TPOT p50 {s['tpot_p50']*1e3:.1f} ms; ITL p50 {s['itl_p50']*1e3:.1f} ms p99 {s['itl_p99']*1e3:.1f} ms; "
          f"E2E p50 {s['e2e_p50']:.2f} s")
    print(f"\n## Engine throughput ({model_dir.name}, {n} requests, {wl.prompt_tokens} prompt tokens, "
          f"{out_len} output tokens each)")
    print("| mode | wall s | output tok/s | prefill tok/s | vs best transformers |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        tps = r["out"] / r["wall"]
        print(f"| {name} | {r['wall']:.1f} | {tps:.1f} | {prefill[name]:.0f} | {tps / best_hf:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
