"""What a reloaded table must hold again: the elements of every ready attachment.

A table is reloaded when it is missing or was rendered from other rules: after `nft
flush ruleset`, a firewall reload, an upgrade. Running containers would otherwise be
treated as spoofing (no tx4/tx6 element) and lose their traffic. The reload and these
elements go into one transaction (runtime.policy.ensure_loaded), taken under the
table lock that ADD and DEL hold while they change elements: no window in which the
table exists without a running container's elements, and no race in which a restore
re-adds the elements of a container a DEL was removing.
"""
from __future__ import annotations

import logging
import secrets

from netpolicy.ruleset import CONTAINER_IFGROUP, Endpoint
from runtime import netns
from runtime.netlink import route as rtnl
from runtime.store import READY, all_attachments

log = logging.getLogger(__name__)


def new_generation() -> str:
    """The token of one creation of an attachment's elements (netpolicy.ruleset,
    counted sets): billing tells a re-created counter by it."""
    return secrets.token_hex(4)


def ready_endpoints(state_dir: str) -> list[tuple[Endpoint, tuple[str, ...]]]:
    """(endpoint, its addresses as pool elements) of every ready attachment whose veth
    exists. Their elements get a new generation: they are created again. Each
    container's own addresses stand in for its network's pools (the records don't name
    them); the full prefixes return with the network's next ADD."""
    ready = [att for att in all_attachments(state_dir) if att.state == READY and att.ipv4 and att.ipv6]
    # A veth that is gone: its container is too; DEL or GC cleans up the rest.
    links = netns.links([att.host_ifname for att in ready])
    # A reload is also what an upgrade brings: veths made by a sockgate that did not
    # set the container interface group get it now, before the rules rely on it, and
    # those that still resolve neighbours stop (the rules drop the container's ND).
    # (Only those not in it yet: a link change costs ~0.2 ms, 200 ms on a node of 1,000.)
    netns.mark_container_links([link.index for link in links.values() if link.group != CONTAINER_IFGROUP])
    for att in ready:
        link = links.get(att.host_ifname)
        if link is not None and not link.flags & rtnl.IFF_NOARP:
            netns.stop_neighbour_resolution(link, att.netns, att.ipv4, att.ipv6)
    generation = new_generation()
    return [(Endpoint(att.host_ifname, links[att.host_ifname].index, att.ipv4, att.ipv6, generation),
             (f"{att.ipv4}/32", f"{att.ipv6}/128")) for att in ready if att.host_ifname in links]


def end_escaped_flows(endpoints: list[tuple[Endpoint, tuple[str, ...]]]) -> int:
    """After a reload: end the flows the containers opened while there was no table
    (runtime.netlink.conntrack.Conntrack.purge_unmasqueraded). A container's next packet on such
    a flow starts a new one, which the rules now see. Returns how many were ended."""
    from runtime.netlink.conntrack import Conntrack  # the CNI executable's ADD path imports this module

    sources = {addr for ep, _ in endpoints for addr in (ep.ipv4, ep.ipv6)}
    ct = Conntrack()
    try:
        ended = ct.purge_unmasqueraded(sources)
    finally:
        ct.close()
    if ended > 0:
        log.warning("ended %d flow(s) that containers opened while the nft table was missing "
                    "(not masqueraded, not filtered)", ended)
    return ended
