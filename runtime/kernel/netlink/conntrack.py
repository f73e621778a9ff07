"""ctnetlink: conntrack's DESTROY events, lookups, dumps and deletes (NETLINK_NETFILTER).

Requests are built here (pyroute2's encoder takes ~90 µs a message, ten times the
request itself, and a sweep asks about every container socket); DESTROY events are
decoded with pyroute2's message classes. Flow is a conntrack original tuple as the
container sees it. A Conntrack works in the netns it was created in.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

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
from runtime.hostport import host_port
from runtime.kernel.netlink.core import (
    NETLINK_NETFILTER,
    NFGENMSG,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    Layout,
    NetlinkSocket,
    attr,
    attr_map,
    attributes,
    be32,
    cstr,
    error_code,
    nfgen,
    u32,
)

log = logging.getLogger(__name__)
# Lookups per datagram in Conntrack.get_many (its docstring says why 64).
GET_CHUNK = 64

TCP_CONNTRACK_ESTABLISHED = 3
CT_DESTROY_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
CT_NEW_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW     # also a GET's answer
# attributes (linux/netfilter/nfnetlink_conntrack.h)
CTA_TUPLE_ORIG, CTA_STATUS, CTA_MARK, CTA_ID, CTA_MARK_MASK, CTA_STATUS_MASK = 1, 3, 8, 12, 21, 26
CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 4, 1, 1
TCP_CONNTRACK_TIME_WAIT, TCP_CONNTRACK_CLOSE = 7, 8
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
IPS_SRC_NAT = 0x10
# A dump filtered on this mark returns (practically) nothing but still evicts expired entries.
NUDGE_MARK = 0x5C1A1DE5

# nf_tables objects (linux/netfilter/nf_tables.h, nfnetlink_cttimeout.h)
NFT_NEWOBJ_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ
NFPROTO_INET = 1
NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE, NFTA_OBJ_DATA = 1, 2, 3, 4
NFT_OBJECT_CT_TIMEOUT = 7
NFTA_CT_TIMEOUT_L4PROTO, NFTA_CT_TIMEOUT_DATA = 2, 3
CTA_TIMEOUT_UDP_REPLIED = 2

_BE32 = Layout(("value", "I"), byteorder="!")

PROTOS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}


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
        return (f"{PROTOS.get(self.proto, self.proto)} {host_port(self.src, self.sport)} -> "
                f"{host_port(self.dst, self.dport)}")


@dataclass(frozen=True)
class Destroyed:
    """One conntrack DESTROY event, the fields reclaim decides on."""

    flow: Flow
    status: int
    tcp_state: int | None
    portid: int              # 0: the kernel (timeout, GC); else the netlink port of the deleter
    nat: str = ""            # the flow's public side, "addr:port" (reply tuple's destination)


@dataclass(frozen=True)
class CtEntry:
    """What a conntrack GET says about a live entry."""

    status: int              # CTA_STATUS: IPS_* bits

    @property
    def assured(self) -> bool:
        """UDP: replied and active for more than 2 s, i.e. under the idle timeout."""
        return bool(self.status & IPS_ASSURED)


# --- parsing ---------------------------------------------------------------------

def _tuple(msg, name: str, family: int) -> NFCTAttrTuple | None:
    t = msg.get_attr(name)
    return NFCTAttrTuple.from_netlink(family, t) if t is not None else None


def parse_destroy(msg) -> Destroyed | None:
    """A decoded ctnetlink message -> Destroyed, for TCP and UDP; None otherwise.
    (pyroute2's ConntrackEntry can't be used: a DESTROY event's TCP protoinfo carries
    only the state, without the flags it expects.)"""
    if msg["header"]["type"] != CT_DESTROY_TYPE:
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
        nat = host_port(reply.daddr, reply.dport)
    return Destroyed(Flow(orig.proto, str(orig.saddr), orig.sport, str(orig.daddr), orig.dport),
                     status=msg.get_attr("CTA_STATUS") or 0, tcp_state=state,
                     portid=msg["header"]["pid"], nat=nat)


def _be32(value: bytes) -> int | None:
    return _BE32.unpack_from(value)[0] if len(value) >= _BE32.size else None


def parse_ct_status(payload: bytes) -> int | None:
    """CTA_STATUS of a ctnetlink message (payload after the netlink header)."""
    for kind, value in attributes(payload[NFGENMSG.size:]):
        if kind == CTA_STATUS and len(value) >= 4:
            return _be32(value)
    return None


def parse_unmasqueraded(payload: bytes, sources: set[str]) -> bytes | None:
    """The CTA_TUPLE_ORIG (and CTA_ID) attributes, ready for a DELETE, of a dumped
    entry whose original source is one of `sources` and that was not source-NATed;
    None for any other entry."""
    attrs = attr_map(payload[NFGENMSG.size:])
    status = _be32(attrs.get(CTA_STATUS, b""))
    if status is None or status & IPS_SRC_NAT:
        return None
    orig = attrs.get(CTA_TUPLE_ORIG)
    if orig is None or _orig_source(orig) not in sources:
        return None
    ident = attr(CTA_ID, attrs[CTA_ID]) if CTA_ID in attrs else b""
    return attr(CTA_TUPLE_ORIG, orig) + ident


def _orig_source(orig: bytes) -> str | None:
    ip = attr_map(attr_map(orig).get(CTA_TUPLE_IP, b""))
    if CTA_IP_V4_SRC in ip:
        return socket.inet_ntop(socket.AF_INET, ip[CTA_IP_V4_SRC])
    if CTA_IP_V6_SRC in ip:
        return socket.inet_ntop(socket.AF_INET6, ip[CTA_IP_V6_SRC])
    return None


@dataclass(frozen=True)
class DumpedEntry:
    source: str      # the original direction's source address
    family: int
    delete: bytes    # CTA_TUPLE_ORIG and CTA_ID, ready for a DELETE
    closing: bool    # TCP in TIME_WAIT or CLOSE: what `ct count` leaves out


def parse_entry(payload: bytes) -> DumpedEntry | None:
    """What the closing trim needs of a dumped entry; None when it has no original tuple."""
    attrs = attr_map(payload[NFGENMSG.size:])
    orig = attrs.get(CTA_TUPLE_ORIG)
    src = _orig_source(orig) if orig is not None else None
    if orig is None or src is None:
        return None
    tcp = attr_map(attr_map(attrs.get(CTA_PROTOINFO, b"")).get(CTA_PROTOINFO_TCP, b""))
    state = tcp.get(CTA_PROTOINFO_TCP_STATE, b"")[:1]
    ident = attr(CTA_ID, attrs[CTA_ID]) if CTA_ID in attrs else b""
    return DumpedEntry(src, payload[NFGENMSG.offset("family")], attr(CTA_TUPLE_ORIG, orig) + ident,
                       state in (bytes([TCP_CONNTRACK_TIME_WAIT]), bytes([TCP_CONNTRACK_CLOSE])))


def parse_udp_idle_timeout(payload: bytes) -> int | None:
    """The `replied` timeout (s) of an nf_tables ct timeout object for UDP (payload of
    an NFT_MSG_NEWOBJ message); None for any other object."""
    attrs = attr_map(payload[NFGENMSG.size:])
    if attrs.get(NFTA_OBJ_TYPE, b"")[:4] != be32(NFT_OBJECT_CT_TIMEOUT):
        return None
    data = attr_map(attrs.get(NFTA_OBJ_DATA, b""))
    if data.get(NFTA_CT_TIMEOUT_L4PROTO, b"")[:1] != bytes([socket.IPPROTO_UDP]):
        return None
    for kind, value in attributes(data.get(NFTA_CT_TIMEOUT_DATA, b"")):
        if kind == CTA_TIMEOUT_UDP_REPLIED and len(value) >= 4:
            return _be32(value)
    return None


def _tuple_layout(addr: int) -> struct.Struct:
    """CTA_TUPLE_ORIG { CTA_TUPLE_IP { SRC, DST }, CTA_TUPLE_PROTO { NUM, SRC_PORT,
    DST_PORT } } for addresses of `addr` bytes, in one pack: built attribute by
    attribute it cost a sweep more than the kernel's answers (8 attributes per
    socket). Attribute headers are host order; the ports are packed as htons()."""
    return struct.Struct(f"=HH HH HH{addr}s HH{addr}s HH HHB3x HHH2x HHH2x")


_TUPLE: dict[int, struct.Struct] = {socket.AF_INET: _tuple_layout(4), socket.AF_INET6: _tuple_layout(16)}
_PROTO_NEST = 4 + 8 + 8 + 8     # its header, then three attributes padded to 8 bytes


def ct_tuple_orig(flow: Flow) -> bytes:
    """The CTA_TUPLE_ORIG attribute of a flow, as a GET request carries it."""
    family = flow.family
    v6 = family == socket.AF_INET6
    a = 16 if v6 else 4
    ip_nest = 4 + 2 * (4 + a)
    src, dst = (CTA_IP_V6_SRC, CTA_IP_V6_DST) if v6 else (CTA_IP_V4_SRC, CTA_IP_V4_DST)
    return _TUPLE[family].pack(
        4 + ip_nest + _PROTO_NEST, CTA_TUPLE_ORIG,
        ip_nest, CTA_TUPLE_IP,
        4 + a, src, socket.inet_pton(family, flow.src), 4 + a, dst, socket.inet_pton(family, flow.dst),
        _PROTO_NEST, CTA_TUPLE_PROTO,
        5, CTA_PROTO_NUM, flow.proto,
        6, CTA_PROTO_SRC_PORT, socket.htons(flow.sport), 6, CTA_PROTO_DST_PORT, socket.htons(flow.dport))


# --- requests --------------------------------------------------------------------

class Conntrack(NetlinkSocket):
    """Requests to ctnetlink in the netns this object was created in (the node's)."""

    PROTOCOL = NETLINK_NETFILTER

    def __init__(self) -> None:
        super().__init__(timeout=10)

    def _call(self, body: bytes, mtype: int, flags: int, family: int, subsys: int = NFNL_SUBSYS_CTNETLINK,
              on_message: Callable[[int, bytes], None] | None = None) -> int:
        """Send one request and read its answers (each to on_message); returns 0 or
        the errno of the request."""
        seq = self.request((subsys << 8) | mtype, NLM_F_REQUEST | flags, nfgen(family) + body)
        for kind, payload in self.replies(seq):
            if kind == NLMSG_ERROR:
                return error_code(payload)
            if kind == NLMSG_DONE:
                return 0
            if on_message is not None:
                on_message(kind, payload)
        return 0

    def get_many(self, flows: Iterable[Flow], chunk: int = GET_CHUNK) -> dict[Flow, CtEntry | None]:
        """Conntrack's entry of each flow (a tuple matches an entry in either
        direction), asked `chunk` to a datagram: a sweep looks up every connected
        socket of every container, and a request and a wait per socket made those
        lookups half a sweep's CPU (docs/measurements.md). A flow absent from the
        result got no definite answer; raises OSError when the socket failed.

        Only a chunk's last request asks for an ACK. Every other one is answered once,
        by its entry or by its error (ENOENT: no entry), and the kernel answers a
        datagram's requests in order, so the last one's ACK (or error) comes after all
        of the chunk's answers. They wait in the socket's receive buffer meanwhile:
        the default one (212,992 bytes) held 224 entries here and overflowed at 256
        (ENOBUFS, raised here), so 64 leave room to spare."""
        found: dict[Flow, CtEntry | None] = {}
        todo = list(dict.fromkeys(flows))
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            last = len(part) - 1
            seqs = self.send_batch(((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
                                    NLM_F_REQUEST | (NLM_F_ACK if i == last else 0),
                                    nfgen(flow.family) + ct_tuple_orig(flow)) for i, flow in enumerate(part))
            by_seq = dict(zip(seqs, part))
            for kind, seq, payload in self.answers():
                flow = by_seq.get(seq)
                if flow is None:
                    continue        # an answer to an earlier request that timed out
                if kind == CT_NEW_TYPE:
                    found[flow] = CtEntry(parse_ct_status(payload) or 0)
                elif kind == NLMSG_ERROR:
                    err = error_code(payload)
                    if err == errno.ENOENT:
                        found[flow] = None
                    elif err:
                        log.warning("conntrack lookup of %s failed: %s", flow, os.strerror(err))
                    if seq == seqs[-1]:
                        break
        return found

    def udp_idle_timeouts(self, table: str = TABLE) -> list[int] | None:
        """The `replied` timeouts (s) of the UDP ct timeout objects in nft table `inet
        <table>`, i.e. the UDP idle timeouts in force (old objects stay while old flows
        use them); None when they can't be read (no table, no nf_tables)."""
        body = attr(NFTA_OBJ_TABLE, cstr(table)) + attr(NFTA_OBJ_TYPE, be32(NFT_OBJECT_CT_TIMEOUT))
        found: list[int] = []

        def obj(mtype: int, payload: bytes) -> None:
            if mtype == NFT_NEWOBJ_TYPE:
                value = parse_udp_idle_timeout(payload)
                if value is not None:
                    found.append(value)
        try:
            err = self._call(body, NFT_MSG_GETOBJ, NLM_F_DUMP, NFPROTO_INET, NFNL_SUBSYS_NFTABLES, obj)
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
        body = attr(CTA_STATUS, be32(0)) + attr(CTA_STATUS_MASK, be32(IPS_SRC_NAT))
        victims: list[tuple[int, bytes]] = []

        def entry(mtype: int, payload: bytes) -> None:
            if mtype == CT_NEW_TYPE:
                found = parse_unmasqueraded(payload, sources)
                if found is not None:
                    victims.append((payload[NFGENMSG.offset("family")], found))
        try:
            err = self._call(body, IPCTNL_MSG_CT_GET, NLM_F_DUMP, socket.AF_UNSPEC, on_message=entry)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err:
            log.warning("conntrack dump for flows that escaped masquerading failed: %s", os.strerror(err))
            return -1
        # Gone meanwhile, or no answer: the next reload's purge tries again.
        return sum(self.delete(family, attrs) for family, attrs in victims)

    def delete(self, family: int, attrs: bytes) -> bool:
        """Delete the entry a dump described (its CTA_TUPLE_ORIG and CTA_ID): False when
        it is gone already or the kernel did not answer."""
        try:
            return self._call(attrs, IPCTNL_MSG_CT_DELETE, NLM_F_ACK, family) == 0
        except OSError:
            return False

    def entries_by_source(self) -> dict[str, list[DumpedEntry]] | None:
        """Every entry, by original source address; None when the dump failed. One walk
        of the whole table, each entry parsed here."""
        found: dict[str, list[DumpedEntry]] = {}

        def entry(mtype: int, payload: bytes) -> None:
            if mtype == CT_NEW_TYPE:
                dumped = parse_entry(payload)
                if dumped is not None:
                    found.setdefault(dumped.source, []).append(dumped)
        try:
            err = self._call(b"", IPCTNL_MSG_CT_GET, NLM_F_DUMP, socket.AF_UNSPEC, on_message=entry)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err:
            log.warning("conntrack dump of the containers' entries failed: %s", os.strerror(err))
            return None
        return found

    def nudge(self) -> None:
        """Walk the conntrack hash with a dump that matches nothing: the walk evicts
        expired entries (their DESTROY events follow) long before the GC would."""
        body = attr(CTA_MARK, be32(NUDGE_MARK)) + attr(CTA_MARK_MASK, u32(0xFFFFFFFF))
        try:
            err = self._call(body, IPCTNL_MSG_CT_GET, NLM_F_DUMP, socket.AF_UNSPEC)
        except OSError as exc:
            err = exc.errno or errno.EIO
        if err:
            log.warning("conntrack nudge failed: %s", os.strerror(err))


class DestroyEvents(NetlinkSocket):
    """A non-blocking subscription to conntrack's DESTROY events in the calling
    thread's netns; decode() turns a datagram into pyroute2 messages for parse_destroy."""

    PROTOCOL = NETLINK_NETFILTER

    def __init__(self, rcvbuf: int) -> None:
        super().__init__(rcvbuf=rcvbuf, force_rcvbuf=True, blocking=False)
        try:
            self.join(NFNLGRP_CONNTRACK_DESTROY)
        except OSError:
            self.close()
            raise
        self._marshal = Marshal()
        self._marshal.msg_map.update(AsyncNFCTSocket.policy)

    def decode(self, data: bytes) -> Iterator:
        return self._marshal.parse(data)
