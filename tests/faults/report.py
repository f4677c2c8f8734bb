"""What one fault cost, from the load's outcomes, the router's metrics and /proc: printed per test."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from tests.faults.fleet import GCACHE_MEMORY_MIB, ProcStats
from tests.faults.load import Outcome

RSS_MARGIN = 1.25  # a survivor's RSS after the fault may be at most 1.25x its RSS before (+ 8 MiB)
RSS_SLACK_KIB = 8 * 1024  # a GCache node also gets its memory tier's size: caching is its job
FD_MARGIN = 8  # and hold at most 8 more open file descriptors


@dataclass
class FaultReport:
    fault: str
    sent: int
    answered: int
    failed_before_token: Counter[str]  # by status
    cut_with_error: int
    cut_without_error: int
    cut_end_s: float | None  # latest end of a cut stream, seconds after the kill
    retries: float  # swaserve_router_retries_total, delta over the run
    first_ok_after_s: float | None  # kill -> end of the first answered request sent after it
    last_fail_sent_after_s: float | None  # kill -> send of the last request that failed before a token
    ttft_p50_before: float | None
    ttft_p50_after: float | None
    e2e_max_before: float | None  # the slowest answered request sent before / after the kill
    e2e_max_after: float | None
    before: dict[str, ProcStats]
    after: dict[str, ProcStats]
    examples: list[str] = field(default_factory=list)

    @classmethod
    def build(
        cls, fault: str, outcomes: list[Outcome], killed_at: float, retries: float,
        before: dict[str, ProcStats], after: dict[str, ProcStats],
    ) -> FaultReport:  # fmt: skip
        failed = [o for o in outcomes if o.failed_before_token]
        cut = [o for o in outcomes if o.cut]
        after_kill = [o for o in outcomes if o.sent_at >= killed_at]
        first_ok = min((o.ended_at for o in after_kill if o.answered), default=None)

        def p50(xs: list[float]) -> float | None:
            return statistics.median(xs) if xs else None

        return cls(
            fault=fault,
            sent=len(outcomes),
            answered=sum(o.answered for o in outcomes),
            failed_before_token=Counter(o.status for o in failed),
            cut_with_error=sum(o.error_event for o in cut),
            cut_without_error=sum(not o.error_event for o in cut),
            cut_end_s=max((o.ended_at - killed_at for o in cut), default=None),
            retries=retries,
            first_ok_after_s=None if first_ok is None else first_ok - killed_at,
            last_fail_sent_after_s=max((o.sent_at - killed_at for o in failed), default=None),
            ttft_p50_before=p50([o.ttft for o in outcomes if o.ttft is not None and o.sent_at < killed_at]),
            ttft_p50_after=p50([o.ttft for o in after_kill if o.ttft is not None]),
            e2e_max_before=max(
                (o.ended_at - o.sent_at for o in outcomes if o.answered and o.sent_at < killed_at),
                default=None,
            ),
            e2e_max_after=max((o.ended_at - o.sent_at for o in after_kill if o.answered), default=None),
            before=before,
            after=after,
            examples=[
                f"#{o.index} {'stream' if o.stream else 'plain'} {o.status}: {o.detail}"
                for o in (failed + cut)[:6]
            ],  # fmt: skip
        )

    def leaks(self) -> list[str]:
        """Survivors whose RSS or fd count grew past the margins."""
        out = []
        for name, b in self.before.items():
            a = self.after.get(name)
            if a is None:
                continue
            slack = RSS_SLACK_KIB + (GCACHE_MEMORY_MIB * 1024 if name.startswith("gcache") else 0)
            if a.rss_kib > b.rss_kib * RSS_MARGIN + slack or a.fds > b.fds + FD_MARGIN:
                out.append(f"{name}: rss {b.rss_kib} -> {a.rss_kib} KiB, fds {b.fds} -> {a.fds}")
        return out

    def growth(self, gcache: bool = False) -> tuple[float | None, int]:
        """The largest RSS ratio after/before and the largest fd increase among the survivors: GCache
        nodes (their memory tier fills under load) or the others."""
        pairs = [
            (b, self.after[n])
            for n, b in self.before.items()
            if n in self.after and n.startswith("gcache") == gcache
        ]
        return (
            max((a.rss_kib / b.rss_kib for b, a in pairs), default=None),
            max((a.fds - b.fds for b, a in pairs), default=0),
        )

    def row(self) -> str:
        """One row of the table in docs/reliability.md."""

        def s(x: float | None) -> str:
            return "-" if x is None else f"{x:.1f}"

        fails = sum(self.failed_before_token.values())
        by = ", ".join(f"{k}: {v}" for k, v in sorted(self.failed_before_token.items()))
        rss, fds = self.growth()
        rss_gc, fds_gc = self.growth(gcache=True)
        return (
            f"| {self.fault} | {self.sent} | {self.answered} | {self.retries:.0f} | {fails}"
            f"{f' ({by})' if by else ''} | {self.cut_with_error}/{self.cut_without_error} | {s(self.cut_end_s)} | "
            f"{s(self.first_ok_after_s)} | {s(self.last_fail_sent_after_s)} | {s(self.ttft_p50_before)}/"
            f"{s(self.ttft_p50_after)} | {s(self.e2e_max_before)}/{s(self.e2e_max_after)} | {rss or 1:.2f}x / "
            f"{'-' if rss_gc is None else f'{rss_gc:.2f}x'}; +{max(fds, fds_gc)} |"
        )

    def text(self) -> str:
        lines = [
            f"fault: {self.fault}",
            "| fault | sent | answered | retried | failed before a token | streams cut (error event/none) "
            "| last cut ended (s after kill) | first success after (s) | last failure sent (s after kill) "
            "| TTFT p50 before/after (s) | slowest answer before/after (s) | RSS growth: others / GCache; fds |",
            self.row(),
        ]
        for name, b in sorted(self.before.items()):
            a = self.after.get(name)
            lines.append(f"  {name}: rss {b.rss_kib} -> {a.rss_kib if a else '-'} KiB, "
                         f"fds {b.fds} -> {a.fds if a else '-'}")  # fmt: skip
        lines += [f"  e.g. {e}" for e in self.examples]
        return "\n".join(lines)
