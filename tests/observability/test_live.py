"""The dashboards against a live stack: `swaserve up --prometheus --gcache 1` (Prometheus from Debian's
package on loopback, 1 s scrapes) under a short trace replay; then every panel's query through
Prometheus's HTTP API, `promtool check metrics` on every service's /metrics, the token identity
behind the hit-rate panels, and `swaserve dashboards render` to PNG."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.replay.main import main as replay_main
from swaserve.cli import main as cli_main
from swaserve.observability.panels import FEATURES, dashboards, expr_for
from swaserve.observability.prom import query
from tests.bench.test_replay_live import PROMPT_SCALE, TRACE, _write_trace
from tests.integration.up_cluster import swaserve_up
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
RUNNING = {"gcache"}  # features this cluster runs; panels needing others must come back empty
WINDOW = "2m"  # $__rate_interval: covers the whole replay


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, dict]]:
    run = tmp_path_factory.mktemp("obs")
    log = run / "up.log"
    args = ("--model", "mimo-tiny", "--gcache", "1", "--gcache-disk", "0", "--gcache-memory", "64M",
            "--prometheus", "--run-dir", str(run))  # fmt: skip
    with swaserve_up(log, *args) as base:
        m = re.search(r"prometheus on (http://127\.0\.0\.1:\d+)", log.read_text())
        assert m, log.read_text()[-2000:]
        prom = m.group(1)
        trace = _write_trace(run / "trace.jsonl", TRACE)
        out = run / "replay.json"
        argv = ["--trace", str(trace), "--target", base, "--prompt-scale", str(PROMPT_SCALE), "--no-progress"]
        assert replay_main([*argv, "--json", str(out), "--detailed"]) == 0
        import json

        data = json.loads(out.read_text())
        assert data["failed"] == 0, data["errors"]
        prompt_tokens = sum(r["prompt_tokens"] for r in data["requests"])

        def scraped() -> bool:  # Prometheus has the last request's tokens from the router
            got = query(prom, "sum(swaserve_router_prompt_tokens_total)")
            return bool(got) and got[0].points[0][1] >= prompt_tokens

        assert wait_for(scraped, timeout=20)
        yield base, prom, {"prompt_tokens": prompt_tokens, "log": log}


def test_every_target_is_up_and_promtool_clean(stack: tuple[str, str, dict]) -> None:
    _, prom, _ = stack
    with urllib.request.urlopen(f"{prom}/api/v1/targets", timeout=5) as r:
        import json

        active = json.loads(r.read())["data"]["activeTargets"]
    jobs = sorted(t["labels"]["job"] for t in active)
    assert jobs == ["decode", "gcache", "prefill", "router"]
    assert all(t["health"] == "up" for t in active), [(t["scrapeUrl"], t["lastError"]) for t in active]
    for t in active:
        text = urllib.request.urlopen(t["scrapeUrl"], timeout=5).read()
        check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
            t["scrapeUrl"], check.stdout.decode(), check.stderr.decode(),
        )  # fmt: skip
        names = set(re.findall(rb"^# TYPE (\S+)", text, re.M))
        assert all(n.startswith(b"swaserve_") and b":" not in n for n in names), names


def test_every_panel_query_returns_data(stack: tuple[str, str, dict]) -> None:
    _, prom, _ = stack
    checked, skipped, failures = 0, [], []
    for d in dashboards():
        for p in d.panels:
            for t in p.targets:
                got = query(prom, expr_for(t.expr, WINDOW))
                where = f"{d.uid} / {p.title}: {t.expr}"
                if p.needs and p.needs not in RUNNING:
                    # the mark must be true: no data without the feature (a stale mark would hide a panel)
                    if got:
                        failures.append(f"{where}: marked as needing {p.needs} but has data")
                    skipped.append(f"{p.title} ({FEATURES[p.needs]})")
                    continue
                checked += 1
                if not got:
                    failures.append(f"{where}: empty")
                elif not any(s.finite for s in got):
                    failures.append(f"{where}: no finite value in {[s.points for s in got]}")
    assert not failures, "\n".join(failures)
    print(f"checked {checked} queries; skipped {skipped}")
    assert checked >= 60 and {s.split(" (")[0] for s in skipped} == {
        "Encoder QPS", "Embedding cache hit rate", "MTP acceptance rate",
    }  # fmt: skip


def test_prompt_tokens_by_source_add_up_and_are_never_absent(stack: tuple[str, str, dict]) -> None:
    _, prom, info = stack
    by_source = {
        s.labels["source"]: s.points[0][1] for s in query(prom, "swaserve_router_prompt_tokens_total")
    }
    assert set(by_source) == {"computed", "l1", "l2", "l3"}  # l2/l3 exist at 0 before any hit
    assert sum(by_source.values()) == info["prompt_tokens"]
    assert by_source["l1"] > 0 and by_source["computed"] > 0
    # the prefill worker's own view agrees with the router's on every source (Prometheus scrapes the
    # worker on its own schedule: wait for a scrape after the last request, not just the router's)
    def worker() -> dict[str, float]:
        return {
            s.labels["source"]: s.points[0][1]
            for s in query(prom, "sum by (source) (swaserve_prefill_prompt_tokens_total)")
        }

    assert wait_for(lambda: worker() == by_source, timeout=30), (worker(), by_source)
    # TTFT per length bucket: the replay's prompts are all "short"; medium and long exist, empty
    counts = {s.labels["bucket"]: s.points[0][1] for s in query(prom, "swaserve_router_ttft_seconds_count")}
    assert counts["short"] == len(TRACE) and counts["medium"] == counts["long"] == 0
    # the rules loaded, and the recording rules evaluate on live data
    assert wait_for(lambda: bool(query(prom, "swaserve:router_cache_hit_ratio:rate5m")), timeout=10)
    ratio = query(prom, "swaserve:router_cache_hit_ratio:rate5m")[0].points[0][1]
    assert 0 < ratio < 1


def test_dashboards_render_to_png(stack: tuple[str, str, dict], tmp_path: Path) -> None:
    import matplotlib.image

    _, prom, _ = stack
    t0 = time.monotonic()
    argv = ["dashboards", "render", "--prometheus", prom, "--out", str(tmp_path), "--since", "120"]
    assert cli_main([*argv, "--dashboard", "overview", "--dashboard", "encoder"]) == 0
    assert time.monotonic() - t0 < 60
    png = tmp_path / "swaserve-overview.png"
    img = matplotlib.image.imread(png)
    height, width = img.shape[:2]
    assert (width, height) == (1200, 768)  # 3 columns x 3 rows of panels at 80 dpi
    rgb = img[..., :3]
    colored = ((rgb.max(axis=2) - rgb.min(axis=2)) > 0.2).mean()  # plotted lines, not white or grey
    assert colored > 0.002, colored
    assert (tmp_path / "swaserve-encoder.png").stat().st_size > 10_000
