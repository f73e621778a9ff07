"""The conntrack entries of containers that are gone (runtime.agent.closing_trim says
why they must go: a deleted container's late packets would reach the next holder of
its address). Used by the agent's closing trim, on the dump it makes anyway, and by
`sockgate gc` through Node.flows."""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.kernel.netlink.conntrack import Conntrack, DumpedEntry


def of_gone_containers(found: dict[str, list[DumpedEntry]], pools: Iterable[str],
                       routed: set[str]) -> dict[str, list[DumpedEntry]]:
    """The entries of containers that are gone: from an address in one of the
    container pools that the node routes into no container veth (`routed`, read after
    the dump: an address given to a new container by then keeps its entries)."""
    nets = [ipaddress.ip_network(p) for p in pools]

    def pooled(addr: str) -> bool:
        ip = ipaddress.ip_address(addr)
        return any(ip in n for n in nets)
    return {addr: entries for addr, entries in found.items() if addr not in routed and pooled(addr)}


def forget_gone_containers(ct: Conntrack, found: dict[str, list[DumpedEntry]] | None = None) -> dict[str, int]:
    """Delete the entries of containers that are gone (of_gone_containers): {address:
    entries deleted}. `found`: the caller's dump of the table (else one is made).
    Raises OSError or SockgateError when the pools or the routes can't be read."""
    from runtime.kernel import nft
    from runtime.kernel.netns import routed_to_containers
    if found is None:
        found = ct.entries_by_source() or {}
    pools = nft.prefixes("pools4") + nft.prefixes("pools6")
    gone = of_gone_containers(found, pools, routed_to_containers())
    deleted = {addr: sum(ct.delete(e.family, e.delete) for e in entries) for addr, entries in gone.items()}
    return {addr: n for addr, n in deleted.items() if n}


def describe_forgotten(deleted: dict[str, int]) -> str:
    return (f"deleted {sum(deleted.values())} conntrack entries of {len(deleted)} address(es) no container holds "
            f"any more (flows of deleted containers, whose late packets the next container given the address "
            f"would receive): {', '.join(sorted(deleted)[:5])}")
