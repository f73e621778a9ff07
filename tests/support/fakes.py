"""In-memory stand-ins for the node's kernel: the backends of runtime.core.node (the nft
table, the links, conntrack), so that the core (runtime.core.attach, policy, restore) runs
in unit tests without root.

Each fake keeps a model of what the kernel would hold (sets with their elements and
whether the table is loaded and current; links, addresses and routes per netns) and
can dump it. Every backend call goes through one Faults, which records the call and
fails the one it was told to: a test can make each call of an attach fail in turn.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

from netpolicy.ruleset import CONTAINER_IFGROUP, COUNTED_SETS, EgressPolicy, Endpoint, endpoint_keys, revision
from runtime.core.node import Node
from runtime.core.policy import CompiledPolicies
from runtime.errors import KERNEL_FAILURE, UNKNOWN_CONTAINER, SockgateError
from runtime.kernel.netlink import route as rtnl
from runtime.kernel.netns import GATEWAY_V4, GATEWAY_V6, ContainerView, node_end_mtu, veth_mac
from runtime.kernel.nft import Counters

NODE_NETNS = "node"
# What the core names the node's own netns by (the Docker door's unplaced veths).
NODE_PATHS = ("/proc/thread-self/ns/net", "/proc/self/ns/net")


class Faults:
    """The backends' calls, in order ("table.add_if_current", "links.create_veth", ...),
    and the failure to inject: the call numbered `fail_at` (0 = the first call from the
    start, see `calls`) or the next call of `fail_op`, once."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_at: int | None = None
        self.fail_op: str | None = None
        self.raised: SockgateError | None = None

    def hit(self, op: str) -> None:
        index = len(self.calls)
        self.calls.append(op)
        if index == self.fail_at or op == self.fail_op:
            self.fail_at = self.fail_op = None
            # What the real backends raise when the kernel refuses.
            self.raised = SockgateError(KERNEL_FAILURE, "injected failure", f"{op} (call {index})")
            raise self.raised


@dataclass
class FakeElement:
    owner: str  # the host veth, as the element's comment names it
    generation: str = ""
    packets: int = 0
    bytes: int = 0


class FakeTable:
    """The `inet sockgate` table: present or not, the revision it was rendered from,
    its per-attachment sets (key -> element) and its pools."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.revision: str | None = None  # None: no table
        self.sets: dict[str, dict[bytes, FakeElement]] = {}
        self.pools: set[str] = set()
        self.loads = 0
        self.refuse_adds = False  # every add_if_current finds the table changed

    # --- what tests do to it ---------------------------------------------------------
    def flush(self) -> None:
        """Someone ran `nft flush ruleset`."""
        self.revision = None
        self.sets.clear()
        self.pools.clear()

    def count(self, host_ifname: str, set_name: str, packets: int, nbytes: int) -> None:
        """Traffic through one endpoint's element of a counted set."""
        for elem in self.sets.get(set_name, {}).values():
            if elem.owner == host_ifname:
                elem.packets += packets
                elem.bytes += nbytes

    def owners(self) -> dict[str, set[str]]:
        """{set: host veths with an element in it}, sets without elements left out."""
        return {name: {e.owner for e in elems.values()} for name, elems in self.sets.items() if elems}

    def dump(self) -> dict:
        return {"present": self.revision is not None, "revision": self.revision, "pools": sorted(self.pools),
                "elements": {name: sorted(owners) for name, owners in self.owners().items()}}

    def _add(self, ep: Endpoint) -> None:
        for set_name, key in endpoint_keys(ep):
            self.sets.setdefault(set_name, {}).setdefault(key, FakeElement(ep.host_ifname, ep.generation))

    # --- TableBackend ------------------------------------------------------------------
    def table_exists(self) -> bool:
        self.faults.hit("table.table_exists")
        return self.revision is not None

    def counts_along_meter(self) -> bool:
        self.faults.hit("table.counts_along_meter")
        return self.revision is not None  # the fakes have no meter: a table records "none"

    def table_current(self, policy: EgressPolicy) -> bool:
        self.faults.hit("table.table_current")
        return self.revision == revision(policy)

    def load_table(self, policy: EgressPolicy, endpoints: list[tuple[Endpoint, tuple[str, ...]]] = (), *,
                   pending: bool = False) -> None:
        self.faults.hit("table.load_table")
        # Elements already there stay (the rendering is idempotent).
        self.revision = ("pending " if pending else "") + revision(policy)
        self.loads += 1
        for ep, pools in endpoints:
            self.pools.update(pools)
            self._add(ep)

    def mark_loaded(self, policy: EgressPolicy) -> None:
        self.faults.hit("table.mark_loaded")
        self.revision = revision(policy)

    def sync_node_addresses(self) -> bool:
        self.faults.hit("table.sync_node_addresses")
        return False  # the fakes have no node addresses to follow

    def add_if_current(self, ep: Endpoint, pools: tuple[str, ...], policy: EgressPolicy) -> bool:
        self.faults.hit("table.add_if_current")
        if self.refuse_adds or self.revision != revision(policy):
            return False
        self.pools.update(pools)
        self._add(ep)
        return True

    def remove(self, ep: Endpoint) -> None:
        self.faults.hit("table.remove")
        if self.revision is None:
            return
        if ep.host_ifindex:
            for set_name, key in endpoint_keys(ep):
                self.sets.get(set_name, {}).pop(key, None)
            return
        # No index: found by the name their comments carry (and ifaces' key).
        for elems in self.sets.values():
            for key in [k for k, e in elems.items() if e.owner == ep.host_ifname]:
                del elems[key]

    def endpoint_present(self, ep: Endpoint) -> list[str]:
        self.faults.hit("table.endpoint_present")
        return [name for name, key in endpoint_keys(ep) if key not in self.sets.get(name, {})]

    def endpoint_counters_of(self, ep: Endpoint) -> Counters | None:
        self.faults.hit("table.endpoint_counters_of")
        got = {name: self.sets.get(name, {}).get(key) for name, key in endpoint_keys(ep) if name in COUNTED_SETS}
        return self._summed([e for e in got.values() if e is not None], got.get("rx"))

    def endpoint_counters(self) -> dict[str, Counters] | None:
        self.faults.hit("table.endpoint_counters")
        if self.revision is None:
            return None
        out = {}
        for rx in self.sets.get("rx", {}).values():
            mine = [e for name in COUNTED_SETS for e in self.sets.get(name, {}).values() if e.owner == rx.owner]
            out[rx.owner] = self._summed(mine, rx)
        return out

    @staticmethod
    def _summed(elems: list[FakeElement], rx: FakeElement | None) -> Counters | None:
        if rx is None:
            return None
        tx = [e for e in elems if e is not rx]
        generations = {e.generation for e in elems}
        return Counters(tx_bytes=sum(e.bytes for e in tx), tx_packets=sum(e.packets for e in tx),
                        rx_bytes=rx.bytes, rx_packets=rx.packets,
                        generation=generations.pop() if len(generations) == 1 else "?")


@dataclass
class FakeLink:
    name: str
    index: int
    mac: str
    peer: tuple[str, str]  # (netns, name) of the other end
    up: bool = False
    addresses: set[str] = field(default_factory=set)
    group: int = 0
    flags: int = 0
    segmentation: bool = True  # segmentation offload, what a new veth has
    mtu: int = 1500


class FakeLinks:
    """Links, addresses and routes per netns; the node's is NODE_NETNS, a container's
    is named by its path. Routes are (destination, device, gateway) triples."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.netns: dict[str, dict[str, FakeLink]] = {NODE_NETNS: {}}
        self.routes: dict[str, set[tuple[str, str, str]]] = {NODE_NETNS: set()}
        self.forwarding = False
        self.narrowed: list[str] = []  # node ends narrow_node_end changed
        self._index = itertools.count(100)

    @staticmethod
    def _ns(path: str) -> str:
        return NODE_NETNS if path in NODE_PATHS else path

    def _in(self, ns: str) -> dict[str, FakeLink]:
        self.routes.setdefault(ns, set())
        return self.netns.setdefault(ns, {})

    def _delete(self, ifname: str) -> bool:
        link = self.netns[NODE_NETNS].pop(ifname, None)
        if link is None:
            return False
        peer_ns, peer_name = link.peer
        self._in(peer_ns).pop(peer_name, None)
        # Routes through either end go with the pair.
        for ns, name in ((NODE_NETNS, ifname), link.peer):
            self.routes[ns] = {r for r in self.routes[ns] if r[1] != name}
        return True

    # --- what tests look at or do --------------------------------------------------------
    def node_links(self) -> set[str]:
        return set(self.netns[NODE_NETNS])

    def dump(self) -> dict:
        return {"links": {ns: sorted(links) for ns, links in self.netns.items() if links},
                "routes": {ns: sorted(r) for ns, r in self.routes.items() if r}}

    # --- LinkBackend ---------------------------------------------------------------------
    def enable_forwarding(self) -> None:
        self.faults.hit("links.enable_forwarding")
        self.forwarding = True

    def check_netns(self, netns_path: str) -> None:
        """A fake container's netns is any file that exists (the kernel's check is
        runtime.kernel.netns.open_netns, tested in the lab and test_unit_netns)."""
        if not os.path.exists(netns_path):
            raise SockgateError(UNKNOWN_CONTAINER, "network namespace does not exist", netns_path)

    def create_veth(self, host_ifname: str, netns_path: str, ifname: str, mtu: int,
                    mac: str = "") -> tuple[str, int]:
        self.faults.hit("links.create_veth")
        ns = self._ns(netns_path)
        if host_ifname in self.netns[NODE_NETNS]:
            self._delete(host_ifname)  # a leftover under this attachment's name
        if ifname in self._in(ns):
            raise SockgateError(KERNEL_FAILURE, "interface already exists",
                                f"{host_ifname} on the node or {ifname} in {netns_path}")
        mac = mac or veth_mac(host_ifname)
        host = FakeLink(host_ifname, next(self._index), mac, (ns, ifname), group=CONTAINER_IFGROUP,
                        flags=rtnl.IFF_NOARP, mtu=node_end_mtu(mtu))
        self.netns[NODE_NETNS][host_ifname] = host
        self._in(ns)[ifname] = FakeLink(ifname, next(self._index), mac, (NODE_NETNS, host_ifname),
                                        group=CONTAINER_IFGROUP, flags=rtnl.IFF_NOARP, mtu=mtu)
        return host.mac, host.index

    def configure_container(self, netns_path: str, ifname: str, ipv4: str, ipv6: str, gateway_mac: str) -> str:
        self.faults.hit("links.configure_container")
        ns = self._ns(netns_path)
        link = self._in(ns).get(ifname)
        if link is None:
            raise SockgateError(KERNEL_FAILURE, f"failed to configure {ifname} in {netns_path}", "No such device")
        link.addresses |= {ipv4, ipv6}
        link.segmentation = False
        link.up = True
        self.routes[ns] |= {(f"{GATEWAY_V4}/32", ifname, ""), ("0.0.0.0/0", ifname, GATEWAY_V4),
                            ("::/0", ifname, GATEWAY_V6)}
        return link.mac

    def stop_segmentation(self, ifname: str) -> None:
        self.faults.hit("links.stop_segmentation")
        link = self.netns[NODE_NETNS].get(ifname)
        if link is None:
            raise SockgateError(KERNEL_FAILURE, f"failed to turn off segmentation offload of {ifname}",
                                "No such device")
        link.segmentation = False

    def configure_host(self, host_ifname: str, host_ifindex: int, ipv4: str, ipv6: str, mtu: int) -> None:
        self.faults.hit("links.configure_host")
        link = self.netns[NODE_NETNS].get(host_ifname)
        if link is None or link.index != host_ifindex:
            raise SockgateError(KERNEL_FAILURE, f"failed to configure {host_ifname}", "No such device")
        link.addresses.add(GATEWAY_V6)
        link.up = True
        self.routes[NODE_NETNS] |= {(f"{ipv4}/32", host_ifname, ""), (f"{ipv6}/128", host_ifname, "")}

    def retire_link(self, ifname: str) -> bool:
        self.faults.hit("links.retire_link")
        return self._delete(ifname)

    def delete_link(self, ifname: str) -> bool:
        self.faults.hit("links.delete_link")
        return self._delete(ifname)

    def link_exists(self, ifname: str) -> bool:
        self.faults.hit("links.link_exists")
        return ifname in self.netns[NODE_NETNS]

    def links(self, ifnames: list[str]) -> dict[str, rtnl.Link]:
        self.faults.hit("links.links")
        found = [self.netns[NODE_NETNS][name] for name in ifnames if name in self.netns[NODE_NETNS]]
        return {link.name: rtnl.Link(link.index, link.mac, link.flags | (rtnl.IFF_UP if link.up else 0), link.group,
                                     mtu=link.mtu)
                for link in found}

    def inspect_container(self, netns_path: str, ifname: str) -> ContainerView | None:
        self.faults.hit("links.inspect_container")
        ns = self._ns(netns_path)
        link = self._in(ns).get(ifname)
        if link is None:
            return None
        defaults = {dst for dst, dev, gw in self.routes[ns] if dev == ifname and gw and dst in ("0.0.0.0/0", "::/0")}
        return ContainerView(link.up, frozenset(link.addresses), "0.0.0.0/0" in defaults, "::/0" in defaults)

    def host_routes(self, host_ifname: str) -> set[str]:
        self.faults.hit("links.host_routes")
        return {dst for dst, dev, _ in self.routes[NODE_NETNS] if dev == host_ifname}

    def mark_container_links(self, indexes: list[int]) -> None:
        self.faults.hit("links.mark_container_links")
        for link in self.netns[NODE_NETNS].values():
            if link.index in indexes:
                link.group = CONTAINER_IFGROUP

    def stop_neighbour_resolution(self, host: rtnl.Link, netns_path: str, ipv4: str, ipv6: str) -> bool:
        self.faults.hit("links.stop_neighbour_resolution")
        for link in self.netns[NODE_NETNS].values():
            if link.index == host.index:
                link.flags |= rtnl.IFF_NOARP
        return True

    def narrow_node_end(self, host: rtnl.Link, ipv4: str, ipv6: str, mtu: int) -> bool:
        self.faults.hit("links.narrow_node_end")
        if host.mtu <= node_end_mtu(mtu):
            return False
        for link in self.netns[NODE_NETNS].values():
            if link.index == host.index:
                link.mtu = node_end_mtu(mtu)
                self.narrowed.append(link.name)
        return True

    def tcp_offload_metered(self) -> bool:
        return True

    def stop_container_segmentation(self, netns_path: str, ipv4: str) -> bool:
        self.faults.hit("links.stop_container_segmentation")
        found = [link for link in self._in(self._ns(netns_path)).values() if ipv4 in link.addresses]
        for link in found:
            link.segmentation = False
        return bool(found)


class FakeFlows:
    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.purged: list[set[str]] = []

    def purge_unmasqueraded(self, sources: set[str]) -> int:
        self.faults.hit("flows.purge_unmasqueraded")
        self.purged.append(set(sources))
        return 0

    def forget_gone_containers(self) -> dict[str, int]:
        self.faults.hit("flows.forget_gone_containers")
        return {}


@dataclass
class FakeNode:
    """A Node on fakes, with the fakes typed as themselves for the tests."""

    node: Node
    faults: Faults
    table: FakeTable
    links: FakeLinks
    flows: FakeFlows


def fake_node(policies: CompiledPolicies | None = None) -> FakeNode:
    """`policies`: shared between nodes to compile the policy once per test module."""
    faults = Faults()
    table, links, flows = FakeTable(faults), FakeLinks(faults), FakeFlows(faults)
    node = Node(table=table, links=links, flows=flows, policies=policies or CompiledPolicies())
    return FakeNode(node, faults, table, links, flows)
