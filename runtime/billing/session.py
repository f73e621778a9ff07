"""What an attachment's next record says: the interval since its last record, the
deltas of its counters, and why they may not be simple differences (a re-created
counter: counter_reset; counters nobody can read any more: counters_missing). The
marks (last record of each attachment key) are the billing checkpoint."""
from __future__ import annotations

import datetime as dt
from typing import Any

from runtime.billing.schema import (
    FIELDS,
    LABELS,
    SCHEMA_VERSION,
    ZERO,
    attachment_key,
    counters_of_record,
    created_time,
    fmt_time,
    parse_time,
)
from runtime.kernel.nft import Counters
from runtime.state.store import READY, Attachment


class Session:
    """One locked read-modify-append of the ledger (see Ledger.session). `marks` holds
    the last record of each attachment key: the billing checkpoint."""

    def __init__(self, node: str, marks: dict[str, dict], now: dt.datetime) -> None:
        self.node = node
        self.marks = marks
        self.now = now
        self.pending: list[dict] = []
        self.dirty = False  # marks differ from the cache on disk

    def bill(self, att: Attachment, cur: Counters | None, *, final: bool = False) -> dict | None:
        """Queue the record of `att` for the interval since its last record. Periodic
        (final=False): only when something moved. Final: for every attachment that was
        ready (a DEL's rollback of a failed ADD excepted), but one that never carried
        a packet and has no record yet: nothing to bill, nothing to close. cur None:
        the elements are gone."""
        key = attachment_key(att)
        mark = self.marks.get(key)
        notes: dict[str, bool] = {}
        base = counters_of_record(mark) if mark else ZERO
        if cur is None:
            # No elements: nothing to read. A final record still closes the key: an
            # attachment whose elements went behind sockgate's back (a flushed table
            # that was never restored) may have carried traffic nobody can count now.
            if not final or (mark is not None and mark.get("final")):
                return None
            if mark is None and att.state != READY:
                return None  # a failed ADD's rollback: it never carried anything
            cur, notes["counters_missing"] = base, True
        if mark and mark.get("final"):
            if cur == base:
                return None  # the deleted link's frozen counters (a repeated DEL): billed already
            if cur.generation and cur.generation == base.generation:
                # The very elements the final record read, their link gone: nothing more
                # passed them. Their counters moved only because the segment meter's part
                # did (a DEL killed after its final record, then a new meter: the old
                # veth's count went with the old one; review 10). Billed already.
                return None
            # Counters moved after a final record: the same key (same ids, `created`
            # in the same second) got a new element, which counts from zero.
            base, notes["counter_reset"] = ZERO, True
        elif mark and cur.generation != base.generation:
            # The elements were created again since the last record (a reloaded table
            # restored them): their counters started from zero, whatever they show now.
            # What was sent between that record and the reload is lost with the old
            # elements.
            base, notes["counter_reset"] = ZERO, True
        elif not mark and att.generation and cur.generation and cur.generation != att.generation:
            # The same before the first record: the elements are not the ones ADD
            # created. The deltas count from zero anyway; what ADD's elements counted
            # before the reload is lost, and the record must say so.
            notes["counter_reset"] = True
        # The same elements as at the last record (their generation says so): a counter
        # of theirs can't have been created again.
        same = bool(mark) and not notes and bool(cur.generation) and cur.generation == base.generation
        deltas = {}
        for d in ("tx", "rx"):
            # bytes and packets are one counter: either going down means it was re-created
            b, p = f"{d}_bytes", f"{d}_packets"
            went_down = getattr(cur, b) < getattr(base, b) or getattr(cur, p) < getattr(base, p)
            if went_down and same:
                # A part of it went (the segment meter's counts, its pins removed behind
                # sockgate's back): billing the whole of what is left would bill it
                # twice (reviews 6 and 7). This interval is unknown; the next counts on.
                deltas[b], deltas[p], notes["counters_decreased"] = 0, 0, True
            elif went_down:
                deltas[b], deltas[p], notes["counter_reset"] = getattr(cur, b), getattr(cur, p), True
            else:
                deltas[b], deltas[p] = getattr(cur, b) - getattr(base, b), getattr(cur, p) - getattr(base, p)
        if not any(deltas.values()) and not notes and not (final and (mark is not None or cur)):
            return None
        start = mark["end"] if mark else created_time(att.created) or fmt_time(self.now)
        end = fmt_time(max(self.now, parse_time(start)))  # a clock step back never makes end < start
        rec: dict[str, Any] = {"v": SCHEMA_VERSION, "attachment": key, "seq": (mark["seq"] + 1) if mark else 1,
                               "start": start, "end": end, "node": self.node,
                               "network": att.network, "container_id": att.container_id, "ifname": att.ifname,
                               "netns": att.netns, "host_ifname": att.host_ifname, "attachment_created": att.created}
        rec.update({k: att.labels[k] for k in LABELS if att.labels.get(k)})
        rec.update(deltas)
        rec.update({f"counter_{f}": getattr(cur, f) for f in FIELDS})
        if cur.generation:
            rec["counter_generation"] = cur.generation
        rec["final"] = final
        rec.update(notes)
        self._queue(rec)
        return rec

    def close(self, key: str) -> dict | None:
        """Final record for a key whose attachment is gone without one (its DEL ran with
        billing off, or its record vanished): zero delta, the last counters again."""
        mark = self.marks.get(key)
        if mark is None or mark.get("final"):
            return None
        rec = dict(mark, seq=mark["seq"] + 1, start=mark["end"], node=self.node, final=True,
                   counters_missing=True, **{f: 0 for f in FIELDS})
        rec.pop("counter_reset", None)
        rec["end"] = fmt_time(max(self.now, parse_time(rec["start"])))
        self._queue(rec)
        return rec

    def forget(self, key: str) -> None:
        """Drop a finished key from the checkpoint cache (the files keep its records)."""
        if self.marks.pop(key, None) is not None:
            self.dirty = True

    def _queue(self, rec: dict) -> None:
        self.pending.append(rec)
        self.marks[rec["attachment"]] = rec
