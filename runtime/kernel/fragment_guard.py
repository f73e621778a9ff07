"""The fragment guard: a BPF classifier on the ingress of every container's node-side
veth that drops IP fragments and IPv6 extension headers before the node sees them.

Why before the node: conntrack reassembles fragments at prerouting (defrag, priority
-400) into one memory pool for the whole netns (4 MiB by default), so unfinished
fragments from one container would starve every other container's reassembly, and a
datagram sent in tiny fragments would be billed once, as the reassembled packet, while
many more bytes leave the node. A container's kernel fragments only UDP datagrams
larger than the path MTU; those are lost (README: "Threat model").

Why BPF on the veth and not an nft chain at prerouting -450 (what sockgate did
first): a prerouting base chain runs for every packet of the node, a container's or
not, and cost 1.3-1.5 % of a 64-byte UDP packet's forwarding here (v6: 1.6-1.8 %):
nf_hook_slow, then one call per nft expression, each dear with retpolines and SRSO's
safe RET. The guard runs only for a container's own packets, as one call into JIT
code with no further calls on the common path: 0.2 % (README "Status").

Attached at ADD, before the veth comes up, with BPF_PROG_ATTACH (tcx, Linux >= 6.6;
a clsact qdisc's bpf filter before that): the attachment holds the program without a
file descriptor or bpffs, and deleting the veth frees program and counters, so there
is nothing to clean up. Each veth gets its own program and counter map (loading one
takes ~0.2 ms: verifier and JIT), which also tells whose packets were dropped.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass

from runtime.kernel import bpf
from runtime.kernel.bpf import EXIT, Insn, add, call, ja, jeq, jgt_reg, jne, ld_map, ldx, mov, movr, stx

log = logging.getLogger(__name__)

NAME = "sg_fragments"

# Keys of the counter map: what was dropped.
IPV4_FRAGMENT = 0
IPV6_EXTENSION = 1

# Verdicts, the same numbers for tcx and cls_bpf in direct-action mode: NEXT (tcx) /
# UNSPEC (tc) hands the packet on; DROP / SHOT frees it.
_PASS = -1
_DROP = 2

_TCA_BPF_ID = 11
_HELPER_MAP_LOOKUP_ELEM = 1
_HELPER_SKB_PULL_DATA = 39

# struct __sk_buff offsets
_SKB_PROTOCOL = 16
_SKB_DATA = 76
_SKB_DATA_END = 80

_ETH_HLEN = 14
# Constants as a little-endian load sees big-endian fields.
_ETH_P_IP = 0x0008       # htons(0x0800)
_ETH_P_IPV6 = 0xDD86     # htons(0x86dd)
_IP_DF = 0x0040          # htons(0x4000): flags+offset of an unfragmented packet with DF set
_IPV4_HLEN = 20
_IPV6_HLEN = 40
_ALLOWED_NEXT_HEADERS = (6, 17, 58)   # TCP, UDP, ICMPv6


class GuardError(OSError):
    """The guard could not be loaded or attached."""


def _check(attempt: str, short: str) -> list[Insn | str]:
    """One look at the headers: r6 = the skb. `short`: where to go when a header is not
    in the linear part (data_end)."""
    return [
        ldx("w", 2, 6, _SKB_DATA), ldx("w", 3, 6, _SKB_DATA_END), ldx("w", 4, 6, _SKB_PROTOCOL),
        jeq(4, _ETH_P_IP, f"v4_{attempt}"), jeq(4, _ETH_P_IPV6, f"v6_{attempt}"), ja("pass"),
        f"v4_{attempt}",
        movr(5, 2), add(5, _ETH_HLEN + _IPV4_HLEN), jgt_reg(5, 3, f"{short}4"),
        ldx("h", 4, 2, _ETH_HLEN + 6), jeq(4, 0, "pass"), jeq(4, _IP_DF, "pass"),
        mov(7, IPV4_FRAGMENT), ja("drop"),
        f"v6_{attempt}",
        movr(5, 2), add(5, _ETH_HLEN + _IPV6_HLEN), jgt_reg(5, 3, f"{short}6"),
        ldx("b", 4, 2, _ETH_HLEN + 6), *(jeq(4, nh, "pass") for nh in _ALLOWED_NEXT_HEADERS),
        mov(7, IPV6_EXTENSION), ja("drop"),
    ]


def program(map_fd: int) -> bytes:
    """The guard. An IPv4 packet is a fragment unless its flags+offset are 0 or DF
    alone (so a packet with the reserved flag is dropped too, which no sender needs).
    A container's IPv6 packet carries no extension header (TCP, UDP, ICMPv6 only; C3),
    so any other next header is dropped: a fragment header may hide behind others.
    Headers outside the skb's linear part (a packet socket can send them that way) are
    pulled in first and looked at again, or a crafted fragment would pass unread; a
    packet too short for its header is left to the stack, which drops it."""
    return bpf.assemble([
        movr(6, 1),
        *_check("first", "short"),
        "short4", mov(2, _ETH_HLEN + _IPV4_HLEN), ja("pull"),
        "short6", mov(2, _ETH_HLEN + _IPV6_HLEN),
        "pull", movr(1, 6), call(_HELPER_SKB_PULL_DATA), jne(0, 0, "pass"),
        *_check("pulled", "pass_"),
        "pass_4", "pass_6", "pass", mov(0, _PASS), EXIT,
        # The drop, counted per CPU under key r7 (no atomics needed).
        "drop", stx("w", 10, 7, -4), movr(2, 10), add(2, -4), ld_map(1, map_fd),
        call(_HELPER_MAP_LOOKUP_ELEM), jeq(0, 0, "shot"),
        ldx("dw", 1, 0, 0), add(1, 1), stx("dw", 0, 1, 0),
        "shot", mov(0, _DROP), EXIT,
    ])


def _load() -> int:
    counters = bpf.create_percpu_array(2)
    try:
        return bpf.load_classifier(NAME.encode(), program(counters))
    finally:
        os.close(counters)     # the program holds the map


def attach(ifindex: int, method: str = "auto") -> None:
    """Guard the interface `ifindex` of the caller's netns (a container's new veth,
    before it comes up). method: "auto" (tcx where the kernel has it, else clsact),
    "tcx" or "clsact" (the tests use those to try each path on one kernel)."""
    try:
        fd = _load()
    except bpf.BpfError as exc:
        raise GuardError(exc.errno, f"loading the fragment guard: {exc.strerror}") from None
    try:
        if method == "clsact":
            _clsact_attach(ifindex, fd)
            return
        try:
            bpf.tcx_attach(ifindex, fd)
        except bpf.BpfError as exc:
            # EINVAL: a kernel before 6.6, which doesn't know the tcx attach type.
            if exc.errno != errno.EINVAL or method == "tcx":
                raise
            _clsact_attach(ifindex, fd)
    except OSError as exc:
        raise GuardError(exc.errno, f"attaching the fragment guard to interface {ifindex}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _clsact_attach(ifindex: int, fd: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.tc("add", "clsact", index=ifindex)
        ipr.tc("add-filter", "bpf", index=ifindex, handle=1, fd=fd, name=NAME, parent="ffff:fff2",
               classid=1, direct_action=True)


def _clsact_programs(ifindex: int) -> list[int]:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with IPRoute() as ipr:
            filters = ipr.get_filters(index=ifindex, parent="ffff:fff2")
    except NetlinkError:
        return []
    ids = []
    for f in filters:
        options = f.get_attr("TCA_OPTIONS")
        for name, nla in options["attrs"] if options is not None else []:
            # pyroute2 0.9 doesn't decode TCA_BPF_ID (11): read its u32 from the raw attribute.
            if name == "UNKNOWN" and nla["header"]["type"] == _TCA_BPF_ID:
                ids.append(struct.unpack_from("=I", nla.data, nla.offset + 4)[0])
    return ids


def _guard_ids(ifindex: int) -> list[int]:
    """Ids of the guard programs on `ifindex`'s ingress."""
    try:
        ids = bpf.tcx_programs(ifindex)
    except bpf.BpfError as exc:
        if exc.errno == errno.ENODEV:
            return []
        if exc.errno != errno.EINVAL:
            raise
        ids = []
    # A clsact filter also where tcx exists: a guard attached before a kernel upgrade.
    ids += _clsact_programs(ifindex)
    out = []
    for prog_id in ids:
        try:
            fd = bpf.prog_fd(prog_id)
        except bpf.BpfError:
            continue        # gone meanwhile
        try:
            if bpf.prog_info(fd)[0] == NAME:
                out.append(prog_id)
        finally:
            os.close(fd)
    return out


def guarded(ifindex: int) -> bool:
    return bool(_guard_ids(ifindex))


@dataclass(frozen=True)
class Dropped:
    ipv4_fragments: int = 0
    ipv6_extensions: int = 0

    @property
    def packets(self) -> int:
        return self.ipv4_fragments + self.ipv6_extensions


def dropped(ifindex: int) -> Dropped | None:
    """What the guard on `ifindex` dropped; None when there is no guard."""
    ids = _guard_ids(ifindex)
    if not ids:
        return None
    v4 = v6 = 0
    for prog_id in ids:
        fd = bpf.prog_fd(prog_id)
        try:
            map_ids = bpf.prog_info(fd)[1]
        finally:
            os.close(fd)
        for map_id in map_ids:
            mfd = bpf.map_fd(map_id)
            try:
                v4 += bpf.percpu_sum(mfd, IPV4_FRAGMENT)
                v6 += bpf.percpu_sum(mfd, IPV6_EXTENSION)
            finally:
                os.close(mfd)
    return Dropped(v4, v6)


def dropped_on(ifname: str) -> Dropped | None:
    """dropped() of the interface named `ifname`; None when it or its guard is missing."""
    try:
        return dropped(socket.if_nametoindex(ifname))
    except OSError:
        return None


def remove(ifindex: int) -> None:
    """Take the guard off (bench-dataplane's baseline, the tests; the product never
    does: the guard goes with the veth)."""
    clsact = set(_clsact_programs(ifindex))
    for prog_id in _guard_ids(ifindex):
        if prog_id in clsact:
            continue
        fd = bpf.prog_fd(prog_id)
        try:
            bpf.tcx_detach(ifindex, fd)
        finally:
            os.close(fd)
    if clsact:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.tc("del", "clsact", index=ifindex)
