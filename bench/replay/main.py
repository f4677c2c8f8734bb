"""`swaserve bench replay`: send a trace's requests at their times to an OpenAI-compatible endpoint.

    swaserve bench replay --trace conversation_trace.jsonl --target http://127.0.0.1:8000 \\
        --duration 30 --prompt-scale 32 --max-output 8 --json out.json

A progress bar runs on stderr; the report (docs/bench-replay.md) is printed last, on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import httpx
from tqdm import tqdm

from bench.replay.client import Endpoint, RequestResult, served_model
from bench.replay.config import ReplayConfig, ReplaySetup
from bench.replay.figures import compute_figures
from bench.replay.ideal import ideal_hit_rate, ideal_hit_tokens
from bench.replay.plan import Scaling, TraceSlice, plan
from bench.replay.prompts import (
    BLOCK_MODES,
    NO_CONTINUATIONS,
    PROMPT_MODES,
    Continuations,
    PromptBuilder,
    VocabRange,
)
from bench.replay.report import format_report, report_json, request_rows
from bench.replay.runner import http_client, replay
from bench.replay.traces import FORMATS, load_trace


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swaserve bench replay",
        description="Replay a Mooncake or Azure trace against an OpenAI-compatible endpoint "
        "(POST {target}/v1/completions, streamed) and report latencies, throughput and prefix-cache hits.",
    )
    t = p.add_argument_group("trace")
    t.add_argument("--trace", required=True, help="trace file: Mooncake JSONL or Azure 2023 CSV")
    t.add_argument(
        "--format", choices=FORMATS, default=None, help="default: from the extension (.jsonl, .csv)"
    )
    t.add_argument("--start", type=float, default=0.0, metavar="S", help="skip the trace's first S seconds")
    t.add_argument("--duration", type=float, default=None, metavar="S", help="replay S seconds of the trace")
    t.add_argument("--limit", type=int, default=None, metavar="N", help="at most N requests")
    s = p.add_argument_group("scaling")
    s.add_argument(
        "--prompt-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="divide prompt lengths and the 512-token block by F (blocks stay shared as in the trace)",
    )
    s.add_argument(
        "--max-output", type=int, default=0, metavar="N", help="cap output lengths at N (0: no cap)"
    )
    s.add_argument(
        "--rate-scale", type=float, default=1.0, metavar="X", help="X times the trace's request rate"
    )
    s.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="K",
        help="compress arrival gaps by K and report measured times x K (for simulated workers whose "
        "service times are / K)",
    )
    s.add_argument("--concurrency", type=int, default=None, metavar="N", help="at most N requests in flight")
    e = p.add_argument_group("endpoint")
    e.add_argument(
        "--target",
        default="http://127.0.0.1:8000",
        help="base URL of the endpoint; several, comma-separated: requests go to them in turn "
        "(round-robin, e.g. router replicas)",
    )
    e.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    e.add_argument(
        "--prompt-mode",
        choices=PROMPT_MODES,
        default="ids",
        help="ids: prompts as token-id lists (exact length anywhere); text: one word 't<N>' per token, "
        "exact length only on servers that tokenize one word as one token (the simulated workers)",
    )
    e.add_argument(
        "--prompt-blocks",
        choices=BLOCK_MODES,
        default="continue",
        help="continue: a request that extends an earlier one's full blocks starts with that earlier prompt, "
        "exactly (a conversation's next turn); blocks: tokens from each hash id alone (a grown last block "
        "is unrelated tokens)",
    )
    e.add_argument(
        "--vocab-range",
        default="100:100000",
        metavar="LOW:HIGH",
        help="token ids drawn from [LOW, HIGH); must fit the model's vocabulary (SmolLM2: 100:49152)",
    )
    e.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the prompt tokens (default: a fresh one, printed in the report, so that an earlier "
        "run's prompts left in the server's cache do not count as hits; fix it to send the same prompts)",
    )
    e.add_argument(
        "--no-ignore-eos", action="store_true", help="do not send ignore_eos (servers that reject it)"
    )
    e.add_argument("--extra-body", default=None, metavar="JSON", help="JSON object merged into every request")
    e.add_argument("--api-key", default=None, help="sent as a Bearer token")
    e.add_argument("--timeout", type=float, default=3600.0, metavar="S", help="per-request timeout")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    o.add_argument(
        "--detailed",
        action="store_true",
        help="the JSON also holds one row per request (times, tokens, errors)",
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _bases(spec: str) -> tuple[str, ...]:
    bases = tuple(u.strip().rstrip("/") for u in spec.split(",") if u.strip())
    if not bases:
        raise ValueError("--target: no base URL")
    return bases


def config_from_args(a: argparse.Namespace) -> ReplayConfig:
    extra: dict[str, Any] = json.loads(a.extra_body) if a.extra_body else {}
    if not isinstance(extra, dict):
        raise ValueError("--extra-body must be a JSON object")
    return ReplayConfig(
        trace_path=a.trace,
        trace_format=a.format,
        window=TraceSlice(a.start, a.duration, a.limit),
        scaling=Scaling(a.prompt_scale, a.max_output, a.rate_scale, a.time_scale),
        endpoint=Endpoint(
            target=_bases(a.target)[0],
            replicas=_bases(a.target)[1:],
            model=a.model or "",
            prompt_mode=a.prompt_mode,
            ignore_eos=not a.no_ignore_eos,
            timeout_s=a.timeout,
            api_key=a.api_key,
            extra_body=tuple(extra.items()),
        ),
        vocab=VocabRange.parse(a.vocab_range),
        blocks=a.prompt_blocks,
        seed=secrets.randbelow(1 << 31) if a.seed is None else a.seed,
        concurrency=a.concurrency,
        json_path=a.json,
        detailed=a.detailed,
        progress=not a.no_progress,
    )


async def run(cfg: ReplayConfig) -> tuple[str, dict[str, Any]]:
    """Replay and return the report text and its JSON."""
    trace = load_trace(cfg.trace_path, cfg.trace_format)
    planned = plan(trace, cfg.window, cfg.scaling)
    if not planned:
        raise ValueError("the slice of the trace holds no request (check --start / --duration)")
    cont = Continuations.plan(planned) if cfg.blocks == "continue" else NO_CONTINUATIONS
    async with http_client(cfg.endpoint) as http:
        if not cfg.endpoint.model:
            cfg = replace(cfg, endpoint=replace(cfg.endpoint, model=await served_model(http)))
        bar = tqdm(total=len(planned), unit="req", desc="replay", file=sys.stderr, disable=not cfg.progress)
        failed = 0

        def done(r: RequestResult) -> None:
            nonlocal failed
            failed += not r.ok
            bar.set_postfix(failed=failed, refresh=False)
            bar.update(1)

        with bar:
            outcome = await replay(
                http, cfg.endpoint, planned, PromptBuilder(cfg.vocab, cfg.seed, cont), cfg.concurrency, done
            )
    k = cfg.scaling.time_scale
    figures = compute_figures(outcome.results, outcome.duration_s, ideal_hit_rate(planned, cont.continued), k)
    setup = ReplaySetup(
        config=cfg,
        trace_format=trace.format,
        trace_requests=len(trace.requests),
        sent=len(planned),
        first_arrival_s=trace.requests[planned[0].index].arrival_s,
        last_arrival_s=trace.requests[planned[-1].index].arrival_s,
        block_size=planned[0].block_size,
    )
    data = report_json(figures, setup)
    if cfg.detailed:
        data["requests"] = request_rows(outcome.results, ideal_hit_tokens(planned, cont.continued), k)
    return format_report(figures, setup), data


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        text, data = asyncio.run(run(cfg))
    except (ValueError, OSError, httpx.HTTPError) as e:
        print(f"swaserve bench replay: error: {e}", file=sys.stderr)
        return 2
    if cfg.json_path:
        with open(cfg.json_path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
