"""Compile a Policy into the `egress_policy` chain and its sets, and explain verdicts
by walking the very same rule list. Pure: data in, ruleset out.

Evaluation order (first match wins): docs/dataplane.md, README "The egress policy".
"""
from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass

from netpolicy.policy import DNS_PORT, Allow, Ingress, Policy
from netpolicy.ranges import Block, IPNetwork, collapse
from netpolicy.ruleset import EgressPolicy, dropped

ALLOW = "accept"
REFUSE = "refuse"

# Sets: (name, declaration, refilled on every load?). Dynamic sets keep their
# elements across reloads: resolved hostnames (the resolver owns them, with
# timeouts) and pools (each network's ADD adds its own).
STATIC_SETS = {
    "allow4": "typeof ip daddr . meta l4proto . th dport; flags interval",
    "allow6": "typeof ip6 daddr . meta l4proto . th dport; flags interval",
    "blocked_ports": "typeof meta l4proto . th dport",
    "blocked4": "type ipv4_addr; flags interval",
    "blocked6": "type ipv6_addr; flags interval",
    "ingress4": "typeof ip saddr . meta l4proto . th dport; flags interval",
    "ingress6": "typeof ip6 saddr . meta l4proto . th dport; flags interval",
    # What the node itself may open into containers (`"source": "node"`); the node's
    # addresses are the sets node4/node6, filled at run time (netpolicy.ruleset).
    "ingress_node": "typeof meta l4proto . th dport; flags interval",
    # clusterDns.services, matched against a flow's original destination.
    "cluster_dns4": "type ipv4_addr",
    "cluster_dns6": "type ipv6_addr",
}
DYNAMIC_SETS = {
    "allow4_dns": "typeof ip daddr . meta l4proto . th dport; flags timeout",
    "allow6_dns": "typeof ip6 daddr . meta l4proto . th dport; flags timeout",
    "pools4": "type ipv4_addr; flags interval; auto-merge",
    "pools6": "type ipv6_addr; flags interval; auto-merge",
}


@dataclass(frozen=True)
class Rule:
    name: str
    why: str
    nft: str
    verdict: str


# The cluster DNS exception looks at the flow's ORIGINAL destination: the forward hook
# sees the address after the node's DNAT (kube-proxy's, in prerouting), a CoreDNS pod's,
# private, which the ranges below would refuse. `ct status dnat`: only through a DNAT
# (a service IP the node does not translate would be routed out as it is). The original
# port has no nft type of its own (it depends on the protocol): `nft list` prints it as
# "0x35 [invalid type]"; the kernel compares the same two bytes as `th dport 53`.


def _cluster_dns(family: str, set_name: str) -> str:
    return (f"meta l4proto {{ tcp, udp }} ct status dnat ct original {family} daddr @{set_name} "
            f"ct original proto-dst {DNS_PORT} return")


RULES: tuple[Rule, ...] = (
    Rule("tcp-udp-only", "only TCP and UDP leave a container (C3)",
         dropped("meta l4proto != { tcp, udp }", "protocol"), REFUSE),
    Rule("cluster-dns", "the cluster DNS service, through the node's DNAT, port 53 only (clusterDns)",
         _cluster_dns("ip", "cluster_dns4"), ALLOW),
    Rule("cluster-dns", "the cluster DNS service, through the node's DNAT, port 53 only (clusterDns)",
         _cluster_dns("ip6", "cluster_dns6"), ALLOW),
    Rule("exception", "exception on its protocols and ports (C8)",
         "ip daddr . meta l4proto . th dport @allow4 return", ALLOW),
    Rule("exception", "exception on its protocols and ports (C8)",
         "ip6 daddr . meta l4proto . th dport @allow6 return", ALLOW),
    Rule("exception-host", "exception by hostname, resolved by the node (C8)",
         "ip daddr . meta l4proto . th dport @allow4_dns return", ALLOW),
    Rule("exception-host", "exception by hostname, resolved by the node (C8)",
         "ip6 daddr . meta l4proto . th dport @allow6_dns return", ALLOW),
    Rule("blocked-port", "blocked port (C4, C6)",
         dropped("meta l4proto . th dport @blocked_ports", "blocked-port"), REFUSE),
    Rule("blocked-range", "blocked destination range (C7)", dropped("ip daddr @blocked4", "blocked-range"), REFUSE),
    Rule("blocked-range", "blocked destination range (C7)", dropped("ip6 daddr @blocked6", "blocked-range"), REFUSE),
    Rule("container-pool", "container address pool", dropped("ip daddr @pools4", "container-pool"), REFUSE),
    Rule("container-pool", "container address pool", dropped("ip6 daddr @pools6", "container-pool"), REFUSE),
)
INGRESS_RULES = ("ip saddr . meta l4proto . th dport @ingress4 accept",
                 "ip6 saddr . meta l4proto . th dport @ingress6 accept")
# `"source": "node"`, in node_to_container (the output hook: only the node's own
# packets pass there, never a forwarded one) ...
NODE_INGRESS_RULES = ("ip saddr @node4 meta l4proto . th dport @ingress_node accept",
                      "ip6 saddr @node6 meta l4proto . th dport @ingress_node accept")
# ... and the container's answers, in container_to_node (the input hook), after its
# anti-spoofing: packets in the REPLY direction of a flow whose original source is the
# node, from the port the node opened it to. A container's own flow to the node is
# in the original direction whatever its ports, so it never matches. (No NAT sits
# between the node and a container: the reply's source port is the port the output
# hook allowed.)
NODE_REPLY_RULES = (
    "ct direction reply ct state established ct original ip saddr @node4 meta l4proto . th sport @ingress_node accept",
    "ct direction reply ct state established ct original ip6 saddr @node6 meta l4proto . th sport @ingress_node accept",
)


def _ip(net: IPNetwork) -> str:
    """Single addresses print without /32 or /128, as nft lists them."""
    return str(net.network_address) if net.num_addresses == 1 else str(net)


def _elements(name: str, items: list[str]) -> list[str]:
    return [f"add element inet sockgate {name} {{ {', '.join(items)} }}"] if items else []


def _allow_elements(allows: tuple[Allow | Ingress, ...], version: int, field: str = "dest") -> list[str]:
    """Elements of a concatenated interval set. The kernel refuses overlapping
    intervals there, so the networks of each (protocol, port) are merged first."""
    by_port: dict[tuple[str, int], list[IPNetwork]] = {}
    for a in allows:
        net = ipaddress.ip_network(getattr(a, field))
        if net.version == version:
            for proto in a.protos:
                for port in a.ports:
                    by_port.setdefault((proto, port), []).append(net)
    return sorted(f"{_ip(net)} . {proto} . {port}"
                  for (proto, port), nets in by_port.items() for net in collapse(nets))


def _node_ports(ingress: tuple[Ingress, ...]) -> list[str]:
    return sorted({f"{proto} . {port}" for i in ingress if i.from_node for proto in i.protos for port in i.ports})


@dataclass(frozen=True)
class Compiled:
    policy: Policy
    blocked: tuple[tuple[IPNetwork, str], ...]  # merged network, the reason of its first block
    egress: EgressPolicy


def blocked_networks(policy: Policy, google: list[IPNetwork]) -> list[tuple[IPNetwork, str]]:
    """Merged blocked ranges, each with the reasons of the blocks inside it."""
    blocks = list(policy.blocked) + [Block(str(n), "Google range (goog.json minus cloud.json)", "C7/C9")
                                     for n in google]
    merged = collapse(b.network for b in blocks)
    keys = [(n.version, int(n.network_address)) for n in merged]
    reasons: list[set[str]] = [set() for _ in merged]
    for b in blocks:
        net = b.network
        # Merged networks are disjoint and sorted, and each block lies inside one: the
        # last merged network starting at or before the block holds it.
        i = bisect.bisect_right(keys, (net.version, int(net.network_address))) - 1
        reasons[i].add(f"{b.name} ({b.source})")
    return [(n, "; ".join(sorted(r))) for n, r in zip(merged, reasons)]


def compile_policy(policy: Policy, google: list[IPNetwork]) -> Compiled:
    blocked = blocked_networks(policy, google)
    statics = [a for a in policy.allows if not a.is_host]
    ports = sorted({f"{b.proto} . {b.port}" for b in policy.blocked_ports})
    cidr_ingress = tuple(i for i in policy.ingress if not i.from_node)
    elements = (
        _elements("allow4", _allow_elements(tuple(statics), 4))
        + _elements("allow6", _allow_elements(tuple(statics), 6))
        + _elements("blocked_ports", ports)
        + _elements("blocked4", [_ip(n) for n, _ in blocked if n.version == 4])
        + _elements("blocked6", [_ip(n) for n, _ in blocked if n.version == 6])
        + _elements("ingress4", _allow_elements(cidr_ingress, 4, "source"))
        + _elements("ingress6", _allow_elements(cidr_ingress, 6, "source"))
        + _elements("ingress_node", _node_ports(policy.ingress))
        + _elements("cluster_dns4", [a for a in policy.cluster_dns if ipaddress.ip_address(a).version == 4])
        + _elements("cluster_dns6", [a for a in policy.cluster_dns if ipaddress.ip_address(a).version == 6])
    )
    egress = EgressPolicy(
        sets=tuple(STATIC_SETS.items()), dynamic_sets=tuple(DYNAMIC_SETS.items()),
        rules=tuple(r.nft for r in RULES), ingress_rules=INGRESS_RULES,
        node_ingress_rules=NODE_INGRESS_RULES, node_reply_rules=NODE_REPLY_RULES, elements=tuple(elements),
        idle_timeout=policy.idle_timeout, bounds=policy.limits, events=policy.events)
    return Compiled(policy, tuple(blocked), egress)


def _why(name: str) -> str:
    return next(r.why for r in RULES if r.name == name)


@dataclass(frozen=True)
class Verdict:
    verdict: str  # ALLOW or REFUSE
    rule: str     # the deciding rule's name
    why: str      # what the rule is for
    detail: str   # which element matched

    def __str__(self) -> str:
        return f"{self.verdict.upper()}  rule {self.rule}: {self.why} — {self.detail}"


def explain(compiled: Compiled, dst: str, port: int, proto: str,
            resolved: dict[str, list[str]] | None = None,
            pools: tuple[IPNetwork, ...] = (), node_addresses: tuple[str, ...] = ()) -> Verdict:
    """The verdict for a new packet to dst:port/proto, and the rule that decides it,
    walking RULES in their nft order. `resolved` maps exception hostnames to the
    addresses the node's resolver currently holds."""
    addr = ipaddress.ip_address(dst)
    policy = compiled.policy
    if addr in {ipaddress.ip_address(a) for a in node_addresses}:
        return Verdict(REFUSE, "node-address", "the node is not a service for containers",
                       f"{addr} is one of the node's own addresses")
    if proto not in ("tcp", "udp"):
        return Verdict(REFUSE, "tcp-udp-only", _why("tcp-udp-only"), f"protocol {proto}")
    if port == DNS_PORT and addr in {ipaddress.ip_address(a) for a in policy.cluster_dns}:
        return Verdict(ALLOW, "cluster-dns", _why("cluster-dns"),
                       f"{addr} is in clusterDns.services: allowed as the flow's original destination, "
                       "to wherever the node's DNAT (kube-proxy) sends it; without a DNAT the rules below decide")
    for a in policy.allows:
        if proto not in a.protos or port not in a.ports:
            continue
        if not a.is_host and addr in ipaddress.ip_network(a.dest):
            return Verdict(ALLOW, "exception", _why("exception"), f"{a.dest} {'/'.join(a.protos)} "
                           f"{','.join(map(str, a.ports))}: {a.reason}")
        if a.is_host and addr in {ipaddress.ip_address(x) for x in (resolved or {}).get(a.dest, [])}:
            return Verdict(ALLOW, "exception-host", _why("exception-host"),
                           f"{addr} is {a.dest} {'/'.join(a.protos)} {','.join(map(str, a.ports))}: {a.reason}")
    for b in policy.blocked_ports:
        if b.proto == proto and b.port == port:
            return Verdict(REFUSE, "blocked-port", _why("blocked-port"), f"{proto} {port}: {b.reason}")
    for net, reason in compiled.blocked:
        if addr.version == net.version and addr in net:
            return Verdict(REFUSE, "blocked-range", _why("blocked-range"), f"{net}: {reason}")
    for pool in pools:
        if addr.version == pool.version and addr in pool:
            return Verdict(REFUSE, "container-pool", _why("container-pool"), str(pool))
    return Verdict(ALLOW, "default", "public destination", "no rule blocks it")
