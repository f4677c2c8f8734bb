"""The Grafana dashboards as code: panels.py's specs built with grafana-foundation-sdk into JSON.

    swaserve dashboards generate            write helm/swaserve/dashboards/<uid>.json
    swaserve dashboards generate --check    exit 1 if a committed file differs from the generated one

The JSON is deterministic (sorted keys, fixed ids and grid positions), so "committed equals
regenerated" is a byte comparison. Each dashboard has a `datasource` variable (type prometheus)
that every query uses, so it imports into any Grafana with a Prometheus data source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from swaserve.observability.panels import FEATURES, Dashboard, Panel, dashboards

OUT_DIR = Path(__file__).resolve().parents[2] / "helm" / "swaserve" / "dashboards"
DS_UID = "${datasource}"
PER_ROW = 3  # panels side by side; Grafana's grid is 24 wide
WIDTH, HEIGHT = 24 // PER_ROW, 8


def _panel(p: Panel, x: int, y: int, width: int) -> object:
    from grafana_foundation_sdk.builders import prometheus, stat, timeseries
    from grafana_foundation_sdk.models.common import DataSourceRef
    from grafana_foundation_sdk.models.dashboard import GridPos

    ds = DataSourceRef(type_val="prometheus", uid=DS_UID)
    b: Any = (
        timeseries.Panel().line_width(1).fill_opacity(10).span_nulls(True)
        if p.kind == "timeseries"
        else stat.Panel()
    )
    b = b.title(p.title).unit(p.unit).datasource(ds)
    description = p.description
    if p.needs:
        description = f"{description} (needs {FEATURES[p.needs]})".strip()
    if description:
        b = b.description(description)
    b = b.grid_pos(GridPos(h=HEIGHT, w=width, x=x, y=y))
    for i, t in enumerate(p.targets):
        q = prometheus.Dataquery().expr(t.expr).ref_id(chr(ord("A") + i)).datasource(ds)
        if t.legend:
            q = q.legend_format(t.legend)
        b = b.with_target(q)
    return b


def build(d: Dashboard) -> dict[str, object]:
    """One dashboard as Grafana's JSON model (a dict)."""
    from grafana_foundation_sdk.builders import dashboard
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import GridPos

    ds_var = dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
    b = (
        dashboard.Dashboard(d.title)
        .uid(d.uid)
        .description(d.description)
        .tags(["swaserve"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(ds_var)
    )
    y = 0
    for row in d.rows:
        b = b.with_row(dashboard.Row(row.title).grid_pos(GridPos(h=1, w=24, x=0, y=y)))
        y += 1
        width = 24 // max(1, min(PER_ROW, len(row.panels)))
        for i, p in enumerate(row.panels):
            x = (i % PER_ROW) * width
            if i and i % PER_ROW == 0:
                y += HEIGHT
            b = b.with_panel(_panel(p, x, y, width))  # type: ignore[arg-type]
        y += HEIGHT
    model = json.loads(json.dumps(b.build(), cls=JSONEncoder))
    for i, panel in enumerate(model.get("panels", []), start=1):  # stable ids, in layout order
        panel["id"] = i
    return model


def render_all() -> dict[str, str]:
    """file name -> JSON text of every dashboard."""
    return {f"{d.uid}.json": json.dumps(build(d), indent=2, sort_keys=True) + "\n" for d in dashboards()}


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render_all().items():
        path = out_dir / name
        path.write_text(text)
        paths.append(path)
    return paths


def check(out_dir: Path = OUT_DIR) -> list[str]:
    """Files that differ from (or are missing against) the generated ones, and stray ones."""
    want = render_all()
    bad = [n for n, text in want.items() if not (out_dir / n).exists() or (out_dir / n).read_text() != text]
    stray = [p.name for p in out_dir.glob("swaserve-*.json") if p.name not in want]
    return sorted(bad + stray)
