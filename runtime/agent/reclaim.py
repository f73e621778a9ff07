"""Idle reclaim (C10): a container flow that saw no packet for the idle timeout loses its
conntrack entry *and* its socket inside the container. Acts on conntrack DESTROY events
(the table's ct timeouts keep time) and on sweeps (periodic, and after lost events); an active flow is
never reclaimed, and sockets are matched exactly and destroyed by their cookie.

Design notes: docs/reclaim.md; operator's view: README, "Idle reclaim".
"""
from __future__ import annotations

import argparse
import errno
import functools
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from runtime import defaults
from runtime.errors import SockgateError
from runtime.fsutil import atomic_write_json
from runtime.kernel import netns
from runtime.kernel.netlink.conntrack import (
    IPS_ASSURED,
    PROTOS,
    TCP_CONNTRACK_ESTABLISHED,
    Conntrack,
    CtEntry,
    Destroyed,
    DestroyEvents,
    Flow,
    parse_destroy,
)
from runtime.kernel.netlink.sockdiag import TCP_ESTABLISHED, InetSock, SockDiag, canonical
from runtime.state.store import Attachment, attachments

log = logging.getLogger(__name__)

DEFAULT_NUDGE_INTERVAL = 0.0     # leave eviction to the kernel GC (see above)
DEFAULT_SWEEP_INTERVAL = 300.0
RCVBUF = 8 << 20
MISS_REFRESH = 1.0      # re-read attachment records at most this often on an unknown source
MAP_MAX_AGE = 30.0      # and at least this often, so a reused address maps to its new owner
# Sweeps after lost events: at least this many seconds apart, and this many times their
# own duration, so a flood that keeps overrunning the buffer gets a sweep every second
# or so rather than a busy loop of sweeps (see SweepSchedule).
LOST_SWEEP_MIN_GAP = 1.0
LOST_SWEEP_DUTY = 4.0
LOG_QUIET = 60.0        # s: repeated warnings about lost events at most this often

ContainerKey = tuple[str, str, str]          # (network, container id, ifname), as in metrics



@dataclass(frozen=True)
class Reclaim:
    """A socket aborted. reason: "idle" (DESTROY of an idle flow), "sweep" (its entry was
    found gone by a sweep) or "deleted" (a process deleted the entry; not counted)."""

    key: ContainerKey
    flow: Flow
    reason: str
    idle: float | None       # TCP: seconds since the socket last sent or received
    at: float


def verdict(ev: Destroyed) -> str:
    """What a DESTROY event means (pure): "idle" (reclaim), "deleted" (a process deleted
    a live TCP flow: abort, don't count), or why it is ignored."""
    if ev.flow.proto == socket.IPPROTO_TCP:
        if ev.tcp_state != TCP_CONNTRACK_ESTABLISHED:
            return "closed"
        return "idle" if ev.portid == 0 else "deleted"
    if ev.flow.proto == socket.IPPROTO_UDP:
        if ev.portid != 0:
            return "ignored-deleted"
        return "idle" if ev.status & IPS_ASSURED else "unassured"
    return "not-tcp-udp"


def sweep_udp(watched: Mapping[Flow, bytes], sockets: Iterable[tuple[Flow, bytes]],
              lookup: Callable[[Flow], CtEntry | None]) -> tuple[list[tuple[Flow, bytes]], dict[Flow, bytes]]:
    """One container's connected UDP sockets at a sweep (pure but for `lookup`).

    watched: flow -> socket cookie of the sockets whose entry the previous sweep found
    assured. sockets: (flow, cookie) of the connected sockets now. lookup: the flow's
    entry, None when conntrack has none; raises OSError when it gave no definite answer.
    Returns (sockets to abort, what to watch until the next sweep):
    - watched and the entry gone: it expired (or was deleted) since; abort. The cookie
      must match: a new socket on the same ports hasn't been seen assured.
    - an assured entry: watch it.
    - no entry and not watched: maybe it just hasn't sent yet; leave it.
    - an unassured entry: a short exchange or a young flow; not under the idle timeout
      (yet), and an expiry of it would say nothing about idleness; leave it.
    - no answer: watched stays watched, to be decided at the next sweep.
    """
    abort: list[tuple[Flow, bytes]] = []
    watch: dict[Flow, bytes] = {}
    for flow, cookie in sockets:
        known = watched.get(flow) == cookie
        try:
            entry = lookup(flow)
        except OSError:
            if known:
                watch[flow] = cookie
            continue
        if entry is None:
            if known:
                abort.append((flow, cookie))
        elif entry.assured:
            watch[flow] = cookie
    return abort, watch


@dataclass
class SweepSchedule:
    """When the loop sweeps (pure; times are time.monotonic() seconds).

    A sweep is due every `interval` s after the previous one (0: never periodically),
    and after lost events: at once, unless the previous sweep was for lost events too
    (a flood goes on) and ended less than max(min_gap, duty x its duration) ago; then
    when that gap is over. Overruns noticed meanwhile share that one sweep. Any sweep
    restarts the periodic clock (it did a periodic sweep's work)."""

    interval: float
    min_gap: float = LOST_SWEEP_MIN_GAP
    duty: float = LOST_SWEEP_DUTY
    next_periodic: float = float("inf")
    lost_pending: bool = False
    lost_not_before: float = float("-inf")

    def lost(self, now: float) -> None:
        """An overrun was noticed (ENOBUFS) at `now`."""
        self.lost_pending = True

    def due(self, now: float) -> str | None:
        """The reason of the sweep due now, or None."""
        if self.lost_pending and now >= self.lost_not_before:
            return "lost events"
        if now >= self.next_periodic:
            return "periodic"
        return None

    def wait(self, now: float) -> float:
        """Seconds until a sweep is due (inf: none scheduled)."""
        at = self.next_periodic
        if self.lost_pending:
            at = min(at, self.lost_not_before)
        return max(0.0, at - now)

    def swept(self, started: float, ended: float, why: str) -> None:
        """A sweep (`why`: "start", "periodic", "lost events") ran from `started` to
        `ended`. It covers every overrun noticed before it started; the loop notices
        overruns only between sweeps."""
        self.lost_pending = False
        if why == "lost events":
            self.lost_not_before = ended + max(self.min_gap, self.duty * (ended - started))
        self.next_periodic = ended + self.interval if self.interval > 0 else float("inf")


def sweep_covers_udp(sweep_interval: float, sweep_seconds: float, udp_idle: int | None) -> bool:
    """Whether sweeps come often enough to see every assured UDP flow before it can
    expire: sweep_interval plus a sweep's duration under the idle timeout (None: not
    known, nothing to check)."""
    if udp_idle is None:
        return True
    return 0 < sweep_interval and sweep_interval + sweep_seconds < udp_idle


# --- the reclaimer ---------------------------------------------------------------------

class Reclaimer:
    """Runs in the node's netns (the process' own): conntrack events come from there;
    container sockets are reached through the netns paths of the attachment records."""

    def __init__(self, state_dir: str, *, nudge_interval: float = DEFAULT_NUDGE_INTERVAL,
                 sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
                 on_reclaim: Callable[[Reclaim], None] | None = None, rcvbuf: int = RCVBUF,
                 lost_sweep_gap: float = LOST_SWEEP_MIN_GAP) -> None:
        self.state_dir = state_dir
        self.rcvbuf = rcvbuf
        self.nudge_interval = nudge_interval
        self.sweep_interval = sweep_interval
        self.lost_sweep_gap = lost_sweep_gap
        self.on_reclaim = on_reclaim
        self._lock = threading.Lock()
        self._counts: Counter[ContainerKey] = Counter()
        self._stats: Counter[str] = Counter()
        self._by_addr: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, Attachment] = {}
        self._loaded_at = float("-inf")
        self._warned_destroy = False
        # Per container: connected UDP sockets (flow -> cookie) whose entry the last
        # sweep found assured (see sweep_udp). Only the loop's thread touches it.
        self._udp_watch: dict[ContainerKey, dict[Flow, bytes]] = {}
        self._warned_udp_idle: int | None = None
        self._last_said: dict[str, float] = {}

    # -- what others read (any thread) --
    def counts(self) -> dict[ContainerKey, int]:
        """Idle flows reclaimed, per (network, container id, ifname)."""
        with self._lock:
            return dict(self._counts)

    def stats(self) -> dict[str, int]:
        """Totals: events (DESTROY events seen), reclaimed (counted reclaims, by events
        and sweeps), deleted, ignored:<why>, no_socket, abort_failed, lost_events
        (overruns noticed), sweeps, sweeps:<why> (start, periodic, lost events),
        swept:tcp and swept:udp (sockets a sweep found expired and aborted; part of
        reclaimed), errors; and one gauge: udp_watched (connected UDP sockets whose
        entry the last sweep found assured)."""
        with self._lock:
            return dict(self._stats)

    def _bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _say(self, topic: str, now: float) -> bool:
        """Whether to log `topic` loudly: once per LOG_QUIET s (a flood repeats it)."""
        if now - self._last_said.get(topic, float("-inf")) < LOG_QUIET:
            return False
        self._last_said[topic] = now
        return True

    # -- attachments --
    def _refresh(self) -> None:
        by_addr = {}
        for att in attachments(self.state_dir).records:
            for a in (att.ipv4, att.ipv6):
                if a:
                    by_addr[ipaddress.ip_address(a)] = att
        self._by_addr, self._loaded_at = by_addr, time.monotonic()

    def container_of(self, addr: str) -> Attachment | None:
        now = time.monotonic()
        if now - self._loaded_at > MAP_MAX_AGE:
            self._refresh()
        ip = ipaddress.ip_address(addr)
        att = self._by_addr.get(ip)
        if att is None and now - self._loaded_at > MISS_REFRESH:
            self._refresh()
            att = self._by_addr.get(ip)
        return att

    # -- the loop --
    def run(self, stop: threading.Event) -> None:
        _check_events_sysctl()
        events = DestroyEvents(self.rcvbuf)
        ct = Conntrack()
        try:
            log.info("idle reclaim: listening for conntrack DESTROY events (nudge every %s s, sweep every %s s)",
                     self.nudge_interval or "-", self.sweep_interval or "-")
            schedule = SweepSchedule(self.sweep_interval, min_gap=self.lost_sweep_gap)
            # Subscribed first, swept second: nothing falls between the two.
            self._scheduled_sweep(ct, "start", schedule)
            now = time.monotonic()
            next_nudge = now + self.nudge_interval if self.nudge_interval > 0 else float("inf")
            while not stop.is_set():
                wait = max(0.0, min(0.5, next_nudge - now, schedule.wait(now)))
                if select.select([events], [], [], wait)[0] and not self._drain(events):
                    self._lost(schedule, time.monotonic())
                now = time.monotonic()
                if now >= next_nudge:
                    ct.nudge()
                    next_nudge = now + self.nudge_interval
                why = schedule.due(now)
                if why is not None:
                    self._scheduled_sweep(ct, why, schedule)
                    now = time.monotonic()
        finally:
            events.close()
            ct.close()
        log.info("idle reclaim stopped: %s", json.dumps(self.stats(), sort_keys=True))

    def _lost(self, schedule: SweepSchedule, now: float) -> None:
        self._bump("lost_events")
        first = not schedule.lost_pending
        schedule.lost(now)
        if first and self._say("lost", now):
            later = schedule.wait(now)
            log.warning("conntrack events were lost (receive buffer overrun); sweeping%s",
                        f" in {later:.1f} s (sweeps after lost events are spaced)" if later >= 0.1 else "")
        else:
            log.debug("conntrack events were lost again (receive buffer overrun)")

    def _scheduled_sweep(self, ct: Conntrack, why: str, schedule: SweepSchedule) -> None:
        started = time.monotonic()
        self.sweep(ct, why)
        ended = time.monotonic()
        schedule.swept(started, ended, why)
        if why != "lost events":        # at start and then every sweep_interval: the policy may change
            self._check_udp_idle(ct, ended - started)

    def _check_udp_idle(self, ct: Conntrack, sweep_seconds: float) -> None:
        """Warn (once per value) when sweeps don't come often enough to catch every
        assured UDP flow that expires while events are lost (see sweep_covers_udp)."""
        timeouts = ct.udp_idle_timeouts()
        shortest = min(timeouts) if timeouts else None
        if sweep_covers_udp(self.sweep_interval, sweep_seconds, shortest):
            self._warned_udp_idle = None
            return
        if shortest != self._warned_udp_idle:
            self._warned_udp_idle = shortest
            log.warning("sweeps %s, but the shortest UDP idle timeout in force is %s s: an idle UDP flow "
                        "whose DESTROY event is lost (receive buffer overrun) can escape reclaim; keep the "
                        "sweep interval below half the idle timeout",
                        f"run every {self.sweep_interval:g} s and take {sweep_seconds:.2f} s"
                        if self.sweep_interval > 0 else "run only at start and after lost events", shortest)

    def _drain(self, events: DestroyEvents, budget: int = 256) -> bool:
        """Handle what is queued (at most `budget` datagrams, so nudges, sweeps and stop
        still get their turn). False when the kernel reported lost events."""
        for _ in range(budget):
            try:
                data = events.sock.recv(1 << 16)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    return False
                raise
            for msg in events.decode(data):
                try:
                    ev = parse_destroy(msg)
                    if ev is not None:
                        self.handle(ev)
                except Exception:       # one odd event must not stop reclaim for everyone
                    self._bump("errors")
                    log.exception("idle reclaim: failed to handle a conntrack event")
        return True

    def handle(self, ev: Destroyed) -> Reclaim | None:
        self._bump("events")
        att = self.container_of(ev.flow.src)
        if att is None:
            return None                     # the node's own flows, inbound ones, ...
        if ev.flow.proto == socket.IPPROTO_UDP:
            # Its fate is decided here (aborted, or left alone if a process deleted it):
            # the next sweep must not take the entry's absence for an unseen expiry.
            self._udp_watch.get((att.network, att.container_id, att.ifname), {}).pop(ev.flow, None)
        why = verdict(ev)
        if why not in ("idle", "deleted"):
            self._bump(f"ignored:{why}")
            log.debug("%s of %s/%s: %s, left alone", ev.flow, att.container_id, att.ifname, why)
            return None
        if why == "deleted":
            log.warning("conntrack entry of live %s of container %s/%s on %s was deleted by netlink port %d; "
                        "the flow can't go on, aborting its socket", ev.flow, att.container_id, att.ifname,
                        att.network, ev.portid)
        return self._abort(att, ev.flow, why, ev.nat)

    def _abort(self, att: Attachment, flow: Flow, reason: str, nat: str = "",
               diag: SockDiag | None = None, sock: InetSock | None = None) -> Reclaim | None:
        """Find the flow's socket (or take `sock`, already found) and destroy it; with
        `diag`, the caller is already in the container's netns."""
        def body() -> tuple[InetSock | None, int]:
            d = diag or SockDiag()
            try:
                s = sock or d.find(flow)
                return s, (d.destroy(flow.proto, s) if s is not None else errno.ENOENT)
            finally:
                if diag is None:
                    d.close()
        try:
            s, err = body() if diag is not None else netns.in_netns(att.netns, body)
        except (OSError, SockgateError) as exc:     # netns gone with its container, sock_diag error
            log.info("%s of container %s/%s: can't look for its socket in %s: %s", flow, att.container_id,
                     att.ifname, att.netns, exc)
            self._bump("abort_failed")
            return None
        if err == errno.ENOENT:
            self._bump("no_socket")
            log.debug("%s of container %s/%s (%s): no such socket any more", flow, att.container_id,
                      att.ifname, reason)
            return None
        if err:
            self._bump("abort_failed")
            if err == errno.EOPNOTSUPP and not self._warned_destroy:
                self._warned_destroy = True
                log.error("the kernel can't destroy sockets (CONFIG_INET_DIAG_DESTROY): idle sockets "
                          "are not reclaimed")
            elif err != errno.EOPNOTSUPP:
                log.warning("aborting %s of container %s/%s failed: %s", flow, att.container_id,
                            att.ifname, os.strerror(err))
            return None
        key: ContainerKey = (att.network, att.container_id, att.ifname)
        rec = Reclaim(key, flow, reason, s.idle if s else None, time.time())
        with self._lock:
            self._stats["deleted" if reason == "deleted" else "reclaimed"] += 1
            if reason == "sweep":
                self._stats[f"swept:{PROTOS[flow.proto]}"] += 1
            if reason != "deleted":
                self._counts[key] += 1
        if reason != "deleted":
            idle = f", idle {rec.idle:.1f} s" if rec.idle is not None else ""
            log.info("reclaimed %s %s of container %s/%s on %s%s%s: conntrack entry gone, socket aborted",
                     "idle" if reason == "idle" else "expired (found by sweep)", flow, att.container_id,
                     att.ifname, att.network, f" (public {nat})" if nat else "", idle)
        if self.on_reclaim is not None:
            try:
                self.on_reclaim(rec)
            except Exception:
                log.exception("idle reclaim: on_reclaim hook failed")
        return rec

    # -- the sweep --
    def sweep(self, ct: Conntrack, why: str) -> int:
        """Abort every container socket whose flow expired unnoticed: established TCP
        sockets whose conntrack entry is gone, connected UDP sockets whose entry the
        previous sweep found assured and is gone now (see the module doc). Returns how
        many."""
        self._refresh()
        atts = {(a.network, *a.key): a for a in self._by_addr.values()}
        found = 0
        watch: dict[ContainerKey, dict[Flow, bytes]] = {}
        for key, att in atts.items():
            before = self._udp_watch.get(key, {})
            try:
                n, watch[key] = netns.in_netns(att.netns, functools.partial(self._sweep_container, ct, att, before))
                found += n
            except (OSError, SockgateError) as exc:
                watch[key] = before     # try again next time (a container gone drops out of atts)
                log.debug("sweep: container %s/%s unreachable: %s", att.container_id, att.ifname, exc)
        self._udp_watch = watch
        with self._lock:
            self._stats["sweeps"] += 1
            self._stats[f"sweeps:{why.replace(' ', '-')}"] += 1
            self._stats["udp_watched"] = sum(map(len, watch.values()))
        loud = found or why == "start" or (why == "lost events" and self._say("lost sweep", time.monotonic()))
        log.log(logging.INFO if loud else logging.DEBUG,
                "sweep (%s): %d container(s), %d expired socket(s) aborted, %d assured UDP flow(s) watched",
                why, len(atts), found, sum(map(len, watch.values())))
        return found

    def _sweep_container(self, ct: Conntrack, att: Attachment,
                         udp_watched: Mapping[Flow, bytes]) -> tuple[int, dict[Flow, bytes]]:
        """In the container's netns (ct was opened in the node's). Returns how many
        sockets it aborted and the UDP sockets to watch until the next sweep."""
        own = {canonical(a) for a in (att.ipv4, att.ipv6) if a}  # compared as text: per socket, cheaper

        def through_node(proto: int, s: InetSock) -> Flow | None:
            if s.local[0] not in own or s.remote[0] in own:
                return None     # not through the node (loopback, another interface)
            return Flow(proto, s.local[0], s.local[1], s.remote[0], s.remote[1])

        n = 0
        d = SockDiag()
        try:
            tcp: list[Flow] = []
            udp: dict[tuple[Flow, bytes], InetSock] = {}
            for fam in (socket.AF_INET, socket.AF_INET6):
                for s in d.dump(fam, socket.IPPROTO_TCP, 1 << TCP_ESTABLISHED):
                    if (flow := through_node(socket.IPPROTO_TCP, s)) is not None:
                        tcp.append(flow)
                # Connected UDP sockets (sock_diag reports them as ESTABLISHED).
                for s in d.dump(fam, socket.IPPROTO_UDP, 1 << TCP_ESTABLISHED):
                    flow = through_node(socket.IPPROTO_UDP, s)
                    if flow is not None:
                        udp[(flow, s.cookie)] = s
            entries = _entries(ct, [*tcp, *(flow for flow, _ in udp)])
            for flow in tcp:
                if flow in entries and entries[flow] is None and self._abort(att, flow, "sweep", diag=d):
                    n += 1

            def lookup(flow: Flow) -> CtEntry | None:
                if flow not in entries:
                    raise OSError(errno.EIO, f"no answer from conntrack for {flow}")
                return entries[flow]
            expired, watch = sweep_udp(udp_watched, udp, lookup)
            for flow, cookie in expired:
                if self._abort(att, flow, "sweep", diag=d, sock=udp[(flow, cookie)]):
                    n += 1
        finally:
            d.close()
        return n, watch


def _entries(ct: Conntrack, flows: list[Flow]) -> dict[Flow, CtEntry | None]:
    """Conntrack's entry of each flow; a flow left out got no definite answer (so
    nothing is decided about it at this sweep)."""
    try:
        return ct.get_many(flows)
    except OSError as exc:
        log.warning("conntrack lookups of %d flow(s) failed: %s", len(flows), exc)
        return {}


def _check_events_sysctl() -> None:
    path = Path("/proc/sys/net/netfilter/nf_conntrack_events")
    try:
        value = path.read_text().strip()
    except OSError:
        log.warning("%s is missing (nf_conntrack not loaded yet?); events may not be delivered", path)
        return
    if value == "0":
        # 1, not 2: 2 ("only while someone listens") leaves flows created while the
        # agent is down without events for good.
        log.warning("net.netfilter.nf_conntrack_events was 0; setting it to 1 (idle reclaim needs events)")
        path.write_text("1")


# --- `python -m runtime.agent.reclaim` ---------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.agent.reclaim",
                                description="Idle reclaim on its own (the node agent runs the same "
                                            "thing). Run it in the node's netns.")
    p.add_argument("--state-dir", default=defaults.STATE_DIR, help="the plugin's stateDir")
    p.add_argument("--nudge-interval", type=float, default=DEFAULT_NUDGE_INTERVAL,
                   help="seconds between conntrack walks that evict expired entries (default 0: "
                        "leave it to the kernel GC, up to 60 s late)")
    p.add_argument("--sweep-interval", type=float, default=DEFAULT_SWEEP_INTERVAL,
                   help="seconds between sweeps for sockets whose entry is gone (0: only at start "
                        "and after lost events); keep it below half the shortest idle timeout, or "
                        "idle UDP flows whose events are lost can escape (default %(default)s)")
    p.add_argument("--counts-file", default="",
                   help="write {\"network/container/ifname\": reclaims} here (atomically) after each reclaim")
    p.add_argument("--rcvbuf", type=int, default=RCVBUF,
                   help="receive buffer for conntrack events, bytes (default %(default)s)")
    p.add_argument("--verbose", action="store_true", help="log every ignored event too")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def write_counts(_rec: Reclaim | None = None) -> None:
        if args.counts_file:
            atomic_write_json(Path(args.counts_file),
                              {"/".join(k): n for k, n in sorted(reclaimer.counts().items())})

    reclaimer = Reclaimer(args.state_dir, nudge_interval=args.nudge_interval,
                          sweep_interval=args.sweep_interval, on_reclaim=write_counts, rcvbuf=args.rcvbuf)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    write_counts()
    reclaimer.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
