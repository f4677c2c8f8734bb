"""`swaserve dashboards render`: the dashboards' panels drawn to PNG from a Prometheus's data, with
matplotlib, for people without Grafana and for bench reports. One PNG per dashboard, a subplot per
panel, the same queries as the Grafana JSON (panels.py) with `$__rate_interval` set to --rate-window.
A panel without data says so in its subplot (and why, when it needs a feature that is not running).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from swaserve.observability.panels import FEATURES, Dashboard, Panel, dashboards, expr_for
from swaserve.observability.prom import Series, query_range

COLS = 3


@dataclass(frozen=True)
class Rendered:
    path: Path
    panels: int
    empty: list[str]  # titles of panels without a finite point


def _legend(fmt: str, labels: dict[str, str]) -> str:
    out = fmt
    for k, v in labels.items():
        out = out.replace("{{" + k + "}}", v)
    return out or ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"


def _draw(ax: object, panel: Panel, data: list[tuple[str, Series]], t0: float) -> bool:
    drawn = False
    for legend, s in data:
        pts = [(t - t0, v) for t, v in s.points if math.isfinite(v)]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, linewidth=1.2, label=legend)  # type: ignore[attr-defined]
        drawn = True
    ax.set_title(panel.title, fontsize=9)  # type: ignore[attr-defined]
    ax.tick_params(labelsize=7)  # type: ignore[attr-defined]
    ax.set_xlabel("seconds", fontsize=7)  # type: ignore[attr-defined]
    ax.set_ylabel(panel.unit, fontsize=7)  # type: ignore[attr-defined]
    if drawn:
        ax.legend(fontsize=6, loc="upper left")  # type: ignore[attr-defined]
    else:
        why = f"no data (needs {FEATURES[panel.needs]})" if panel.needs else "no data"
        ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, fontsize=7, transform=ax.transAxes)  # type: ignore[attr-defined]
    return drawn


def render_dashboard(
    d: Dashboard, prom_url: str, out_dir: Path, start: float, end: float, step: float, window: str
) -> Rendered:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = d.panels
    rows = math.ceil(len(panels) / COLS)
    fig, axes = plt.subplots(rows, COLS, figsize=(5 * COLS, 3.2 * rows), squeeze=False)
    empty = []
    for i, panel in enumerate(panels):
        ax = axes[i // COLS][i % COLS]
        data = [
            (_legend(t.legend, s.labels), s)
            for t in panel.targets
            for s in query_range(prom_url, expr_for(t.expr, window), start, end, step)
        ]
        if not _draw(ax, panel, data, start):
            empty.append(panel.title)
    for j in range(len(panels), rows * COLS):
        axes[j // COLS][j % COLS].axis("off")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(end))
    fig.suptitle(
        f"{d.title}  ({end - start:.0f} s to {stamp}, rate window {window}; {prom_url})", fontsize=11
    )
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{d.uid}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Rendered(path, len(panels), empty)


def render(
    prom_url: str, out_dir: Path, since_s: float = 600.0, window: str = "30s", only: Sequence[str] = ()
) -> list[Rendered]:
    """Every dashboard (or those whose uid or short name is in `only`) over the last `since_s` seconds."""
    if since_s <= 0:
        raise ValueError("--since must be > 0 seconds")
    chosen = [d for d in dashboards() if not only or d.uid in only or d.uid.removeprefix("swaserve-") in only]
    if not chosen:
        known = ", ".join(d.uid.removeprefix("swaserve-") for d in dashboards())
        raise ValueError(f"no dashboard named {', '.join(only)}; known: {known}")
    end = time.time()
    start = end - since_s
    step = max(1.0, since_s / 300)
    return [render_dashboard(d, prom_url, out_dir, start, end, step, window) for d in chosen]
