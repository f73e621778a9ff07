"""Namespace plumbing with pyroute2: the routed veth between the node and a container
(ptp style, no shared L2 between containers; both ends carry one MAC and NOARP).

Layout and why NOARP: docs/dataplane.md.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import socket
import stat
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netpolicy.ruleset import CONTAINER_IFGROUP, GATEWAY_V6
from runtime.errors import KERNEL_FAILURE, UNKNOWN_CONTAINER, SockgateError
from runtime.kernel import ethtool, segment_meter
from runtime.kernel.netlink import route as rtnl

log = logging.getLogger(__name__)
GATEWAY_V4 = "169.254.1.1"  # GATEWAY_V6 is netpolicy.ruleset's: rules name it
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


# ioctl(2) of nsfs files: NS_GET_NSTYPE = _IO(0xb7, 0x3) (Linux >= 4.11) answers the
# namespace's CLONE_NEW* type; every other file answers ENOTTY (or EINVAL).
_NS_GET_NSTYPE = 0xB703
# Where runtimes pin pod namespaces, for the error of a path the agent can't use.
_PIN_HINT = ("if the sockgate agent runs in a container, it probably doesn't see the runtime's "
             "pin dir: mount {dir} into the agent container with mountPropagation: HostToContainer "
             "(deploy/kubernetes/sockgate.yaml: the netns-pin-* volumes; README, \"Kubernetes workloads\")")


def open_netns(path: str) -> int:
    """An O_RDONLY descriptor of the network namespace at `path`, checked to be one
    before anything uses it: one open and one ioctl. Anything else is CNI code 3
    naming the path. Without this a path that isn't a netns (typically the empty
    file a runtime bind-mounts the netns onto, seen from a mount namespace the
    mount didn't reach) failed later as "create veth ... Invalid argument" (102)."""
    try:
        # O_NONBLOCK: a FIFO at the path can't block the request; O_NOCTTY: nor a tty
        # become ours.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise SockgateError(UNKNOWN_CONTAINER, "network namespace does not exist", path) from None
    except OSError as exc:
        raise SockgateError(UNKNOWN_CONTAINER, "network namespace is not accessible",
                            f"{path}: {exc.strerror}") from None
    try:
        nstype = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        nstype = None
    if nstype == _CLONE_NEWNET:
        return fd
    try:
        raise _not_a_netns(path, fd, nstype)
    finally:
        os.close(fd)


def _not_a_netns(path: str, fd: int, nstype: int | None) -> SockgateError:
    if nstype is not None:
        return SockgateError(UNKNOWN_CONTAINER, "not a network namespace",
                             f"{path} is a namespace of another type (CLONE_NEW* {nstype:#x})")
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        return SockgateError(UNKNOWN_CONTAINER, "network namespace path is a directory", path)
    if stat.S_ISREG(st.st_mode):
        # What a runtime's pin looks like where its bind mount didn't propagate (or
        # after the runtime unmounted it): the empty file it mounts onto.
        return SockgateError(UNKNOWN_CONTAINER, "not a network namespace",
                             f"{path} is a plain file here, not a mounted network namespace; "
                             + _PIN_HINT.format(dir=os.path.dirname(path) or path))
    return SockgateError(UNKNOWN_CONTAINER, "not a network namespace", f"{path} is not an nsfs file")


def check_netns(path: str) -> None:
    """CNI_NETNS must be a network namespace this process can open (CNI code 3 if not:
    a missing one means the container is gone)."""
    os.close(open_netns(path))


def in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run fn in a thread that joined the netns at `path`.

    setns(CLONE_NEWNET) is per thread, so the rest of the process (and the node-side
    netlink socket) stays where it is; sockets that fn opens belong to the target netns,
    and /proc/sys/net resolves to it too. No fork, unlike pyroute2's NetNS.
    """
    result: dict[str, object] = {}

    def body() -> None:
        try:
            fd = open_netns(path)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise SockgateError(UNKNOWN_CONTAINER, "not a network namespace",
                                        f"{path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=body, name="netns")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def sysctl(key: str, value: str) -> None:
    with open("/proc/sys/" + key.replace(".", "/"), "w") as fh:
        fh.write(value)


_conf_dirs: dict[str, tuple[int, int]] = {}  # family -> (netns inode, fd of /proc/sys/net/<family>/conf)
_conf_lock = threading.Lock()


def _own_conf_dir(family: str) -> int | None:
    """An open /proc/sys/net/<family>/conf of the process's own netns (the node's, for
    the agent and the plugin), when the calling thread is in it; None in any other
    netns (a thread that joined a container's). That netns lives as long as the
    process, so the descriptor can't come to name another one's."""
    here = os.stat("/proc/thread-self/ns/net").st_ino
    if here != os.stat("/proc/self/ns/net").st_ino:
        return None
    with _conf_lock:
        cached = _conf_dirs.get(family)
        if cached is not None and cached[0] == here:
            return cached[1]
        fd = os.open(f"/proc/sys/net/{family}/conf", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if cached is not None:
            os.close(cached[1])
        _conf_dirs[family] = (here, fd)
        return fd


def interface_sysctls(family: str, ifname: str, values: dict[str, str]) -> None:
    """Write net.<family>.conf.<ifname>.<key> = value for each item, with at most one
    path lookup under /proc/sys for all of them (none in the process's own netns).
    That lookup is what costs on a busy node: /proc/sys/net holds one "ipv6" (and
    "ipv4", ...) entry per network namespace that used it, all in one dentry hash
    chain, so every path through it compares about as many names as there are
    containers (~0.15 ms with a thousand; ~0.004 ms without)."""
    base = _own_conf_dir(family)
    if base is not None:
        fd = os.open(ifname, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=base)
    else:
        fd = os.open(f"/proc/sys/net/{family}/conf/{ifname}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for key, value in values.items():
            f = os.open(key, os.O_WRONLY | os.O_CLOEXEC, dir_fd=fd)
            try:
                os.write(f, value.encode())
            finally:
                os.close(f)
    finally:
        os.close(fd)


def _kernel(action: str, exc: Exception) -> SockgateError:
    return SockgateError(KERNEL_FAILURE, f"failed to {action}", str(exc))


def _index(ipr: IPRoute, ifname: str) -> int | None:
    # RTM_GETLINK by name: one kernel lookup. (link_lookup dumps every link, which on
    # a node with a thousand containers costs milliseconds per call.)
    try:
        return ipr.link("get", ifname=ifname)[0]["index"]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


def veth_mac(host_ifname: str) -> str:
    """A locally administered unicast MAC derived from the (unique) host veth name."""
    return ":".join(["02", *(f"{b:02x}" for b in hashlib.sha256(host_ifname.encode()).digest()[:5])])


def create_veth(host_ifname: str, netns_path: str, ifname: str, mtu: int, mac: str = "",
                reaper: LinkReaper | None = None) -> tuple[str, int]:
    """Create the pair with the peer born inside the container netns under its final
    name: no window where it sits in the node under a temporary name, and an ifname
    already taken in the container fails here, before anything else was done. Both
    ends get `mac` (default: veth_mac) and NOARP (see the module doc). `reaper`: the
    one retire_link hands links to, if any.
    Returns the MAC and the node end's index."""
    try:
        return _create_veth(host_ifname, netns_path, ifname, mtu, mac)
    except SockgateError as exc:
        # A DEL returns once its veth is down; the agent's reaper deletes it (and the
        # container's end with it) later. An ADD into the same netns under the same
        # ifname before then (a runtime re-attaching a container) finds the old end:
        # delete that veth now, if it is one the reaper was to delete, and try again.
        if exc.msg != "interface already exists" or reaper is None:
            raise
        peer = in_netns(netns_path, lambda: _peer_index(ifname))
        if peer is None or not reaper.delete_now(peer):
            # The reaper may have finished deleting it between the failed create and
            # delete_now's look at its queue (found by test_reload's churn): gone
            # now means free to create; still there means someone else's.
            if in_netns(netns_path, lambda: link_exists(ifname)):
                raise
        return _create_veth(host_ifname, netns_path, ifname, mtu, mac)



# A veth takes a frame from its peer if it is at most MTU + 18 bytes long: Ethernet
# header and room for a VLAN tag (is_skb_forwardable), tag or no tag. A container
# that cuts its packets itself (a packet socket's virtio header, runtime/kernel/ethtool.py)
# can so hand the node an IP packet 4 bytes over its MTU, which ip_forward answers
# "fragmentation needed" to its (forged) source before any hook, or fragments. So the
# node's end is 4 bytes smaller than the container's, and the routes to the container
# carry the container's MTU (configure_host): what the node forwards to it is not
# limited by its own end. IPv6 needs 1280 on a link: a network of less than 1284
# keeps up to 3 bytes of the slack.
VETH_SLACK = 4  # VLAN_HLEN


def node_end_mtu(mtu: int) -> int:
    return max(mtu - VETH_SLACK, 1280)


def _peer_index(ifname: str) -> int | None:
    """The index, in its own netns, of the veth peer of `ifname` (in this thread's netns)."""
    with rtnl.Rtnl() as nl:
        link = rtnl.find(nl, ifname)
    return link.peer_index if link is not None and link.peer_index else None


def _create_veth(host_ifname: str, netns_path: str, ifname: str, mtu: int, mac: str) -> tuple[str, int]:
    fd = open_netns(netns_path)
    try:
        with rtnl.Rtnl() as nl:
            # The name is ours and derived from this very attachment, which has no
            # record yet: a link under it is a leftover (e.g. retired by an agent that
            # was killed before its reaper got to it).
            if rtnl.find(nl, host_ifname) is not None:
                delete_link(host_ifname)
            # The container end's super-packets hold at most MAX_SEGMENTS segments (its
            # TCP stack's; the meter refuses bigger ones: runtime/kernel/segment_meter.py).
            _, link = nl.run(rtnl.new_veth(host_ifname, ifname, fd, mtu, CONTAINER_IFGROUP,
                                           mac or veth_mac(host_ifname), noarp=True,
                                           name_mtu=node_end_mtu(mtu),
                                           peer_gso_max_segs=segment_meter.MAX_SEGMENTS),
                             rtnl.get_link(host_ifname))
    except rtnl.RtnlError as exc:
        if exc.errno == errno.EEXIST:
            raise SockgateError(KERNEL_FAILURE, "interface already exists",
                                f"{host_ifname} on the node or {ifname} in {netns_path}") from None
        raise _kernel("create veth pair", exc) from None
    finally:
        os.close(fd)
    assert isinstance(link, rtnl.Link)
    return link.mac, link.index


def configure_container(netns_path: str, ifname: str, ipv4: str, ipv6: str, gateway_mac: str) -> str:
    """Addresses, routes and gateway neighbours inside the container; returns the
    container side's MAC."""
    keep_tcp = tcp_offload_metered()  # asked here, in the node's netns

    def body() -> str:
        # No SLAAC, no router advertisements: the container's only v6 address is ours.
        interface_sysctls("ipv6", ifname, {"accept_ra": "0", "autoconf": "0", "accept_dad": "0"})
        # Before the link is up: the node must never see a container's packet whole
        # that the wire carries as several (billing, MTU; runtime/kernel/ethtool.py),
        # unless the segment meter counts it.
        ethtool.segmentation_off(ifname, keep_tcp)
        with rtnl.Rtnl() as nl:
            link = rtnl.find(nl, ifname)
            if link is None:
                raise rtnl.RtnlError(errno.ENODEV, f"find {ifname}")
            idx = link.index
            nl.run(rtnl.set_up(rtnl.LOOPBACK_IFINDEX),
                   rtnl.new_addr(idx, ipv4, 32),
                   rtnl.new_addr(idx, ipv6, 128, nodad=True),
                   rtnl.set_up(idx),
                   rtnl.new_neigh(idx, GATEWAY_V4, gateway_mac),
                   rtnl.new_neigh(idx, GATEWAY_V6, gateway_mac),
                   # Metric = ifindex: a second sockgate interface in the same container
                   # gets its own gateway routes instead of EEXIST; the first one stays
                   # preferred.
                   rtnl.new_route(f"{GATEWAY_V4}/32", idx, scope=rtnl.RT_SCOPE_LINK, priority=idx),
                   rtnl.new_route("0.0.0.0/0", idx, gateway=GATEWAY_V4, priority=idx),
                   rtnl.new_route("::/0", idx, gateway=GATEWAY_V6, priority=idx))
            return link.mac
    try:
        return in_netns(netns_path, body)
    except (NetlinkError, OSError) as exc:
        raise _kernel(f"configure {ifname} in {netns_path}", exc) from None


def tcp_offload_metered() -> bool:
    """A container end keeps TCP's segmentation offloads on: this netns (the node's) has
    a segment meter to count them."""
    return segment_meter.installed()


def stop_segmentation(ifname: str) -> None:
    try:
        ethtool.segmentation_off(ifname, tcp_offload_metered())
    except OSError as exc:
        raise _kernel(f"turn off segmentation offload of {ifname}", exc) from None


def stop_container_segmentation(netns_path: str, ipv4: str) -> bool:
    """What configure_container does now, for a container end an earlier sockgate
    configured (found by its address: Docker renames it). False when the container
    can't be entered (it keeps its offloads)."""
    keep_tcp = tcp_offload_metered()  # asked here, in the node's netns
    try:
        in_netns(netns_path, lambda: ethtool.segmentation_off(socket.if_indextoname(_container_link(ipv4).index),
                                                              keep_tcp))
    except (OSError, NetlinkError, SockgateError) as exc:
        log.warning("the container end with %s (netns %s) keeps its segmentation offloads: %s",
                    ipv4, netns_path or "-", exc)
        return False
    return True


def container_segmentation(netns_path: str, ipv4: str) -> tuple[str, ...]:
    """The segmentation offloads that are on at the container end with `ipv4` (found
    by its address, as stop_container_segmentation does). Raises SockgateError when
    the container can't be entered or the link isn't there."""
    try:
        return in_netns(netns_path, lambda: ethtool.segmentation_on(socket.if_indextoname(_container_link(ipv4).index)))
    except (OSError, NetlinkError) as exc:
        raise _kernel(f"read the offloads of the container end with {ipv4} in {netns_path}", exc) from None


def enable_forwarding() -> None:
    """The node must route between veths and its uplink (what ptp does too). Note: with
    IPv6 forwarding on, the node ignores router advertisements unless accept_ra=2.
    Read over rtnetlink and written only when off: a write of
    net.ipv6.conf.all.forwarding walks every interface of the node under the RTNL
    lock, even when the value doesn't change, and a path under /proc/sys costs a
    lookup that grows with the number of containers (see interface_sysctls)."""
    try:
        try:
            with rtnl.Rtnl() as nl:
                v4, v6_all, v6_default = nl.run(rtnl.get_netconf(socket.AF_INET),
                                                rtnl.get_netconf(socket.AF_INET6),
                                                rtnl.get_netconf(socket.AF_INET6, rtnl.NETCONFA_IFINDEX_DEFAULT))
        except rtnl.RtnlError:
            v4 = v6_all = v6_default = None  # can't tell: write them
        if not (isinstance(v4, rtnl.Netconf) and v4.forwarding == 1):
            sysctl("net.ipv4.ip_forward", "1")
        # `all` also sets `default`, which new interfaces inherit.
        if not all(isinstance(c, rtnl.Netconf) and c.forwarding == 1 for c in (v6_all, v6_default)):
            sysctl("net.ipv6.conf.all.forwarding", "1")
    except OSError as exc:  # e.g. /proc/sys mounted read-only in an unprivileged container
        raise _kernel("enable IP forwarding", exc) from None


def configure_host(host_ifname: str, host_ifindex: int, ipv4: str, ipv6: str, mtu: int) -> None:
    try:
        # fe80::1 is its link-local address (addr_gen_mode 1: none generated); the one
        # the shared MAC would give is the container end's.
        interface_sysctls("ipv6", host_ifname, {"accept_ra": "0", "addr_gen_mode": "1"})
        with rtnl.Rtnl() as nl:
            nl.run(rtnl.new_addr(host_ifindex, GATEWAY_V6, 64, nodad=True),
                   rtnl.set_up(host_ifindex),
                   *_routes_to_container(host_ifindex, ipv4, ipv6, mtu))
    except (NetlinkError, OSError) as exc:
        raise _kernel(f"configure {host_ifname}", exc) from None


def _routes_to_container(host_ifindex: int, ipv4: str, ipv6: str, mtu: int,
                         replace: bool = False) -> tuple[rtnl.Request, rtnl.Request]:
    return (rtnl.new_route(f"{ipv4}/32", host_ifindex, scope=rtnl.RT_SCOPE_LINK, mtu=mtu, replace=replace),
            rtnl.new_route(f"{ipv6}/128", host_ifindex, mtu=mtu, replace=replace))


def narrow_node_end(host: rtnl.Link, ipv4: str, ipv6: str, mtu: int) -> bool:
    """Bring the node end of a veth an earlier sockgate made (both ends at the network's
    MTU, see VETH_SLACK) to what create_veth and configure_host make now. The routes
    first: once they carry the MTU, locked, the smaller end no longer limits what the
    node forwards to the container. Idempotent, so a reload killed halfway does it again.
    False when there was nothing to do, the veth went meanwhile or the kernel refused
    (it stays as it was)."""
    if host.mtu <= node_end_mtu(mtu):
        return False
    try:
        with rtnl.Rtnl() as nl:
            # Two calls: a batch goes on past a refused request, and the end must not
            # narrow under routes that don't carry the MTU.
            nl.run(*_routes_to_container(host.index, ipv4, ipv6, mtu, replace=True))
            nl.run(rtnl.set_mtu(host.index, node_end_mtu(mtu)))
    except (NetlinkError, OSError) as exc:
        log.warning("the node end %d of the veth to %s keeps MTU %d: %s", host.index, ipv4, host.mtu, exc)
        return False
    return True


def delete_link(ifname: str) -> bool:
    """Delete a node-side link; its veth peer and the routes through it go with it.
    True if it existed."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:  # raced with another deleter
                raise _kernel(f"delete {ifname}", exc) from None
        return True


class LinkReaper:
    """Deletes retired links in the background. Deleting a veth waits for an RCU grace
    period in the kernel (~40 ms here), which DEL need not wait for once the link is
    down: a down link carries no packet, and its routes are gone with it.

    With `pending_dir`, the queue survives a `kill -9` of the agent: each retired link
    is marked there (an empty file named after it, under /run) before it goes down and
    unmarked once deleted; the next reaper deletes what is still marked. Without it a
    killed agent's queued links stayed, down, for good: their DEL had returned 0 and
    removed lease and record, so neither a DEL retry nor GC knew of them (found by
    scripts/soak). `in_use` names the host veths that have an attachment record: a
    marked link that is up again or recorded (the same container added again) is
    someone's, and only unmarked."""

    def __init__(self, pending_dir: str | os.PathLike[str] | None = None,
                 in_use: Callable[[], set[str]] | None = None) -> None:
        self._queue: list[str] = []
        self._deleting: str | None = None
        self._cond = threading.Condition()
        self._pending = os.fspath(pending_dir) if pending_dir is not None else None
        self._in_use = in_use
        if self._pending is not None:
            os.makedirs(self._pending, mode=0o700, exist_ok=True)

    def _mark(self, ifname: str) -> None:
        if self._pending is not None:
            with open(os.path.join(self._pending, ifname), "w"):
                pass

    def _unmark(self, ifname: str) -> None:
        if self._pending is not None:
            try:
                os.unlink(os.path.join(self._pending, ifname))
            except FileNotFoundError:
                pass

    def retire(self, ifname: str) -> bool:
        self._mark(ifname)   # before the link goes down: a kill in between leaves the mark
        try:
            with rtnl.Rtnl() as nl:
                nl.run(rtnl.set_down_by_name(ifname))
        except rtnl.RtnlError as exc:
            self._unmark(ifname)
            if exc.errno == errno.ENODEV:
                return False
            raise _kernel(f"set {ifname} down", exc) from None
        with self._cond:
            self._queue.append(ifname)
            self._cond.notify()
        return True

    def delete_now(self, index: int) -> bool:
        """Delete at once the retired link with this index, if it is one this reaper
        was to delete (queued or being deleted); True if it was."""
        with self._cond:
            candidates = [*self._queue, *([self._deleting] if self._deleting else [])]
        name = next((n for n, link in links(candidates).items() if link.index == index), None)
        if name is None:
            return False
        with self._cond:
            if name in self._queue:
                self._queue.remove(name)
        delete_link(name)  # if the reaper is deleting it too, one of the two finds it gone
        self._unmark(name)
        log.info("deleted retired %s at once: an ADD needs its peer's name in the container", name)
        return True

    def recover(self) -> list[str]:
        """Queue the links an earlier reaper marked and never deleted; returns them."""
        if self._pending is None:
            return []
        marked = sorted(n for n in os.listdir(self._pending) if n.startswith("sg"))
        if not marked:
            return []
        found = links(marked)
        in_use = self._in_use() if self._in_use is not None else set()
        queued = []
        for name in marked:
            link = found.get(name)
            if link is None or link.flags & rtnl.IFF_UP or name in in_use:
                self._unmark(name)
            else:
                queued.append(name)
        if queued:
            log.warning("deleting %d link(s) retired by an earlier agent and never deleted: %s",
                        len(queued), ", ".join(queued))
            with self._cond:
                self._queue.extend(queued)
                self._cond.notify()
        return queued

    def reap_earlier(self) -> list[str]:
        """Delete now, in this process, what an earlier reaper marked and never deleted
        (`sockgate gc`: an agent killed between a DEL's answer and the link's deletion,
        and not started again). Returns the links deleted."""
        queued = self.recover()
        with self._cond:
            self._queue = [n for n in self._queue if n not in queued]
        for name in queued:
            delete_link(name)  # a running agent's reaper may delete it too: one finds it gone
            self._unmark(name)
        return queued

    def run(self, stop: threading.Event) -> None:
        """Until stop is set and the queue is empty: nothing retired is left behind."""
        self.recover()
        while True:
            with self._cond:
                while not self._queue and not stop.is_set():
                    self._cond.wait(0.5)
                if not self._queue:
                    return
                ifname = self._queue.pop(0)
                self._deleting = ifname
            delete_link(ifname)
            with self._cond:
                self._deleting = None
            self._unmark(ifname)


def retire_link(ifname: str, reaper: LinkReaper | None = None) -> bool:
    """Take a node-side link out of service: deleted now, or set down and deleted in
    the background by `reaper` (the agent's; a plugin process has none). True if it
    existed."""
    if reaper is not None:
        return reaper.retire(ifname)
    return delete_link(ifname)


def links(ifnames: list[str]) -> dict[str, rtnl.Link]:
    """{name: link} of those of `ifnames` that exist, on one netlink socket."""
    with rtnl.Rtnl() as nl:
        found = {name: rtnl.find(nl, name) for name in ifnames}
    return {name: link for name, link in found.items() if link is not None}


def link_indexes(ifnames: list[str]) -> dict[str, int]:
    """{name: index} of those of `ifnames` that exist, on one netlink socket."""
    return {name: link.index for name, link in links(ifnames).items()}


def mark_container_links(indexes: list[int]) -> None:
    """Put node-side veths into CONTAINER_IFGROUP (veths created before sockgate set
    it at creation)."""
    try:
        with rtnl.Rtnl() as nl:
            nl.run(*(rtnl.set_group(i, CONTAINER_IFGROUP) for i in indexes))
    except rtnl.RtnlError as exc:
        if exc.errno != errno.ENODEV:  # a container that went meanwhile
            raise _kernel("set interface group", exc) from None


def _container_link(ipv4: str) -> rtnl.Link:
    """The link holding `ipv4` in this thread's netns (a container's end of its veth)."""
    with IPRoute() as ipr:
        found = [a["index"] for a in ipr.get_addr(address=ipv4)]
    if not found:
        raise SockgateError(UNKNOWN_CONTAINER, f"no interface with {ipv4}")
    with rtnl.Rtnl() as nl:
        link = nl.run(rtnl.get_link_by_index(found[0]))[0]
    assert isinstance(link, rtnl.Link)
    return link


def stop_neighbour_resolution(host: rtnl.Link, netns_path: str, ipv4: str, ipv6: str) -> bool:
    """Bring a veth made by an earlier sockgate (ARP and ND between its ends) to what
    create_veth makes now: permanent entries for the gateways in the container, NOARP
    on the node's end (from then on the node ignores what the container says about
    neighbours) and permanent entries there for the container's addresses. False when the
    container can't be entered (the veth stays as it was)."""
    def container_side() -> str:
        link = _container_link(ipv4)
        with rtnl.Rtnl() as nl:
            nl.run(rtnl.new_neigh(link.index, GATEWAY_V4, host.mac, replace=True),
                   rtnl.new_neigh(link.index, GATEWAY_V6, host.mac, replace=True))
            return link.mac
    try:
        container_mac = in_netns(netns_path, container_side)
        with rtnl.Rtnl() as nl:
            # In this order: turning NOARP on flushes the link's neighbour entries,
            # permanent ones too (one batch: the kernel takes it in one go).
            nl.run(rtnl.set_noarp(host.index),
                   rtnl.new_neigh(host.index, ipv4, container_mac, replace=True),
                   rtnl.new_neigh(host.index, ipv6, container_mac, replace=True))
    except (OSError, NetlinkError, SockgateError) as exc:
        log.warning("veth %d (container netns %s) keeps neighbour resolution: %s", host.index, netns_path or "-", exc)
        return False
    return True


def link_exists(ifname: str) -> bool:
    return ifname in link_indexes([ifname])


@dataclass(frozen=True)
class ContainerView:
    """What the container side looks like, for CHECK."""

    link_up: bool
    addresses: frozenset[str]
    default_v4: bool
    default_v6: bool


def inspect_container(netns_path: str, ifname: str) -> ContainerView | None:
    def body() -> ContainerView | None:
        with IPRoute() as ipr:
            idx = _index(ipr, ifname)
            if idx is None:
                return None
            link = ipr.get_links(idx)[0]
            addrs = frozenset(a.get("IFA_ADDRESS") for a in ipr.get_addr(index=idx))
            defaults = {r["family"] for r in ipr.get_routes(oif=idx)
                        if r["dst_len"] == 0 and r.get("RTA_GATEWAY")}
            return ContainerView(link_up=bool(link["flags"] & 1), addresses=addrs,
                                 default_v4=socket.AF_INET in defaults,
                                 default_v6=socket.AF_INET6 in defaults)
    return in_netns(netns_path, body)


def host_routes(host_ifname: str) -> set[str]:
    """Destinations routed through a host veth, as "addr/len"."""
    with IPRoute() as ipr:
        idx = _index(ipr, host_ifname)
        if idx is None:
            return set()
        return {f"{r.get('RTA_DST')}/{r['dst_len']}" for r in ipr.get_routes(oif=idx, family=socket.AF_INET)
                } | {f"{r.get('RTA_DST')}/{r['dst_len']}" for r in ipr.get_routes(oif=idx, family=socket.AF_INET6)}


def routed_to_containers() -> set[str]:
    """The addresses the node routes into a container veth now (a link in
    CONTAINER_IFGROUP): the attached containers', of every state dir and door. A
    deleted container's address is not among them: its veth went down at DEL, and its
    routes with it."""
    with IPRoute() as ipr:
        veths = {link["index"] for link in ipr.get_links() if link.get("IFLA_GROUP") == CONTAINER_IFGROUP}
        return {r.get("RTA_DST") for family in (socket.AF_INET, socket.AF_INET6)
                for r in ipr.get_routes(family=family) if r.get("RTA_OIF") in veths and r.get("RTA_DST")}


class NetlinkLinks:
    """The LinkBackend (runtime.core.node) over this module. With a reaper (the agent's),
    retired links are set down and deleted in the background."""

    def __init__(self, reaper: LinkReaper | None = None) -> None:
        self.reaper = reaper

    def create_veth(self, host_ifname: str, netns_path: str, ifname: str, mtu: int,
                    mac: str = "") -> tuple[str, int]:
        return create_veth(host_ifname, netns_path, ifname, mtu, mac, self.reaper)

    def retire_link(self, ifname: str) -> bool:
        return retire_link(ifname, self.reaper)

    check_netns = staticmethod(check_netns)
    enable_forwarding = staticmethod(enable_forwarding)
    configure_container = staticmethod(configure_container)
    stop_segmentation = staticmethod(stop_segmentation)
    stop_container_segmentation = staticmethod(stop_container_segmentation)
    tcp_offload_metered = staticmethod(tcp_offload_metered)
    configure_host = staticmethod(configure_host)
    delete_link = staticmethod(delete_link)
    link_exists = staticmethod(link_exists)
    links = staticmethod(links)
    inspect_container = staticmethod(inspect_container)
    host_routes = staticmethod(host_routes)
    mark_container_links = staticmethod(mark_container_links)
    stop_neighbour_resolution = staticmethod(stop_neighbour_resolution)
    narrow_node_end = staticmethod(narrow_node_end)
