"""The rtnetlink requests of an ADD, batched on a plain netlink socket.

Why not pyroute2 here (it does everything else: CHECK, DEL's lookups, the reaper,
reclaim, the lab): pyroute2 0.9's synchronous API runs each request through an
asyncio loop, ~0.66 ms per request on the development machine against ~13 µs for
the same RTM_GETLINK on a plain socket (measured in the same process). An ADD makes
about twenty requests, so that was ~14 ms of every container start. The kernel
also takes several requests in one send (it handles them in order and acks each),
so a whole side of the veth is configured in one round trip.

Only the few fixed message layouts an ADD needs are built here, each after its
struct in <linux/rtnetlink.h>, <linux/if_addr.h>, <linux/neighbour.h>; answers are
read only for errors and for the link's index and MAC. messages() and attributes()
parse any netlink datagram (runtime.nft_events reads nf_tables' notifications with
them).
"""
from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterator

# message types and flags (linux/netlink.h, linux/rtnetlink.h)
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK, RTM_SETLINK = 16, 18, 19
RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWNEIGH = 20, 24, 28
RTM_NEWNETCONF, RTM_GETNETCONF = 80, 82
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x200, 0x400
# attributes
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO, IFLA_GROUP, IFLA_NET_NS_FD = 1, 3, 4, 5, 18, 27, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY = 1, 4, 5, 6
NETCONFA_IFINDEX, NETCONFA_FORWARDING = 1, 2
NETCONFA_IFINDEX_ALL, NETCONFA_IFINDEX_DEFAULT = -1, -2
# values
IFF_UP, IFF_NOARP = 0x1, 0x80
IFA_F_NODAD = 0x02
NUD_PERMANENT = 0x80
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST = 254, 3, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
LOOPBACK_IFINDEX = 1  # the kernel registers lo first in every new netns

_HDR = struct.Struct("=IHHII")        # nlmsghdr
_IFINFO = struct.Struct("=BxHiII")    # ifinfomsg
_IFADDR = struct.Struct("=BBBBI")     # ifaddrmsg
_NDMSG = struct.Struct("=BxxxiHBB")   # ndmsg
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg
_seq = itertools.count(1)
# The answers to one batch must fit the socket's receive buffer (~200 KiB by
# default); a link's answer to get_link is ~1.5 KiB.
BATCH = 64


class RtnlError(OSError):
    """A request the kernel refused; `what` names it."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.what = what


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _name(text: str) -> bytes:
    return text.encode() + b"\0"


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _addr(text: str) -> tuple[int, bytes]:
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    return family, socket.inet_pton(family, text)


@dataclass(frozen=True)
class Request:
    kind: int
    flags: int
    body: bytes
    what: str  # for errors: "add address 10.77.0.5/32 to sg…"


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def new_veth(name: str, peer: str, peer_netns_fd: int, mtu: int, group: int = 0, mac: str = "",
             noarp: bool = False) -> Request:
    """`group` (the interface group, IFLA_GROUP) applies to `name`, the node end; `mac`
    and `noarp` (IFF_NOARP) to both ends."""
    flags = (_IFINFO.pack(0, 0, 0, IFF_NOARP, IFF_NOARP) if noarp else _IFINFO.pack(0, 0, 0, 0, 0))
    address = _attr(IFLA_ADDRESS, _mac(mac)) if mac else b""
    peer_info = flags + _attr(IFLA_IFNAME, _name(peer)) + _attr(IFLA_MTU, _u32(mtu)) + address \
        + _attr(IFLA_NET_NS_FD, _u32(peer_netns_fd))
    linkinfo = _attr(IFLA_INFO_KIND, b"veth") + _attr(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_info))
    body = flags + _attr(IFLA_IFNAME, _name(name)) + _attr(IFLA_MTU, _u32(mtu)) + address \
        + _attr(IFLA_GROUP, _u32(group)) + _attr(IFLA_LINKINFO, linkinfo)
    return Request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"create veth {name} (peer {peer})")


def get_link(name: str) -> Request:
    return Request(RTM_GETLINK, 0, _IFINFO.pack(0, 0, 0, 0, 0) + _attr(IFLA_IFNAME, _name(name)), f"find {name}")


def get_link_by_index(index: int) -> Request:
    return Request(RTM_GETLINK, 0, _IFINFO.pack(0, 0, index, 0, 0), f"find link {index}")


def set_up(index: int, up: bool = True) -> Request:
    return Request(RTM_SETLINK, 0, _IFINFO.pack(0, 0, index, IFF_UP if up else 0, IFF_UP),
                   f"set link {index} {'up' if up else 'down'}")


def set_group(index: int, group: int) -> Request:
    return Request(RTM_SETLINK, 0, _IFINFO.pack(0, 0, index, 0, 0) + _attr(IFLA_GROUP, _u32(group)),
                   f"set link {index} group {group:#x}")


def set_noarp(index: int) -> Request:
    return Request(RTM_SETLINK, 0, _IFINFO.pack(0, 0, index, IFF_NOARP, IFF_NOARP), f"set link {index} noarp")


def set_down_by_name(name: str) -> Request:
    return Request(RTM_SETLINK, 0, _IFINFO.pack(0, 0, 0, 0, IFF_UP) + _attr(IFLA_IFNAME, _name(name)),
                   f"set {name} down")


def new_addr(index: int, address: str, prefixlen: int, nodad: bool = False) -> Request:
    family, raw = _addr(address)
    attrs = _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
    body = _IFADDR.pack(family, prefixlen, IFA_F_NODAD if nodad else 0, RT_SCOPE_UNIVERSE, index) + attrs
    return Request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"add address {address}/{prefixlen}")


def new_neigh(index: int, address: str, lladdr: str, replace: bool = False) -> Request:
    """A permanent neighbour entry; `replace` overwrites one the kernel learned."""
    family, raw = _addr(address)
    body = _NDMSG.pack(family, index, NUD_PERMANENT, 0, 0) + _attr(NDA_DST, raw) + _attr(NDA_LLADDR, _mac(lladdr))
    flags = NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
    return Request(RTM_NEWNEIGH, flags, body, f"add neighbour {address} {lladdr}")


def new_route(dst: str, oif: int, gateway: str = "", scope: int = RT_SCOPE_UNIVERSE,
              priority: int | None = None) -> Request:
    net, _, plen = dst.partition("/")
    family, raw = _addr(net)
    attrs = _attr(RTA_OIF, _u32(oif))
    if int(plen):
        attrs = _attr(RTA_DST, raw) + attrs
    if gateway:
        attrs += _attr(RTA_GATEWAY, _addr(gateway)[1])
    if priority is not None:
        attrs += _attr(RTA_PRIORITY, _u32(priority))
    body = _RTMSG.pack(family, int(plen), 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0) + attrs
    return Request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body,
                   f"add route {dst}" + (f" via {gateway}" if gateway else ""))


def get_netconf(family: int, ifindex: int = NETCONFA_IFINDEX_ALL) -> Request:
    """A family's netconf (forwarding, ...) of an interface, or of `all`/`default`:
    what /proc/sys/net/ipv{4,6}/conf/*/forwarding say, without a path lookup under
    /proc/sys (whose top level holds a "net" entry per network namespace that used
    it: with a thousand containers, each lookup compares a thousand names)."""
    body = struct.pack("=Bxxx", family) + _attr(NETCONFA_IFINDEX, struct.pack("=i", ifindex))
    return Request(RTM_GETNETCONF, 0, body, f"get netconf family {family} ifindex {ifindex}")


@dataclass(frozen=True)
class Netconf:
    family: int
    ifindex: int
    forwarding: int | None


@dataclass(frozen=True)
class Link:
    index: int
    mac: str
    flags: int = 0
    group: int = 0  # IFLA_GROUP
    peer_index: int = 0  # IFLA_LINK: a veth's peer, in the peer's netns


class Rtnl:
    """One NETLINK_ROUTE socket in the calling thread's netns (a socket belongs to the
    netns it was opened in, whatever the thread does later)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def run(self, *requests: Request) -> list[Link | Netconf | None]:
        """Send the requests in batches of BATCH; the kernel handles them in order.
        Raises RtnlError for the first one refused (those after it are still handled,
        as they would be if sent one by one and the error ignored: callers roll back
        the whole attachment anyway). Returns, per request, the Link a get_link found
        (the Netconf a get_netconf did)."""
        out: list[Link | Netconf | None] = []
        error: RtnlError | None = None
        for start in range(0, len(requests), BATCH):
            links, failed = self._batch(requests[start:start + BATCH])
            out += links
            error = error or failed
        if error is not None:
            raise error
        return out

    def _batch(self, requests: tuple[Request, ...]) -> tuple[list[Link | Netconf | None], RtnlError | None]:
        seqs = {}
        out: list[Link | Netconf | None] = [None] * len(requests)
        buf = bytearray()
        for i, req in enumerate(requests):
            seq = next(_seq)
            seqs[seq] = i
            flags = NLM_F_REQUEST | NLM_F_ACK | req.flags
            buf += _HDR.pack(_HDR.size + len(req.body), req.kind, flags, seq, 0) + req.body
        self.sock.sendall(bytes(buf))
        pending, error = set(seqs), None
        while pending:
            for kind, seq, payload in messages(self.sock.recv(1 << 16)):
                if seq not in pending:
                    continue
                i = seqs[seq]
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    pending.discard(seq)
                    if code and error is None:
                        error = RtnlError(code, requests[i].what)
                elif kind == RTM_NEWLINK:
                    out[i] = _parse_link(payload)
                elif kind == RTM_NEWNETCONF:
                    out[i] = parse_netconf(payload)
                elif kind == NLMSG_DONE:
                    pending.discard(seq)
        return out, error


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each netlink message in a datagram."""
    offset = 0
    while offset + _HDR.size <= len(data):
        length, kind, _, seq, _ = _HDR.unpack_from(data, offset)
        if length < _HDR.size:
            return
        yield kind, seq, data[offset + _HDR.size:offset + length]
        offset += length + (-length % 4)


def attributes(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in `body`."""
    offset = 0
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if length < 4:
            return
        yield kind & 0x3FFF, body[offset + 4:offset + length]
        offset += length + (-length % 4)


def _parse_link(body: bytes) -> Link:
    _, _, index, flags, _ = _IFINFO.unpack_from(body)
    mac, group, peer = "", 0, 0
    for kind, value in attributes(body[_IFINFO.size:]):
        if kind == IFLA_ADDRESS:
            mac = value.hex(":")
        elif kind == IFLA_GROUP and len(value) >= 4:
            group = struct.unpack_from("=I", value)[0]
        elif kind == IFLA_LINK and len(value) >= 4:
            peer = struct.unpack_from("=i", value)[0]
    return Link(index, mac, flags, group, peer)


def parse_netconf(body: bytes) -> Netconf:
    """An RTM_NEWNETCONF message's payload (struct netconfmsg, then attributes)."""
    family = body[0] if body else 0
    ifindex, forwarding = 0, None
    for kind, value in attributes(body[4:]):
        if kind == NETCONFA_IFINDEX and len(value) >= 4:
            ifindex = struct.unpack_from("=i", value)[0]
        elif kind == NETCONFA_FORWARDING and len(value) >= 4:
            forwarding = struct.unpack_from("=i", value)[0]
    return Netconf(family, ifindex, forwarding)


def find(rtnl: Rtnl, name: str) -> Link | None:
    try:
        return rtnl.run(get_link(name))[0]
    except RtnlError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
