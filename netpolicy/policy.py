"""The policy model: what a container may reach. The default is the contract of App
Engine's legacy sockets service; a policy file may add to it. Pure: data in, data out.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any

from netpolicy.ranges import SPECIAL_PURPOSE, Block
from netpolicy.ruleset import EventRate, FlowBounds

PROTOCOLS = ("tcp", "udp")
GOOG_URL = "https://www.gstatic.com/ipranges/goog.json"
CLOUD_URL = "https://www.gstatic.com/ipranges/cloud.json"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$")


class PolicyError(ValueError):
    """An invalid policy; `field` is the path of the offending field."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"policy field {field_path!r} {problem}")
        self.field = field_path


@dataclass(frozen=True)
class PortBlock:
    proto: str
    port: int
    reason: str


@dataclass(frozen=True)
class Allow:
    """An exception: `dest` (an address, a CIDR, or a hostname the node resolves) is
    reachable on these protocols and ports although a blocked range holds it."""

    dest: str
    protos: tuple[str, ...]
    ports: tuple[int, ...]
    reason: str
    # Hostname exceptions only: internal ranges (blocked ranges, pools, the node's own
    # networks) its answers may fall in. An answer anywhere else inside them is data
    # from outside pointing inwards (DNS rebinding, a poisoned resolver) and is dropped.
    allowed_answers: tuple[str, ...] = ()

    @property
    def is_host(self) -> bool:
        try:
            ipaddress.ip_network(self.dest)
            return False
        except ValueError:
            return True


# The ingress source that names the node itself: its own addresses, whatever they are
# (read at run time in the node's netns), for kubelet's probes.
NODE_SOURCE = "node"
# The one port a cluster DNS service is opened on.
DNS_PORT = 53


@dataclass(frozen=True)
class Ingress:
    """A source (e.g. a platform proxy) allowed to open connections into containers.
    `source` is a CIDR, or NODE_SOURCE: connections the node itself opens (from the
    output hook, never a forwarded packet), whose replies may then reach the node."""

    source: str
    protos: tuple[str, ...]
    ports: tuple[int, ...]

    @property
    def from_node(self) -> bool:
        return self.source == NODE_SOURCE


@dataclass(frozen=True)
class ResolverSettings:
    nameservers: tuple[str, ...] = ("8.8.8.8", "8.8.4.4")
    min_ttl: int = 30
    max_ttl: int = 3600
    timeout: float = 2.0


@dataclass(frozen=True)
class GoogleSources:
    goog: str = GOOG_URL
    cloud: str = CLOUD_URL


@dataclass(frozen=True)
class Policy:
    blocked: tuple[Block, ...] = SPECIAL_PURPOSE
    blocked_ports: tuple[PortBlock, ...] = (
        PortBlock("tcp", 25, "SMTP port 25 (C6)"),
        PortBlock("udp", 25, "port 25 (C6)"),
        PortBlock("tcp", 21, "FTP is not supported (C4)"),
    )
    allows: tuple[Allow, ...] = (
        Allow("8.8.8.8", PROTOCOLS, (53,), "Google Public DNS (C8)"),
        Allow("8.8.4.4", PROTOCOLS, (53,), "Google Public DNS (C8)"),
        Allow("2001:4860:4860::8888", PROTOCOLS, (53,), "Google Public DNS (C8)"),
        Allow("2001:4860:4860::8844", PROTOCOLS, (53,), "Google Public DNS (C8)"),
        Allow("smtp.gmail.com", ("tcp",), (465, 587), "Gmail SMTP (C8)"),
        Allow("pop.gmail.com", ("tcp",), (995,), "Gmail POP (C8)"),
        Allow("imap.gmail.com", ("tcp",), (993,), "Gmail IMAP (C8)"),
    )
    ingress: tuple[Ingress, ...] = ()
    # Cluster DNS service addresses (`clusterDns.services`): a flow whose ORIGINAL
    # destination (before the node's DNAT, e.g. kube-proxy's) is one of them, on port
    # 53, is allowed wherever the DNAT sent it. Empty: no exception (the default).
    cluster_dns: tuple[str, ...] = ()
    resolver: ResolverSettings = field(default_factory=ResolverSettings)
    google: GoogleSources = field(default_factory=GoogleSources)
    # Seconds a flow may stay silent (both directions) before it is reclaimed (C10).
    idle_timeout: int = 600
    # What one container may hold of what the node shares (README "Threat model").
    limits: FlowBounds = FlowBounds()
    # Refused-flow events per container (`limits.eventsPerSecond`, `eventsBurst`).
    events: EventRate = EventRate()

    @property
    def hostnames(self) -> tuple[str, ...]:
        return tuple(sorted({a.dest.rstrip(".").lower() for a in self.allows if a.is_host}))


# --- parsing a policy file -------------------------------------------------------

_KEYS = {"googleRanges", "resolver", "blockedRanges", "blockedPorts", "exceptions", "ingress",
         "idleTimeout", "limits", "clusterDns"}


def _obj(value: Any, path: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(path, f"must be an object, got {type(value).__name__}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise PolicyError(f"{path}.{unknown[0]}" if path else unknown[0],
                          "is not a known field (known: " + ", ".join(sorted(keys)) + ")")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise PolicyError(path, f"must be a list, got {type(value).__name__}")
    return value


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise PolicyError(path, f"must be a port number 1-65535, got {value!r}")
    return value


def _proto(value: Any, path: str) -> str:
    if value not in PROTOCOLS:
        raise PolicyError(path, f"must be 'tcp' or 'udp', got {value!r}")
    return str(value)


def _cidr(value: Any, path: str) -> str:
    # strict: "10.1.2.3/8" is a typo for one of two things; refuse rather than widen it.
    if not isinstance(value, str):
        raise PolicyError(path, f"must be an IP address or CIDR string, got {value!r}")
    try:
        return str(ipaddress.ip_network(value))
    except ValueError as exc:
        raise PolicyError(path, f"must be an IP address or CIDR, got {value!r} ({exc})") from None


def _ports(value: Any, path: str) -> tuple[int, ...]:
    ports = _list(value, path)
    if not ports:
        raise PolicyError(path, "must not be empty")
    return tuple(_port(p, f"{path}[{i}]") for i, p in enumerate(ports))


def _protos(value: Any, path: str) -> tuple[str, ...]:
    protos = _list(value, path)
    if not protos:
        raise PolicyError(path, "must not be empty")
    return tuple(_proto(p, f"{path}[{i}]") for i, p in enumerate(protos))


def _dest(value: Any, path: str) -> str:
    if isinstance(value, str):
        if _HOSTNAME.match(value) and not value.rstrip(".").rsplit(".", 1)[-1].isdigit():
            return value.rstrip(".").lower()
        return _cidr(value, path)
    raise PolicyError(path, f"must be an IP address, CIDR or hostname, got {value!r}")


def _resolver(raw: Any) -> ResolverSettings:
    r = _obj(raw, "resolver", {"nameservers", "minTtl", "maxTtl", "timeout"})
    base = ResolverSettings()
    servers = tuple(str(ipaddress.ip_address(s)) if _is_ip(s) else _bad_server(i, s)
                    for i, s in enumerate(_list(r.get("nameservers", list(base.nameservers)),
                                                "resolver.nameservers")))
    if not servers:
        raise PolicyError("resolver.nameservers", "must not be empty")
    min_ttl = r.get("minTtl", base.min_ttl)
    max_ttl = r.get("maxTtl", base.max_ttl)
    for name, v in (("minTtl", min_ttl), ("maxTtl", max_ttl)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 86400:
            raise PolicyError(f"resolver.{name}", f"must be seconds 1-86400, got {v!r}")
    if min_ttl > max_ttl:
        raise PolicyError("resolver.minTtl", f"({min_ttl}) must not exceed maxTtl ({max_ttl})")
    timeout = r.get("timeout", base.timeout)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 30:
        raise PolicyError("resolver.timeout", f"must be seconds in (0, 30], got {timeout!r}")
    return ResolverSettings(servers, min_ttl, max_ttl, float(timeout))


def _is_ip(value: Any) -> bool:
    if not isinstance(value, str):  # ip_address(134744072) would be 8.8.8.8
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def _bad_server(i: int, value: Any) -> str:
    raise PolicyError(f"resolver.nameservers[{i}]", f"must be an IP address, got {value!r}")


def _count(value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PolicyError(path, f"must be a whole number {low}-{high}, got {value!r}")
    return value


_LIMITS = {"maxFlows", "newFlowsPerSecond", "newFlowsBurst", "eventsPerSecond", "eventsBurst"}


def _limits(raw: Any) -> FlowBounds:
    d = _obj(raw, "limits", _LIMITS)
    base = FlowBounds()
    return FlowBounds(_count(d.get("maxFlows", base.max_flows), "limits.maxFlows", 16, 1_000_000),
                  _count(d.get("newFlowsPerSecond", base.new_flows_per_second), "limits.newFlowsPerSecond",
                         1, 100_000),
                  _count(d.get("newFlowsBurst", base.new_flows_burst), "limits.newFlowsBurst", 1, 1_000_000))


def _events(raw: Any) -> EventRate:
    d = _obj(raw, "limits", _LIMITS)
    base = EventRate()
    return EventRate(_count(d.get("eventsPerSecond", base.per_second), "limits.eventsPerSecond", 0, 10_000),
                     _count(d.get("eventsBurst", base.burst), "limits.eventsBurst", 1, 100_000))


def _exception(item: Any, path: str) -> Allow:
    e = _obj(item, path, {"destination", "protocols", "ports", "allowedAnswers"})
    dest = _dest(e.get("destination"), f"{path}.destination")
    allow = Allow(dest, _protos(e.get("protocols", list(PROTOCOLS)), f"{path}.protocols"),
                  _ports(e.get("ports"), f"{path}.ports"), "exception from policy file")
    if "allowedAnswers" in e:
        if not allow.is_host:
            raise PolicyError(f"{path}.allowedAnswers", "applies to hostname exceptions only "
                              f"({dest!r} is an address)")
        ranges = _list(e["allowedAnswers"], f"{path}.allowedAnswers")
        allow = replace(allow, allowed_answers=tuple(_cidr(c, f"{path}.allowedAnswers[{i}]")
                                                     for i, c in enumerate(ranges)))
    return allow


def _source(value: Any, path: str) -> str:
    if value == NODE_SOURCE:
        return NODE_SOURCE
    problem = f"must be an IP address, a CIDR or {NODE_SOURCE!r} (the node's own addresses), got {value!r}"
    if not isinstance(value, str):
        raise PolicyError(path, problem)
    try:
        return str(ipaddress.ip_network(value))
    except ValueError as exc:
        raise PolicyError(path, f"{problem} ({exc})") from None


def _cluster_dns(raw: Any) -> tuple[str, ...]:
    d = _obj(raw, "clusterDns", {"services"})
    services = _list(d.get("services"), "clusterDns.services")
    if not services:
        raise PolicyError("clusterDns.services", "must not be empty (leave clusterDns out for no exception)")
    out = []
    for i, s in enumerate(services):
        # One address each: a service IP, never a range (a range would open port 53 of
        # every private host in it through any DNAT).
        if not _is_ip(s):
            raise PolicyError(f"clusterDns.services[{i}]", f"must be an IP address (the DNS service's), got {s!r}")
        out.append(str(ipaddress.ip_address(s)))
    return tuple(dict.fromkeys(out))


def parse_policy(raw: Any) -> Policy:
    """The default contract plus what the file adds. Raises PolicyError naming the field."""
    doc = _obj(raw, "", _KEYS)
    policy = Policy()
    if "googleRanges" in doc:
        g = _obj(doc["googleRanges"], "googleRanges", {"goog", "cloud"})
        for key in ("goog", "cloud"):
            if key in g and (not isinstance(g[key], str) or not g[key]):
                raise PolicyError(f"googleRanges.{key}", "must be a URL or a file path")
        policy = replace(policy, google=GoogleSources(g.get("goog", GOOG_URL), g.get("cloud", CLOUD_URL)))
    if "resolver" in doc:
        policy = replace(policy, resolver=_resolver(doc["resolver"]))
    if "idleTimeout" in doc:
        idle = doc["idleTimeout"]
        if isinstance(idle, bool) or not isinstance(idle, int) or not 1 <= idle <= 86400:
            raise PolicyError("idleTimeout", f"must be seconds 1-86400, got {idle!r}")
        policy = replace(policy, idle_timeout=idle)
    if "limits" in doc:
        policy = replace(policy, limits=_limits(doc["limits"]), events=_events(doc["limits"]))
    extra_blocks = tuple(Block(_cidr(c, f"blockedRanges[{i}]"), "blocked by policy file", "policy")
                         for i, c in enumerate(_list(doc.get("blockedRanges", []), "blockedRanges")))
    extra_ports = []
    for i, item in enumerate(_list(doc.get("blockedPorts", []), "blockedPorts")):
        p = _obj(item, f"blockedPorts[{i}]", {"protocol", "port"})
        extra_ports.append(PortBlock(_proto(p.get("protocol"), f"blockedPorts[{i}].protocol"),
                                     _port(p.get("port"), f"blockedPorts[{i}].port"), "blocked by policy file"))
    extra_allows = [_exception(item, f"exceptions[{i}]")
                    for i, item in enumerate(_list(doc.get("exceptions", []), "exceptions"))]
    ingress = []
    for i, item in enumerate(_list(doc.get("ingress", []), "ingress")):
        path = f"ingress[{i}]"
        e = _obj(item, path, {"source", "protocols", "ports"})
        source = e.get("source")
        ingress.append(Ingress(_source(source, f"{path}.source"),
                               _protos(e.get("protocols", ["tcp"]), f"{path}.protocols"),
                               _ports(e.get("ports"), f"{path}.ports")))
    cluster_dns = _cluster_dns(doc["clusterDns"]) if "clusterDns" in doc else ()
    return replace(policy, blocked=policy.blocked + extra_blocks,
                   blocked_ports=policy.blocked_ports + tuple(extra_ports),
                   allows=policy.allows + tuple(extra_allows), ingress=tuple(ingress),
                   cluster_dns=cluster_dns)
