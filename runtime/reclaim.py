"""Idle reclaim (C10): a container flow that saw no packet for the idle timeout loses its
conntrack entry *and* its socket inside the container.

The kernel keeps time. The table gives every new container flow a ct timeout object
(`idle_tcp_<N>`: established N s, `idle_udp_<N>`: replied N s), so an idle flow's entry
expires by itself; its DESTROY event is what this module acts on. Conntrack counts from
the last packet in either direction, so any activity restarts the clock, and an active
flow never expires.

Deleting the entry alone doesn't end a TCP connection (nf_conntrack_tcp_loose=1 would
pick it up again; the table's SYN-only rule now refuses that, but the app would only
learn on its next send, and never if it only reads). So for each DESTROY event of a
flow whose original source is a container address and that died idle, the socket is
aborted inside the container's netns with sock_diag SOCK_DESTROY (what `ss -K` does):
the app's blocked or next recv/send fails with ECONNABORTED.

- TCP: only entries destroyed in state ESTABLISHED (a closed connection passes through
  FIN_WAIT/CLOSE_WAIT/TIME_WAIT/CLOSE first and is left alone).
- UDP: only entries with IPS_ASSURED. The kernel applies the `replied` timeout only
  once a flow has been active for 2 s; a short exchange (one query, one answer) keeps
  the kernel's `unreplied` timeout (30 s by default), so its entry dying says nothing
  about 10 minutes of idleness. Its socket keeps working; a later datagram starts a
  new flow.
- Who deleted it: a DESTROY the kernel sent on its own behalf (timeout, GC) carries
  netlink port id 0; one caused by a process (`conntrack -D`, `-F`) carries that
  process' port id. A TCP flow deleted that way is dead anyway (the SYN-only rule
  resets its next packet), so its socket is aborted too, so the app learns now; it is
  logged as "deleted" and not counted as an idle reclaim. A UDP flow deleted that way
  is left alone (its next datagram simply starts a new flow).

Sockets are matched exactly (protocol, local address and port, remote address and
port; v4-mapped IPv6 sockets too) and destroyed by their sock_diag cookie, so a
listener or an unconnected UDP socket that shares the local port is never hit.

Why sock_diag in-process rather than `nsenter … ss -K`: no fork and exec per reclaim
(a mass expiry can mean thousands), a definite answer (ENOENT: no such socket,
EOPNOTSUPP: kernel without CONFIG_INET_DIAG_DESTROY) instead of parsing ss's output,
and exact matching by cookie instead of ss's filter language. The socket is reached
from a thread that joined the container's netns (runtime.netns.in_netns).

Timeliness. The kernel's conntrack GC evicts an expired entry up to 60 s late
(GC_SCAN_INTERVAL_MAX; measured here: 60.1 s), so by default a flow is reclaimed
between N and N + 60 s after its last packet, which is what C10 asks ("may be
reclaimed"). A conntrack dump evicts every expired entry it walks past, so with
`nudge_interval` > 0 the reclaimer runs a dump that matches nothing that often, and
reclaim follows within about that long (measured with 1 s and N = 3: 3.3-4.0 s after
the last packet). Off by default: each walk covers the whole conntrack hash (every
netns's; expired entries anywhere are evicted, as the GC would do) with softirqs off on
that CPU: 12 ms for the 262144 buckets of an empty table here, more for a full one.

Lost events. A full receive buffer drops events (ENOBUFS): logged, counted, and a
sweep runs at once. A sweep also runs at start and every `sweep_interval` s: it lists
each container's established TCP sockets and aborts those whose conntrack entry is
gone. That also covers flows that expired while the reclaimer wasn't running, and flows
created while nobody listened (with net.netfilter.nf_conntrack_events=2 such entries
never produce events at all). UDP has no such check: a connected UDP socket without
an entry may simply not have sent anything yet.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2.netlink.marshal import Marshal
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK, NFNLGRP_CONNTRACK_DESTROY
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPS_ASSURED,
    AsyncNFCTSocket,
    NFCTAttrTuple,
    nfct_msg,
)

from runtime import netns
from runtime.rtnl import messages
from runtime.attach import all_attachments
from runtime.errors import SockgateError
from runtime.fsutil import atomic_write_json
from runtime.store import Attachment

log = logging.getLogger(__name__)

DEFAULT_NUDGE_INTERVAL = 0.0     # leave eviction to the kernel GC (see above)
DEFAULT_SWEEP_INTERVAL = 300.0
RCVBUF = 8 << 20
MISS_REFRESH = 1.0      # re-read attachment records at most this often on an unknown source
MAP_MAX_AGE = 30.0      # and at least this often, so a reused address maps to its new owner

# netlink
NETLINK_NETFILTER = 12
NETLINK_SOCK_DIAG = 4
SOL_NETLINK = 270
SO_RCVBUFFORCE = 33     # not in Python's socket module
NETLINK_ADD_MEMBERSHIP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
_NLMSGHDR = struct.Struct("=IHHII")

# ctnetlink
TCP_CONNTRACK_ESTABLISHED = 3
_CT_DESTROY_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
# A dump filtered on this mark returns (practically) nothing but still evicts expired entries.
_NUDGE_MARK = 0x5C1A1DE5

# sock_diag
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
INET_DIAG_INFO = 2
TCP_ESTABLISHED = 1
# ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING (include/net/tcp_states.h)
_TCP_SYNCHRONIZED = frozenset({1, 4, 5, 8, 9, 11})
_NOCOOKIE = b"\xff" * 8
_DIAG_REQ = struct.Struct("=BBBxI")          # family, protocol, ext, states
_DIAG_ID = struct.Struct("!HH16s16s")        # sport, dport, src, dst (then if, cookie)
_DIAG_MSG_LEN = 72                           # struct inet_diag_msg
# tcp_info: tcpi_last_data_sent, _last_ack_sent, _last_data_recv, _last_ack_recv (ms ago)
_TCPI_LAST = struct.Struct("=IIII")
_TCPI_LAST_OFFSET = 44

PROTOS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}

ContainerKey = tuple[str, str, str]          # (network, container id, ifname), as in metrics


@dataclass(frozen=True)
class Flow:
    """A flow as the container sees it: its own address is src (the original tuple)."""

    proto: int
    src: str
    sport: int
    dst: str
    dport: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.src else socket.AF_INET

    def __str__(self) -> str:
        def hp(a: str, p: int) -> str:
            return f"[{a}]:{p}" if ":" in a else f"{a}:{p}"
        return f"{PROTOS.get(self.proto, self.proto)} {hp(self.src, self.sport)} -> {hp(self.dst, self.dport)}"


@dataclass(frozen=True)
class Destroyed:
    """One conntrack DESTROY event, the fields reclaim decides on."""

    flow: Flow
    status: int
    tcp_state: int | None
    portid: int              # 0: the kernel (timeout, GC); else the netlink port of the deleter
    nat: str = ""            # the flow's public side, "addr:port" (reply tuple's destination)


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


# --- ctnetlink ------------------------------------------------------------------------

def _marshal() -> Marshal:
    m = Marshal()
    m.msg_map.update(AsyncNFCTSocket.policy)
    return m


def _tuple(msg, name: str, family: int) -> NFCTAttrTuple | None:
    t = msg.get_attr(name)
    return NFCTAttrTuple.from_netlink(family, t) if t is not None else None


def parse_destroy(msg) -> Destroyed | None:
    """A decoded ctnetlink message -> Destroyed, for TCP and UDP; None otherwise.
    (pyroute2's ConntrackEntry can't be used: a DESTROY event's TCP protoinfo carries
    only the state, without the flags it expects.)"""
    if msg["header"]["type"] != _CT_DESTROY_TYPE:
        return None
    family = msg["nfgen_family"]
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    orig = _tuple(msg, "CTA_TUPLE_ORIG", family)
    if orig is None or orig.proto not in PROTOS or orig.sport is None:
        return None
    reply = _tuple(msg, "CTA_TUPLE_REPLY", family)
    state = None
    info = msg.get_attr("CTA_PROTOINFO")
    tcp = info.get_attr("CTA_PROTOINFO_TCP") if info is not None else None
    if tcp is not None:
        state = tcp.get_attr("CTA_PROTOINFO_TCP_STATE")
    nat = ""
    if reply is not None:
        nat = f"[{reply.daddr}]:{reply.dport}" if ":" in str(reply.daddr) else f"{reply.daddr}:{reply.dport}"
    return Destroyed(Flow(orig.proto, str(orig.saddr), orig.sport, str(orig.daddr), orig.dport),
                     status=msg.get_attr("CTA_STATUS") or 0, tcp_state=state,
                     portid=msg["header"]["pid"], nat=nat)


def _nl_header(length: int, mtype: int, flags: int, seq: int) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + length, mtype, flags, seq, 0)


def _nl_error(payload: bytes) -> int:
    return -struct.unpack_from("=i", payload)[0]


class Conntrack:
    """Requests to ctnetlink in the netns this object was created in (the node's)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.settimeout(10)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _request(self, body: bytes, mtype: int, flags: int, family: int) -> int:
        self.seq += 1
        nfgen = struct.pack("=BBH", family, 0, 0)
        self.sock.send(_nl_header(len(nfgen) + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | mtype,
                                  NLM_F_REQUEST | flags, self.seq) + nfgen + body)
        return self.seq

    def _wait(self, seq: int, until_done: bool) -> int:
        """Read replies to `seq`; returns 0 or the errno of the request."""
        while True:
            data = self.sock.recv(1 << 16)
            for mtype, mseq, payload in messages(data):
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    return _nl_error(payload)
                if mtype == NLMSG_DONE and until_done:
                    return 0

    def exists(self, flow: Flow) -> bool | None:
        """Whether conntrack has an entry with this tuple (in either direction); None
        when the kernel didn't give a definite answer."""
        msg = nfct_msg.create_from(tuple_orig=NFCTAttrTuple(
            family=flow.family, saddr=flow.src, daddr=flow.dst, proto=flow.proto,
            sport=flow.sport, dport=flow.dport))
        msg.encode()
        body = bytes(msg.data[_NLMSGHDR.size + 4:])     # attributes only
        try:
            err = self._wait(self._request(body, IPCTNL_MSG_CT_GET, NLM_F_ACK, flow.family), False)
        except OSError as exc:
            log.warning("conntrack lookup of %s failed: %s", flow, exc)
            return None
        if err == 0:
            return True
        if err == errno.ENOENT:
            return False
        log.warning("conntrack lookup of %s failed: %s", flow, os.strerror(err))
        return None

    def nudge(self) -> None:
        """Walk the conntrack hash with a dump that matches nothing: the walk evicts
        expired entries (their DESTROY events follow) long before the GC would."""
        body = (struct.pack("=HHI", 8, 8, socket.htonl(_NUDGE_MARK))      # CTA_MARK
                + struct.pack("=HHI", 8, 21, 0xFFFFFFFF))                # CTA_MARK_MASK
        try:
            err = self._wait(self._request(body, IPCTNL_MSG_CT_GET, NLM_F_DUMP, socket.AF_UNSPEC), True)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err:
            log.warning("conntrack nudge failed: %s", os.strerror(err))


def _events_socket(rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)   # root may exceed rmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((0, 0))
    sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_DESTROY)
    sock.setblocking(False)
    return sock


# --- sock_diag, run inside the container's netns ---------------------------------------

@dataclass(frozen=True)
class _Sock:
    family: int
    state: int
    sid: bytes               # the inet_diag_sockid as the kernel sent it (with the cookie)
    local: tuple[str, int]
    remote: tuple[str, int]
    idle: float | None


def _unmap(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped or addr)


def _pack_addr(addr: str) -> bytes:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return socket.inet_pton(fam, addr).ljust(16, b"\0")


def _parse_diag(payload: bytes) -> _Sock:
    family, state = payload[0], payload[1]
    sid = payload[4:52]
    sport, dport, src, dst = _DIAG_ID.unpack_from(sid)
    idle = None
    off = _DIAG_MSG_LEN
    while off + 4 <= len(payload):
        alen, atype = struct.unpack_from("=HH", payload, off)
        if alen < 4:
            break
        if atype == INET_DIAG_INFO and alen - 4 >= _TCPI_LAST_OFFSET + _TCPI_LAST.size:
            sent, _ack_sent, recv, ack_recv = _TCPI_LAST.unpack_from(payload, off + 4 + _TCPI_LAST_OFFSET)
            idle = min(sent, recv, ack_recv) / 1000
        off += (alen + 3) & ~3
    return _Sock(family, state, sid, (_unmap(family, src), sport), (_unmap(family, dst), dport), idle)


class _Diag:
    """A NETLINK_SOCK_DIAG socket of the netns of the thread that creates it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        self.sock.bind((0, 0))
        self.sock.settimeout(10)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def _send(self, mtype: int, flags: int, family: int, proto: int, states: int, ext: int, sid: bytes) -> int:
        self.seq += 1
        body = _DIAG_REQ.pack(family, proto, ext, states) + sid
        self.sock.send(_nl_header(len(body), mtype, NLM_F_REQUEST | flags, self.seq) + body)
        return self.seq

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        while True:
            data = self.sock.recv(1 << 17)
            for mtype, mseq, payload in messages(data):
                if mseq != seq:
                    continue
                yield mtype, payload
                if mtype in (NLMSG_DONE, NLMSG_ERROR):
                    return

    def dump(self, family: int, proto: int, states: int) -> list[_Sock]:
        seq = self._send(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, family, proto, states,
                         1 << (INET_DIAG_INFO - 1), b"\0" * 40 + _NOCOOKIE)
        out = []
        for mtype, payload in self._replies(seq):
            if mtype == SOCK_DIAG_BY_FAMILY:
                out.append(_parse_diag(payload))
            elif mtype == NLMSG_ERROR and _nl_error(payload):
                raise OSError(_nl_error(payload), os.strerror(_nl_error(payload)))
        return out

    def get_tcp(self, flow: Flow) -> _Sock | None:
        """The TCP socket with exactly this 4-tuple (the lookup is the kernel's own hash
        lookup; it may answer with a listener or a TIME_WAIT socket, checked by the caller)."""
        sid = (_DIAG_ID.pack(flow.sport, flow.dport, _pack_addr(flow.src), _pack_addr(flow.dst))
               + struct.pack("=I", 0) + _NOCOOKIE)
        seq = self._send(SOCK_DIAG_BY_FAMILY, 0, flow.family, socket.IPPROTO_TCP, 0xFFFFFFFF,
                         1 << (INET_DIAG_INFO - 1), sid)
        for mtype, payload in self._replies(seq):
            if mtype == SOCK_DIAG_BY_FAMILY:
                return _parse_diag(payload)
            if mtype == NLMSG_ERROR:
                err = _nl_error(payload)
                if err in (0, errno.ENOENT):
                    return None
                raise OSError(err, os.strerror(err))
        return None

    def destroy(self, proto: int, s: _Sock) -> int:
        """SOCK_DESTROY by the socket's own id and cookie: 0 or an errno."""
        seq = self._send(SOCK_DESTROY, NLM_F_ACK, s.family, proto, 0xFFFFFFFF, 0, s.sid)
        for mtype, payload in self._replies(seq):
            if mtype == NLMSG_ERROR:
                return _nl_error(payload)
        return errno.EIO


def _matches(s: _Sock, flow: Flow) -> bool:
    return s.local == (flow.src, flow.sport) and s.remote == (flow.dst, flow.dport)


def _find(diag: _Diag, flow: Flow) -> _Sock | None:
    if flow.proto == socket.IPPROTO_TCP:
        s = diag.get_tcp(flow)
        # A connection conntrack saw established: never a listener or a TIME_WAIT socket.
        return s if s is not None and s.state in _TCP_SYNCHRONIZED and _matches(s, flow) else None
    # UDP: only connected sockets (state ESTABLISHED) whose peer is the flow's; an
    # unconnected socket sharing the port talks to other peers too. (The kernel's exact
    # lookup would answer with such a wildcard socket, hence a dump.)
    families = (socket.AF_INET, socket.AF_INET6) if flow.family == socket.AF_INET else (socket.AF_INET6,)
    for fam in families:
        for s in diag.dump(fam, socket.IPPROTO_UDP, 1 << TCP_ESTABLISHED):
            if _matches(s, flow):
                return s
    return None


# --- the reclaimer ---------------------------------------------------------------------

class Reclaimer:
    """Runs in the node's netns (the process' own): conntrack events come from there;
    container sockets are reached through the netns paths of the attachment records."""

    def __init__(self, state_dir: str, *, nudge_interval: float = DEFAULT_NUDGE_INTERVAL,
                 sweep_interval: float = DEFAULT_SWEEP_INTERVAL,
                 on_reclaim: Callable[[Reclaim], None] | None = None, rcvbuf: int = RCVBUF) -> None:
        self.state_dir = state_dir
        self.rcvbuf = rcvbuf
        self.nudge_interval = nudge_interval
        self.sweep_interval = sweep_interval
        self.on_reclaim = on_reclaim
        self._lock = threading.Lock()
        self._counts: Counter[ContainerKey] = Counter()
        self._stats: Counter[str] = Counter()
        self._by_addr: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, Attachment] = {}
        self._loaded_at = float("-inf")
        self._marshal = _marshal()
        self._warned_destroy = False

    # -- what others read (any thread) --
    def counts(self) -> dict[ContainerKey, int]:
        """Idle flows reclaimed, per (network, container id, ifname)."""
        with self._lock:
            return dict(self._counts)

    def stats(self) -> dict[str, int]:
        """Totals: events (DESTROY events seen), reclaimed (counted reclaims), deleted,
        ignored:<why>, no_socket, abort_failed, lost_events (overruns), sweeps, errors."""
        with self._lock:
            return dict(self._stats)

    def _bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    # -- attachments --
    def _refresh(self) -> None:
        by_addr = {}
        for att in all_attachments(self.state_dir):
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
        events = _events_socket(self.rcvbuf)
        ct = Conntrack()
        try:
            log.info("idle reclaim: listening for conntrack DESTROY events (nudge every %s s, sweep every %s s)",
                     self.nudge_interval or "-", self.sweep_interval or "-")
            # Subscribed first, swept second: nothing falls between the two.
            self.sweep(ct, "start")
            now = time.monotonic()
            next_nudge = now + self.nudge_interval if self.nudge_interval > 0 else float("inf")
            next_sweep = now + self.sweep_interval if self.sweep_interval > 0 else float("inf")
            while not stop.is_set():
                wait = max(0.0, min(0.5, next_nudge - now, next_sweep - now))
                lost = False
                if select.select([events], [], [], wait)[0]:
                    lost = not self._drain(events)
                now = time.monotonic()
                if now >= next_nudge:
                    ct.nudge()
                    next_nudge = now + self.nudge_interval
                if lost or now >= next_sweep:
                    self.sweep(ct, "lost events" if lost else "periodic")
                    now = time.monotonic()
                    next_sweep = now + self.sweep_interval if self.sweep_interval > 0 else float("inf")
        finally:
            events.close()
            ct.close()
        log.info("idle reclaim stopped: %s", json.dumps(self.stats(), sort_keys=True))

    def _drain(self, events: socket.socket, budget: int = 256) -> bool:
        """Handle what is queued (at most `budget` datagrams, so nudges, sweeps and stop
        still get their turn). False when the kernel reported lost events."""
        for _ in range(budget):
            try:
                data = events.recv(1 << 16)
            except BlockingIOError:
                return True
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._bump("lost_events")
                    log.warning("conntrack events were lost (receive buffer overrun); sweeping")
                    return False
                raise
            for msg in self._marshal.parse(data):
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
               diag: _Diag | None = None) -> Reclaim | None:
        def body() -> tuple[_Sock | None, int]:
            d = diag or _Diag()
            try:
                s = _find(d, flow)
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
        """Abort every established TCP socket of a container whose conntrack entry is
        gone (see the module doc). Returns how many."""
        self._refresh()
        atts = {(a.network, *a.key): a for a in self._by_addr.values()}.values()
        found = 0
        for att in atts:
            try:
                found += netns.in_netns(att.netns, lambda att=att: self._sweep_container(ct, att))
            except (OSError, SockgateError) as exc:
                log.debug("sweep: container %s/%s unreachable: %s", att.container_id, att.ifname, exc)
        self._bump("sweeps")
        log.log(logging.INFO if found or why != "periodic" else logging.DEBUG,
                "sweep (%s): %d container(s), %d expired socket(s) aborted",
                why, len(atts), found)
        return found

    def _sweep_container(self, ct: Conntrack, att: Attachment) -> int:
        """In the container's netns (ct was opened in the node's)."""
        own = {ipaddress.ip_address(a) for a in (att.ipv4, att.ipv6) if a}
        n = 0
        d = _Diag()
        try:
            for fam in (socket.AF_INET, socket.AF_INET6):
                for s in d.dump(fam, socket.IPPROTO_TCP, 1 << TCP_ESTABLISHED):
                    local, remote = ipaddress.ip_address(s.local[0]), ipaddress.ip_address(s.remote[0])
                    if local not in own or remote in own:
                        continue    # not through the node (loopback, another interface)
                    flow = Flow(socket.IPPROTO_TCP, s.local[0], s.local[1], s.remote[0], s.remote[1])
                    if ct.exists(flow) is False and self._abort(att, flow, "sweep", diag=d):
                        n += 1
        finally:
            d.close()
        return n


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


# --- `python -m runtime.reclaim` ---------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.reclaim",
                                description="Idle reclaim on its own (the node agent runs the same "
                                            "thing). Run it in the node's netns.")
    p.add_argument("--state-dir", default="/var/lib/sockgate", help="the plugin's stateDir")
    p.add_argument("--nudge-interval", type=float, default=DEFAULT_NUDGE_INTERVAL,
                   help="seconds between conntrack walks that evict expired entries (default 0: "
                        "leave it to the kernel GC, up to 60 s late)")
    p.add_argument("--sweep-interval", type=float, default=DEFAULT_SWEEP_INTERVAL,
                   help="seconds between sweeps for sockets whose entry is gone (0: only at start "
                        "and after lost events; default %(default)s)")
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
