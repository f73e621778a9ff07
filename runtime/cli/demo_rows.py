"""The demo's checks: what an app (or the internet, or the node) tries, what the
contract says must happen, and what did. Every attempt is a real socket in a lab
netns (runtime/lab/probe.py); nothing leaves the lab."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from runtime.hostport import host_port
from runtime.lab import LAB, Lab, ProbeResult

APP_PORT = 8080  # each app listens here: something for inbound attempts to (fail to) reach
# Refused destinations the lab's internet doesn't hold by itself: given to it, so that a
# packet the policy let through would reach the echo servers (Lab.reached).
BAITS = {"private": "10.1.2.3", "private6": "fd00::1", "metadata": "169.254.169.254"}
TIMEOUT_S = 1.0  # per attempt; refusals come at once, drops (inbound) take this long


@dataclass
class Target:
    """An attached app: its netns path and the addresses the CNI ADD gave it."""
    name: str
    ns: str
    v4: str
    v6: str


@dataclass
class Row:
    section: str          # core, policy, reclaim
    what: str
    src: str              # who tried: an app's name, "internet", "node"
    proto: str            # tcp, udp, icmp
    host: str
    port: int | None
    expected: str         # open | refused (reclaim: aborted | alive)
    got: str = ""
    detail: str = ""
    started: float = 0.0  # wall clock, to find the attempt's refused-flow event
    ended: float = 0.0
    event: dict[str, Any] | None = None
    # A refused attempt at an internet host: how many server events there were before
    # it; any later one at that host means a packet got through (check_reached).
    server_events_before: int | None = None

    @property
    def dst(self) -> str:
        if self.port is None:
            return self.host
        return host_port(self.host, self.port)

    def verdict(self) -> str:
        """ok, MISMATCH (got is not what the contract says), or NO EVENT (a refusal
        that left no refused-flow event)."""
        if self.got != self.expected:
            return "MISMATCH"
        if self.expected == "refused" and self.event is None:
            return "NO EVENT"
        return "ok"

    def as_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["server_events_before"]
        return {**doc, "to": self.dst, "verdict": self.verdict()}


def _detail(r: ProbeResult) -> str:
    if r.ok:
        return f"server saw source {r.peer_seen}" if r.peer_seen else "echo reply"
    return f"{r.error} after {r.elapsed * 1000:.0f} ms"


class Prober:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def attempt(self, section: str, what: str, src: str, ns: str, proto: str, host: str, port: int | None,
                expected: str, *, far_side: bool = False) -> Row:
        """One attempt from netns ns. far_side: host is an internet address, whose
        server events tell whether a packet of a refused attempt got through anyway."""
        row = Row(section, what, src, proto, host, port, expected)
        if far_side and expected == "refused" and proto != "icmp":  # (the servers don't log ICMP)
            row.server_events_before = len(self.lab.server_events())
        row.started = time.time()
        if proto == "icmp":
            r = self.lab.ping(ns, host, timeout=TIMEOUT_S)
        else:
            assert port is not None
            r = self.lab.probe(ns, proto, host, port, timeout=TIMEOUT_S)
        row.ended = time.time()
        row.got, row.detail = ("open" if r.ok else "refused"), _detail(r)
        return row

    def resolve(self, section: str, what: str, app: Target, server: str, name: str, *,
                tcp: bool = False) -> tuple[Row, list[str]]:
        """A DNS query from the app to the lab's DNS (playing Google Public DNS): the row
        says whether the server answered, and the addresses it gave."""
        row = Row(section, what, app.name, "tcp" if tcp else "udp", server, LAB.dns_port, "open")
        row.started = time.time()
        r = self.lab.dns_query(app.ns, name, "AAAA" if ":" in server else "A", server=server, tcp=tcp,
                               timeout=TIMEOUT_S)
        row.ended = time.time()
        row.got = "open" if r.ok else "refused"
        if r.ok:
            row.detail = f"{name} -> {', '.join(r.addresses) or r.rcode}"
        else:
            row.detail = f"{r.error} after {r.elapsed * 1000:.0f} ms"
        return row, r.addresses

    def check_reached(self, rows: list[Row]) -> None:
        """A refused attempt whose packet reached the internet's servers did not fail
        closed: it is a mismatch, whatever the app saw."""
        for row in rows:
            if row.server_events_before is not None and self.lab.reached(row.host, row.server_events_before,
                                                                         row.port):
                row.got = "reached"
                row.detail += "; a packet reached the server"


def core_rows(p: Prober, a: Target, b: Target) -> list[Row]:
    """Egress works from both families and protocols, with the node's address; nothing
    gets in: not from the internet, the node or another container."""
    rows = []
    for proto in ("tcp", "udp"):
        for fam, dst in (("v4", LAB.public_v4), ("v6", LAB.public_v6)):
            rows.append(p.attempt("core", f"outbound {proto.upper()} {fam}", a.name, a.ns, proto, dst, 9000,
                                  "open"))
    for fam in ("v4", "v6"):
        target = a.v4 if fam == "v4" else a.v6
        node_addr = LAB.node_uplink_v4 if fam == "v4" else LAB.node_uplink_v6
        rows += [
            p.attempt("core", f"inbound TCP {fam} from the internet", "internet", p.lab.ns_path(p.lab.internet),
                      "tcp", target, APP_PORT, "refused"),
            p.attempt("core", f"inbound TCP {fam} from the node", "node", p.lab.ns_path(p.lab.node), "tcp",
                      target, APP_PORT, "refused"),
            p.attempt("core", f"container to container TCP {fam}", b.name, b.ns, "tcp", target, APP_PORT,
                      "refused"),
            p.attempt("core", f"container to node TCP {fam}", a.name, a.ns, "tcp", node_addr, 22, "refused"),
        ]
    return rows


def policy_rows(p: Prober, a: Target) -> list[Row]:
    """The egress policy, from app a: blocked ranges and ports, Google's ranges but not
    Compute Engine's, the DNS and Gmail exceptions (on their ports only), no ICMP."""
    def go(what: str, proto: str, host: str, port: int | None, expected: str) -> Row:
        return p.attempt("policy", what, a.name, a.ns, proto, host, port, expected, far_side=True)

    rows = [
        go("private range 10.0.0.0/8", "tcp", BAITS["private"], 80, "refused"),
        go("private range fc00::/7", "tcp", BAITS["private6"], 80, "refused"),
        go("cloud metadata server", "tcp", BAITS["metadata"], 80, "refused"),
        go("Google range (goog.json)", "tcp", LAB.google_v4, 443, "refused"),
        go("Google range v6", "tcp", LAB.google_v6, 443, "refused"),
        go("Compute Engine address (cloud.json)", "tcp", LAB.cloud_v4, 443, "open"),
        go("Compute Engine address v6", "tcp", LAB.cloud_v6, 443, "open"),
        go("port 25 (SMTP)", "tcp", LAB.public_v4, 25, "refused"),
        go("port 21 (FTP)", "tcp", LAB.public_v4, 21, "refused"),
        go("port 587 (mail submission)", "tcp", LAB.public_v4, 587, "open"),
    ]
    # Google Public DNS is an exception on port 53 only; the queries resolve the Gmail
    # names the next rows use, as an app would.
    dns4, dns6 = LAB.dns_v4[0], LAB.dns_v6[0]
    resolved: dict[str, list[str]] = {}
    for what, server, name, tcp in (("Google Public DNS, UDP", dns4, "smtp.gmail.com", False),
                                    ("Google Public DNS, TCP", dns4, "imap.gmail.com", True),
                                    ("Google Public DNS v6, UDP", dns6, "pop.gmail.com", False)):
        row, resolved[name] = p.resolve("policy", what, a, server, name, tcp=tcp)
        rows.append(row)
    rows.append(go("Google Public DNS off port 53", "tcp", dns4, 443, "refused"))
    # Gmail's names are in Google's ranges: open on their mail ports only.
    for name, open_ports, other in (("smtp.gmail.com", (465, 587), 443), ("imap.gmail.com", (993,), 995),
                                    ("pop.gmail.com", (995,), 993)):
        addrs = resolved[name]
        for port in (*open_ports, other):
            expected = "open" if port in open_ports else "refused"
            what = f"{name}{'' if expected == 'open' else ', not its port'}"
            if not addrs:
                rows.append(Row("policy", what, a.name, "tcp", name, port, expected, got="unresolved",
                                detail=f"{name} did not resolve"))
                continue
            rows.append(go(what, "tcp", addrs[0], port, expected))
    rows.append(go("ICMP echo", "icmp", LAB.public_v4, None, "refused"))
    rows.append(go("ICMPv6 echo", "icmp", LAB.public_v6, None, "refused"))
    return rows
