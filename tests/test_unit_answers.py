"""Screening of DNS answers for exception hostnames (netpolicy.answers, pure), the
per-exception screening and per-family bookkeeping of runtime.agent.resolver's Refresher
(with the DNS lookups, the node's view and nft replaced by fakes), and how
`policy explain` reads the dropped answers."""
from __future__ import annotations

import json
import logging

import pytest

from netpolicy.answers import Internal, NodeView, internal_networks, screen
from netpolicy.policy import Policy, parse_policy
from runtime.agent import resolver
from runtime.agent.resolver import DROPPED_KEY, Lookup, Refresher, screen_answer
from runtime.cli.policy import _resolved_for

SMTP = "smtp.gmail.com"
NODE = NodeView(
    addresses=(("198.18.0.2", "uplink"), ("2001:db8:5067::2", "uplink"), ("127.0.0.1", "lo"),
               ("93.184.216.10", "eth1")),
    peers=(("100.100.0.2", "wg0"),),
    on_link=(("198.18.0.0/24", "uplink"), ("2001:db8:5067::/64", "uplink"), ("93.184.216.0/24", "eth1")),
    gateways=(("198.18.0.1", "uplink"), ("2001:db8:5067::1", "uplink"), ("93.184.216.1", "eth1")),
    pools=("10.77.0.0/16", "fd77:5067:6174::/64", "44.77.0.0/16"),
)
POLICY = parse_policy({"blockedRanges": ["198.51.100.7/32", "2606:4700::/32"]})
INTERNAL = internal_networks(POLICY.blocked, NODE)


def verdict(addr: str, allowed: tuple[str, ...] = ()) -> tuple[bool, str]:
    (s,) = screen([addr], INTERNAL, allowed)
    return s.accepted, s.why


@pytest.mark.parametrize("addr", [
    "142.250.10.108", "2607:f8b0:400e:c00::6c",   # Google ranges: what the Gmail exceptions are for
    "8.8.8.8", "93.184.215.14", "2606:2800:21f:cb07::14", "34.35.0.10",
])
def test_public_and_google_answers_are_accepted(addr):
    assert verdict(addr) == (True, "")


@pytest.mark.parametrize("addr,why", [
    ("10.20.0.5", "private use (RFC 1918, 10.0.0.0/8)"),
    ("172.16.3.4", "private use (RFC 1918, 172.16.0.0/12)"),
    ("192.168.1.1", "private use (RFC 1918, 192.168.0.0/16)"),
    ("169.254.169.254", "metadata 169.254.169.254"),
    ("127.0.0.53", "loopback (RFC 1122, 127.0.0.0/8)"),
    ("100.64.1.1", "shared address space (CGN)"),
    ("0.0.0.0", "this network"),
    ("fd00:ec2::254", "unique local (RFC 4193, fc00::/7)"),
    ("fe80::1", "link local"),
    ("::1", "loopback"),
    # Forms that embed a private IPv4 address (Python 3.11's is_global calls some global).
    ("::ffff:10.0.0.1", "IPv4-mapped"),
    ("64:ff9b::a00:1", "NAT64"),
    ("2002:a00:1::", "6to4"),
    ("2001:0:a00:1::", "Teredo"),
    # The node itself: the most specific reason wins over the range around it.
    ("198.18.0.2", "the node's own address (on uplink)"),
    ("2001:db8:5067::2", "the node's own address (on uplink)"),
    ("198.18.0.1", "the node's gateway (via uplink)"),
    ("2001:db8:5067::1", "the node's gateway (via uplink)"),
    ("198.18.0.77", "on the node's link uplink (198.18.0.0/24)"),
    ("100.100.0.2", "the node's point-to-point peer (on wg0)"),
    # Public, but the node's own network: not a destination an exception stands for.
    ("93.184.216.10", "the node's own address (on eth1)"),
    ("93.184.216.1", "the node's gateway (via eth1)"),
    ("93.184.216.99", "on the node's link eth1 (93.184.216.0/24)"),
    ("10.77.0.5", "container pool 10.77.0.0/16"),
    ("fd77:5067:6174::5", "container pool fd77:5067:6174::/64"),
    ("44.77.3.3", "container pool 44.77.0.0/16"),
    # The policy file's blockedRanges count as internal too.
    ("198.51.100.7", "blocked by the policy file's blockedRanges (198.51.100.7/32)"),
    ("2606:4700::1111", "blocked by the policy file's blockedRanges (2606:4700::/32)"),
])
def test_internal_answers_are_dropped_with_the_reason(addr, why):
    accepted, reason = verdict(addr)
    assert not accepted
    assert why in reason, reason


def test_google_ranges_are_not_internal():
    # Policy.blocked never holds Google's ranges (they join only when compiling), so an
    # exception may open them; the special-purpose ranges are all there.
    nets = {str(i.network) for i in internal_networks(Policy().blocked, NodeView())}
    assert "10.0.0.0/8" in nets and "fc00::/7" in nets and "169.254.0.0/16" in nets
    assert not any(n.startswith("142.250.") for n in nets)


def test_allowed_answers_open_their_range_only():
    allowed = ("10.20.0.0/16", "fd20::/16", "198.18.0.0/24")
    ok, why = verdict("10.20.0.5", allowed)
    assert ok and "allowedAnswers 10.20.0.0/16" in why and "private use" in why
    assert verdict("fd20::5", allowed)[0]
    assert verdict("198.18.0.1", allowed)[0]            # the gateway, named explicitly
    assert verdict("10.30.0.5", allowed) == (False, "private use (RFC 1918, 10.0.0.0/8)")
    assert not verdict("169.254.169.254", allowed)[0]
    assert verdict("142.250.10.108", allowed) == (True, "")


def test_allowed_answers_never_open_the_node_or_the_pools():
    allowed = ("10.0.0.0/8", "fd00::/8", "198.18.0.0/15", "2001:db8::/32")
    assert verdict("10.77.0.5", allowed) == (False, "container pool 10.77.0.0/16")
    assert verdict("fd77:5067:6174::5", allowed)[1] == "container pool fd77:5067:6174::/64"
    assert verdict("198.18.0.2", allowed) == (False, "the node's own address (on uplink)")
    assert not verdict("2001:db8:5067::2", allowed)[0]
    assert verdict("10.1.2.3", allowed)[0]


def test_duplicate_node_entries_collapse_and_order_breaks_ties():
    node = NodeView(addresses=(("fe80::1", "sg1"), ("fe80::1", "sg2")), on_link=(("10.0.0.0/8", "eth9"),))
    internal = internal_networks(Policy().blocked, node)
    assert sum(str(i.network) == "fe80::1/128" for i in internal) == 1
    # Same prefix as RFC 1918's 10/8: the node's link is listed first and says more.
    assert screen(["10.1.1.1"], internal)[0].why == "on the node's link eth9 (10.0.0.0/8)"
    assert isinstance(internal[0], Internal) and not internal[0].overridable


# --- per exception: protocols, ports and allowedAnswers --------------------------

TWO = parse_policy({"exceptions": [
    {"destination": "db.example.com", "protocols": ["tcp"], "ports": [5432], "allowedAnswers": ["10.20.0.0/16"]},
    {"destination": "db.example.com", "protocols": ["tcp"], "ports": [443]},
]})


def test_screen_answer_opens_each_exception_with_its_own_allowed_answers():
    internal = internal_networks(TWO.blocked, NODE)
    o = screen_answer(TWO, "db.example.com", ["10.20.0.5", "93.184.215.14", "10.77.0.9"], internal)
    assert set(o.elements) == {("10.20.0.5", "tcp", 5432), ("93.184.215.14", "tcp", 443),
                               ("93.184.215.14", "tcp", 5432)}
    by_addr = {d.address: d for d in o.dropped}
    assert by_addr["10.20.0.5"].closed == ("tcp/443",) and "private use" in by_addr["10.20.0.5"].why
    assert by_addr["10.77.0.9"].closed == ("tcp/443", "tcp/5432")
    assert o.opened == ("10.20.0.5", "93.184.215.14")


def test_screen_answer_of_the_default_gmail_exception():
    internal = internal_networks(Policy().blocked, NODE)
    o = screen_answer(Policy(), SMTP, ["142.250.10.108", "169.254.169.254"], internal)
    assert {e[0] for e in o.elements} == {"142.250.10.108"}
    assert [(d.address, d.closed) for d in o.dropped] == [("169.254.169.254", ("tcp/465", "tcp/587"))]


def test_elements_script_rearms_each_element():
    text = resolver.elements_script([("10.20.0.5", "tcp", 443), ("fd20::5", "tcp", 443)], 7)
    assert "add element inet sockgate allow4_dns { 10.20.0.5 . tcp . 443 timeout 7s }" in text
    assert "delete element inet sockgate allow6_dns { fd20::5 . tcp . 443 }" in text
    assert resolver.elements_script([], 7) == ""


# --- the Refresher: each family on its own ----------------------------------------

class FakeDNS:
    """Scripted lookups: answers[(host, rdtype)] is a Lookup, or a list consumed in turn."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], Lookup] = {}
        self.asked: list[tuple[str, str]] = []

    def __call__(self, host, settings, rdtypes=resolver.FAMILIES):
        out = []
        for t in rdtypes:
            self.asked.append((host, t))
            out.append(self.answers.get((host, t), Lookup(t, (), settings.min_ttl)))
        return tuple(out)


@pytest.fixture
def rig(monkeypatch, tmp_path):
    dns = FakeDNS()
    scripts: list[str] = []
    monkeypatch.setattr(resolver, "resolve", dns)
    monkeypatch.setattr(resolver.nft, "run", scripts.append)
    policy = parse_policy({"resolver": {"minTtl": 5, "maxTtl": 600}})
    ref = Refresher(policy, tmp_path / "resolved.json", view=lambda: NODE)
    return dns, scripts, ref, tmp_path / "resolved.json"


def _only(ref: Refresher, host: str = SMTP) -> None:
    # The fake answers NoAnswer for the other hostnames; keep them out of the way.
    for key in ref.due:
        if key[0] != host:
            ref.due[key] = 1e9


def test_one_family_failing_keeps_the_other(rig, caplog):
    dns, scripts, ref, record = rig
    _only(ref)
    dns.answers[(SMTP, "A")] = Lookup("A", ("142.250.10.108",), 60)
    dns.answers[(SMTP, "AAAA")] = Lookup("AAAA", error="LifetimeTimeout: timed out")
    with caplog.at_level(logging.INFO, logger="runtime.agent.resolver"):
        (res,) = ref.refresh_due(now=100.0)
    assert res.addresses == ("142.250.10.108",) and "AAAA: LifetimeTimeout" in res.error
    assert len(scripts) == 1 and "allow4_dns" in scripts[0] and "allow6_dns" not in scripts[0]
    assert "timeout 62s" in scripts[0]
    # The failure is logged as one, and not as success.
    msgs = [r.getMessage() for r in caplog.records]
    assert any("resolving smtp.gmail.com AAAA failed" in m and "retry in 1s" in m for m in msgs), msgs
    assert not any("resolved smtp.gmail.com AAAA" in m for m in msgs)
    assert any("resolved smtp.gmail.com A: 142.250.10.108" in m for m in msgs)
    # The failed family is retried with backoff; the good one waits for its TTL.
    assert ref.due[(SMTP, "A")] == 160.0 and ref.due[(SMTP, "AAAA")] == 101.0
    dns.asked.clear()
    ref.refresh_due(now=101.0)
    assert dns.asked == [(SMTP, "AAAA")]
    assert ref.due[(SMTP, "AAAA")] == 103.0
    ref.refresh_due(now=103.0)
    assert ref.due[(SMTP, "AAAA")] == 107.0
    assert json.loads(record.read_text())[SMTP] == ["142.250.10.108"]


def test_a_failed_family_adds_nothing_and_its_old_answer_runs_out(rig, monkeypatch):
    dns, scripts, ref, record = rig
    _only(ref)
    dns.answers[(SMTP, "A")] = Lookup("A", ("142.250.10.108",), 5)
    dns.answers[(SMTP, "AAAA")] = Lookup("AAAA", ("2607:f8b0:400e:c00::6c",), 5)
    clock = [1000.0]
    monkeypatch.setattr(resolver.time, "time", lambda: clock[0])
    ref.refresh_due(now=0.0)
    assert set(json.loads(record.read_text())[SMTP]) == {"142.250.10.108", "2607:f8b0:400e:c00::6c"}
    scripts.clear()
    dns.answers[(SMTP, "AAAA")] = Lookup("AAAA", error="NoNameservers: SERVFAIL")
    clock[0] = 1005.0
    ref.refresh_due(now=5.0)
    assert scripts and all("allow6_dns" not in s for s in scripts)  # nothing re-armed for v6
    # Within its timeout (ttl 5 + grace 2) the old v6 answer is still open, then not.
    assert "2607:f8b0:400e:c00::6c" in json.loads(record.read_text())[SMTP]
    clock[0] = 1010.0
    ref.refresh_due(now=10.0)
    assert json.loads(record.read_text())[SMTP] == ["142.250.10.108"]


def test_dropped_answers_open_nothing_and_are_recorded(rig, caplog):
    dns, scripts, ref, record = rig
    _only(ref)
    dns.answers[(SMTP, "A")] = Lookup("A", ("142.250.10.108", "169.254.169.254", "198.18.0.2"), 60)
    dns.answers[(SMTP, "AAAA")] = Lookup("AAAA", ("fd00:ec2::254",), 60)
    with caplog.at_level(logging.WARNING, logger="runtime.agent.resolver"):
        (res,) = ref.refresh_due(now=0.0)
    assert res.error == "" and res.addresses == ("142.250.10.108",)
    assert "169.254.169.254" not in "".join(scripts) and "fd00:ec2" not in "".join(scripts)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("dropped answer 169.254.169.254 for smtp.gmail.com" in w and "metadata" in w for w in warnings)
    assert any("198.18.0.2" in w and "the node's own address (on uplink)" in w for w in warnings)
    assert any("fd00:ec2::254" in w and "unique local" in w for w in warnings)
    rec = json.loads(record.read_text())
    assert rec[SMTP] == ["142.250.10.108"]
    assert {d["address"] for d in rec[DROPPED_KEY][SMTP]} == {"169.254.169.254", "198.18.0.2", "fd00:ec2::254"}
    # The same drop again is not warned about at every TTL.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.agent.resolver"):
        ref.refresh_due(now=60.0)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_without_the_nodes_view_nothing_opens(rig):
    dns, scripts, ref, _ = rig
    _only(ref)

    def broken() -> NodeView:
        raise OSError(9, "netlink gone")

    ref.view = broken
    dns.answers[(SMTP, "A")] = Lookup("A", ("142.250.10.108",), 60)
    (res,) = ref.refresh_due(now=0.0)
    assert not scripts and "A: not applied: OSError" in res.error
    assert ref.failures[(SMTP, "A")] == 1 and ref.due[(SMTP, "A")] == 1.0


def test_no_answer_is_not_a_failure(rig):
    dns, scripts, ref, _ = rig
    _only(ref)
    dns.answers[(SMTP, "A")] = Lookup("A", ("142.250.10.108",), 60)  # AAAA: NoAnswer (fake's default)
    (res,) = ref.refresh_due(now=0.0)
    assert res.error == "" and ref.failures[(SMTP, "AAAA")] == 0 and ref.due[(SMTP, "AAAA")] == 5.0


# --- `policy explain` reading resolved.json ----------------------------------------

def test_explain_reads_the_record_with_dropped_answers():
    record = {"db.example.com": ["10.20.0.5", "93.184.215.14"], "smtp.gmail.com": ["142.250.10.108"],
              DROPPED_KEY: {"db.example.com": [{"address": "10.20.0.5", "why": "private use (RFC 1918, 10.0.0.0/8)",
                                                "closed": ["tcp/443"]}],
                            "smtp.gmail.com": [{"address": "169.254.169.254", "why": "metadata",
                                                "closed": ["tcp/465", "tcp/587"]}]}}
    resolved, notes = _resolved_for(record, "10.20.0.5", "tcp/443")
    assert resolved == {"db.example.com": ["93.184.215.14"], "smtp.gmail.com": ["142.250.10.108"]}
    assert notes and "10.20.0.5 was an answer for db.example.com" in notes[0]
    resolved, _ = _resolved_for(record, "10.20.0.5", "tcp/5432")
    assert "10.20.0.5" in resolved["db.example.com"]
    resolved, notes = _resolved_for(record, "169.254.169.254", "tcp/587")
    assert "metadata" in notes[0] and DROPPED_KEY not in resolved
    # The old shape (no dropped answers) reads as before.
    assert _resolved_for({"smtp.gmail.com": ["142.250.10.108"]}, "8.8.8.8", "udp/53") == \
        ({"smtp.gmail.com": ["142.250.10.108"]}, [])


def test_record_keys_for_dropped_answers_cannot_be_hostnames():
    from netpolicy.policy import PolicyError
    with pytest.raises(PolicyError):
        parse_policy({"exceptions": [{"destination": DROPPED_KEY, "ports": [1]}]})
