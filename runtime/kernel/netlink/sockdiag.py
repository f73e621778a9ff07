"""sock_diag (NETLINK_SOCK_DIAG, inet_diag): list, find and destroy TCP/UDP sockets.

Used from a thread inside a container's netns (runtime.kernel.netns.in_netns): a SockDiag
sees the sockets of the netns it was opened in. Sockets are matched exactly (protocol,
both addresses and ports, v4-mapped IPv6 too) and destroyed by their cookie, so a
listener or an unconnected UDP socket sharing a port is never hit.
"""
from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from runtime.kernel.netlink.conntrack import Flow
from runtime.kernel.netlink.core import (
    NETLINK_SOCK_DIAG,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    Layout,
    NetlinkSocket,
    attributes,
    error_code,
)

# linux/sock_diag.h, linux/inet_diag.h, include/net/tcp_states.h
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
INET_DIAG_INFO = 2
TCP_ESTABLISHED = 1
ALL_STATES = 0xFFFFFFFF
# ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING
TCP_SYNCHRONIZED = frozenset({1, 4, 5, 8, 9, 11})
NO_COOKIE = b"\xff" * 8

# struct inet_diag_sockid: ports and addresses in network order; the interface index
# (host order) is only ever sent as 0 here, and the cookie is opaque.
INET_DIAG_SOCKID = Layout(("sport", "H"), ("dport", "H"), ("src", "16s"), ("dst", "16s"), ("if", "4s"),
                          ("cookie", "8s"), byteorder="!")
INET_DIAG_REQ_V2 = Layout(("family", "B"), ("protocol", "B"), ("ext", "B"), ("_pad", "x"), ("states", "I"),
                          ("id", INET_DIAG_SOCKID))
INET_DIAG_MSG = Layout(("family", "B"), ("state", "B"), ("timer", "B"), ("retrans", "B"), ("id", INET_DIAG_SOCKID),
                       ("expires", "I"), ("rqueue", "I"), ("wqueue", "I"), ("uid", "I"), ("inode", "I"))
# The start of struct tcp_info (linux/tcp.h), up to the times since the socket last
# sent or received (ms); two bytes of bit fields are declared as whole bytes.
TCPI_TIMES = Layout(("last_data_sent", "I"), ("last_ack_sent", "I"), ("last_data_recv", "I"), ("last_ack_recv", "I"))
TCP_INFO = Layout(("state", "B"), ("ca_state", "B"), ("retransmits", "B"), ("probes", "B"), ("backoff", "B"),
                  ("options", "B"), ("wscale", "B"), ("rate_flags", "B"),
                  ("rto", "I"), ("ato", "I"), ("snd_mss", "I"), ("rcv_mss", "I"),
                  ("unacked", "I"), ("sacked", "I"), ("lost", "I"), ("retrans", "I"), ("fackets", "I"),
                  ("times", TCPI_TIMES))
_ID = slice(INET_DIAG_MSG.offset("id"), INET_DIAG_MSG.offset("id") + INET_DIAG_SOCKID.size)
_COOKIE = slice(INET_DIAG_SOCKID.offset("cookie"), INET_DIAG_SOCKID.offset("cookie") + len(NO_COOKIE))
_TIMES = TCP_INFO.offset("times")


@dataclass(frozen=True)
class InetSock:
    family: int
    state: int
    sid: bytes               # the inet_diag_sockid as the kernel sent it (with the cookie)
    local: tuple[str, int]
    remote: tuple[str, int]
    idle: float | None       # TCP: seconds since it last sent or received

    @property
    def cookie(self) -> bytes:
        """The kernel's id of this socket (inet_diag_sockid.idiag_cookie): a socket
        closed and another opened on the same ports differ in it."""
        return self.sid[_COOKIE]

    def matches(self, flow: Flow) -> bool:
        return self.local == (flow.src, flow.sport) and self.remote == (flow.dst, flow.dport)


_V4_MAPPED = bytes(10) + b"\xff\xff"


def _unmap(family: int, raw: bytes) -> str:
    """The address as inet_ntop writes it; a v4-mapped one as IPv4. A sweep does this for
    each socket of each container (a container may hold tens of thousands): ipaddress
    took 20 us a socket, inet_ntop takes a tenth of that."""
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == _V4_MAPPED:
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def canonical(addr: str) -> str:
    """An address as _unmap writes it, for comparisons with InetSock's."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return socket.inet_ntop(family, socket.inet_pton(family, addr))


def _pack_addr(addr: str) -> bytes:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    return socket.inet_pton(fam, addr).ljust(16, b"\0")


def parse_inet_diag(payload: bytes) -> InetSock:
    """A SOCK_DIAG_BY_FAMILY answer (struct inet_diag_msg, then attributes)."""
    family, state = payload[INET_DIAG_MSG.offset("family")], payload[INET_DIAG_MSG.offset("state")]
    sid = payload[_ID]
    sport, dport, src, dst, _, _ = INET_DIAG_SOCKID.unpack_from(sid)
    idle = None
    for kind, value in attributes(payload[INET_DIAG_MSG.size:]):
        if kind == INET_DIAG_INFO and len(value) >= TCP_INFO.size:
            sent, _ack_sent, recv, ack_recv = TCPI_TIMES.unpack_from(value, _TIMES)
            idle = min(sent, recv, ack_recv) / 1000
    return InetSock(family, state, sid, (_unmap(family, src), sport), (_unmap(family, dst), dport), idle)


class SockDiag(NetlinkSocket):
    """A NETLINK_SOCK_DIAG socket of the netns of the thread that creates it."""

    PROTOCOL = NETLINK_SOCK_DIAG

    def __init__(self) -> None:
        super().__init__(timeout=10)

    def _send(self, mtype: int, flags: int, family: int, proto: int, states: int, ext: int, sid: bytes) -> int:
        return self.request(mtype, NLM_F_REQUEST | flags, INET_DIAG_REQ_V2.pack(family, proto, ext, states, sid))

    def _replies(self, seq: int) -> Iterator[tuple[int, bytes]]:
        return self.replies(seq, 1 << 17)

    def dump(self, family: int, proto: int, states: int) -> list[InetSock]:
        seq = self._send(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, family, proto, states,
                         1 << (INET_DIAG_INFO - 1), INET_DIAG_SOCKID.pack(0, 0, b"", b"", b"", NO_COOKIE))
        out = []
        for mtype, payload in self._replies(seq):
            if mtype == SOCK_DIAG_BY_FAMILY:
                out.append(parse_inet_diag(payload))
            elif mtype == NLMSG_ERROR and error_code(payload):
                raise OSError(error_code(payload), os.strerror(error_code(payload)))
        return out

    def get_tcp(self, flow: Flow) -> InetSock | None:
        """The TCP socket with exactly this 4-tuple (the lookup is the kernel's own hash
        lookup; it may answer with a listener or a TIME_WAIT socket, checked by the caller)."""
        sid = INET_DIAG_SOCKID.pack(flow.sport, flow.dport, _pack_addr(flow.src), _pack_addr(flow.dst), b"",
                                    NO_COOKIE)
        seq = self._send(SOCK_DIAG_BY_FAMILY, 0, flow.family, socket.IPPROTO_TCP, ALL_STATES,
                         1 << (INET_DIAG_INFO - 1), sid)
        for mtype, payload in self._replies(seq):
            if mtype == SOCK_DIAG_BY_FAMILY:
                return parse_inet_diag(payload)
            if mtype == NLMSG_ERROR:
                err = error_code(payload)
                if err in (0, errno.ENOENT):
                    return None
                raise OSError(err, os.strerror(err))
        return None

    def destroy(self, proto: int, s: InetSock) -> int:
        """SOCK_DESTROY by the socket's own id and cookie: 0 or an errno."""
        seq = self._send(SOCK_DESTROY, NLM_F_ACK, s.family, proto, ALL_STATES, 0, s.sid)
        for mtype, payload in self._replies(seq):
            if mtype == NLMSG_ERROR:
                return error_code(payload)
        return errno.EIO

    def find(self, flow: Flow) -> InetSock | None:
        """The socket of a flow conntrack saw: for TCP a synchronized one (never a
        listener or a TIME_WAIT socket); for UDP a connected one whose peer is the
        flow's (an unconnected socket sharing the port talks to other peers too, and
        the kernel's exact lookup would answer with it, hence a dump)."""
        if flow.proto == socket.IPPROTO_TCP:
            s = self.get_tcp(flow)
            return s if s is not None and s.state in TCP_SYNCHRONIZED and s.matches(flow) else None
        families = (socket.AF_INET, socket.AF_INET6) if flow.family == socket.AF_INET else (socket.AF_INET6,)
        for fam in families:
            for s in self.dump(fam, socket.IPPROTO_UDP, 1 << TCP_ESTABLISHED):
                if s.matches(flow):
                    return s
        return None
