"""PNG plots of the rate sweep: hit rate and P90 TTFT against the offered request rate, a line per policy."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from bench.compare.analysis import Summary  # noqa: E402


def sweep_plots(summaries: Sequence[Summary], out_dir: Path, title: str) -> list[Path]:
    """hit_rate_vs_rate.png and p90_ttft_vs_rate.png in out_dir; the runs that failed are left out."""
    ok = [s for s in summaries if not s.get("error") and s.get("completed")]
    policies = list(dict.fromkeys(s["policy"] for s in ok))
    paths = []
    for key, ylabel, name, scale in (
        ("hit_rate", "prefix-cache hit rate (%)", "hit_rate_vs_rate.png", 100.0),
        ("p90_ttft_ms", "P90 TTFT (ms, simulated time)", "p90_ttft_vs_rate.png", 1.0),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p in policies:
            pts = sorted(
                (s["offered_rate"], s[key] * scale) for s in ok if s["policy"] == p and s[key] is not None
            )
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
        if key == "hit_rate":
            ideal = sorted({(s["offered_rate"], 100 * s["ideal_hit_rate"]) for s in ok})
            if ideal:
                ax.plot([x for x, _ in ideal], [y for _, y in ideal], "k--", label="ideal (infinite cache)")
        else:
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered request rate (req/s of trace time)")
        ax.set_ylabel(ylabel)
        ks = sorted({(s["offered_rate"], s["workload"]["time_scale"]) for s in ok})
        note = "time scale K per rate: " + ", ".join(f"{k:g}" for _, k in ks) + " (wall overheads count x K)"
        ax.set_title("\n".join(textwrap.wrap(f"SIMULATED: {title}", 100) + [note]), fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
