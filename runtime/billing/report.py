"""Reading the ledger back: sums of billed bytes and packets per pod, container or
attachment over a time window (`sockgate billing report`)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from runtime import textable
from runtime.billing.schema import FIELDS, parse_time

GROUPINGS = ("pod", "container", "attachment")


def group_of(rec: Mapping[str, Any], by: str) -> str:
    if by == "attachment":
        return rec["attachment"]
    if by == "pod" and rec.get("pod_name"):
        return f"{rec.get('pod_namespace', '')}/{rec['pod_name']}"
    if by == "pod" and rec.get("container_name"):
        return rec["container_name"]
    return str(rec.get("container_id", ""))


@dataclass
class ReportRow:
    group: str
    tx_bytes: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    rx_packets: int = 0
    records: int = 0


def report(records: Iterable[Mapping[str, Any]], *, by: str = "pod", since: dt.datetime | None = None,
           until: dt.datetime | None = None) -> tuple[list[ReportRow], int]:
    """Sums per group of the records whose interval ends in (since, until]. Returns
    the rows (sorted by group) and how many duplicate (attachment, seq) records were
    ignored (always 0 for a ledger written by this module)."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}")
    rows: dict[str, ReportRow] = {}
    seen: set[tuple[str, int]] = set()
    dups = 0
    for rec in records:
        ident = (rec["attachment"], rec["seq"])
        if ident in seen:
            dups += 1
            continue
        seen.add(ident)
        end = parse_time(rec["end"])
        if (since is not None and end <= since) or (until is not None and end > until):
            continue
        row = rows.setdefault(group_of(rec, by), ReportRow(group_of(rec, by)))
        for f in FIELDS:
            setattr(row, f, getattr(row, f) + int(rec.get(f, 0)))
        row.records += 1
    return [rows[g] for g in sorted(rows)], dups


def format_report(rows: list[ReportRow], by: str) -> str:
    total = ReportRow("total")
    for row in rows:
        for f in (*FIELDS, "records"):
            setattr(total, f, getattr(total, f) + getattr(row, f))
    head = (by, *FIELDS, "records")
    return textable.render(head, [(r.group, *(getattr(r, f) for f in (*FIELDS, "records"))) for r in [*rows, total]],
                           left=(0,), rule=False)
