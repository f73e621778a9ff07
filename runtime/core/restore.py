"""What a reloaded table must hold again: the elements of every ready attachment,
loaded in the same transaction as the table, under the table lock ADD and DEL hold.

Why: docs/dataplane.md.
"""
from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

from netpolicy.ruleset import CONTAINER_IFGROUP, Endpoint
from runtime.fsutil import locked
from runtime.kernel.netlink import route as rtnl
from runtime.state.store import READY, Attachment, AttachmentStore, attachments, network_root

if TYPE_CHECKING:
    from runtime.core.node import FlowBackend, LinkBackend

log = logging.getLogger(__name__)


def new_generation() -> str:
    """The token of one creation of an attachment's elements (netpolicy.ruleset,
    counted sets): billing tells a re-created counter by it."""
    return secrets.token_hex(4)


def ready_endpoints(links: LinkBackend, state_dir: str) -> list[tuple[Endpoint, tuple[str, ...]]]:
    """(endpoint, its addresses as pool elements) of every ready attachment whose veth
    exists. Their elements get a new generation: they are created again. Each
    container's own addresses stand in for its network's pools (the records don't name
    them); the full prefixes return with the network's next ADD."""
    ready = [att for att in attachments(state_dir).records if att.state == READY and att.ipv4 and att.ipv6]
    # A veth that is gone: its container is too; DEL or GC cleans up the rest.
    found = links.links([att.host_ifname for att in ready])
    # A reload is also what an upgrade brings: veths made by a sockgate that did not
    # set the container interface group get it now, before the rules rely on it, and
    # those that still resolve neighbours stop (the rules drop the container's ND).
    # (Only those not in it yet: a link change costs ~0.2 ms, 200 ms on a node of 1,000.)
    links.mark_container_links([link.index for link in found.values() if link.group != CONTAINER_IFGROUP])
    for att in ready:
        link = found.get(att.host_ifname)
        if link is not None and not link.flags & rtnl.IFF_NOARP:
            links.stop_neighbour_resolution(link, att.netns, att.ipv4, att.ipv6)
        # Veths from before the node end was narrower than the container's (netns.VETH_SLACK):
        # the link itself says whether it's done.
        if link is not None:
            links.narrow_node_end(link, att.ipv4, att.ipv6, att.mtu)
        # Once per attachment an earlier sockgate made: its record says when it's done.
        if link is not None and not att.segmentation_off and links.stop_container_segmentation(att.netns, att.ipv4):
            _record_segmentation_off(state_dir, att)
    generation = new_generation()
    return [(Endpoint(att.host_ifname, found[att.host_ifname].index, att.ipv4, att.ipv6, generation),
             (f"{att.ipv4}/32", f"{att.ipv6}/128")) for att in ready if att.host_ifname in found]


def stop_tcp_offload(links: LinkBackend, state_dir: str, endpoints: list[tuple[Endpoint, tuple[str, ...]]]) -> int:
    """Every segmentation offload off (TCP's too) in the containers of `endpoints`: what
    a load without a segment meter leaves them. Returns how many were reached."""
    loaded = {ep.host_ifname for ep, _ in endpoints}
    ready = [att for att in attachments(state_dir).records if att.state == READY and att.host_ifname in loaded]
    done = sum(links.stop_container_segmentation(att.netns, att.ipv4) for att in ready)
    log.warning("no segment meter: TCP segmentation offload turned off in %d of %d container(s)", done, len(ready))
    return done


def _record_segmentation_off(state_dir: str, att: Attachment) -> None:
    # Under the network's lock, as every other writer of a record (the caller holds the
    # table lock: DEL, which takes it too, can't remove the record meanwhile).
    root = network_root(state_dir, att.network)
    with locked(root / "lock"):
        store = AttachmentStore(root / "attachments")
        current = store.load(att.container_id, att.ifname)
        if current is not None and current.created == att.created:
            current.segmentation_off = True
            store.save(current)


class ConntrackFlows:
    """The FlowBackend over runtime.kernel.netlink.conntrack.Conntrack, opened for each call (reloads are rare)."""

    def purge_unmasqueraded(self, sources: set[str]) -> int:
        from runtime.kernel.netlink.conntrack import Conntrack  # the CNI executable's ADD path imports this module

        ct = Conntrack()
        try:
            return ct.purge_unmasqueraded(sources)
        finally:
            ct.close()

    def forget_gone_containers(self) -> dict[str, int]:
        from runtime.core.gone_flows import forget_gone_containers
        from runtime.kernel.netlink.conntrack import Conntrack

        ct = Conntrack()
        try:
            return forget_gone_containers(ct)
        finally:
            ct.close()


def end_escaped_flows(flows: FlowBackend, endpoints: list[tuple[Endpoint, tuple[str, ...]]]) -> int:
    """After a reload: end the flows the containers opened while there was no table
    (runtime.kernel.netlink.conntrack.Conntrack.purge_unmasqueraded). A container's next packet on such
    a flow starts a new one, which the rules now see. Returns how many were ended."""
    ended = flows.purge_unmasqueraded({addr for ep, _ in endpoints for addr in (ep.ipv4, ep.ipv6)})
    if ended > 0:
        log.warning("ended %d flow(s) that containers opened while the nft table was missing "
                    "(not masqueraded, not filtered)", ended)
    return ended
