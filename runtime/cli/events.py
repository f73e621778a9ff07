"""`sockgate events`: the refused-flow events the agent wrote (runtime.agent.event_log),
as a table, JSON, or followed as they come."""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Iterator

from runtime import defaults
from runtime.cli.commands import command, count
from runtime.hostport import host_port

COLUMNS = ("time", "pod/container", "proto", "source", "destination", "port", "reason", "rule — element")


def _pod(text: str) -> str:
    ns, slash, name = text.partition("/")
    if not slash or not ns or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/NAME, not {text!r}")
    return text


def who(event: dict) -> str:
    """The pod, else the Docker container's name, else the container id (12 characters,
    as Docker shows it); "-" when the interface belongs to no attachment."""
    if event.get("pod"):
        return str(event["pod"])
    if event.get("container_name"):
        return str(event["container_name"])
    cid = event.get("container_id")
    return str(cid)[:12] if cid else f"- ({event.get('ifname') or '?'})"


def row(event: dict) -> list[str]:
    port = event.get("port")
    source = str(event.get("source", ""))
    if event.get("source_port") is not None:
        source = host_port(source, event['source_port'])
    decided = event.get("rule") or ""
    if event.get("element"):
        decided += f" — {event['element']}"
    return [str(event.get("time", "")), who(event), str(event.get("protocol", "")), str(source),
            str(event.get("destination", "")), "-" if port is None else str(port), str(event.get("reason", "")),
            decided]


def _print_lines(lines: Iterable[str]) -> None:
    for line in lines:
        print(line, flush=True)


def _events(args: argparse.Namespace) -> int:
    from runtime.agent.events import events_path, follow_events, last_events, read_events
    from runtime.textable import render
    if args.follow:
        stream: Iterator[dict] = follow_events(args.state_dir, pod=args.pod, container=args.container,
                                               existing=args.last is None)
        if args.last is not None:
            # The last N of what is there now; then what comes.
            stream = _last_then_rest(stream, args.state_dir, args)
        try:
            if args.json:
                _print_lines(json.dumps(e) for e in stream)
            else:
                _print_lines("  ".join(row(e)) for e in stream)
        except BrokenPipeError:
            return 0
        return 0
    if args.last is not None:
        events = last_events(args.state_dir, args.last, pod=args.pod, container=args.container)
    else:
        events = list(read_events(args.state_dir, pod=args.pod, container=args.container))
    if args.json:
        print(json.dumps(events))
        return 0
    if not events:
        what = " matching" if args.pod or args.container else ""
        print(f"no{what} refused-flow events in {events_path(args.state_dir)} (or the files rotated before it)")
        return 0
    print(render(COLUMNS, [row(e) for e in events], left=(0, 1, 2, 3, 4, 6, 7)))
    return 0


def _last_then_rest(stream: Iterator[dict], state_dir: str, args: argparse.Namespace) -> Iterator[dict]:
    """follow_events without its existing events, preceded by the last N of them."""
    from runtime.agent.events import last_events
    yield from last_events(state_dir, args.last, pod=args.pod, container=args.container)
    yield from stream


def add_events_commands(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "events", _events, help="refused flows: which container, where to, and the rule that refused",
                description="Print the refused-flow events the node agent wrote to "
                            "STATE_DIR/events/events.jsonl (and its rotated files, oldest first): one per "
                            "refused first packet of a flow, at most limits.eventsPerSecond per container "
                            "(README, \"Refused-flow events\"). By default a table; --json prints one JSON "
                            "array of the events (the file's schema); with --follow, one JSON object per "
                            "line as they come.")
    p.add_argument("--state-dir", default=defaults.STATE_DIR, help="the agent's state dir (default: %(default)s)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--pod", type=_pod, metavar="NAMESPACE/NAME", help="only this pod's events")
    which.add_argument("--container", metavar="ID",
                       help="only this container's events: its id, a prefix of it (Docker shows 12 characters), "
                            "or a Docker container's name")
    p.add_argument("--json", action="store_true",
                   help="one JSON array of the events; with --follow, JSON Lines (one event per line)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="keep printing events as the agent writes them, across rotations, until interrupted")
    p.add_argument("--last", type=count, metavar="N",
                   help="only the last N events (with --follow: of those already written); default: all")

