"""The dashboards as code: committed JSON equals the regenerated one, the SDK flavour is the pinned one,
every panel query parses (promtool), and the rules pass `promtool test rules` on synthetic series."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from swaserve.cli import main as cli_main
from swaserve.observability import grafana
from swaserve.observability.panels import RATE, Panel, Target, dashboards, expr_for
from swaserve.observability.prom import RULES

HERE = Path(__file__).resolve().parent
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


def test_committed_json_equals_the_regenerated(tmp_path: Path) -> None:
    assert grafana.check() == [], "run: swaserve dashboards generate"
    # and the check notices a change: a stale copy in another directory is reported
    for path in grafana.write(tmp_path):
        assert path.read_text() == (grafana.OUT_DIR / path.name).read_text()
    stale = tmp_path / "swaserve-router.json"
    stale.write_text(stale.read_text().replace("Decisions by reason", "Decisions"))
    assert grafana.check(tmp_path) == ["swaserve-router.json"]
    assert cli_main(["dashboards", "generate", "--check", "--out", str(tmp_path)]) == 1


def test_the_sdk_is_the_current_grafana_flavour() -> None:
    # a plain `pip install grafana-foundation-sdk` picks the highest version epoch: 1769699998!10.1.0,
    # the Grafana 10.1 flavour; the pinned build targets Grafana's current schema
    assert "!" not in importlib.metadata.version("grafana-foundation-sdk")
    for name in grafana.render_all():
        model = json.loads((grafana.OUT_DIR / name).read_text())
        assert model["schemaVersion"] >= 41
        assert model["templating"]["list"][0] == model["templating"]["list"][0] | {
            "name": "datasource",
            "type": "datasource",
        }
        ids = [p["id"] for p in model["panels"]]
        assert ids == list(range(1, len(ids) + 1))
        for p in model["panels"]:
            for t in p.get("targets", []):
                assert t["datasource"]["uid"] == "${datasource}" and t["expr"]


def test_every_dashboard_has_its_panels() -> None:
    by_uid = {d.uid: {p.title for p in d.panels} for d in dashboards()}
    assert set(by_uid) == {f"swaserve-{n}" for n in ("overview", "router", "workers", "gcache", "encoder")}
    assert {"TTFT by length bucket", "Token-weighted hit rate by tier", "Window-safe vs raw match"} <= by_uid[
        "swaserve-overview"
    ]
    assert {
        "Decisions by reason",
        "Routing latency",
        "Queued tokens per worker",
        "Pending residency entries",
    } <= by_uid["swaserve-router"]
    assert {"Prefill KV pool usage (full, SWA)", "KV bytes shipped", "KV transfer time"} <= by_uid[
        "swaserve-workers"
    ]
    with pytest.raises(ValueError, match="unknown feature"):
        Panel("x", (Target("up"),), needs="warp-drive")


@needs_promtool
def test_every_panel_query_parses(tmp_path: Path) -> None:
    # promtool parses PromQL offline through a rules file: one recording rule per panel query
    rules = [
        {"record": f"check:q{i}", "expr": expr_for(t.expr, "1m")}
        for i, t in enumerate(t for d in dashboards() for p in d.panels for t in p.targets)
    ]
    assert all(RATE not in r["expr"] for r in rules) and len(rules) > 60
    path = tmp_path / "panels.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "panels", "rules": rules}]}))
    ok = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    rules[0]["expr"] = "sum(rate(swaserve_router_requests_total[1m])"  # and a broken one is caught
    path.write_text(json.dumps({"groups": [{"name": "panels", "rules": rules}]}))
    assert subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True).returncode != 0


@needs_promtool
def test_rules_pass_promtool_check_and_unit_tests(tmp_path: Path) -> None:
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 11 rules found" in check.stdout, check.stdout + check.stderr
    names = re.findall(r"^\s+- (?:record|alert): (\S+)", RULES.read_text(), re.M)
    assert all(":" in n for n in names if not n.startswith("Swaserve")) and len(names) == 11
    run = subprocess.run(
        ["promtool", "test", "rules", str(HERE / "rules_test.yml")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # the tests can fail: with the Redis alert's `for` made longer, its expected firing at 5m is missed
    mutated = tmp_path / "rules.yml"
    mutated.write_text(RULES.read_text().replace("        for: 1m\n", "        for: 10m\n"))
    test = tmp_path / "rules_test.yml"
    test.write_text(
        (HERE / "rules_test.yml").read_text().replace("../../swaserve/observability/rules.yml", str(mutated))
    )
    bad = subprocess.run(["promtool", "test", "rules", str(test)], capture_output=True, text=True)
    assert bad.returncode != 0 and "SwaserveRedisDown" in bad.stdout + bad.stderr
