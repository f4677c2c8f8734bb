"""How well our router predicted the cached tokens of a run, from its /metrics.

For every request the router counts (services/router/metrics.py, `observe_prediction`) the
window-safe cached tokens its decision predicted on the chosen prefill worker and the cached tokens
that worker reported. A run is summed over the router replicas' scrapes, taken after the replay
(a fresh router per run: nothing else is in them), and reduced to:

    error share    sum |predicted - reported| / sum prompt tokens   (goal <= 2%)
    phantom share  requests predicted > 0 but reported 0 / requests  (goal < 0.5%)
    missed share   requests predicted 0 but reported > 0 / requests
    bias           sum (predicted - reported) / sum prompt tokens    (> 0: the router over-predicts)

The text routers export nothing of the kind: their rows show n/a.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx

from bench.compare.analysis import Goal

# figure -> the metric's sample name (counters as exported, with _total)
SAMPLES = {
    "requests": "swaserve_router_predicted_cached_error_tokens_count",
    "predicted_tokens": "swaserve_router_predicted_cached_tokens_total",
    "reported_tokens": "swaserve_router_reported_cached_tokens_total",
    "abs_error_tokens": "swaserve_router_predicted_cached_abs_error_tokens_total",
    "prompt_tokens": "swaserve_router_prediction_prompt_tokens_total",
    "phantom_hits": "swaserve_router_phantom_hits_total",
    "missed_hits": "swaserve_router_missed_hits_total",
    "error_fraction_sum": "swaserve_router_predicted_cached_error_fraction_sum",
}
ERROR_GOAL = 0.02  # mean |error| as a share of prompt tokens, at most
PHANTOM_GOAL = 0.005  # phantom hits as a share of requests, below
COLUMNS = ("pred. error / prompt", "phantom hits")

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([-+0-9.eEinfaN]+)$", re.M)


def parse(text: str) -> dict[str, float]:
    """The counts of one /metrics text (0 for a sample it lacks: a router that served nothing)."""
    values = {name: float(v) for name, labels, v in _SAMPLE.findall(text) if not labels}
    return {k: values.get(name, 0.0) for k, name in SAMPLES.items()}


def per_worker(text: str) -> dict[str, float]:
    """Requests served per prefill worker id (`swaserve_router_prefill_requests_total{worker=...}`)."""
    out: dict[str, float] = {}
    for m in re.finditer(r'^swaserve_router_prefill_requests_total\{worker="([^"]*)"\} (\S+)$', text, re.M):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def combine(counts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Counts summed over router replicas (or the difference of two scrapes, with `minus`)."""
    total = dict.fromkeys(SAMPLES, 0.0)
    for c in counts:
        for k in SAMPLES:
            total[k] += c.get(k, 0.0)
    return total


def minus(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}


def figures(c: Mapping[str, float]) -> dict[str, Any]:
    """The counts and the shares of the module doc (None where nothing was counted)."""
    n, prompt = c["requests"], c["prompt_tokens"]
    return {k: int(v) if k != "error_fraction_sum" else v for k, v in c.items()} | {
        "error_share": c["abs_error_tokens"] / prompt if prompt else None,
        "bias_share": (c["predicted_tokens"] - c["reported_tokens"]) / prompt if prompt else None,
        "mean_request_error_share": c["error_fraction_sum"] / n if n else None,
        "phantom_share": c["phantom_hits"] / n if n else None,
        "missed_share": c["missed_hits"] / n if n else None,
    }


def scrape(bases: Sequence[str], timeout: float = 5.0) -> dict[str, Any]:
    """The run's figures from the /metrics of every router replica (`bases`: their base URLs)."""
    return figures(combine(parse(httpx.get(f"{b}/metrics", timeout=timeout).text) for b in bases))


# -- the report ----------------------------------------------------------------------------------
def _pct(x: float | None, digits: int) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def cells(s: Mapping[str, Any]) -> tuple[str, str]:
    a = s.get("accuracy") or {}
    return _pct(a.get("error_share"), 2), _pct(a.get("phantom_share"), 2)


def with_columns(table: str, summaries: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table (head, separator, one row per summary) with the COLUMNS appended."""
    lines = table.split("\n")
    if len(lines) != len(summaries) + 2:
        raise ValueError(f"a table of {len(lines) - 2} rows for {len(summaries)} runs")
    head = lines[0] + "".join(f" {c} |" for c in COLUMNS)
    sep = lines[1] + "---|" * len(COLUMNS)
    rows = [ln + "".join(f" {c} |" for c in cells(s)) for ln, s in zip(lines[2:], summaries, strict=True)]
    return "\n".join([head, sep, *rows])


def goals(summaries: Sequence[Mapping[str, Any]], scope: str, policy: str) -> list[Goal]:
    """The issue's accuracy goals for `policy`'s run in one group (none if it has no figures)."""
    s = next((x for x in summaries if x.get("policy") == policy and x.get("accuracy")), None)
    a = (s or {}).get("accuracy") or {}
    if a.get("error_share") is None or a.get("phantom_share") is None:
        return []
    return [
        Goal(f"{policy} predicted cached tokens, mean |error| / prompt", scope, 100 * a["error_share"],
             100 * ERROR_GOAL, False, unit="%"),
        Goal(f"{policy} phantom hits / requests", scope, 100 * a["phantom_share"], 100 * PHANTOM_GOAL, False,
             unit="%"),
    ]  # fmt: skip
