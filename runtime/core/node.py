"""The node as the core (runtime.core.attach, runtime.core.table, runtime.core.restore) sees it: the
backends it calls and what it knows about the table, held by one Node per process
that serves requests (the agent, a plugin run in-process, the Docker driver, a
benchmark) and passed to every core call.

The core keeps no state of its own between calls; all of it is here, so a test can
hand it fakes (tests/support/fakes.py) and run it without root. The protocols name
what the core needs, no more: the real implementations are the module runtime.kernel.nft,
runtime.kernel.netns.NetlinkLinks and runtime.core.restore.ConntrackFlows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from runtime.core.policy import CompiledPolicies

if TYPE_CHECKING:
    from netpolicy.ruleset import EgressPolicy, Endpoint
    from runtime.kernel.netlink.route import Link
    from runtime.kernel.netns import ContainerView, LinkReaper
    from runtime.kernel.nft import Counters


class TableBackend(Protocol):
    """The `inet sockgate` table: rules, pools and per-attachment elements."""

    def table_exists(self) -> bool: ...

    def counts_along_meter(self) -> bool:
        """The loaded table records the segment meter the node has now."""

    def table_current(self, policy: EgressPolicy) -> bool:
        """Loaded, and rendered from `policy`."""

    def load_table(self, policy: EgressPolicy, endpoints: list[tuple[Endpoint, tuple[str, ...]]], *,
                   pending: bool = False) -> None:
        """The table with the elements of `endpoints`, in one transaction; pending: not
        current until mark_loaded()."""

    def mark_loaded(self, policy: EgressPolicy) -> None:
        """A table loaded with pending=True made current."""

    def sync_node_addresses(self) -> bool:
        """The node's own addresses (sets node4/node6) made current; True if they changed."""

    def add_if_current(self, ep: Endpoint, pools: tuple[str, ...], policy: EgressPolicy) -> bool:
        """Add one endpoint's elements if the table is current; False, nothing changed, if not."""

    def remove(self, ep: Endpoint) -> None:
        """Remove one endpoint's elements; idempotent."""

    def endpoint_present(self, ep: Endpoint) -> list[str]:
        """The sets missing one of the endpoint's elements."""

    def endpoint_counters_of(self, ep: Endpoint) -> Counters | None: ...

    def endpoint_counters(self) -> dict[str, Counters] | None: ...


class LinkBackend(Protocol):
    """The veth pairs, their addresses and routes, in the node's and the containers' netns."""

    def enable_forwarding(self) -> None: ...

    def check_netns(self, netns_path: str) -> None:
        """CNI code 3 unless netns_path is a network namespace this process can open."""

    def create_veth(self, host_ifname: str, netns_path: str, ifname: str, mtu: int,
                    mac: str = "") -> tuple[str, int]:
        """Returns the MAC and the node end's index."""

    def configure_container(self, netns_path: str, ifname: str, ipv4: str, ipv6: str, gateway_mac: str) -> str:
        """Returns the container end's MAC. Also turns off its segmentation offloads."""

    def stop_segmentation(self, ifname: str) -> None:
        """Turn off the segmentation offloads of a container end still in the calling
        thread's netns (one the runtime will move itself)."""

    def stop_container_segmentation(self, netns_path: str, ipv4: str) -> bool:
        """The same inside a container's netns; False when it can't be entered."""

    def tcp_offload_metered(self) -> bool:
        """The node netns has a segment meter: container ends keep TCP's offload."""

    def configure_host(self, host_ifname: str, host_ifindex: int, ipv4: str, ipv6: str, mtu: int) -> None:
        """Up, with fe80::1 and the routes to the container (carrying its MTU)."""

    def retire_link(self, ifname: str) -> bool:
        """Take a node-side link out of service (deleted now or by the reaper)."""

    def delete_link(self, ifname: str) -> bool: ...

    def link_exists(self, ifname: str) -> bool: ...

    def links(self, ifnames: list[str]) -> dict[str, Link]: ...

    def inspect_container(self, netns_path: str, ifname: str) -> ContainerView | None: ...

    def host_routes(self, host_ifname: str) -> set[str]: ...

    def mark_container_links(self, indexes: list[int]) -> None: ...

    def stop_neighbour_resolution(self, host: Link, netns_path: str, ipv4: str, ipv6: str) -> bool: ...

    def narrow_node_end(self, host: Link, ipv4: str, ipv6: str, mtu: int) -> bool:
        """The node end of a veth an earlier sockgate made, at the MTU create_veth gives it
        now; nothing for one already there. True when it changed it."""


class FlowBackend(Protocol):
    """Conntrack, as far as a table reload and `sockgate gc` need it."""

    def purge_unmasqueraded(self, sources: set[str]) -> int: ...

    def forget_gone_containers(self) -> dict[str, int]: ...


@dataclass
class Node:
    table: TableBackend
    links: LinkBackend
    flows: FlowBackend
    # Compiled once per change of the policy file or the ranges cache, not per ADD.
    policies: CompiledPolicies = field(default_factory=CompiledPolicies)
    # True while a watcher (the agent's runtime.agent.policy_watch.PolicyKeeper) keeps the
    # table's rules in shape: then an ADD need not check them itself (see attach).
    watched: bool = False

    @classmethod
    def open(cls, reaper: LinkReaper | None = None) -> Node:
        """The real node. `reaper`: the agent's (retired links deleted in the
        background); without one, links are deleted synchronously (a plugin process).
        Costs no syscall: every backend opens what it needs when first called."""
        from runtime.core.restore import ConntrackFlows
        from runtime.kernel import nft
        from runtime.kernel.netns import NetlinkLinks
        return cls(table=nft, links=NetlinkLinks(reaper), flows=ConntrackFlows())


def link_reaper(run_dir: str, state_dir: str) -> LinkReaper:
    """The agent's reaper of retired links, its marks under the run dir: they must
    outlive the agent, not the node (nor its veths). A marked link that an attachment
    record names again is someone's."""
    from pathlib import Path

    from runtime.kernel.netns import LinkReaper
    from runtime.state.store import attachments

    def in_use() -> set[str]:
        return {att.host_ifname for att in attachments(state_dir).records}
    return LinkReaper(Path(run_dir) / "retired", in_use)
