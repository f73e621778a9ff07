"""How the demo shows what it did: a progress line per step on stderr, a table per
section on stdout (each refusal followed by its event line), or one JSON document."""
from __future__ import annotations

import sys
import time
from typing import Any, Sequence, TextIO

from runtime import textable
from runtime.billing.report import ReportRow, format_report
from runtime.cli.demo_events import format_event
from runtime.cli.demo_reclaim import format_reclaim
from runtime.cli.demo_rows import Row

TITLES = {
    "core": "The core: egress-only NAT, nothing gets in, no container reaches another or the node",
    "policy": "The egress policy, from app-a",
    "reclaim": "Idle reclaim (policy idleTimeout 3 s)",
}
HEAD = ("what", "from", "to", "expected", "got", "detail", "")


class Progress:
    """`[ 12.3 s] step 4/9: ...` lines on stderr, so a user sees the demo move (and
    stdout stays the tables, or the one JSON document)."""

    def __init__(self, steps: int, out: TextIO = sys.stderr) -> None:
        self.steps, self.out = steps, out
        self.t0 = time.monotonic()
        self.n = 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def step(self, text: str, *, last: bool = False) -> None:
        """The next step; last: the final one (teardown), also when an error or Ctrl-C
        skipped the steps before it."""
        self.n = self.steps if last else self.n + 1
        self.note(f"step {self.n}/{self.steps}: {text}")

    def note(self, text: str) -> None:
        print(f"[{self.elapsed:5.1f} s] {text}", file=self.out, flush=True)


def section_lines(section: str, rows: Sequence[Row]) -> list[str]:
    """The section's title and table; under each refusal (and the idle reclaim) the
    event it produced, indented."""
    table = textable.lines(HEAD, [(r.what, r.src, r.dst, r.expected, r.got, r.detail, r.verdict())
                                  for r in rows])
    out = [TITLES.get(section, section), "", *table[:2]]
    for row, line in zip(rows, table[2:]):
        out.append(line)
        if row.event is not None:
            text = format_reclaim(row.event) if section == "reclaim" else format_event(row.event)
            out.append(f"    {text}")
        elif row.expected == "refused":
            out.append("    (no refused-flow event found for this attempt)")
    return out


def billing_lines(rows: list[ReportRow], upload: int) -> list[str]:
    return ["Billing: what `sockgate billing report` prints for the demo's ledger (a record every second,",
            f"and a final one at each DEL). tx is what an app sent, IP headers included: app-b's {upload}-byte",
            "upload, and nothing of its refused attempts.", "",
            format_report(rows, "pod")]


def document(prefix: str, rows: Sequence[Row], billing: list[ReportRow], *,
             agent_pid: int | None, seconds: float, failures: list[str]) -> dict[str, Any]:
    """The --json output: every row (with its event), the billing report, the verdict."""
    return {"lab": prefix, "agent_pid": agent_pid, "rows": [r.as_json() for r in rows],
            "billing": [vars(b) for b in billing],
            "failures": failures, "passed": not failures, "seconds": round(seconds, 1)}
