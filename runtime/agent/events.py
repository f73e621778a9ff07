"""Refused-flow events: the agent's component that reads the kernel's reports of
refused first packets (NFLOG group EVENTS_NFLOG_GROUP, see netpolicy.ruleset) and
writes one JSON line per packet to the events file (runtime.agent.event_log), naming
the container as billing knows it, the packet's addresses, ports and protocol, and
the rule and element that refused it (netpolicy.refusals).

How a flood is bounded (README "Refused-flow events"):
- in the kernel, per container: at most limits.eventsPerSecond reports (burst
  limits.eventsBurst); the refusals themselves don't wait for anybody, and without
  a listener a report costs nothing;
- between kernel and agent: the socket's receive buffer (DEFAULT_RCVBUF); a batch
  that doesn't fit is dropped by the kernel and counted from the sequence numbers;
- in the agent: a reader thread that only parses and queues (at most QUEUE_SIZE
  events; beyond that they are dropped and counted), and a writer thread that
  writes at most MAX_PER_SECOND events a second. Both run apart from the threads that
  serve CNI requests, and neither holds a lock they need.

The file's reader API is re-exported here: `read_events(state_dir, pod=None,
container=None)`, `last_events(state_dir, n, pod=None, container=None)` and
`follow_events(...)`.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netpolicy.refusals import Packet, Refusals
from netpolicy.ruleset import EVENT_PREFIX, EVENT_REASONS, EVENTS_NFLOG_GROUP, EVENTS_SNAPLEN
from runtime.agent.event_log import (
    DEFAULT_KEEP,
    DEFAULT_MAX_BYTES,
    EventLog,
    events_path,
    follow_events,
    last_events,
    read_events,
)
from runtime.fsutil import file_stamp
from runtime.kernel.netlink.nflog import Logged, NflogSocket
from runtime.state import store

__all__ = ["EventLog", "EventsWatch", "events_path", "follow_events", "last_events", "read_events"]

log = logging.getLogger(__name__)

QUEUE_SIZE = 4096
MAX_PER_SECOND = 2000
# How long the reader waits for the kernel, and the writer for the reader: how late
# a stop is noticed.
SLICE_S = 0.2
# Attachment records are looked at again at most this often on a miss (a container
# attached since), and every REFRESH_S in any case; the pools (on a miss) and a
# policy that could not be had at most every POLICY_REFRESH_S.
MISS_REFRESH_S = 0.05
REFRESH_S = 10.0
POLICY_REFRESH_S = 1.0
RETRY_S = 5.0
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}
# Labels of sockgate_refused_flows_total, in this order.
METRIC_LABELS = ("network", "container_id", "ifname", "pod_namespace", "pod_name", "container_name", "reason")

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_PORTS = struct.Struct("!HH")


# --- the packet --------------------------------------------------------------------

def parse_headers(payload: bytes) -> tuple[str, Packet] | None:
    """(family "ipv4"/"ipv6", Packet) of a reported packet's first bytes (its IP
    header on); None when they are no IP packet. Ports and ICMP type only when the
    transport header is there (not for a later IPv4 fragment)."""
    if len(payload) < 20:
        return None
    version = payload[0] >> 4
    if version == 4:
        ihl = (payload[0] & 0x0F) * 4
        frag, proto = _IPV4.unpack_from(payload)[4], payload[9]
        src, dst = socket.inet_ntop(socket.AF_INET, payload[12:16]), socket.inet_ntop(socket.AF_INET, payload[16:20])
        l4 = payload[ihl:] if ihl >= 20 and frag & 0x1FFF == 0 else b""
        family = "ipv4"
    elif version == 6 and len(payload) >= 40:
        proto = payload[6]
        src, dst = socket.inet_ntop(socket.AF_INET6, payload[8:24]), socket.inet_ntop(socket.AF_INET6, payload[24:40])
        # No extension headers to walk: a container can't send any (the `before_routing`
        # chains drop them), and an inbound packet with one is reported without ports.
        l4 = payload[40:]
        family = "ipv6"
    else:
        return None
    name = PROTOCOLS.get(proto, str(proto))
    sport = dport = icmp_type = icmp_code = flags = None
    if name in ("tcp", "udp") and len(l4) >= 4:
        sport, dport = _PORTS.unpack_from(l4)
        if name == "tcp" and len(l4) >= 14:
            flags = l4[13]
    elif name in ("icmp", "ipv6-icmp") and len(l4) >= 2:
        icmp_type, icmp_code = l4[0], l4[1]
    return family, Packet(name, src, dst, sport, dport, icmp_type, icmp_code, flags)


def fmt_time(seconds: float) -> str:
    """UTC, microseconds, "Z": 2026-12-06T09:00:00.123456Z."""
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- who the container is ------------------------------------------------------------

class Attachments:
    """Interface index -> attachment record, from the records on disk (labels as
    billing knows them). Read again when an index is unknown (at most every
    MISS_REFRESH_S: a container attached since) and every REFRESH_S (labels the
    Docker door adds later); a record is parsed again only when its file changed, so
    a look costs a directory listing and a stat per record."""

    def __init__(self, state_dir: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.state_dir = state_dir
        self.clock = clock
        self.by_index: dict[int, store.Attachment] = {}
        self._read: dict[Path, tuple[tuple[int, int, int] | None, store.Attachment | None]] = {}
        self._read_at = float("-inf")

    def refresh(self) -> None:
        read: dict[Path, tuple[tuple[int, int, int] | None, store.Attachment | None]] = {}
        for path in store.record_paths(self.state_dir):
            stamp = file_stamp(path)
            known = self._read.get(path)
            read[path] = known if known is not None and known[0] == stamp else (stamp, store.read_record(path))
        by_index = {}
        for _, att in read.values():
            if att is None:
                continue
            index = att.host_ifindex
            if not index:  # a record of a version that didn't keep it
                try:
                    index = socket.if_nametoindex(att.host_ifname)
                except OSError:
                    continue
            by_index[index] = att
        self._read, self.by_index = read, by_index
        self._read_at = self.clock()

    def get(self, index: int) -> store.Attachment | None:
        now = self.clock()
        if now - self._read_at > REFRESH_S or (index not in self.by_index and now - self._read_at > MISS_REFRESH_S):
            self.refresh()
        return self.by_index.get(index)

    def keys(self) -> set[tuple[str, str, str]]:
        return {(a.network, a.container_id, a.ifname) for a in self.by_index.values()}


def _ifname(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index) if index else ""


# --- the component -----------------------------------------------------------------

@dataclass
class _Item:
    logged: Logged
    received: float  # time.time() when read, for packets the kernel didn't stamp


class EventsWatch:
    """The agent's `events` component (wired in runtime.cli.main). `policy` returns
    the compiled policy in force (or raises): the words of the rule that decided."""

    def __init__(self, state_dir: str, policy: Callable[[], Any] | None = None, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP, queue_size: int = QUEUE_SIZE,
                 max_per_second: int = MAX_PER_SECOND, pools: Callable[[], list[str]] | None = None,
                 group: int = EVENTS_NFLOG_GROUP) -> None:
        self.state_dir = state_dir
        self.policy = policy
        self.pools_source = pools
        self.log = EventLog(state_dir, max_bytes=max_bytes, keep=keep)
        self.queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self.max_per_second = max_per_second
        self.group = group
        self.attachments = Attachments(state_dir)
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, ...], int] = {}
        self._dropped = 0          # queue full, or not written
        self._kernel_lost = 0      # lost before the reader: sequence gaps of earlier sockets
        self._socket: NflogSocket | None = None
        self._refusals: tuple[object, Refusals] | None = None
        self._policy_at = float("-inf")
        self._pools: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._pools_at = float("-inf")
        self._write_errors = 0

    # --- what the metrics read ---
    def counts(self) -> dict[tuple[str, ...], int]:
        """{METRIC_LABELS values: events written}, for sockgate_refused_flows_total."""
        with self._lock:
            return dict(self._counts)

    def dropped(self) -> int:
        """Events lost: the kernel's batches that didn't fit the socket, events the
        reader couldn't queue, lines the writer couldn't write."""
        sock = self._socket
        with self._lock:
            return self._dropped + self._kernel_lost + (sock.lost.total if sock is not None else 0)

    # --- threads ---
    def run(self, stop: threading.Event) -> None:
        # The writer stops with the reader, whyever the reader stopped (the agent's
        # stop, or a failure the agent restarts the component after).
        done = threading.Event()
        writer = threading.Thread(target=self._write_loop, args=(done,), name="events-writer")
        writer.start()
        try:
            self._read_loop(stop)
        finally:
            done.set()
            writer.join()
            self.log.close()

    def _read_loop(self, stop: threading.Event) -> None:
        failing = False
        while not stop.is_set():
            try:
                sock = NflogSocket(self.group, copy_range=EVENTS_SNAPLEN)
            except OSError as exc:
                # Once per streak: EPERM (another listener holds the group) lasts.
                log.log(logging.DEBUG if failing else logging.ERROR,
                        "refused-flow events: cannot listen to NFLOG group %d (%s; EPERM: another program "
                        "listens to it); no events are written until it can (retrying every %.0f s)",
                        self.group, exc, RETRY_S)
                failing = True
                stop.wait(RETRY_S)
                continue
            failing = False
            self._socket = sock
            log.info("refused-flow events: listening to NFLOG group %d, writing %s", self.group,
                     events_path(self.state_dir))
            try:
                while not stop.is_set():
                    batch = sock.read(SLICE_S)
                    received = time.time()
                    for logged in batch:
                        self.enqueue(logged, received)
            finally:
                with self._lock:
                    self._kernel_lost += sock.lost.total
                    self._socket = None
                sock.close()

    def enqueue(self, logged: Logged, received: float) -> bool:
        """Hand a reported packet to the writer; False (and counted) when the queue is
        full."""
        try:
            self.queue.put_nowait(_Item(logged, received))
            return True
        except queue.Full:
            with self._lock:
                self._dropped += 1
            return False

    def _write_loop(self, stop: threading.Event) -> None:
        budget, window = self.max_per_second * SLICE_S, time.monotonic()
        spent = 0
        pruned = window
        while not (stop.is_set() and self.queue.empty()):
            now = time.monotonic()
            if now - pruned >= REFRESH_S and self._counts:
                pruned = now
                self.prune()
            if now - window >= SLICE_S:
                window, spent = now, 0
            if spent >= budget:
                # Over the node's rate: let the queue fill (and the reader drop).
                time.sleep(max(0.0, window + SLICE_S - now))
                continue
            try:
                items = [self.queue.get(timeout=SLICE_S)]
            except queue.Empty:
                continue
            while len(items) < budget - spent:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            spent += len(items)
            self._write(items)

    def _write(self, items: list[_Item]) -> None:
        lines = []
        for item in items:
            try:
                event = self.event(item.logged, item.received)
            except Exception:  # noqa: BLE001 - one odd packet must not stop the events
                log.exception("refused-flow events: cannot describe a reported packet")
                continue
            if event is not None:
                lines.append(json.dumps(event, separators=(",", ":")))
        if not lines:
            return
        try:
            self.log.append(lines)
        except OSError as exc:
            with self._lock:
                self._dropped += len(lines)
                self._write_errors += 1
            if self._write_errors in (1, 10, 100) or self._write_errors % 1000 == 0:
                log.error("refused-flow events: cannot write %s: %s (%d failed writes)",
                          events_path(self.state_dir), exc, self._write_errors)

    # --- one event ---
    def event(self, logged: Logged, received: float) -> dict | None:
        """The event line of a reported packet (see event_log's schema), counted for
        the metrics; None for a report that isn't sockgate's or no IP packet."""
        if not logged.prefix.startswith(EVENT_PREFIX):
            return None
        reason = logged.prefix[len(EVENT_PREFIX):]
        parsed = parse_headers(logged.payload)
        if parsed is None:
            return None
        family, pkt = parsed
        side = EVENT_REASONS.get(reason, ("iif", ""))[0]
        index = logged.outdev if side == "oif" else logged.indev
        att = self.attachments.get(index) if index else None
        decided = self._refusals_now().decide(reason, pkt, self._pools_for(reason, pkt.destination))
        labels = att.labels if att else {}
        pod = att.pod if att else None
        key = (att.network if att else "", att.container_id if att else "", att.ifname if att else "",
               labels.get("pod_namespace", ""), labels.get("pod_name", ""), labels.get("container_name", ""), reason)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        return {"time": fmt_time(logged.timestamp or received), "network": att.network if att else None,
                "container_id": att.container_id if att else None, "pod": pod,
                "container_name": labels.get("container_name") or None,
                "ifname": att.host_ifname if att else _ifname(index), "family": family,
                "protocol": pkt.protocol, "source": pkt.source, "source_port": pkt.source_port,
                "destination": pkt.destination, "port": pkt.port, "reason": reason,
                "rule": decided.rule, "element": decided.element}

    def prune(self) -> None:
        """Forget the counts of attachments that are gone (their series end)."""
        try:
            self.attachments.refresh()
        except OSError as exc:
            log.warning("refused-flow events: cannot list the attachments: %s", exc)
            return
        alive = self.attachments.keys()
        with self._lock:
            for key in [k for k in self._counts if k[1] and k[:3] not in alive]:
                del self._counts[key]

    def _refusals_now(self) -> Refusals:
        """For the policy in force now: asked for each event (the agent's compiled
        policy is cached; asking costs two stats), so that a line written right after
        a policy change names the new limits. A policy that can't be had (an invalid
        file, no ranges cache) is asked for again at most every POLICY_REFRESH_S."""
        now = time.monotonic()
        if self._refusals is not None and self._refusals[0] is None and now - self._policy_at < POLICY_REFRESH_S:
            return self._refusals[1]
        self._policy_at = now
        compiled = None
        if self.policy is not None:
            try:
                compiled = self.policy()
            except Exception as exc:  # noqa: BLE001 - an invalid file: words without elements
                log.debug("refused-flow events: no compiled policy (%s)", exc)
        if self._refusals is None or self._refusals[0] is not compiled:
            self._refusals = (compiled, Refusals(compiled))
        return self._refusals[1]

    def _pools_for(self, reason: str, destination: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        if reason != "container-pool" or self.pools_source is None:
            return self._pools
        addr = ipaddress.ip_address(destination)
        now = time.monotonic()
        if not any(addr in p for p in self._pools if p.version == addr.version) and now - self._pools_at > \
                POLICY_REFRESH_S:
            self._pools_at = now
            try:
                self._pools = [ipaddress.ip_network(p) for p in self.pools_source()]
            except Exception as exc:  # noqa: BLE001 - the element is then unknown
                log.debug("refused-flow events: cannot read the pools (%s)", exc)
        return self._pools
