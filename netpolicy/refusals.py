"""The rule and the element that refused a flow, for each reason the table reports
(netpolicy.ruleset.EVENT_REASONS), in the words `sockgate policy explain` prints
(netpolicy.compile.explain: "rule NAME: WHY — ELEMENT"); for the reasons outside the
egress policy, in the reason's own words. Pure: data in, words out.

What the kernel said decides: the reason comes from the refusing rule, and the
policy only supplies the element (which blocked range, which port block). When the
policy changed since (the range is no longer blocked), the element is None.
"""
from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from netpolicy.compile import RULES, Compiled
from netpolicy.ranges import IPNetwork
from netpolicy.ruleset import FlowBounds

# The egress policy's reasons, by the name of their rule in netpolicy.compile.RULES.
POLICY_RULES = {"protocol": "tcp-udp-only", "blocked-port": "blocked-port", "blocked-range": "blocked-range",
                "container-pool": "container-pool"}
# explain()'s verdict for a destination that is the node's own address; a container
# meets it as "container-to-node" (the input hook, before any policy).
NODE_RULE = ("node-address", "the node is not a service for containers")
# The other reasons, in their own words.
REASON_WORDS = {
    "spoofed-source": "a container sends only from its own addresses",
    "spoofed-node": "a forwarded packet claiming to come from the node is forged",
    "tcp-without-flow": "a TCP flow starts with a SYN (this one is unknown, or was reclaimed)",
    "tcp-reopen": "a connection the peer reset is not reopened on the same ports while its entry closes "
                  "(about 10 s)",
    "container-to-container": "containers can't reach each other (C1)",
    "icmp-error": "ICMP errors leave only about the container's own flows (C3)",
    "flow-rate": "the container's rate of new flows (limits.newFlowsPerSecond, newFlowsBurst)",
    "flow-limit": "the container's live flows (limits.maxFlows)",
    "inbound": "nothing from outside opens a connection into a container (C2)",
    "node-to-container": "the node opens no connection into a container unless an ingress rule allows it (C2)",
}
_TCP_FLAGS = ("fin", "syn", "rst", "psh", "ack", "urg", "ecn", "cwr")


@dataclass(frozen=True)
class Packet:
    """What a refused packet's headers say. `protocol`: tcp, udp, icmp, ipv6-icmp or
    the IP protocol number as text; ports None where the protocol has none."""

    protocol: str
    source: str
    destination: str
    source_port: int | None = None
    port: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    tcp_flags: int | None = None


@dataclass(frozen=True)
class Decided:
    rule: str             # "NAME: WHY", as explain prints it after "rule "
    element: str | None   # what matched, as explain prints it after "—"


def _why(name: str) -> str:
    return next(r.why for r in RULES if r.name == name)


def rule_words(reason: str) -> str:
    """"NAME: WHY" of the rule behind a reported reason."""
    if reason in POLICY_RULES:
        name = POLICY_RULES[reason]
        return f"{name}: {_why(name)}"
    if reason == "container-to-node":
        return f"{NODE_RULE[0]}: {NODE_RULE[1]}"
    return f"{reason}: {REASON_WORDS.get(reason, 'refused')}"


def tcp_flags(flags: int) -> str:
    return "|".join(name for bit, name in enumerate(_TCP_FLAGS) if flags & 1 << bit) or "none"


class Refusals:
    """Decides the words for one compiled policy (None: no policy at hand, words
    without elements). Built once per policy: the blocked ranges are indexed for a
    lookup in O(log n) (explain walks them all, fine for one question, not for a
    flood of events)."""

    def __init__(self, compiled: Compiled | None, bounds: FlowBounds | None = None) -> None:
        self.compiled = compiled
        self.bounds = bounds or (compiled.egress.bounds if compiled else FlowBounds())
        blocked = compiled.blocked if compiled else ()
        self._blocked = sorted(blocked, key=lambda b: (b[0].version, int(b[0].network_address)))
        self._keys = [(n.version, int(n.network_address)) for n, _ in self._blocked]

    def blocked_range(self, destination: str) -> str | None:
        addr = ipaddress.ip_address(destination)
        i = bisect.bisect_right(self._keys, (addr.version, int(addr))) - 1
        if i >= 0:
            net, reason = self._blocked[i]
            if addr in net:
                return f"{net}: {reason}"
        return None

    def decide(self, reason: str, pkt: Packet, pools: Sequence[IPNetwork] = ()) -> Decided:
        """The rule and element for a packet refused for `reason` (a key of
        netpolicy.ruleset.EVENT_REASONS; any other reason gets its name and no
        element)."""
        return Decided(rule_words(reason), self._element(reason, pkt, pools))

    def _element(self, reason: str, pkt: Packet, pools: Sequence[IPNetwork]) -> str | None:
        dst = pkt.destination
        if reason == "protocol":
            return f"protocol {pkt.protocol}"
        if reason == "blocked-port":
            policy = self.compiled.policy if self.compiled else None
            for b in policy.blocked_ports if policy else ():
                if b.proto == pkt.protocol and b.port == pkt.port:
                    return f"{pkt.protocol} {pkt.port}: {b.reason}"
            return None
        if reason == "blocked-range":
            return self.blocked_range(dst)
        if reason == "container-pool":
            addr = ipaddress.ip_address(dst)
            return next((str(p) for p in pools if p.version == addr.version and addr in p), None)
        if reason == "container-to-node":
            return f"{dst} is one of the node's own addresses"
        if reason == "spoofed-source":
            return f"{pkt.source} is not this container's address"
        if reason == "spoofed-node":
            return f"{pkt.source} is one of the node's own addresses"
        if reason == "container-to-container":
            return f"{dst} is another container"
        if reason == "flow-rate":
            return f"{self.bounds.new_flows_per_second}/second, burst {self.bounds.new_flows_burst}"
        if reason == "flow-limit":
            return f"{self.bounds.max_flows} live flows"
        if reason == "icmp-error" and pkt.icmp_type is not None:
            return f"{pkt.protocol} type {pkt.icmp_type} code {pkt.icmp_code}, not about a flow of this container"
        if reason == "tcp-without-flow" and pkt.tcp_flags is not None:
            return f"tcp flags {tcp_flags(pkt.tcp_flags)} without a SYN"
        return None

