"""`swaserve dashboards generate | render` (docs/observability.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_dashboards_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("dashboards", help="Grafana dashboards: generate the JSON, or draw them to PNG")
    dsub = d.add_subparsers(dest="dashboards_cmd", required=True)
    g = dsub.add_parser("generate", help="write the Grafana JSON (helm/swaserve/dashboards) from panels.py")
    g.add_argument("--out", default="", help="directory (default: helm/swaserve/dashboards)")
    g.add_argument("--check", action="store_true", help="only check the files equal the generated ones")
    g.set_defaults(func=_cmd_generate)
    r = dsub.add_parser("render", help="draw every dashboard's panels to PNG from a Prometheus's data")
    r.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    r.add_argument("--out", required=True, help="directory for <dashboard>.png")
    r.add_argument("--since", type=float, default=600.0, help="seconds of history to draw (default 600)")
    r.add_argument("--rate-window", default="30s", help="what $__rate_interval becomes (default 30s)")
    r.add_argument(
        "--dashboard", action="append", default=[], help="only this one (overview, router, ...); repeatable"
    )
    r.set_defaults(func=_cmd_render)


def _cmd_generate(args: argparse.Namespace) -> int:
    from swaserve.observability import grafana

    out = Path(args.out) if args.out else grafana.OUT_DIR
    if args.check:
        bad = grafana.check(out)
        if bad:
            print(
                f"dashboards differ from the generated ones: {', '.join(bad)} (run swaserve dashboards generate)"
            )
            return 1
        print(f"dashboards in {out} are up to date")
        return 0
    for path in grafana.write(out):
        print(f"wrote {path}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from swaserve.observability.prom import PromAPIError
    from swaserve.observability.render import render

    try:
        done = render(args.prometheus, Path(args.out), args.since, args.rate_window, args.dashboard)
    except (OSError, PromAPIError) as e:
        raise ValueError(f"cannot read {args.prometheus}: {e}") from None
    for r in done:
        note = f"; no data: {', '.join(r.empty)}" if r.empty else ""
        print(f"wrote {r.path} ({r.panels} panels{note})")
    return 0
