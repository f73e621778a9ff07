"""Idle reclaim (C10): a container flow that saw no packet for the idle timeout loses its
conntrack entry *and* its socket inside the container. Acts on conntrack DESTROY events
(the table's ct timeouts keep time) and on sweeps (periodic, and after lost events); an active flow is
never reclaimed, and sockets are matched exactly and destroyed by their cookie.

Design notes: docs/reclaim.md; operator's view: README, "Idle reclaim".
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pyroute2.netlink.marshal import Marshal
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK, NFNL_SUBSYS_NFTABLES, NFNLGRP_CONNTRACK_DESTROY
from pyroute2.netlink.nfnetlink.nfctsocket import (
    IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW,
    IPS_ASSURED,
    AsyncNFCTSocket,
    NFCTAttrTuple,
)
from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_GETOBJ, NFT_MSG_NEWOBJ

from netpolicy.ruleset import TABLE
from runtime import defaults, netns
from runtime.rtnl import attributes, messages
from runtime.store import attachments
from runtime.errors import SockgateError
from runtime.fsutil import atomic_write_json
from runtime.store import Attachment

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
_CT_NEW_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW     # also a GET's answer
_NFGENMSG_LEN = 4
CTA_TUPLE_ORIG, CTA_STATUS, CTA_ID, CTA_STATUS_MASK = 1, 3, 12, 26
IPS_SRC_NAT = 0x10
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
# A dump filtered on this mark returns (practically) nothing but still evicts expired entries.
_NUDGE_MARK = 0x5C1A1DE5

# nf_tables objects (include/uapi/linux/netfilter/nf_tables.h, nfnetlink_cttimeout.h)
_NFT_NEWOBJ_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ
NFPROTO_INET = 1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_CT_TIMEOUT = 7
NFTA_CT_TIMEOUT_L4PROTO, NFTA_CT_TIMEOUT_DATA = 2, 3
CTA_TIMEOUT_UDP_REPLIED = 2

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


@dataclass(frozen=True)
class CtEntry:
    """What a conntrack GET says about a live entry."""

    status: int              # CTA_STATUS: IPS_* bits

    @property
    def assured(self) -> bool:
        """UDP: replied and active for more than 2 s, i.e. under the idle timeout."""
        return bool(self.status & IPS_ASSURED)


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


def parse_ct_status(payload: bytes) -> int | None:
    """CTA_STATUS of a ctnetlink message (payload after the netlink header)."""
    for kind, value in attributes(payload[_NFGENMSG_LEN:]):
        if kind == CTA_STATUS and len(value) >= 4:
            return struct.unpack_from("!I", value)[0]
    return None


def parse_unmasqueraded(payload: bytes, sources: set[str]) -> bytes | None:
    """The CTA_TUPLE_ORIG (and CTA_ID) attributes, ready for a DELETE, of a dumped
    entry whose original source is one of `sources` and that was not source-NATed;
    None for any other entry."""
    attrs = dict(attributes(payload[_NFGENMSG_LEN:]))
    status = attrs.get(CTA_STATUS, b"")
    if len(status) < 4 or struct.unpack_from("!I", status)[0] & IPS_SRC_NAT:
        return None
    orig = attrs.get(CTA_TUPLE_ORIG)
    if orig is None:
        return None
    ip = dict(attributes(dict(attributes(orig)).get(CTA_TUPLE_IP, b"")))
    if CTA_IP_V4_SRC in ip:
        src = socket.inet_ntop(socket.AF_INET, ip[CTA_IP_V4_SRC])
    elif CTA_IP_V6_SRC in ip:
        src = socket.inet_ntop(socket.AF_INET6, ip[CTA_IP_V6_SRC])
    else:
        return None
    if src not in sources:
        return None
    ident = _nla(CTA_ID, attrs[CTA_ID]) if CTA_ID in attrs else b""
    return _nla(CTA_TUPLE_ORIG, orig) + ident


def parse_udp_idle_timeout(payload: bytes) -> int | None:
    """The `replied` timeout (s) of an nf_tables ct timeout object for UDP (payload of
    an NFT_MSG_NEWOBJ message); None for any other object."""
    attrs = dict(attributes(payload[_NFGENMSG_LEN:]))
    if attrs.get(NFTA_OBJ_TYPE, b"")[:4] != struct.pack("!I", NFT_OBJECT_CT_TIMEOUT):
        return None
    data = dict(attributes(attrs.get(NFTA_OBJ_DATA, b"")))
    if data.get(NFTA_CT_TIMEOUT_L4PROTO, b"")[:1] != bytes([socket.IPPROTO_UDP]):
        return None
    for kind, value in attributes(data.get(NFTA_CT_TIMEOUT_DATA, b"")):
        if kind == CTA_TIMEOUT_UDP_REPLIED and len(value) >= 4:
            return struct.unpack_from("!I", value)[0]
    return None


def _nl_header(length: int, mtype: int, flags: int, seq: int) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + length, mtype, flags, seq, 0)


def _nla(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    return (struct.pack("=HH", 4 + len(value), kind) + value).ljust((4 + len(value) + 3) & ~3, b"\0")


def ct_tuple_orig(flow: Flow) -> bytes:
    """The CTA_TUPLE_ORIG attribute of a flow, as a GET request carries it. Built by
    hand: pyroute2's encoder takes ~90 us per message, ten times the request itself,
    and a sweep asks about every container socket."""
    v6 = flow.family == socket.AF_INET6
    src, dst = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if v6 else (CTA_IP_V4_SRC, CTA_IP_V4_DST)
    ip = (_nla(src, socket.inet_pton(flow.family, flow.src)) + _nla(dst, socket.inet_pton(flow.family, flow.dst)))
    proto = (_nla(CTA_PROTO_NUM, bytes([flow.proto])) + _nla(CTA_PROTO_SRC_PORT, struct.pack("!H", flow.sport))
             + _nla(CTA_PROTO_DST_PORT, struct.pack("!H", flow.dport)))
    return _nla(CTA_TUPLE_ORIG, _nla(CTA_TUPLE_IP, ip) + _nla(CTA_TUPLE_PROTO, proto))


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

    def _request(self, body: bytes, mtype: int, flags: int, family: int,
                 subsys: int = NFNL_SUBSYS_CTNETLINK) -> int:
        self.seq += 1
        nfgen = struct.pack("=BBH", family, 0, 0)
        self.sock.send(_nl_header(len(nfgen) + len(body), (subsys << 8) | mtype,
                                  NLM_F_REQUEST | flags, self.seq) + nfgen + body)
        return self.seq

    def _wait(self, seq: int, until_done: bool, on_message: Callable[[int, bytes], None] | None = None) -> int:
        """Read replies to `seq` (other messages go to on_message); returns 0 or the
        errno of the request."""
        while True:
            data = self.sock.recv(1 << 16)
            for mtype, mseq, payload in messages(data):
                if mseq != seq:
                    continue
                if mtype == NLMSG_ERROR:
                    return _nl_error(payload)
                if mtype == NLMSG_DONE and until_done:
                    return 0
                if on_message is not None:
                    on_message(mtype, payload)

    def get(self, flow: Flow) -> CtEntry | None:
        """Conntrack's entry with this tuple (in either direction), None when there is
        none. Raises OSError when the kernel gave no definite answer."""
        body = ct_tuple_orig(flow)
        found: list[int] = []

        def entry(mtype: int, payload: bytes) -> None:
            if mtype == _CT_NEW_TYPE:
                found.append(parse_ct_status(payload) or 0)
        err = self._wait(self._request(body, IPCTNL_MSG_CT_GET, NLM_F_ACK, flow.family), False, entry)
        if err == errno.ENOENT:
            return None
        if err:
            raise OSError(err, os.strerror(err))
        # The entry comes before the ACK; an ACK alone (never seen) would still mean "exists".
        return CtEntry(found[0] if found else 0)

    def exists(self, flow: Flow) -> bool | None:
        """Whether conntrack has an entry with this tuple (in either direction); None
        when the kernel didn't give a definite answer."""
        try:
            return self.get(flow) is not None
        except OSError as exc:
            log.warning("conntrack lookup of %s failed: %s", flow, exc)
            return None

    def udp_idle_timeouts(self, table: str = TABLE) -> list[int] | None:
        """The `replied` timeouts (s) of the UDP ct timeout objects in nft table `inet
        <table>`, i.e. the UDP idle timeouts in force (old objects stay while old flows
        use them); None when they can't be read (no table, no nf_tables)."""
        body = _nla(NFTA_OBJ_TABLE, table.encode() + b"\0") + _nla(NFTA_OBJ_TYPE, struct.pack("!I", NFT_OBJECT_CT_TIMEOUT))
        found: list[int] = []

        def obj(mtype: int, payload: bytes) -> None:
            if mtype == _NFT_NEWOBJ_TYPE:
                value = parse_udp_idle_timeout(payload)
                if value is not None:
                    found.append(value)
        try:
            err = self._wait(self._request(body, NFT_MSG_GETOBJ, NLM_F_DUMP, NFPROTO_INET, NFNL_SUBSYS_NFTABLES),
                             True, obj)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err:
            log.debug("can't read the ct timeout objects of table inet %s: %s", table, os.strerror(err))
            return None
        return found

    def purge_unmasqueraded(self, sources: set[str]) -> int:
        """Delete the entries of flows from `sources` (containers' addresses) that were
        not masqueraded: flows a container opened while sockgate's table was missing
        (a flush, until the reload). They went out unfiltered with the container's own
        address and without sockgate's idle timeout, and would otherwise live on,
        accepted as established by the reloaded rules, for the kernel's 5 days.
        Returns how many were deleted; -1 when the dump failed."""
        # The kernel drops the masqueraded ones itself (status filter, Linux >= 5.19).
        body = _nla(CTA_STATUS, struct.pack("!I", 0)) + _nla(CTA_STATUS_MASK, struct.pack("!I", IPS_SRC_NAT))
        victims: list[tuple[int, bytes]] = []

        def entry(mtype: int, payload: bytes) -> None:
            if mtype == _CT_NEW_TYPE:
                found = parse_unmasqueraded(payload, sources)
                if found is not None:
                    victims.append((payload[0], found))
        try:
            err = self._wait(self._request(body, IPCTNL_MSG_CT_GET, NLM_F_DUMP, socket.AF_UNSPEC), True, entry)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err:
            log.warning("conntrack dump for flows that escaped masquerading failed: %s", os.strerror(err))
            return -1
        deleted = 0
        for family, attrs in victims:
            try:
                if self._wait(self._request(attrs, IPCTNL_MSG_CT_DELETE, NLM_F_ACK, family), False) == 0:
                    deleted += 1
            except OSError:
                continue  # gone meanwhile, or no answer: the next reload's purge tries again
        return deleted

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

    @property
    def cookie(self) -> bytes:
        """The kernel's id of this socket (inet_diag_sockid.idiag_cookie): a socket
        closed and another opened on the same ports differ in it."""
        return self.sid[40:48]


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
        self._marshal = _marshal()
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
        events = _events_socket(self.rcvbuf)
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
               diag: _Diag | None = None, sock: _Sock | None = None) -> Reclaim | None:
        """Find the flow's socket (or take `sock`, already found) and destroy it; with
        `diag`, the caller is already in the container's netns."""
        def body() -> tuple[_Sock | None, int]:
            d = diag or _Diag()
            try:
                s = sock or _find(d, flow)
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
                n, watch[key] = netns.in_netns(
                    att.netns, lambda att=att, before=before: self._sweep_container(ct, att, before))
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
        own = {ipaddress.ip_address(a) for a in (att.ipv4, att.ipv6) if a}

        def through_node(proto: int, s: _Sock) -> Flow | None:
            local, remote = ipaddress.ip_address(s.local[0]), ipaddress.ip_address(s.remote[0])
            if local not in own or remote in own:
                return None     # not through the node (loopback, another interface)
            return Flow(proto, s.local[0], s.local[1], s.remote[0], s.remote[1])

        def lookup(flow: Flow) -> CtEntry | None:
            try:
                return ct.get(flow)
            except OSError as exc:
                log.warning("conntrack lookup of %s failed: %s", flow, exc)
                raise

        n = 0
        d = _Diag()
        try:
            udp: dict[tuple[Flow, bytes], _Sock] = {}
            for fam in (socket.AF_INET, socket.AF_INET6):
                for s in d.dump(fam, socket.IPPROTO_TCP, 1 << TCP_ESTABLISHED):
                    flow = through_node(socket.IPPROTO_TCP, s)
                    if flow is not None and ct.exists(flow) is False and self._abort(att, flow, "sweep", diag=d):
                        n += 1
                # Connected UDP sockets (sock_diag reports them as ESTABLISHED).
                for s in d.dump(fam, socket.IPPROTO_UDP, 1 << TCP_ESTABLISHED):
                    flow = through_node(socket.IPPROTO_UDP, s)
                    if flow is not None:
                        udp[(flow, s.cookie)] = s
            expired, watch = sweep_udp(udp_watched, udp, lookup)
            for flow, cookie in expired:
                if self._abort(att, flow, "sweep", diag=d, sock=udp[(flow, cookie)]):
                    n += 1
        finally:
            d.close()
        return n, watch


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
