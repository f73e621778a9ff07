"""The rtnetlink requests of an ADD (links, addresses, neighbours, routes, netconf), batched.

Requests are built for the few fixed layouts an ADD needs; answers are read only for
errors, a link's index/MAC/flags/group/peer and a family's forwarding. Rtnl.run sends
up to BATCH requests per datagram and waits for all their acks: one round trip per
batch. Why not pyroute2 here: docs/netlink.md.
"""
from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from runtime.kernel.netlink.core import (
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    Layout,
    NetlinkError,
    NetlinkSocket,
    attr,
    attributes,
    cstr,
    error_code,
    u32,
)

# message types (linux/rtnetlink.h)
RTM_NEWLINK, RTM_GETLINK, RTM_SETLINK = 16, 18, 19
RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWNEIGH = 20, 24, 28
RTM_NEWNETCONF, RTM_GETNETCONF = 80, 82
# attributes (linux/if_link.h, if_addr.h, neighbour.h, rtnetlink.h, netconf.h)
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_LINKINFO, IFLA_GROUP, IFLA_NET_NS_FD = 1, 3, 4, 5, 18, 27, 28
IFLA_GSO_MAX_SEGS = 40
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
NDA_DST, NDA_LLADDR = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_METRICS = 1, 4, 5, 6, 8
RTAX_LOCK, RTAX_MTU = 1, 2
NETCONFA_IFINDEX, NETCONFA_FORWARDING = 1, 2
NETCONFA_IFINDEX_ALL, NETCONFA_IFINDEX_DEFAULT = -1, -2
# values
IFF_UP, IFF_NOARP = 0x1, 0x80
IFA_F_NODAD = 0x02
NUD_PERMANENT = 0x80
RT_TABLE_MAIN, RTPROT_BOOT, RTN_UNICAST = 254, 3, 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
LOOPBACK_IFINDEX = 1  # the kernel registers lo first in every new netns

IFINFOMSG = Layout(("family", "B"), ("_pad", "x"), ("type", "H"), ("index", "i"), ("flags", "I"), ("change", "I"))
IFADDRMSG = Layout(("family", "B"), ("prefixlen", "B"), ("flags", "B"), ("scope", "B"), ("index", "I"))
NDMSG = Layout(("family", "B"), ("_pad1", "x"), ("_pad2", "2x"), ("ifindex", "i"), ("state", "H"),
               ("flags", "B"), ("type", "B"))
RTMSG = Layout(("family", "B"), ("dst_len", "B"), ("src_len", "B"), ("tos", "B"), ("table", "B"),
               ("protocol", "B"), ("scope", "B"), ("type", "B"), ("flags", "I"))
# struct netconfmsg is one byte; its attributes start at the next 4-byte boundary.
NETCONFMSG = Layout(("family", "B"), ("_pad", "3x"))
_I32, _U32 = Layout(("value", "i")), Layout(("value", "I"))
# The answers to one batch must fit the socket's receive buffer (~200 KiB by
# default); a link's answer to get_link is ~1.5 KiB.
BATCH = 64


class RtnlError(NetlinkError):
    """A request the kernel refused; `what` names it."""


def _i32(value: int) -> bytes:
    return _I32.pack(value)


def _addr(text: str) -> tuple[int, bytes]:
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    return family, socket.inet_pton(family, text)


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


@dataclass(frozen=True)
class Request:
    kind: int
    flags: int
    body: bytes
    what: str  # for errors: "add address 10.77.0.5/32 to sg…"


def new_veth(name: str, peer: str, peer_netns_fd: int, mtu: int, group: int = 0, mac: str = "",
             noarp: bool = False, name_mtu: int = 0, peer_gso_max_segs: int = 0) -> Request:
    """`group` (the interface group, IFLA_GROUP) applies to `name`, the node end; `mac`
    and `noarp` (IFF_NOARP) to both ends; `mtu` to the peer, and to `name` too unless
    `name_mtu` is given; `peer_gso_max_segs` (0: the kernel's default) to the peer."""
    flags = IFINFOMSG.pack(0, 0, 0, IFF_NOARP, IFF_NOARP) if noarp else IFINFOMSG.pack(0, 0, 0, 0, 0)
    address = attr(IFLA_ADDRESS, _mac(mac)) if mac else b""
    peer_info = flags + attr(IFLA_IFNAME, cstr(peer)) + attr(IFLA_MTU, u32(mtu)) + address \
        + attr(IFLA_NET_NS_FD, u32(peer_netns_fd)) \
        + (attr(IFLA_GSO_MAX_SEGS, u32(peer_gso_max_segs)) if peer_gso_max_segs else b"")
    linkinfo = attr(IFLA_INFO_KIND, b"veth") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer_info))
    body = flags + attr(IFLA_IFNAME, cstr(name)) + attr(IFLA_MTU, u32(name_mtu or mtu)) + address \
        + attr(IFLA_GROUP, u32(group)) + attr(IFLA_LINKINFO, linkinfo)
    return Request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body, f"create veth {name} (peer {peer})")


def get_link(name: str) -> Request:
    return Request(RTM_GETLINK, 0, IFINFOMSG.pack(0, 0, 0, 0, 0) + attr(IFLA_IFNAME, cstr(name)), f"find {name}")


def get_link_by_index(index: int) -> Request:
    return Request(RTM_GETLINK, 0, IFINFOMSG.pack(0, 0, index, 0, 0), f"find link {index}")


def set_up(index: int, up: bool = True) -> Request:
    return Request(RTM_SETLINK, 0, IFINFOMSG.pack(0, 0, index, IFF_UP if up else 0, IFF_UP),
                   f"set link {index} {'up' if up else 'down'}")


def set_group(index: int, group: int) -> Request:
    return Request(RTM_SETLINK, 0, IFINFOMSG.pack(0, 0, index, 0, 0) + attr(IFLA_GROUP, u32(group)),
                   f"set link {index} group {group:#x}")


def set_mtu(index: int, mtu: int) -> Request:
    return Request(RTM_SETLINK, 0, IFINFOMSG.pack(0, 0, index, 0, 0) + attr(IFLA_MTU, u32(mtu)),
                   f"set link {index} mtu {mtu}")


def set_noarp(index: int) -> Request:
    return Request(RTM_SETLINK, 0, IFINFOMSG.pack(0, 0, index, IFF_NOARP, IFF_NOARP), f"set link {index} noarp")


def set_down_by_name(name: str) -> Request:
    return Request(RTM_SETLINK, 0, IFINFOMSG.pack(0, 0, 0, 0, IFF_UP) + attr(IFLA_IFNAME, cstr(name)),
                   f"set {name} down")


def new_addr(index: int, address: str, prefixlen: int, nodad: bool = False) -> Request:
    family, raw = _addr(address)
    attrs = attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
    body = IFADDRMSG.pack(family, prefixlen, IFA_F_NODAD if nodad else 0, RT_SCOPE_UNIVERSE, index) + attrs
    return Request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body, f"add address {address}/{prefixlen}")


def new_neigh(index: int, address: str, lladdr: str, replace: bool = False) -> Request:
    """A permanent neighbour entry; `replace` overwrites one the kernel learned."""
    family, raw = _addr(address)
    body = NDMSG.pack(family, index, NUD_PERMANENT, 0, 0) + attr(NDA_DST, raw) + attr(NDA_LLADDR, _mac(lladdr))
    flags = NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
    return Request(RTM_NEWNEIGH, flags, body, f"add neighbour {address} {lladdr}")


def new_route(dst: str, oif: int, gateway: str = "", scope: int = RT_SCOPE_UNIVERSE,
              priority: int | None = None, mtu: int = 0, replace: bool = False) -> Request:
    """`mtu`: the route's own MTU, locked (`mtu lock`), whatever its device's.
    `replace`: overwrite the route to `dst` (via `oif`) if there is one."""
    net, _, plen = dst.partition("/")
    family, raw = _addr(net)
    attrs = attr(RTA_OIF, u32(oif))
    if int(plen):
        attrs = attr(RTA_DST, raw) + attrs
    if gateway:
        attrs += attr(RTA_GATEWAY, _addr(gateway)[1])
    if priority is not None:
        attrs += attr(RTA_PRIORITY, u32(priority))
    if mtu:
        attrs += attr(RTA_METRICS, attr(RTAX_LOCK, u32(1 << RTAX_MTU)) + attr(RTAX_MTU, u32(mtu)))
    body = RTMSG.pack(family, int(plen), 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0) + attrs
    return Request(RTM_NEWROUTE, NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL), body,
                   f"{'replace' if replace else 'add'} route {dst}" + (f" via {gateway}" if gateway else ""))


def get_netconf(family: int, ifindex: int = NETCONFA_IFINDEX_ALL) -> Request:
    """A family's netconf (forwarding, ...) of an interface, or of `all`/`default`: what
    /proc/sys/net/ipv{4,6}/conf/*/forwarding say, without a lookup under /proc/sys
    (slow with many netns: docs/netlink.md)."""
    body = NETCONFMSG.pack(family) + attr(NETCONFA_IFINDEX, _i32(ifindex))
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
    mtu: int = 0


class Rtnl(NetlinkSocket):
    """One NETLINK_ROUTE socket in the calling thread's netns."""

    PROTOCOL = NETLINK_ROUTE

    def __enter__(self) -> Rtnl:
        return self

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
        out: list[Link | Netconf | None] = [None] * len(requests)
        sent = self.send_batch((req.kind, NLM_F_REQUEST | NLM_F_ACK | req.flags, req.body) for req in requests)
        seqs = {seq: i for i, seq in enumerate(sent)}
        pending, error = set(seqs), None
        while pending:
            for kind, seq, payload in self.receive():
                if seq not in pending:
                    continue
                i = seqs[seq]
                if kind == NLMSG_ERROR:
                    code = error_code(payload)
                    pending.discard(seq)
                    if code and error is None:
                        error = RtnlError(code, requests[i].what)
                elif kind == RTM_NEWLINK:
                    out[i] = parse_link(payload)
                elif kind == RTM_NEWNETCONF:
                    out[i] = parse_netconf(payload)
                elif kind == NLMSG_DONE:
                    pending.discard(seq)
        return out, error


def parse_link(body: bytes) -> Link:
    """An RTM_NEWLINK message's payload (struct ifinfomsg, then attributes)."""
    _, _, index, flags, _ = IFINFOMSG.unpack_from(body)
    mac, group, peer, mtu = "", 0, 0, 0
    for kind, value in attributes(body[IFINFOMSG.size:]):
        if kind == IFLA_ADDRESS:
            mac = value.hex(":")
        elif kind == IFLA_MTU and len(value) >= 4:
            mtu = _U32.unpack_from(value)[0]
        elif kind == IFLA_GROUP and len(value) >= 4:
            group = _U32.unpack_from(value)[0]
        elif kind == IFLA_LINK and len(value) >= 4:
            peer = _I32.unpack_from(value)[0]
    return Link(index, mac, flags, group, peer, mtu)


def parse_netconf(body: bytes) -> Netconf:
    """An RTM_NEWNETCONF message's payload (struct netconfmsg, then attributes)."""
    family = body[0] if body else 0
    ifindex, forwarding = 0, None
    for kind, value in attributes(body[NETCONFMSG.size:]):
        if kind == NETCONFA_IFINDEX and len(value) >= 4:
            ifindex = _I32.unpack_from(value)[0]
        elif kind == NETCONFA_FORWARDING and len(value) >= 4:
            forwarding = _I32.unpack_from(value)[0]
    return Netconf(family, ifindex, forwarding)


def find(rtnl: Rtnl, name: str) -> Link | None:
    try:
        link = rtnl.run(get_link(name))[0]
        return link if isinstance(link, Link) else None
    except RtnlError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
