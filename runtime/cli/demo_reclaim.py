"""The demo's idle reclaim: two sockets in one app, one left idle past the policy's
idleTimeout, one kept busy; the agent aborts the idle one only."""
from __future__ import annotations

import datetime as dt
import time
from typing import Any, Callable

from runtime.cli.demo_rows import Row, Target
from runtime.hostport import host_port
from runtime.lab import LAB, Lab
from runtime.lab.agent import log_entries
from runtime.lab.sockapp import AppError, SocketApp

IDLE_TIMEOUT_S = 3          # the demo policy's idleTimeout
BUSY_PERIOD_S = 0.5         # the busy socket sends this often
# The agent's conntrack nudge is 1 s (run.py): reclaim follows the timeout within about
# that (README "Idle reclaim": 3.3-4.0 s after the last packet for 3 s). Past this, the
# idle row says so instead of waiting on.
RECLAIM_DEADLINE_S = IDLE_TIMEOUT_S + 20


def _reclaim_line(agent_log: str, local: tuple[str, int]) -> dict[str, Any] | None:
    """The agent's log entry of the reclaim of the flow from `local`."""
    src = host_port(local[0], local[1])
    for entry in log_entries(agent_log.splitlines()):
        msg = str(entry.get("msg", ""))
        if msg.startswith("reclaimed ") and f" {src} -> " in msg:
            return dict(entry)
    return None


def _wall(ts: str) -> float:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def reclaim_rows(lab: Lab, app: Target, agent_log: Callable[[], str]) -> list[Row]:
    dst = (LAB.public_v4, 9000)
    idle_row = Row("reclaim", f"idle TCP socket (no packet for {IDLE_TIMEOUT_S} s)", app.name, "tcp", *dst,
                   expected="aborted")
    busy_row = Row("reclaim", f"busy TCP socket (a packet every {BUSY_PERIOD_S} s)", app.name, "tcp", *dst,
                   expected="alive")
    idle, busy = SocketApp(lab, app.ns, "tcp", *dst), SocketApp(lab, app.ns, "tcp", *dst)
    try:
        idle_row.started = busy_row.started = time.time()
        last = idle.echo("hello")["t"]
        busy.echo("hello")
        found, sent, busy_error = None, 0, ""
        while found is None and time.time() - last < RECLAIM_DEADLINE_S:
            if not busy_error:
                try:
                    busy.echo(f"keep{sent}")
                    sent += 1
                except AppError as exc:  # reclaimed although busy: the row says so
                    busy_error = str(exc)
            found = _reclaim_line(agent_log(), idle.local)
            time.sleep(BUSY_PERIOD_S)
        # What the app learns: its next send fails.
        r = idle.do("send late")
        idle_row.ended = time.time()
        idle_row.got = "aborted" if not r["ok"] else "alive"
        after = (f", {_wall(found['ts']) - last:.1f} s after its last packet" if found else
                 f"; no reclaim in the agent's log within {RECLAIM_DEADLINE_S} s")
        idle_row.detail = f"next send: {r.get('error') or 'sent'}{after}"
        idle_row.event = found
        try:
            if busy_error:
                raise AppError(busy_error)
            busy.echo("still")
            busy_row.got = "alive"
            busy_row.detail = f"echo ok {time.time() - last:.1f} s after the idle one's last packet, " \
                              f"{sent + 2} echoes"
        except AppError as exc:
            busy_row.got, busy_row.detail = "aborted", str(exc)
        busy_row.ended = time.time()
    finally:
        idle.close()
        busy.close()
    return [idle_row, busy_row]


def format_reclaim(entry: dict[str, Any]) -> str:
    return f"agent {str(entry.get('ts', ''))[11:23]}: {entry.get('msg', '')}"
