"""Figures and report from hand-made per-request results; numpy.percentile is the reference."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from bench.replay.client import Endpoint, RequestResult
from bench.replay.config import ReplayConfig, ReplaySetup
from bench.replay.figures import Distribution, compute_figures, percentile
from bench.replay.plan import Scaling, TraceSlice
from bench.replay.report import format_report, report_json


def _ok(
    i: int, ttft: float, e2e: float, out: int, itl: tuple[float, ...], prompt: int, cached: int | None
) -> RequestResult:
    return RequestResult(
        index=i,
        scheduled_s=float(i),
        started_s=float(i) + 0.001 * i,  # request i leaves i ms late
        input_length=prompt,
        output_length=out,
        ok=True,
        ttft_s=ttft,
        e2e_s=e2e,
        itl_s=itl,
        prompt_tokens=prompt,
        output_tokens=out,
        cached_tokens=cached,
    )


def _failed(i: int, error: str) -> RequestResult:
    return RequestResult(i, float(i), float(i), 100, 4, ok=False, error=error)


RESULTS = [
    _ok(0, 0.100, 0.400, 4, (0.1, 0.1, 0.1), 100, 0),
    _ok(1, 0.200, 0.200, 1, (), 200, 64),
    _ok(2, 0.050, 1.050, 11, (0.2, 0.1, 0.05, 0.3, 0.35), 300, 128),  # 5 chunks carried 10 tokens
    _ok(3, 0.300, 0.500, 3, (0.1, 0.1), 400, None),  # a server that does not report cached tokens
    _failed(4, "HTTP 400: too long"),
    _failed(5, "HTTP 400: too long"),
    _failed(6, "stream error: worker gone"),
]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 101])
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_is_numpys_linear(n: int, q: float) -> None:
    values = list(np.random.default_rng(n).exponential(size=n))
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50))
    assert math.isnan(Distribution.of([]).mean)


def test_latency_figures_match_numpy() -> None:
    f = compute_figures(RESULTS, duration_s=2.0, ideal=0.5)
    ttft = [100, 200, 50, 300]
    e2e = [400, 200, 1050, 500]
    tpot = [(400 - 100) / 3, (1050 - 50) / 10, (500 - 300) / 2]  # requests with > 1 output token
    itl = [100, 100, 100, 200, 100, 50, 300, 350, 100, 100]
    for d, ref in ((f.ttft, ttft), (f.e2e, e2e), (f.tpot, tpot), (f.itl, itl)):
        assert d.count == len(ref)
        assert d.mean == pytest.approx(np.mean(ref))
        assert d.median == pytest.approx(np.percentile(ref, 50))
        assert d.p90 == pytest.approx(np.percentile(ref, 90))
        assert d.p99 == pytest.approx(np.percentile(ref, 99))


def test_counts_throughput_cache_and_errors() -> None:
    f = compute_figures(RESULTS, duration_s=2.0, ideal=0.5)
    assert (f.sent, f.completed, f.failed) == (7, 4, 3)
    assert (f.input_tokens, f.output_tokens) == (1000, 19)
    assert f.request_throughput == pytest.approx(2.0)
    assert f.input_throughput == pytest.approx(500.0)
    assert f.output_throughput == pytest.approx(9.5)
    assert f.total_throughput == pytest.approx(509.5)
    # cache: over the three requests that reported it
    assert (f.cache.cached_tokens, f.cache.prompt_tokens, f.cache.reporting) == (192, 600, 3)
    assert f.cache.measured == pytest.approx(0.32)
    assert f.cache.ratio == pytest.approx(0.64)
    assert f.errors == ("HTTP 400: too long", "stream error: worker gone")  # distinct, in order
    assert f.max_send_delay_ms == pytest.approx(3.0)  # request 3


def test_time_scale_multiplies_times_and_divides_throughput() -> None:
    base = compute_figures(RESULTS, duration_s=2.0, ideal=0.5)
    k = compute_figures(RESULTS, duration_s=2.0, ideal=0.5, time_scale=10.0)
    assert k.duration_s == pytest.approx(20.0)
    assert k.ttft.p99 == pytest.approx(10 * base.ttft.p99)
    assert k.itl.median == pytest.approx(10 * base.itl.median)
    assert k.tpot.mean == pytest.approx(10 * base.tpot.mean)
    assert k.output_throughput == pytest.approx(base.output_throughput / 10)
    assert k.cache.measured == base.cache.measured


def test_a_warm_cache_above_the_ideal_is_pointed_out() -> None:
    results = [_ok(0, 0.1, 0.2, 2, (0.1,), 100, 16), _ok(1, 0.1, 0.2, 2, (0.1,), 100, 50)]
    above = format_report(compute_figures(results, duration_s=1.0, ideal=0.3))
    below = format_report(compute_figures(results, duration_s=1.0, ideal=0.4))
    assert _value(above, "Measured / ideal") == "1.100"
    assert "cache was warm" in above and "cache was warm" not in below


def test_no_cache_information_and_no_ideal() -> None:
    f = compute_figures([_ok(0, 0.1, 0.2, 2, (0.1,), 50, None)], duration_s=1.0, ideal=0.0)
    assert f.cache.measured is None and f.cache.ratio is None
    text = format_report(f)
    assert re.search(r"^Measured hit rate \(%\):\s+n/a$", text, re.M)
    assert "1 successful requests reported no cached_tokens" in text


def _setup() -> ReplaySetup:
    cfg = ReplayConfig(
        trace_path="/data/conv.jsonl",
        trace_format=None,
        window=TraceSlice(start_s=60.0, duration_s=30.0),
        scaling=Scaling(prompt_scale=32, max_output=8, rate_scale=2, time_scale=4),
        endpoint=Endpoint(target="http://127.0.0.1:8123", model="mimo-tiny"),
        concurrency=16,
    )
    return ReplaySetup(cfg, "mooncake", 12031, 7, 60.0, 88.5, block_size=16)


def _value(text: str, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}:\s+(.+)$", text, re.M)
    assert m, label
    return m.group(1)


def test_text_report_layout() -> None:
    f = compute_figures(RESULTS, duration_s=2.0, ideal=0.5)
    text = format_report(f, _setup())
    assert _value(text, "Successful requests") == "4"
    assert _value(text, "Failed requests") == "3"
    assert _value(text, "Benchmark duration (s)") == "2.00"
    assert _value(text, "Request throughput (req/s)") == "2.00"
    assert _value(text, "Output token throughput (tok/s)") == "9.50"
    assert _value(text, "Median TTFT (ms)") == f"{np.percentile([100, 200, 50, 300], 50):.2f}"
    assert _value(text, "P99 E2E (ms)") == f"{np.percentile([400, 200, 1050, 500], 99):.2f}"
    assert _value(text, "Measured hit rate (%)") == "32.00"
    assert _value(text, "Ideal hit rate, infinite cache (%)") == "50.00"
    assert _value(text, "Measured / ideal") == "0.640"
    # the setup states the slice and every factor
    assert _value(text, "Requests sent").startswith("7 of 12031 requests, trace time 60.0-88.5 s")
    assert _value(text, "Slice") == "start 60 s, duration 30 s, limit none"
    assert _value(text, "Prompt scale") == "32 (16 tokens per hash id)"
    assert _value(text, "Max output") == "8"
    assert _value(text, "Rate scale").startswith("2 ")
    assert _value(text, "Time scale").startswith("4 ")
    assert _value(text, "Concurrency") == "16"
    assert "  stream error: worker gone" in text
    # sections in the order of vllm bench serve, the cache last
    order = [
        "Serving Benchmark Result",
        "Time to First Token",
        "Time per Output Token",
        "Inter-token Latency",
    ]
    order += ["End-to-end Latency", "Prefix Cache", "Errors"]
    positions = [text.index(s) for s in order]
    assert positions == sorted(positions)
    assert text.index("Trace Replay Setup") < positions[0]


def test_json_holds_the_same_figures() -> None:
    f = compute_figures(RESULTS, duration_s=2.0, ideal=0.5, time_scale=4)
    data = json.loads(json.dumps(report_json(f, _setup())))  # serializable as is
    assert data["completed"] == 4 and data["failed"] == 3
    assert data["duration"] == pytest.approx(8.0)
    assert data["p90_ttft_ms"] == pytest.approx(4 * np.percentile([100, 200, 50, 300], 90))
    assert data["median_itl_ms"] == pytest.approx(f.itl.median)
    assert data["mean_e2el_ms"] == pytest.approx(f.e2e.mean)
    assert data["measured_hit_rate"] == pytest.approx(0.32)
    assert data["ideal_hit_rate"] == 0.5
    assert data["hit_rate_ratio"] == pytest.approx(0.64)
    assert data["errors"] == ["HTTP 400: too long", "stream error: worker gone"]
    assert data["setup"]["time_scale"] == 4 and data["setup"]["block_size"] == 16
    assert data["setup"]["model"] == "mimo-tiny"


def test_json_has_null_not_nan_without_successes() -> None:
    f = compute_figures([_failed(0, "HTTP 503: busy")], duration_s=1.0, ideal=0.2)
    data = report_json(f)
    assert data["mean_ttft_ms"] is None and data["p99_itl_ms"] is None
    json.dumps(data, allow_nan=False)
    assert _value(format_report(f), "Mean TTFT (ms)") == "n/a"
