"""The replay's report as text (the layout of `vllm bench serve` / SGLang bench_serving) and as JSON.

The text starts with the setup (trace, slice, every scaling factor), then the serving figures,
then the prefix cache: measured hit rate, the trace's ideal over the requests sent, and their ratio.
JSON holds the same figures under vLLM's key names, plus `setup`, the cache figures and `errors`,
and with --detailed one row per request (`requests`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.replay.client import RequestResult
from bench.replay.config import ReplaySetup
from bench.replay.figures import MS, Distribution, ReplayFigures

WIDTH = 50
LABEL = 40


def _title(text: str, fill: str) -> str:
    return f"{' ' + text + ' ' if text else '':{fill}^{WIDTH}}"


def _row(label: str, value: object) -> str:
    return f"{label + ':':<{LABEL}} {value}"


def _num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def _factor(x: float) -> str:
    return f"{x:g}"


def setup_lines(s: ReplaySetup) -> list[str]:
    c = s.config
    sc, w = c.scaling, c.window
    window = f"start {_factor(w.start_s)} s, duration " + (
        "to the end" if w.duration_s is None else f"{_factor(w.duration_s)} s"
    )
    window += f", limit {w.limit if w.limit is not None else 'none'}"
    span = f"{s.sent} of {s.trace_requests} requests, trace time {s.first_arrival_s:.1f}-{s.last_arrival_s:.1f} s"
    return [
        _title("Trace Replay Setup", "="),
        _row("Trace", f"{c.trace_path} ({s.trace_format})"),
        _row("Slice", window),
        _row("Requests sent", span),
        _row("Prompt scale", f"{_factor(sc.prompt_scale)} ({s.block_size} tokens per hash id)"),
        _row("Max output", sc.max_output if sc.max_output else "as in the trace"),
        _row("Rate scale", f"{_factor(sc.rate_scale)} (arrival gaps / {_factor(sc.rate_scale)})"),
        _row("Time scale", f"{_factor(sc.time_scale)} (arrival gaps / K, measured times x K)"),
        _row("Concurrency", c.concurrency if c.concurrency else "unlimited"),
        _row(
            "Prompts",
            f"{c.endpoint.prompt_mode}, token ids in [{c.vocab.low}, {c.vocab.high}), seed {c.seed}, "
            + ("turns continue earlier prompts" if c.blocks == "continue" else "blocks from hash ids only"),
        ),
        _row("ignore_eos", "sent" if c.endpoint.ignore_eos else "not sent"),
        _row("Target", f"{', '.join(c.endpoint.bases)} (model {c.endpoint.model})"),
    ]


def _latency(name: str, title: str, d: Distribution) -> list[str]:
    return [
        _title(title, "-"),
        _row(f"Mean {name} (ms)", _num(d.mean)),
        _row(f"Median {name} (ms)", _num(d.median)),
        _row(f"P90 {name} (ms)", _num(d.p90)),
        _row(f"P99 {name} (ms)", _num(d.p99)),
    ]


def format_report(f: ReplayFigures, setup: ReplaySetup | None = None) -> str:
    lines = setup_lines(setup) if setup is not None else []
    lines += [
        _title("Serving Benchmark Result", "="),
        _row("Successful requests", f.completed),
        _row("Failed requests", f.failed),
        _row("Benchmark duration (s)", _num(f.duration_s)),
        _row("Total input tokens", f.input_tokens),
        _row("Total generated tokens", f.output_tokens),
        _row("Request throughput (req/s)", _num(f.request_throughput)),
        _row("Input token throughput (tok/s)", _num(f.input_throughput)),
        _row("Output token throughput (tok/s)", _num(f.output_throughput)),
        _row("Total token throughput (tok/s)", _num(f.total_throughput)),
        _row("Max send delay (ms)", _num(f.max_send_delay_ms)),
    ]
    lines += _latency("TTFT", "Time to First Token", f.ttft)
    lines += _latency("TPOT", "Time per Output Token (excl. 1st token)", f.tpot)
    lines += _latency("ITL", "Inter-token Latency", f.itl)
    lines += _latency("E2E", "End-to-end Latency", f.e2e)
    c = f.cache
    lines += [
        _title("Prefix Cache", "-"),
        _row("Cached prompt tokens", f"{c.cached_tokens} of {c.prompt_tokens}"),
        _row("Measured hit rate (%)", _pct(c.measured)),
        _row("Ideal hit rate, infinite cache (%)", _pct(c.ideal)),
        _row("Measured / ideal", _num(c.ratio, 3)),
    ]
    if c.ratio is not None and c.ratio > 1:
        lines.append(
            "(measured above ideal: the server's cache was warm, e.g. from a run with the same --seed)"
        )
    if c.reporting < f.completed:
        lines.append(f"({f.completed - c.reporting} successful requests reported no cached_tokens)")
    if f.errors:
        lines.append(_title("Errors (first distinct)", "-"))
        lines += [f"  {e}" for e in f.errors]
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _json_num(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x


def report_json(f: ReplayFigures, setup: ReplaySetup | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if setup is not None:
        c = setup.config
        out["setup"] = {
            "trace": c.trace_path,
            "format": setup.trace_format,
            "start_s": c.window.start_s,
            "duration_s": c.window.duration_s,
            "limit": c.window.limit,
            "trace_requests": setup.trace_requests,
            "first_arrival_s": setup.first_arrival_s,
            "last_arrival_s": setup.last_arrival_s,
            "prompt_scale": c.scaling.prompt_scale,
            "block_size": setup.block_size,
            "max_output": c.scaling.max_output or None,
            "rate_scale": c.scaling.rate_scale,
            "time_scale": c.scaling.time_scale,
            "concurrency": c.concurrency,
            "prompt_mode": c.endpoint.prompt_mode,
            "vocab_range": [c.vocab.low, c.vocab.high],
            "seed": c.seed,
            "prompt_blocks": c.blocks,
            "ignore_eos": c.endpoint.ignore_eos,
            "target": c.endpoint.target,
            "replicas": list(c.endpoint.replicas),
            "model": c.endpoint.model,
        }
    out |= {
        "sent": f.sent,
        "completed": f.completed,
        "failed": f.failed,
        "duration": f.duration_s,
        "total_input_tokens": f.input_tokens,
        "total_output_tokens": f.output_tokens,
        "request_throughput": f.request_throughput,
        "input_throughput": f.input_throughput,
        "output_throughput": f.output_throughput,
        "total_token_throughput": f.total_throughput,
        "max_send_delay_ms": f.max_send_delay_ms,
    }
    for name, d in (("ttft", f.ttft), ("tpot", f.tpot), ("itl", f.itl), ("e2el", f.e2e)):
        for stat in ("mean", "median", "p90", "p99"):
            out[f"{stat}_{name}_ms"] = _json_num(getattr(d, stat))
    out |= {
        "cached_tokens": f.cache.cached_tokens,
        "cache_prompt_tokens": f.cache.prompt_tokens,
        "measured_hit_rate": f.cache.measured,
        "ideal_hit_rate": f.cache.ideal,
        "hit_rate_ratio": f.cache.ratio,
        "errors": list(f.errors),
    }
    return out


def request_rows(
    results: Sequence[RequestResult], ideal_hits: Sequence[int], time_scale: float = 1.0
) -> list[dict[str, Any]]:
    """One JSON row per request, in send order; `ideal_hit_tokens` from bench.replay.ideal."""
    k = time_scale * MS
    rows = []
    for r, ideal in zip(results, ideal_hits, strict=True):
        row: dict[str, Any] = {
            "index": r.index,
            "ok": r.ok,
            "scheduled_s": r.scheduled_s * time_scale,
            "started_s": r.started_s * time_scale,
            "input_length": r.input_length,
            "output_length": r.output_length,
            "ideal_hit_tokens": ideal,
        }
        if r.ok:
            row |= {
                "prompt_tokens": r.prompt_tokens,
                "output_tokens": r.output_tokens,
                "cached_tokens": r.cached_tokens,
                "ttft_ms": r.ttft_s * k,
                "e2el_ms": r.e2e_s * k,
                "itl_ms": [g * k for g in r.itl_s],
            }
        else:
            row["error"] = r.error
        rows.append(row)
    return rows
