"""Which refused-flow event a demo row produced (README "Refused-flow events"; the
agent writes them to STATE_DIR/events/events.jsonl)."""
from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any, Iterable, Mapping, Sequence

from runtime.agent.events import read_events
from runtime.cli.demo_rows import Row
from runtime.hostport import host_port

# An event is stamped by the agent when the kernel hands it the packet; a probe's
# start is stamped here just before the probe process starts. Same clock, so this
# only covers the rounding of the event's microseconds.
CLOCK_SLACK_S = 0.005


def load_events(state_dir: str) -> list[dict[str, Any]]:
    """Every refused-flow event of the demo's state dir, oldest first."""
    return list(read_events(state_dir))


def _time(event: Mapping[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00")).timestamp()


def _same_address(a: object, b: str) -> bool:
    try:
        x, y = ipaddress.ip_address(str(a)), ipaddress.ip_address(b)
    except ValueError:
        return False
    unmap = lambda ip: ip.ipv4_mapped or ip if ip.version == 6 else ip  # noqa: E731
    return bool(unmap(x) == unmap(y))


def _protocol_matches(row: Row, event: Mapping[str, Any]) -> bool:
    if row.proto == "icmp":
        return event.get("protocol") in ("icmp", "ipv6-icmp")
    return bool(event.get("protocol") == row.proto)


def find_event(row: Row, events: Iterable[Mapping[str, Any]], until: float) -> dict[str, Any] | None:
    """The event of row's refused attempt: the first one with the row's protocol,
    destination and port, stamped between the attempt's start and `until` (when the
    next attempt at the same destination started: a row must not take the event of
    the one after it)."""
    for event in events:
        if not (_protocol_matches(row, event) and _same_address(event.get("destination"), row.host)
                and event.get("port") == row.port):
            continue
        try:
            t = _time(event)
        except (KeyError, ValueError):
            continue
        if row.started - CLOCK_SLACK_S <= t < until:
            return dict(event)
    return None


def attach_events(rows: Sequence[Row], events: Sequence[Mapping[str, Any]]) -> int:
    """Set each refused row's `event` (rows in the order they ran); returns how many
    refused rows still have none."""
    missing = 0
    for i, row in enumerate(rows):
        if row.expected != "refused" or row.event is not None:
            continue
        later = [r.started for r in rows[i + 1:] if (r.proto, r.host, r.port) == (row.proto, row.host, row.port)]
        row.event = find_event(row, events, min(later, default=float("inf")))
        missing += row.event is None
    return missing


def format_event(event: Mapping[str, Any]) -> str:
    """One line: when, whose, the flow, and the rule (and element) that refused it, in
    `policy explain`'s words; the reason too when the rule's name isn't it."""
    def hp(addr: object, port: object) -> str:
        a = str(addr)
        return host_port(a, port) if port is not None else a
    who = event.get("pod") or event.get("container_name") or event.get("container_id") or "?"
    when = str(event.get("time", ""))
    when = when[11:23] if len(when) >= 23 else when  # HH:MM:SS.mmm of the ISO time
    flow = f"{event.get('protocol')} {hp(event.get('source'), event.get('source_port'))} -> " \
           f"{hp(event.get('destination'), event.get('port'))}"
    reason, rule = str(event.get("reason") or ""), str(event.get("rule") or "")
    why = rule if rule.startswith(reason) else f"{reason} ({rule})" if rule else reason
    element = f" — {event['element']}" if event.get("element") else ""
    return f"event {when} {who}: {flow}: {why}{element}"
