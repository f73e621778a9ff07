"""Screening the DNS answers for exception hostnames (pure: data in, verdicts out).

An answer inside the node's internal networks is dropped unless the exception's
allowedAnswers holds it; the node's own addresses and the container pools stay dropped
even then. Design notes: docs/resolver.md.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Sequence

from netpolicy.ranges import Block, IPNetwork


@dataclass(frozen=True)
class Internal:
    """A network answers must not point into, and why (for the log)."""

    network: IPNetwork
    why: str
    # False: not even an exception's allowedAnswers opens it (the node, the pools).
    overridable: bool = True


@dataclass(frozen=True)
class NodeView:
    """What the node's netns looks like (gathered by runtime.agent.resolver.node_view).
    Each entry pairs an address or CIDR with the interface it belongs to."""

    addresses: tuple[tuple[str, str], ...] = ()   # the node's own addresses
    peers: tuple[tuple[str, str], ...] = ()       # point-to-point peers (IFA_ADDRESS != IFA_LOCAL)
    on_link: tuple[tuple[str, str], ...] = ()     # networks of non-container links
    gateways: tuple[tuple[str, str], ...] = ()    # next hops of the node's routes
    pools: tuple[str, ...] = ()                   # container pools (nft sets pools4/pools6)


@dataclass(frozen=True)
class Screened:
    address: str
    accepted: bool
    # Dropped: why. Accepted although internal: which allowedAnswers range let it in.
    # An ordinary public answer: "".
    why: str = ""


def _block_why(b: Block) -> str:
    if b.source == "policy":
        return f"blocked by the policy file's blockedRanges ({b.cidr})"
    return f"{b.name} ({b.source}, {b.cidr})"


def internal_networks(blocked: Iterable[Block], node: NodeView) -> tuple[Internal, ...]:
    """The networks an answer must not fall in. `blocked` is Policy.blocked: the
    special-purpose ranges and the policy file's blockedRanges, never Google's ranges
    (those are added only when compiling the ruleset)."""
    out: list[Internal] = []
    seen: set[IPNetwork] = set()

    def add(cidr: str, why: str, overridable: bool = True) -> None:
        net = ipaddress.ip_network(cidr, strict=False)
        if net not in seen:  # e.g. fe80::1 sits on every container veth
            seen.add(net)
            out.append(Internal(net, why, overridable))

    # Most specific first: ties in screen() go to the earlier entry.
    for addr, dev in node.addresses:
        add(addr, f"the node's own address (on {dev})", overridable=False)
    for cidr in node.pools:
        add(cidr, f"container pool {ipaddress.ip_network(cidr, strict=False)}", overridable=False)
    for addr, dev in node.gateways:
        add(addr, f"the node's gateway (via {dev})")
    for addr, dev in node.peers:
        add(addr, f"the node's point-to-point peer (on {dev})")
    for cidr, dev in node.on_link:
        add(cidr, f"on the node's link {dev} ({ipaddress.ip_network(cidr, strict=False)})")
    for b in blocked:
        add(b.cidr, _block_why(b))
    return tuple(out)


def _most_specific(matches: Sequence[Internal]) -> Internal:
    # Longest prefix, first listed on a tie: the node's uplink address says "the node's
    # own address", not "benchmarking (RFC 2544)" of the range around it.
    return max(enumerate(matches), key=lambda im: (im[1].network.prefixlen, -im[0]))[1]


def screen(addresses: Iterable[str], internal: Sequence[Internal],
           allowed: Iterable[str] = ()) -> tuple[Screened, ...]:
    """A verdict for each answer of one exception. `allowed` is its allowedAnswers."""
    allowed_nets = [ipaddress.ip_network(c) for c in allowed]
    out = []
    for text in addresses:
        addr = ipaddress.ip_address(text)
        matches = [i for i in internal if addr.version == i.network.version and addr in i.network]
        if not matches:
            out.append(Screened(str(addr), True))
            continue
        fixed = [m for m in matches if not m.overridable]
        if fixed:
            out.append(Screened(str(addr), False, _most_specific(fixed).why))
            continue
        worst = _most_specific(matches)
        ok = next((n for n in allowed_nets if addr.version == n.version and addr in n), None)
        if ok is not None:
            out.append(Screened(str(addr), True, f"inside allowedAnswers {ok} (else: {worst.why})"))
        else:
            out.append(Screened(str(addr), False, worst.why))
    return tuple(out)
