"""netpolicy (pure): ranges, policy parsing, compilation to nft text, explain()."""
from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from netpolicy.compile import DYNAMIC_SETS, STATIC_SETS, compile_policy, explain
from netpolicy.policy import Policy, PolicyError, parse_policy
from netpolicy.ranges import SPECIAL_PURPOSE, collapse, google_ranges, subtract
from netpolicy.ruleset import EVENT_REASONS, EventRate, FlowBounds, render_table

RANGES_DIR = Path(os.environ.get("SOCKGATE_GOOGLE_RANGES_DIR",
                                 Path(__file__).resolve().parents[2] / "shared/data/google-ip-ranges"))
GOOG = json.loads((RANGES_DIR / "goog.json").read_text())
CLOUD = json.loads((RANGES_DIR / "cloud.json").read_text())
GOOGLE = google_ranges(GOOG, CLOUD)  # loaded once for the module
DEFAULT = compile_policy(Policy(), GOOGLE)

N = ip_network


def elements(text: str) -> dict[str, list[str]]:
    """Set name -> its elements, from the `add element` lines of a rendered table."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"^add element inet sockgate (\S+) \{ (.*) \}$", text, re.M):
        out.setdefault(m[1], []).extend(m[2].split(", "))
    return out


def covered(cidr: str, blocks) -> bool:
    net = N(cidr)
    return any(net.version == b.network.version and net.subnet_of(b.network) for b in blocks)


# --- 1. ranges ---------------------------------------------------------------------

def test_google_minus_cloud_snapshot():
    assert len(GOOGLE) == 277
    assert sum(n.version == 4 for n in GOOGLE) == 197
    assert sum(n.version == 6 for n in GOOGLE) == 80
    assert GOOGLE == collapse(GOOGLE)  # already collapsed and sorted

    def inside(cidr):
        return any(N(cidr).version == n.version and N(cidr).subnet_of(n) for n in GOOGLE)

    assert inside("8.8.8.8/32") and inside("142.250.0.0/15")
    assert not any(n.overlaps(N("34.35.0.0/16")) for n in GOOGLE if n.version == 4)


@pytest.mark.parametrize("base, cut, expected", [
    (["10.0.0.0/24"], ["10.0.0.0/26"], ["10.0.0.64/26", "10.0.0.128/25"]),   # cut inside
    (["10.0.0.0/24"], ["10.0.0.128/32"], None),                               # cut inside, deep
    (["10.0.0.0/24", "10.2.0.0/24"], ["10.0.0.0/16"], ["10.2.0.0/24"]),        # cut covers a base
    (["10.0.0.0/24"], ["10.0.0.0/24"], []),                                   # cut equals base
    (["10.0.0.0/24"], ["10.1.0.0/24", "2001:db8::/32"], ["10.0.0.0/24"]),     # no overlap
    (["2001:db8::/32", "10.0.0.0/8"], ["2001:db8::/33"], ["10.0.0.0/8", "2001:db8:8000::/33"]),
])
def test_subtract(base, cut, expected):
    got = subtract(map(N, base), map(N, cut))
    if expected is None:  # every address but the cut one, nothing else
        addrs = {a for n in got for a in n}
        assert len(addrs) == 255 and ip_address("10.0.0.128") not in addrs
    else:
        assert got == [N(c) for c in expected]


@pytest.mark.parametrize("nets, expected", [
    (["10.0.0.0/25", "10.0.0.128/25"], ["10.0.0.0/24"]),
    (["10.0.0.0/8", "10.1.0.0/16"], ["10.0.0.0/8"]),
    (["10.1.0.0/16", "10.0.0.0/8", "10.0.0.0/8"], ["10.0.0.0/8"]),
    (["2001:db8::/33", "10.0.0.0/8", "2001:db8:8000::/33", "::a00:0/104"],
     ["10.0.0.0/8", "::a00:0/104", "2001:db8::/32"]),  # v4 and v6 stay apart, v4 first
])
def test_collapse(nets, expected):
    assert collapse(map(N, nets)) == [N(c) for c in expected]


@pytest.mark.parametrize("goog, cloud, where", [
    ({}, {"prefixes": []}, "goog.json"),
    ({"prefixes": {}}, {"prefixes": []}, "goog.json"),
    ({"prefixes": [{"ipv4Prefix": "8.8.8.0/24"}, {"service": "x"}]}, {"prefixes": []}, "goog.json: prefixes[1]"),
    ({"prefixes": [{"ipv4Prefix": "8.8.8.0/24"}]}, {"prefixes": ["8.8.8.0/24"]}, "cloud.json: prefixes[0]"),
    ({"prefixes": [{"ipv4Prefix": "8.8.8.0/33"}]}, {"prefixes": []}, "goog.json: prefixes[0]"),
    ({"prefixes": [{"ipv6Prefix": "2001:4860::/32"}, {"ipv6Prefix": "2001:4860::1/32"}]}, {"prefixes": []},
     "goog.json: prefixes[1]"),
])
def test_google_ranges_rejects_malformed(goog, cloud, where):
    with pytest.raises(ValueError, match=re.escape(where)):
        google_ranges(goog, cloud)


def test_google_ranges_does_not_mutate_or_depend_on_order():
    goog, cloud = copy.deepcopy(GOOG), copy.deepcopy(CLOUD)
    goog["prefixes"].reverse()
    assert google_ranges(goog, cloud) == GOOGLE
    assert GOOG["prefixes"][0] == {"ipv4Prefix": "8.8.4.0/24"}


# --- 2. special-purpose lists -------------------------------------------------------

V4_REQUIRED = ["0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
               "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
               "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32"]
V6_REQUIRED = ["::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64",
               "2001::/23", "2001::/32", "2001:db8::/32", "2002::/16", "3fff::/20", "fc00::/7", "fe80::/10",
               "ff00::/8"]


@pytest.mark.parametrize("cidr", V4_REQUIRED + V6_REQUIRED)
def test_special_purpose_lists_cover(cidr):
    assert covered(cidr, SPECIAL_PURPOSE), f"{cidr} is not covered by the special-purpose list"


def test_special_purpose_lists_are_well_formed():
    versions = [b.network.version for b in SPECIAL_PURPOSE]
    assert versions == sorted(versions), "v4 blocks first, then v6"
    for b in SPECIAL_PURPOSE:
        assert str(b.network) == b.cidr and b.name and b.source


def _forbidden(self):
    raise AssertionError("netpolicy consulted ipaddress.is_global/is_private")


def test_ranges_do_not_use_is_global_or_is_private(monkeypatch):
    # On this interpreter (3.11.x) 64:ff9b::a00:1 is "global"; the verdict must not care.
    for cls in (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network):
        for attr in ("is_global", "is_private"):
            monkeypatch.setattr(cls, attr, property(_forbidden))
    compiled = compile_policy(Policy(), GOOGLE)
    assert render_table(compiled.egress) == render_table(DEFAULT.egress)
    for dst in ("64:ff9b::a00:1", "2002:a00:1::", "10.0.0.1"):
        v = explain(compiled, dst, 443, "tcp")
        assert (v.verdict, v.rule) == ("refuse", "blocked-range"), dst


# --- 3. parse_policy ---------------------------------------------------------------

def test_empty_policy_is_the_default():
    assert parse_policy({}) == Policy()


@pytest.mark.parametrize("raw, field", [
    ([], ""),
    ({"bogus": 1}, "bogus"),
    ({"blockedRanges": "10.0.0.0/8"}, "blockedRanges"),
    ({"blockedRanges": ["10.0.0.0/8", "nope"]}, "blockedRanges[1]"),
    ({"blockedRanges": ["10.0.0.0/8", "10.0.0.0/33"]}, "blockedRanges[1]"),
    ({"blockedPorts": [{"protocol": "icmp", "port": 1}]}, "blockedPorts[0].protocol"),
    ({"blockedPorts": [{"port": 1}]}, "blockedPorts[0].protocol"),
    ({"blockedPorts": [{"protocol": "tcp", "port": 70000}]}, "blockedPorts[0].port"),
    ({"blockedPorts": [{"protocol": "tcp", "port": 0}]}, "blockedPorts[0].port"),
    ({"blockedPorts": [{"protocol": "tcp", "port": True}]}, "blockedPorts[0].port"),
    ({"blockedPorts": [{"protocol": "tcp", "port": "25"}]}, "blockedPorts[0].port"),
    ({"blockedPorts": [{"protocol": "tcp", "port": 25, "x": 1}]}, "blockedPorts[0].x"),
    ({"exceptions": [{"destination": "not a host!", "ports": [1]}]}, "exceptions[0].destination"),
    ({"exceptions": [{"ports": [1]}]}, "exceptions[0].destination"),
    ({"exceptions": [{"destination": "1.2.3.4", "ports": []}]}, "exceptions[0].ports"),
    ({"exceptions": [{"destination": "1.2.3.4"}]}, "exceptions[0].ports"),
    ({"exceptions": [{"destination": "1.2.3.4", "ports": [1, 65536]}]}, "exceptions[0].ports[1]"),
    ({"exceptions": [{"destination": "1.2.3.4", "ports": [1], "protocols": ["sctp"]}]},
     "exceptions[0].protocols[0]"),
    ({"exceptions": [{"destination": "1.2.3.4", "ports": [1], "protocols": []}]}, "exceptions[0].protocols"),
    ({"ingress": [{"source": "x", "ports": [80]}]}, "ingress[0].source"),
    ({"ingress": [{"source": "192.0.2.1", "ports": [80], "protocols": ["icmp"]}]}, "ingress[0].protocols[0]"),
    ({"resolver": {"nameservers": ["dns.google"]}}, "resolver.nameservers[0]"),
    ({"resolver": {"nameservers": []}}, "resolver.nameservers"),
    ({"resolver": {"minTtl": 0}}, "resolver.minTtl"),
    ({"resolver": {"maxTtl": 86401}}, "resolver.maxTtl"),
    ({"resolver": {"minTtl": 100, "maxTtl": 50}}, "resolver.minTtl"),
    ({"resolver": {"timeout": 0}}, "resolver.timeout"),
    ({"resolver": {"timeout": True}}, "resolver.timeout"),
    ({"resolver": {"retries": 3}}, "resolver.retries"),
    ({"googleRanges": {"goog": ""}}, "googleRanges.goog"),
    ({"googleRanges": {"cloud": 5}}, "googleRanges.cloud"),
    ({"googleRanges": "x"}, "googleRanges"),
    ({"limits": []}, "limits"),
    ({"limits": {"maxFlows": 0}}, "limits.maxFlows"),
    ({"limits": {"maxFlows": 15}}, "limits.maxFlows"),
    ({"limits": {"maxFlows": "1024"}}, "limits.maxFlows"),
    ({"limits": {"newFlowsPerSecond": 0}}, "limits.newFlowsPerSecond"),
    ({"limits": {"newFlowsBurst": True}}, "limits.newFlowsBurst"),
    ({"limits": {"flows": 10}}, "limits.flows"),
    ({"limits": {"eventsPerSecond": -1}}, "limits.eventsPerSecond"),
    ({"limits": {"eventsPerSecond": 1.5}}, "limits.eventsPerSecond"),
    ({"limits": {"eventsBurst": 0}}, "limits.eventsBurst"),
    ({"exceptions": [{"destination": "10.1.2.3", "ports": [1], "allowedAnswers": ["10.0.0.0/8"]}]},
     "exceptions[0].allowedAnswers"),
    ({"exceptions": [{"destination": "db.example.com", "ports": [1], "allowedAnswers": "10.0.0.0/8"}]},
     "exceptions[0].allowedAnswers"),
    ({"exceptions": [{"destination": "db.example.com", "ports": [1], "allowedAnswers": ["10.0.0.1/8"]}]},
     "exceptions[0].allowedAnswers[0]"),
])
def test_invalid_policy_names_the_field(raw, field):
    with pytest.raises(PolicyError) as exc:
        parse_policy(raw)
    assert exc.value.field == field


def test_additions_are_appended_to_the_defaults():
    p = parse_policy({
        "blockedRanges": ["44.0.0.0/8"],
        "blockedPorts": [{"protocol": "udp", "port": 5060}],
        "exceptions": [{"destination": "10.1.2.3", "protocols": ["tcp"], "ports": [443]},
                       {"destination": "Relay.Example.COM.", "ports": [2525]}],
        "ingress": [{"source": "192.0.2.10", "ports": [8080]}],
        "resolver": {"nameservers": ["2001:4860:4860::8888"], "minTtl": 5, "timeout": 1},
        "googleRanges": {"goog": "/tmp/goog.json"},
    })
    d = Policy()
    assert p.blocked[:len(d.blocked)] == d.blocked and p.blocked[-1].cidr == "44.0.0.0/8"
    assert p.blocked_ports[:3] == d.blocked_ports and (p.blocked_ports[3].proto, p.blocked_ports[3].port) == ("udp", 5060)
    assert p.allows[:len(d.allows)] == d.allows
    extra = [(a.dest, a.protos, a.ports) for a in p.allows[len(d.allows):]]
    assert extra == [("10.1.2.3/32", ("tcp",), (443,)), ("relay.example.com", ("tcp", "udp"), (2525,))]
    assert "relay.example.com" in p.hostnames and "smtp.gmail.com" in p.hostnames
    assert [(i.source, i.protos, i.ports) for i in p.ingress] == [("192.0.2.10/32", ("tcp",), (8080,))]
    assert (p.resolver.nameservers, p.resolver.min_ttl, p.resolver.max_ttl, p.resolver.timeout) == \
        (("2001:4860:4860::8888",), 5, 3600, 1.0)
    assert p.google.goog == "/tmp/goog.json" and p.google.cloud == d.google.cloud


def test_limits_and_allowed_answers():
    assert Policy().limits == FlowBounds(1024, 100, 200)
    p = parse_policy({"limits": {"maxFlows": 200, "newFlowsPerSecond": 50},
                      "exceptions": [{"destination": "db.example.com", "ports": [5432],
                                      "allowedAnswers": ["10.20.0.0/16", "fd00::/8"]}]})
    assert p.limits == FlowBounds(200, 50, 200)
    assert p.allows[-1].allowed_answers == ("10.20.0.0/16", "fd00::/8")
    assert all(a.allowed_answers == () for a in Policy().allows)
    # The limits reach the rules that enforce them.
    rules = render_table(compile_policy(p, GOOGLE).egress)
    assert "add @flow_count { meta iif ct count over 200 }" in rules
    assert "limit rate over 50/second burst 200 packets" in rules


def test_event_rate_from_limits_reaches_every_event_chain():
    assert Policy().events == EventRate(5, 10)
    p = parse_policy({"limits": {"eventsPerSecond": 2, "eventsBurst": 3}})
    assert p.events == EventRate(2, 3) and p.limits == FlowBounds()
    rules = render_table(compile_policy(p, GOOGLE).egress)
    reports = [line for line in rules.splitlines() if " log prefix " in line]
    assert len(reports) == len(EVENT_REASONS)
    assert all("limit rate 2/second burst 3 packets" in line for line in reports)
    # 0: no reports at all, the refusals stay.
    off = render_table(compile_policy(parse_policy({"limits": {"eventsPerSecond": 0}}), GOOGLE).egress)
    assert " log " not in off and 'goto event_blocked_range comment "drop:blocked-range"' in off


# --- 4. compile_policy -------------------------------------------------------------

POLICY_FILE = {
    "blockedRanges": ["10.1.0.0/16", "203.0.112.0/24", "2001:db8:1::/48"],
    "blockedPorts": [{"protocol": "udp", "port": 5060}, {"protocol": "tcp", "port": 21}],
    "exceptions": [{"destination": "10.1.2.3", "protocols": ["tcp"], "ports": [443]},
                   {"destination": "fd00::/64", "protocols": ["udp"], "ports": [53, 5353]},
                   {"destination": "relay.example.com", "ports": [2525]}],
    "ingress": [{"source": "192.0.2.10", "ports": [8080]}, {"source": "2001:db8::10", "ports": [8080, 22]}],
}
COMPILED = compile_policy(parse_policy(POLICY_FILE), GOOGLE)
TEXT = render_table(COMPILED.egress)
ELEMENTS = elements(TEXT)


def test_compile_is_deterministic():
    assert render_table(compile_policy(Policy(), GOOGLE).egress) == render_table(DEFAULT.egress)
    assert render_table(compile_policy(parse_policy(copy.deepcopy(POLICY_FILE)), GOOGLE).egress) == TEXT
    # Order of unordered inputs (additions in the file, Google's list) doesn't matter.
    shuffled = {k: list(reversed(v)) for k, v in POLICY_FILE.items()}
    assert render_table(compile_policy(parse_policy(shuffled), list(reversed(GOOGLE))).egress) == TEXT


def test_blocked_sets_are_collapsed():
    default4, blocked4 = elements(render_table(DEFAULT.egress))["blocked4"], ELEMENTS["blocked4"]
    assert "10.0.0.0/8" in blocked4 and "10.1.0.0/16" not in blocked4
    assert "203.0.112.0/23" in blocked4 and "203.0.113.0/24" not in blocked4
    assert len(blocked4) == len(default4)  # 10.1/16 added nothing, 203.0.112/24 merged
    assert "2001:db8::/32" in ELEMENTS["blocked6"] and "2001:db8:1::/48" not in ELEMENTS["blocked6"]
    # Single addresses print without /32 or /128, as nft lists them.
    singles = [e for name, es in ELEMENTS.items() if name not in ("blocked_ports", "revision") for e in es
               if N(e.split(" . ")[0]).prefixlen == N(e.split(" . ")[0]).max_prefixlen]
    assert singles and not [e for e in singles if "/" in e.split(" . ")[0]]
    nets4 = [N(e) for e in blocked4]
    assert collapse(nets4) == nets4
    assert len(COMPILED.blocked) == len(blocked4) + len(ELEMENTS["blocked6"])


def test_exceptions_are_static_elements_but_hostnames_are_not():
    allow4, allow6 = ELEMENTS["allow4"], ELEMENTS["allow6"]
    for e in ("8.8.8.8 . tcp . 53", "8.8.8.8 . udp . 53", "8.8.4.4 . udp . 53", "10.1.2.3 . tcp . 443"):
        assert e in allow4
    for e in ("2001:4860:4860::8888 . udp . 53", "2001:4860:4860::8844 . tcp . 53", "fd00::/64 . udp . 5353"):
        assert e in allow6
    assert "10.1.2.3 . udp . 443" not in allow4 and "fd00::/64 . tcp . 53" not in allow6
    assert len(allow4) == 5 and len(allow6) == 6
    for host in ("gmail.com", "relay.example.com", "465", "2525"):
        assert host not in " ".join(allow4 + allow6)
    assert "allow4_dns" not in ELEMENTS and "allow6_dns" not in ELEMENTS


def _address_part(element: str):
    addr, proto, port = element.split(" . ")
    return N(addr), (proto, port)


@pytest.mark.parametrize("raw", [
    {"exceptions": [{"destination": "8.8.8.0/24", "ports": [53]}]},                # covers a default one
    {"exceptions": [{"destination": "2001:4860:4860::/48", "protocols": ["udp"], "ports": [53]}]},
    {"ingress": [{"source": "192.0.2.0/24", "ports": [22]}, {"source": "192.0.2.10", "ports": [22]}]},
], ids=["exception-v4-covers-default", "exception-v6-covers-default", "ingress-overlap"])
def test_interval_elements_never_overlap(raw):
    """allow4/allow6/ingress4/ingress6 are concatenated interval sets: the kernel
    (nft_set_pipapo) rejects an element that overlaps another with "File exists", and
    the whole `nft -f` transaction with it. A valid policy file must compile to
    elements that don't overlap (merge them, as blocked4/blocked6 are)."""
    els = elements(render_table(compile_policy(parse_policy(raw), GOOGLE).egress))
    for name in ("allow4", "allow6", "ingress4", "ingress6"):
        parts = [_address_part(e) for e in els.get(name, [])]
        overlaps = [(str(a), str(b), k) for i, (a, k) in enumerate(parts) for b, k2 in parts[i + 1:]
                    if k == k2 and a.overlaps(b)]
        assert not overlaps, (f"BUG netpolicy.compile._allow_elements: set {name} gets overlapping "
                              f"elements {overlaps}; nft rejects the whole ruleset (File exists)")


def test_blocked_ports():
    assert sorted(elements(render_table(DEFAULT.egress))["blocked_ports"]) == ["tcp . 21", "tcp . 25", "udp . 25"]
    assert sorted(ELEMENTS["blocked_ports"]) == ["tcp . 21", "tcp . 25", "udp . 25", "udp . 5060"]


def test_dynamic_sets_declared_never_flushed():
    lines = TEXT.splitlines()
    for name, decl in {**STATIC_SETS, **DYNAMIC_SETS}.items():
        assert f"add set inet sockgate {name} {{ {decl}; }}" in lines
    for name in DYNAMIC_SETS:
        assert f"flush set inet sockgate {name}" not in lines
        assert name not in ELEMENTS
    for name in STATIC_SETS:
        flush = lines.index(f"flush set inet sockgate {name}")
        adds = [i for i, l in enumerate(lines) if l.startswith(f"add element inet sockgate {name} ")]
        assert all(flush < i for i in adds)


def test_ingress_before_final_drop():
    assert sorted(ELEMENTS["ingress4"]) == ["192.0.2.10 . tcp . 8080"]
    assert sorted(ELEMENTS["ingress6"]) == ["2001:db8::10 . tcp . 22", "2001:db8::10 . tcp . 8080"]
    lines = TEXT.splitlines()
    for chain in ("to_container", "node_to_container"):
        rules = [l.removeprefix(f"add rule inet sockgate {chain} ") for l in lines
                 if l.startswith(f"add rule inet sockgate {chain} ")]
        # The final drop (through the reason's event chain, which reports the packet).
        assert rules[-1].startswith("counter goto event_")
        event = rules[-1].split()[2]
        assert [l for l in lines if l.startswith(f"add rule inet sockgate {event} ")][-1].endswith(" drop")
        assert "ip saddr . meta l4proto . th dport @ingress4 accept" in rules[:-1]
        assert "ip6 saddr . meta l4proto . th dport @ingress6 accept" in rules[:-1]


def test_egress_rules_in_contract_order():
    rules = [l.removeprefix("add rule inet sockgate egress_policy ") for l in TEXT.splitlines()
             if l.startswith("add rule inet sockgate egress_policy ")]
    order = ["@allow4 ", "@allow6 ", "@allow4_dns ", "@allow6_dns ", "@blocked_ports ", "@blocked4 ",
             "@blocked6 ", "@pools4 ", "@pools6 "]
    pos = [next(i for i, r in enumerate(rules) if s in r) for s in order]
    assert pos == sorted(pos)
    proto = next(i for i, r in enumerate(rules) if r.startswith("meta l4proto != { tcp, udp }"))
    assert proto < pos[0] and "goto event_protocol" in rules[proto]


# --- 5. explain --------------------------------------------------------------------

SMTP, IMAP = "142.250.10.108", "142.250.10.109"
RESOLVED = {"smtp.gmail.com": [SMTP], "imap.gmail.com": [IMAP]}
POOLS = (N("10.77.0.0/16"), N("44.77.0.0/16"))


@pytest.mark.parametrize("dst, port, proto, verdict, rule", [
    ("8.8.8.8", 53, "udp", "accept", "exception"),
    ("8.8.8.8", 53, "tcp", "accept", "exception"),
    ("8.8.4.4", 53, "udp", "accept", "exception"),
    ("8.8.8.8", 443, "tcp", "refuse", "blocked-range"),
    ("8.8.8.8", 25, "tcp", "refuse", "blocked-port"),
    ("2001:4860:4860::8888", 53, "udp", "accept", "exception"),
    ("2001:4860:4860::8844", 53, "tcp", "accept", "exception"),
    ("2001:4860:4860::8888", 443, "tcp", "refuse", "blocked-range"),
    ("34.35.0.10", 443, "tcp", "accept", "default"),
    ("142.250.72.14", 443, "tcp", "refuse", "blocked-range"),
    ("169.254.169.254", 80, "tcp", "refuse", "blocked-range"),
    ("93.184.215.14", 25, "tcp", "refuse", "blocked-port"),
    ("93.184.215.14", 25, "udp", "refuse", "blocked-port"),
    ("93.184.215.14", 587, "tcp", "accept", "default"),
    ("93.184.215.14", 21, "tcp", "refuse", "blocked-port"),
    ("93.184.215.14", 21, "udp", "accept", "default"),
    ("93.184.215.14", 5060, "udp", "refuse", "blocked-port"),  # from the policy file
    (SMTP, 465, "tcp", "accept", "exception-host"),
    (SMTP, 587, "tcp", "accept", "exception-host"),
    (SMTP, 465, "udp", "refuse", "blocked-range"),
    (SMTP, 25, "tcp", "refuse", "blocked-port"),
    (SMTP, 993, "tcp", "refuse", "blocked-range"),
    (IMAP, 993, "tcp", "accept", "exception-host"),
    (IMAP, 995, "tcp", "refuse", "blocked-range"),
    ("142.250.10.110", 465, "tcp", "refuse", "blocked-range"),  # not a resolved address
    ("64:ff9b::a00:1", 443, "tcp", "refuse", "blocked-range"),
    ("64:ff9b:1::a00:1", 443, "tcp", "refuse", "blocked-range"),
    ("2002:a00:1::", 443, "tcp", "refuse", "blocked-range"),
    ("2001:0:a00:1::", 443, "tcp", "refuse", "blocked-range"),
    ("::ffff:10.0.0.1", 443, "tcp", "refuse", "blocked-range"),
    ("::ffff:8.8.8.8", 53, "udp", "refuse", "blocked-range"),
    ("::1", 80, "tcp", "refuse", "blocked-range"),
    ("fd00::1", 443, "tcp", "refuse", "blocked-range"),
    ("fe80::1", 443, "tcp", "refuse", "blocked-range"),
    ("ff02::1", 443, "udp", "refuse", "blocked-range"),
    ("2606:4700::1111", 443, "tcp", "accept", "default"),
    ("198.18.0.2", 443, "tcp", "refuse", "node-address"),
    ("198.18.0.3", 443, "tcp", "refuse", "blocked-range"),
    # The pool rule comes after the blocked ranges: 10.77/16 sits inside 10/8.
    ("10.77.5.5", 443, "tcp", "refuse", "blocked-range"),
    ("44.77.5.5", 443, "tcp", "refuse", "container-pool"),
    ("44.78.5.5", 443, "tcp", "accept", "default"),
    ("93.184.215.14", 0, "icmp", "refuse", "tcp-udp-only"),
    ("8.8.8.8", 53, "icmp", "refuse", "tcp-udp-only"),
    ("10.1.2.3", 443, "tcp", "accept", "exception"),   # from the policy file
    ("10.1.2.3", 443, "udp", "refuse", "blocked-range"),
    ("10.1.2.3", 80, "tcp", "refuse", "blocked-range"),
    ("10.1.2.4", 443, "tcp", "refuse", "blocked-range"),
    ("fd00::5", 5353, "udp", "accept", "exception"),   # CIDR exception from the policy file
    ("fd00:0:0:1::5", 5353, "udp", "refuse", "blocked-range"),
    ("203.0.112.7", 443, "tcp", "refuse", "blocked-range"),
])
def test_explain(dst, port, proto, verdict, rule):
    v = explain(COMPILED, dst, port, proto, resolved=RESOLVED, pools=POOLS, node_addresses=("198.18.0.2",))
    assert (v.verdict, v.rule) == (verdict, rule), str(v)
    assert v.why and v.detail and str(v).startswith(verdict.upper())


def test_explain_without_resolved_hostnames_refuses_them():
    v = explain(DEFAULT, SMTP, 465, "tcp")
    assert (v.verdict, v.rule) == ("refuse", "blocked-range")


def test_explain_reasons_name_the_range():
    assert "169.254.0.0/16" in explain(DEFAULT, "169.254.169.254", 80, "tcp").detail
    assert "Google range" in explain(DEFAULT, "142.250.72.14", 443, "tcp").detail


@pytest.mark.parametrize("raw,field", [
    ({"blockedRanges": ["10.1.2.3/8"]}, "blockedRanges[0]"),                 # host bits: a typo, not a /8
    ({"exceptions": [{"destination": "300.1.1.1", "ports": [1]}]}, "exceptions[0].destination"),
    ({"resolver": {"nameservers": [134744072]}}, "resolver.nameservers[0]"),  # not silently 8.8.8.8
])
def test_ambiguous_input_is_refused_not_guessed(raw, field):
    with pytest.raises(PolicyError) as exc:
        parse_policy(raw)
    assert exc.value.field == field


def test_explain_matches_addresses_not_spellings():
    v = explain(DEFAULT, "2607:F8B0:400E:C00::6C", 465, "tcp",
                resolved={"smtp.gmail.com": ["2607:f8b0:400e:c00::6c"]})
    assert v.rule == "exception-host"
    assert explain(DEFAULT, "2001:DB8:5067::2", 80, "tcp",
                   node_addresses=("2001:db8:5067::2",)).rule == "node-address"
