"""The billing file format: file names, record fields, times, attachment keys (schema
in README, "Billing"). A record is one JSON object on one line, compact separators,
ASCII; it carries the cumulative counters it was computed from (`counter_*`), which
is what makes the ledger its own checkpoint (see runtime.billing.ledger)."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Mapping

from runtime.kernel.nft import COUNTER_FIELDS, Counters
from runtime.state.store import Attachment

SCHEMA_VERSION = 1
CURRENT = "billing.jsonl"
ROTATED_PREFIX = "billing-"
CHECKPOINT = "checkpoint.json"
LOCK = "billing.lock"
# Labels copied from the attachment into every record, when known.
LABELS = ("pod_namespace", "pod_name", "pod_uid", "container_name", "docker_container_id", "docker_network")
# A record's deltas, and (prefixed "counter_") its cumulative counters, in this order.
FIELDS = COUNTER_FIELDS
ZERO = Counters()


# --- time --------------------------------------------------------------------------

def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def fmt_time(t: dt.datetime) -> str:
    """UTC, ISO 8601, milliseconds, "Z": 2024-05-01T12:00:00.123Z."""
    t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_time(text: str) -> dt.datetime:
    """ISO 8601; a time without a zone is UTC."""
    t = dt.datetime.fromisoformat(text.strip().replace("z", "Z"))
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


# --- counters ----------------------------------------------------------------------

def counters_of_record(rec: Mapping[str, Any]) -> Counters:
    """The cumulative counters a record was computed from."""
    return Counters(tx_bytes=int(rec["counter_tx_bytes"]), tx_packets=int(rec["counter_tx_packets"]),
                    rx_bytes=int(rec["counter_rx_bytes"]), rx_packets=int(rec["counter_rx_packets"]),
                    generation=rec.get("counter_generation", ""))


# --- records -----------------------------------------------------------------------

def attachment_key(att: Attachment) -> str:
    """Identifies one attachment's life: a re-created attachment with the same ids has
    another `created`, hence another key and counters of its own."""
    return f"{att.network}/{att.container_id}/{att.ifname}/{att.created}"


MARK_KEYS = frozenset({"attachment", "seq", "end", "network", *(f"counter_{f}" for f in FIELDS)})


def valid(rec: Any) -> bool:
    return (isinstance(rec, dict) and isinstance(rec.get("attachment"), str) and isinstance(rec.get("seq"), int)
            and all(isinstance(rec.get(f"counter_{f}"), int) for f in FIELDS))


def parse_line(line: bytes) -> dict | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if valid(rec) else None


def created_time(text: str) -> str | None:
    """An attachment's `created` as a record time, or None when it doesn't parse."""
    try:
        return fmt_time(parse_time(text)) if text else None
    except ValueError:
        return None


def encode(rec: dict) -> bytes:
    return (json.dumps(rec, separators=(",", ":"), ensure_ascii=True) + "\n").encode()

