"""Destination ranges the contract blocks (pure data and set arithmetic).

An explicit CIDR list, never Python's ipaddress.is_global/is_private: those answers
changed between Python versions (on 3.11, 64:ff9b::a00:1 and 2002:a00:1:: count as
"global"), and a sandbox boundary must not move with the interpreter.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Block:
    cidr: str
    name: str
    source: str  # where the entry comes from (RFC / registry)

    @property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)


# The blocked destinations, v4 first, then v6.
# IANA IPv4 Special-Purpose Address Registry: the blocks not globally reachable, the
# deprecated 6to4 relay anycast, plus multicast, reserved and limited broadcast.
SPECIAL_PURPOSE: tuple[Block, ...] = (
    Block("0.0.0.0/8", "this network", "RFC 791"),
    Block("10.0.0.0/8", "private use", "RFC 1918"),
    Block("100.64.0.0/10", "shared address space (CGN)", "RFC 6598"),
    Block("127.0.0.0/8", "loopback", "RFC 1122"),
    Block("169.254.0.0/16", "link local, incl. metadata 169.254.169.254", "RFC 3927"),
    Block("172.16.0.0/12", "private use", "RFC 1918"),
    Block("192.0.0.0/24", "IETF protocol assignments", "RFC 6890"),
    Block("192.0.2.0/24", "documentation TEST-NET-1", "RFC 5737"),
    Block("192.88.99.0/24", "6to4 relay anycast (deprecated)", "RFC 7526"),
    Block("192.168.0.0/16", "private use", "RFC 1918"),
    Block("198.18.0.0/15", "benchmarking", "RFC 2544"),
    Block("198.51.100.0/24", "documentation TEST-NET-2", "RFC 5737"),
    Block("203.0.113.0/24", "documentation TEST-NET-3", "RFC 5737"),
    Block("224.0.0.0/4", "multicast", "RFC 5771"),
    Block("240.0.0.0/4", "reserved", "RFC 1112"),
    Block("255.255.255.255/32", "limited broadcast", "RFC 919"),
    # IANA IPv6 Special-Purpose Address Registry, plus every form that embeds an IPv4
    # address (it could smuggle a private v4 destination through a translator).
    Block("::/96", "unspecified, loopback, IPv4-compatible (deprecated)", "RFC 4291"),
    Block("::1/128", "loopback", "RFC 4291"),
    Block("::ffff:0:0/96", "IPv4-mapped", "RFC 4291"),
    Block("64:ff9b::/96", "NAT64 well-known prefix (embeds IPv4)", "RFC 6052"),
    Block("64:ff9b:1::/48", "NAT64 local use (embeds IPv4)", "RFC 8215"),
    Block("100::/64", "discard only", "RFC 6666"),
    Block("2001::/23", "IETF protocol assignments, incl. Teredo 2001::/32", "RFC 2928"),
    Block("2001:db8::/32", "documentation", "RFC 3849"),
    Block("2002::/16", "6to4 (embeds IPv4)", "RFC 3056"),
    Block("3fff::/20", "documentation", "RFC 9637"),
    Block("5f00::/16", "SRv6 SIDs", "RFC 9602"),
    Block("fc00::/7", "unique local", "RFC 4193"),
    Block("fe80::/10", "link local", "RFC 4291"),
    Block("fec0::/10", "site local (deprecated)", "RFC 3879"),
    Block("ff00::/8", "multicast", "RFC 4291"),
)


def collapse(networks: Iterable[IPNetwork]) -> list[IPNetwork]:
    """Merge overlapping and adjacent networks; v4 first, then v6, each sorted."""
    nets = list(networks)
    v4 = ipaddress.collapse_addresses(n for n in nets if n.version == 4)
    v6 = ipaddress.collapse_addresses(n for n in nets if n.version == 6)
    return [*v4, *v6]


def subtract(base: Iterable[IPNetwork], remove: Iterable[IPNetwork]) -> list[IPNetwork]:
    """Every address of `base` that is in none of `remove`, as collapsed CIDRs."""
    removals = collapse(remove)
    out: list[IPNetwork] = []
    for net in collapse(base):
        pieces = [net]
        for cut in removals:
            if cut.version != net.version:
                continue
            next_pieces: list[IPNetwork] = []
            for piece in pieces:
                if not piece.overlaps(cut):
                    next_pieces.append(piece)
                elif not cut.supernet_of(piece):  # type: ignore[arg-type]  # same version, checked above
                    next_pieces.extend(piece.address_exclude(cut))  # type: ignore[arg-type]
            pieces = next_pieces
        out.extend(pieces)
    return collapse(out)


def _prefixes(published: dict[str, Any], source: str) -> list[IPNetwork]:
    if not isinstance(published, dict) or not isinstance(published.get("prefixes"), list):
        raise ValueError(f"{source}: not Google's IP ranges format (no 'prefixes' list)")
    nets = []
    for i, entry in enumerate(published["prefixes"]):
        raw = entry.get("ipv4Prefix") or entry.get("ipv6Prefix") if isinstance(entry, dict) else None
        if not raw:
            raise ValueError(f"{source}: prefixes[{i}] has neither ipv4Prefix nor ipv6Prefix")
        try:
            nets.append(ipaddress.ip_network(raw))
        except ValueError as exc:
            raise ValueError(f"{source}: prefixes[{i}]: {exc}") from None
    return nets


def google_ranges(goog: dict[str, Any], cloud: dict[str, Any]) -> list[IPNetwork]:
    """Google's own ranges: goog.json minus cloud.json (Compute Engine customer
    addresses are not "Google ranges", contract row C9)."""
    return subtract(_prefixes(goog, "goog.json"), _prefixes(cloud, "cloud.json"))
