"""The one core: attach, detach, check and gc of a container, whichever door (CNI,
Docker, demo) the request came through, and the sweep of attachments whose container
vanished (the agent's, `sockgate gc`).

Invariant: the lease files and the attachment record are written before the kernel is
touched, and removed only after the kernel state is gone. Overview: docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

from netpolicy.ruleset import Endpoint
from runtime.billing.flush import final_record
from runtime.core import restore, table
from runtime.core.netconf import NetConf
from runtime.core.node import Node
from runtime.errors import ALREADY_ATTACHED, CHECK_FAILED, KERNEL_FAILURE, NOT_AVAILABLE, SockgateError
from runtime.fsutil import abandoned, held_while, locked, remove, remove_stale_temps
from runtime.state.ipam import LeaseStore, Owner
from runtime.state.store import (
    ADDING,
    READY,
    Attachment,
    AttachmentStore,
    attachments,
    host_ifname,
    network_root,
    table_lock,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttachRequest:
    conf: NetConf
    container_id: str
    ifname: str
    netns: str
    labels: dict[str, str] = field(default_factory=dict)
    runtime_config: dict[str, Any] = field(default_factory=dict)
    mac: str = ""  # of both veth ends; default netns.veth_mac (Docker passes --mac-address)


class Network:
    """On-disk layout of one network under the state dir."""

    def __init__(self, conf: NetConf) -> None:
        self.conf = conf
        self.root = network_root(conf.state_dir, conf.name)
        self.leases = LeaseStore(self.root / "leases")
        self.attachments = AttachmentStore(self.root / "attachments")

    def lock(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.root / "lock")

    def adding(self, container_id: str, ifname: str) -> Path:
        """Held by an ADD from before its record to its end: a record that is not ready
        while nobody holds this is a killed ADD's (see remove_crashed_add)."""
        return self.root / "adding" / f"{container_id}--{ifname}.lock"


def _endpoint(att: Attachment, generation: str = "") -> Endpoint | None:
    """`generation`: only when the elements are being created (ADD)."""
    if not (att.ipv4 and att.ipv6):
        return None
    return Endpoint(att.host_ifname, att.host_ifindex, att.ipv4, att.ipv6, generation)


def _reserve(net: Network, req: AttachRequest) -> Attachment:
    """Under the network lock: refuse a second ADD, lease addresses, write the record."""
    owner = Owner(req.container_id, req.ifname)
    with net.lock():
        if net.attachments.load(req.container_id, req.ifname) is not None:
            raise SockgateError(ALREADY_ATTACHED, "container is already attached to this network",
                                f"container {req.container_id} interface {req.ifname} on {req.conf.name}")
        ipv4 = net.leases.allocate(req.conf.ipv4_pool, owner)
        try:
            ipv6 = net.leases.allocate(req.conf.ipv6_pool, owner)
        except SockgateError:
            net.leases.release(ipv4)
            raise
        att = Attachment(network=req.conf.name, container_id=req.container_id, ifname=req.ifname,
                         netns=req.netns, host_ifname=host_ifname(req.conf.name, req.container_id, req.ifname),
                         ipv4=str(ipv4), ipv6=str(ipv6), mtu=req.conf.mtu, labels=dict(req.labels),
                         runtime_config=dict(req.runtime_config), state=ADDING,
                         created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        net.attachments.save(att)
    return att


def attach(node: Node, req: AttachRequest) -> Attachment:
    """The CNI way: the container end is created and configured inside req.netns."""
    node.links.check_netns(req.netns)

    def place(att: Attachment) -> None:
        att.container_mac = node.links.configure_container(req.netns, req.ifname, att.ipv4, att.ipv6, att.host_mac)

    return _attach(node, req, req.netns, place)


def _attach(node: Node, req: AttachRequest, peer_netns: str, place: Callable[[Attachment], None]) -> Attachment:
    net = Network(req.conf)
    with held_while(net.adding(req.container_id, req.ifname)):
        return _attach_held(node, net, req, peer_netns, place)


def _attach_held(node: Node, net: Network, req: AttachRequest, peer_netns: str,
                 place: Callable[[Attachment], None]) -> Attachment:
    att = _reserve(net, req)
    try:
        # Compiled (cached) before the kernel is touched: an invalid policy fails here.
        egress = node.policies.get(req.conf.policy_file, req.conf.state_dir).egress
        node.links.enable_forwarding()
        att.host_mac, att.host_ifindex = node.links.create_veth(att.host_ifname, peer_netns, req.ifname, att.mtu,
                                                                req.mac)
        # Elements before the links come up: there is no moment when the container
        # can send while the table doesn't know it.
        ep = _endpoint(att, restore.new_generation())
        assert ep is not None  # _reserve leased both addresses
        pools = (str(req.conf.ipv4_pool), str(req.conf.ipv6_pool))
        att.generation = ep.generation  # saved with the ready record
        if not node.watched:
            # No agent checks the rules: this ADD does (the transaction below only
            # asserts the revision).
            table.apply(node, req.conf.policy_file, req.conf.state_dir)
        for _ in range(3):
            # Under the table lock until the record says ready: a reload restores the
            # ready attachments, so this one's elements are either added here, after
            # any reload, or restored by a reload that comes later.
            with table_lock(req.conf.state_dir):
                if node.table.add_if_current(ep, pools, egress):
                    place(att)
                    att.segmentation_off = True  # both doors' place() did it
                    node.links.configure_host(att.host_ifname, att.host_ifindex, att.ipv4, att.ipv6, att.mtu)
                    att.state = READY
                    net.attachments.save(att)
                    break
            # The table is missing or outdated (flushed, upgraded): load it, then add.
            table.apply(node, req.conf.policy_file, req.conf.state_dir)
        else:
            raise SockgateError(KERNEL_FAILURE, "nftables transaction failed",
                                "the sockgate table changed under every attempt to add this container's elements")
    except BaseException:
        log.exception("attach of %s/%s failed; rolling back", req.container_id, req.ifname)
        _teardown(node, net, att)
        raise
    log.info("attached %s/%s on %s: %s %s via %s", att.container_id, att.ifname,
             att.network, att.ipv4, att.ipv6, att.host_ifname)
    return att


def _teardown(node: Node, net: Network, att: Attachment) -> None:
    """Undo an attachment, each step idempotent. The record goes last, so a crash here
    leaves it for the next DEL or GC. Under the table lock (shared): a reload can't
    restore the elements of an attachment half torn down."""
    with table_lock(net.conf.state_dir):
        _teardown_locked(node, net, att)


def _teardown_locked(node: Node, net: Network, att: Attachment, *, net_locked: bool = False) -> None:
    """net_locked: the caller holds the network's lock already (a sweep)."""
    node.links.retire_link(att.host_ifname)
    # The link is down (no more packets) and the counters still exist: bill the rest.
    final_record(net.conf, att, table=node.table)
    ep = _endpoint(att)
    if ep is not None:
        node.table.remove(ep)
    with contextlib.nullcontext() if net_locked else net.lock():
        # The record names the addresses: only their two lease files are read.
        net.leases.release_owner(Owner(att.container_id, att.ifname), [a for a in (att.ipv4, att.ipv6) if a])
        # What a writer killed mid-write left: the record's temp file (unless a live
        # writer holds it) and the cursor's (its writers hold the lock we hold).
        # Two fixed names each, no directory listing: DEL's cost stays flat.
        net.attachments.remove_temp(att.container_id, att.ifname)
        net.leases.remove_temps()
        remove(net.adding(att.container_id, att.ifname))  # a killed ADD's (its holder is gone)
        net.attachments.delete(att.container_id, att.ifname)


def _orphan(net: Network, container_id: str, ifname: str) -> Attachment:
    """What a record would have said, rebuilt from leases and the deterministic veth
    name: DEL must clean up even when the record never made it to disk."""
    att = Attachment(network=net.conf.name, container_id=container_id, ifname=ifname, netns="",
                     host_ifname=host_ifname(net.conf.name, container_id, ifname))
    for addr, owner in net.leases.leases().items():
        if owner == Owner(container_id, ifname):
            if addr.version == 4:
                att.ipv4 = str(addr)
            else:
                att.ipv6 = str(addr)
    return att


def detach(node: Node, conf: NetConf, container_id: str, ifname: str) -> Attachment | None:
    """Idempotent: succeeds when the netns, the link, the leases or the record are
    already gone. Returns the record that was removed, if there was one."""
    net = Network(conf)
    att = net.attachments.load(container_id, ifname)
    _teardown(node, net, att or _orphan(net, container_id, ifname))
    if att:
        log.info("detached %s/%s from %s", container_id, ifname, conf.name)
    if not node.watched:
        table.put_back(node, conf.policy_file, conf.state_dir)  # after the record went: not restored
    return att


def check(node: Node, conf: NetConf, container_id: str, ifname: str, netns_path: str) -> None:
    net = Network(conf)
    att = net.attachments.load(container_id, ifname)
    if att is None or att.state != READY:
        raise SockgateError(CHECK_FAILED, "container is not attached to this network",
                            f"no attachment for {container_id}/{ifname} on {conf.name}")
    node.links.check_netns(netns_path)
    problems = []
    view = node.links.inspect_container(netns_path, ifname)
    if view is None:
        problems.append(f"interface {ifname} missing in {netns_path}")
    else:
        if not view.link_up:
            problems.append(f"interface {ifname} is down")
        problems += [f"address {a} missing on {ifname}" for a in (att.ipv4, att.ipv6)
                     if a not in view.addresses]
        if not view.default_v4:
            problems.append("IPv4 default route missing")
        if not view.default_v6:
            problems.append("IPv6 default route missing")
    if not node.links.link_exists(att.host_ifname):
        problems.append(f"host interface {att.host_ifname} missing")
    else:
        routes = node.links.host_routes(att.host_ifname)
        problems += [f"node route to {d} missing" for d in (f"{att.ipv4}/32", f"{att.ipv6}/128")
                     if d not in routes]
    ep = _endpoint(att)
    problems += (["no addresses recorded"] if ep is None else
                 [f"nft element missing from set {s}" for s in node.table.endpoint_present(ep)])
    if problems:
        raise SockgateError(CHECK_FAILED, "attachment is damaged", "; ".join(problems))


def remove_temps(net: Network) -> list[Path]:
    """Temp files of this network's writers killed mid-write (also under an earlier
    version's names); a live writer's stays (see runtime.fsutil). Lists the
    directories: for GC and periodic sweeps, not for DEL."""
    with net.lock():  # the lease cursor's writers hold it
        return [*net.attachments.remove_stale_temps(), *net.leases.remove_temps(every=True)]


def gc(node: Node, conf: NetConf, valid: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """Remove every attachment of this network not in `valid` (container id, ifname),
    and leases no attachment accounts for. Returns the keys removed."""
    net = Network(conf)
    removed = []
    for att in attachments(conf.state_dir, conf.name).records:
        if att.key not in valid:
            _teardown(node, net, att)
            removed.append(att.key)
    removed += _leftovers(node, net, valid).leases
    for key in removed:
        log.info("gc removed %s/%s from %s", key[0], key[1], conf.name)
    return sorted(set(removed))


@dataclass
class Leftovers:
    """What a crash left in a network that no record accounts for: torn records,
    leases without a record (their owners' keys), temp files of killed writers."""

    torn: list[Path] = field(default_factory=list)
    leases: list[tuple[str, str]] = field(default_factory=list)
    temps: list[Path] = field(default_factory=list)


def _leftovers(node: Node, net: Network, valid: Collection[tuple[str, str]] = ()) -> Leftovers:
    """Remove them (see Leftovers). Under the network lock, a lease without a record is
    a dead ADD's: _reserve writes both under that lock, teardown removes both under it.
    `valid`: keys whose leases stay even without a record (CNI GC's list)."""
    found = Leftovers()
    conf = net.conf
    with net.lock():
        listing = attachments(conf.state_dir, conf.name)
        readable, torn = listing.records, listing.unreadable
        for path in torn:
            # Torn by a crash of the node, which also took what it described.
            log.warning("gc removes unreadable attachment record %s", path)
            path.unlink(missing_ok=True)
            found.torn.append(path)
        recorded = {a.key for a in readable}
        for addr, owner in net.leases.leases().items():
            key = (owner.container_id, owner.ifname)
            if key not in valid and key not in recorded:
                # A lease without a record: an ADD crashed between the two writes,
                # or this is a leftover from an older layout.
                orphan = _orphan(net, *key)
                node.links.delete_link(orphan.host_ifname)
                net.leases.release(addr)
                found.leases.append(key)
    temps = remove_temps(net)
    # The node-wide files under the state dir written the same way (the resolver's
    # record, the Google ranges cache); billing/ and docker/ are swept by their owners.
    for directory in ("policy", "ranges"):
        temps += remove_stale_temps(Path(conf.state_dir) / directory)
    if temps:
        log.warning("gc removed temp files left by killed writers: %s", ", ".join(str(t) for t in temps))
    found.temps = temps
    return found


# --- Attachments whose container vanished (the agent's sweep, `sockgate gc`) ---------
# A container whose netns is destroyed takes its veth end with it, and the kernel then
# deletes the node end too: a ready attachment whose node-side veth is gone has lost
# its container (or had its veth deleted behind sockgate's back: no traffic can flow
# either way). Whether the netns path still opens is no trigger on its own: a runtime's
# pin that this process can't see (a pin dir not mounted into the agent's container)
# looks exactly like a deleted one, and removing a live pod's attachment for that
# would cut it off. It is reported, to say why the veth went.

@dataclass(frozen=True)
class Vanished:
    att: Attachment
    why: str


def vanished(node: Node, records: list[Attachment]) -> list[Attachment]:
    """The ready attachments among `records` whose node-side veth is gone, asked on
    one netlink socket. Not ready ones are never listed: their ADD may be under way
    (a killed one's: see remove_crashed_add)."""
    ready = [att for att in records if att.state == READY]
    present = node.links.links([att.host_ifname for att in ready])
    return [att for att in ready if att.host_ifname not in present]


def _netns_state(node: Node, path: str) -> str:
    if not path:
        return "no netns recorded"
    try:
        node.links.check_netns(path)
    except SockgateError as exc:
        return f"container netns {path}: {exc.msg}"
    return f"container netns {path} still opens"


def remove_vanished(node: Node, conf: NetConf, att: Attachment) -> Vanished | None:
    """Remove `att` (one of vanished()'s) once the same record, under the table lock
    and the network lock, is still ready with its veth still gone; None if anything
    changed meanwhile. The network lock is held to the end: no ADD of the same key can
    reserve while the record is being removed, so a new attachment under the same
    name (and the same veth name) is never touched. A DEL of the same attachment at
    the same time does the same steps, each idempotent."""
    net = Network(conf)
    with table_lock(conf.state_dir), net.lock():
        now = net.attachments.load(att.container_id, att.ifname)
        if now is None or now.state != READY or (now.created, now.generation) != (att.created, att.generation):
            return None
        if node.links.link_exists(now.host_ifname):
            return None
        why = f"node-side veth {now.host_ifname} is gone; {_netns_state(node, now.netns)}"
        _teardown_locked(node, net, now, net_locked=True)
    log.info("removed attachment %s/%s from %s: %s", now.container_id, now.ifname, conf.name, why)
    return Vanished(now, why)


def remove_crashed_add(node: Node, conf: NetConf, att: Attachment) -> Vanished | None:
    """Remove `att` if the ADD that wrote it was killed: nobody holds its ADD lock
    (Network.adding), and the record, read again once that lock is ours, is still the
    same and not ready. Its runtime would DEL it after the failed ADD; one that died
    too, or whose container vanished, never does, and its leases and elements would
    stay (review 10; containerd 1.6 sends no CNI GC). A record without the lock's file
    (an ADD of an earlier version) is left alone: its ADD may be under way."""
    net = Network(conf)
    with table_lock(conf.state_dir), net.lock(), abandoned(net.adding(att.container_id, att.ifname)) as dead:
        if not dead:
            return None
        now = net.attachments.load(att.container_id, att.ifname)
        if now is None or now.state == READY or now.created != att.created:
            return None
        why = f"its ADD was killed before it was ready; {_netns_state(node, now.netns)}"
        _teardown_locked(node, net, now, net_locked=True)
    log.info("removed attachment %s/%s from %s: %s", now.container_id, now.ifname, conf.name, why)
    return Vanished(now, why)


@dataclass
class Swept:
    removed: list[Vanished] = field(default_factory=list)
    leftovers: Leftovers = field(default_factory=Leftovers)


def sweep(node: Node, conf: NetConf, skip: Callable[[Attachment], bool] = lambda att: False) -> Swept:
    """Remove the attachments of this network whose container vanished (see vanished;
    `skip`: those another sweep owns), then the leftovers of crashes (see Leftovers).
    What the agent runs periodically and `sockgate gc` once."""
    records = [att for att in attachments(conf.state_dir, conf.name).records if not skip(att)]
    done = Swept()
    for att in vanished(node, records):
        gone = remove_vanished(node, conf, att)
        if gone is not None:
            done.removed.append(gone)
    for att in (att for att in records if att.state != READY):
        gone = remove_crashed_add(node, conf, att)
        if gone is not None:
            done.removed.append(gone)
    done.leftovers = _leftovers(node, Network(conf))
    return done


def status(node: Node, conf: NetConf) -> None:
    """Ready when state can be written and nftables answers."""
    net = Network(conf)
    try:
        net.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(net.root, os.W_OK):
            raise OSError(f"{net.root} is not writable")
        table.apply(node, conf.policy_file, conf.state_dir)
    except (OSError, SockgateError) as exc:
        raise SockgateError(NOT_AVAILABLE, "sockgate cannot serve ADD requests", str(exc)) from None


# --- Runtimes that move the container's interface themselves (the Docker door) ---------
# Docker's remote driver is asked before the container's netns exists (runc creates
# it; Docker's prestart hook then moves the driver's interface in and sets the
# addresses and routes the driver named, before the container's process starts).
# The attachment is therefore made with the container end left, down, in the node
# netns under the attachment's ifname. No neighbour entry can be put in a container
# we never enter: the container end's NOARP flag (both ends share one MAC) is what
# reaches the gateway without asking the node. Leases, record, elements, billing and
# teardown are the same as attach()'s.

def attach_unplaced(node: Node, req: AttachRequest) -> Attachment:
    """For a runtime that moves the container end itself (Docker): the pair is made
    with both ends in the node netns, the container end left down."""

    def place(att: Attachment) -> None:
        # Here, while the container end is in the node netns: billing counts what the
        # node forwards, which must be the packets the wire carries (ethtool.py).
        node.links.stop_segmentation(req.ifname)
        att.container_mac = att.host_mac

    # thread-self: the calling thread may have joined the node netns with setns.
    return _attach(node, req, "/proc/thread-self/ns/net", place)


def set_netns(conf: NetConf, container_id: str, ifname: str, netns_path: str) -> Attachment | None:
    """Record where the runtime put the container end (reclaim enters that netns)."""
    net = Network(conf)
    with net.lock():
        att = net.attachments.load(container_id, ifname)
        if att is not None and att.netns != netns_path:
            att.netns = netns_path
            net.attachments.save(att)
    return att
