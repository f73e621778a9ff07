"""The node's resolver is not trusted (security issue #10): an answer for an exception
hostname that points inside (the node, its gateway and link, private hosts, the
metadata address, ULAs, the container pools) opens nothing, unless the operator's
exception names that range in allowedAnswers; and a lookup where one family failed
keeps the other family's answer while the failed family's old addresses run out.

Real lab: the node's `sockgate policy refresh` asks the lab's DNS server, which
answers what the test sets (lab.set_dns); the internet netns holds a host on each
rebinding target, so an exception that wrongly opened one would let the probe in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, Iterator

import pytest

from runtime.core.policy import resolved_record
from runtime.lab import LAB
from runtime.lab.policy import write_lab_policy

pytestmark = pytest.mark.lab
SMTP = "smtp.gmail.com"
DB = "db.sockgate-lab.test"
# Fresh addresses inside Google's ranges: only the exception can open them.
GOOD = ("142.250.10.210", "2607:f8b0:400e:c00::d2")
PRIVATE4, ULA6, METADATA4 = "10.20.0.5", "fd00:ec2::254", "169.254.169.254"
NEIGHBOUR = ("198.18.0.99", "2001:db8:5067::99")  # on the node's uplink network, not its gateway
# Hosts the test adds in the internet netns: (address, device). The neighbours sit on
# the link itself (IPv6 neighbour discovery answers only for the link's own addresses).
HOSTS = ((GOOD[0], "lo"), (GOOD[1], "lo"), (PRIVATE4, "lo"), (ULA6, "lo"), (METADATA4, "lo"),
         (NEIGHBOUR[0], LAB.downlink_if), (NEIGHBOUR[1], LAB.downlink_if))

# Rebinding targets per family: (address, what the drop must say).
REBIND = {
    4: ((LAB.node_uplink_v4, "the node's own address (on uplink)"),
        (LAB.internet_v4, "the node's gateway (via uplink)"),
        (NEIGHBOUR[0], "on the node's link uplink (198.18.0.0/24)"),
        (PRIVATE4, "private use (RFC 1918, 10.0.0.0/8)"),
        (METADATA4, "metadata 169.254.169.254"),
        ("10.77.254.254", "container pool 10.77.0.0/16")),
    6: ((LAB.node_uplink_v6, "the node's own address (on uplink)"),
        (LAB.internet_v6, "the node's gateway (via uplink)"),
        (NEIGHBOUR[1], "on the node's link uplink (2001:db8:5067::/64)"),
        (ULA6, "unique local (RFC 4193, fc00::/7)"),
        ("fd77:5067:6174::fe", "container pool fd77:5067:6174::/64"),
        ("64:ff9b::a14:5", "NAT64 well-known prefix")),  # 10.20.0.5 behind NAT64
}


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout}s")


def _dns_elements(lab) -> set[tuple[str, str, int]]:
    """(address, protocol, port) of every element of allow4_dns and allow6_dns."""
    out = set()
    for name in ("allow4_dns", "allow6_dns"):
        listing = json.loads(lab.run(lab.node, ["nft", "-j", "list", "set", "inet", "sockgate", name]).stdout)
        for item in listing["nftables"]:
            for e in item.get("set", {}).get("elem", []):
                val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                addr, proto, port = val["concat"]
                out.add((addr, proto, int(port)))
    return out


def _purge(lab, addresses: set[str]) -> None:
    """Delete the test's addresses from allow4_dns/allow6_dns (they would time out
    anyway; a later test must not meet them)."""
    for addr, proto, port in _dns_elements(lab):
        if addr in addresses:
            name = "allow6_dns" if ":" in addr else "allow4_dns"
            lab.run(lab.node, ["nft", "delete", "element", "inet", "sockgate", name,
                               f"{{ {addr} . {proto} . {port} }}"], check=False)


@pytest.fixture
def attached(plugin, app) -> str:
    ns = app()
    plugin.add("hardening", ns)
    return ns


@pytest.fixture
def lab_hosts(lab) -> Iterator[None]:
    """The rebinding targets exist in the lab's internet; the DNS records and the
    table's elements go back to what they were, pass or fail."""
    records = lab.dns_records.read_text()
    added = []
    try:
        for addr, dev in HOSTS:
            v6 = ":" in addr
            lab.run(lab.internet, ["ip", "addr", "add", f"{addr}/{128 if v6 else 32}", "dev", dev]
                    + (["nodad"] if v6 else []))
            added.append((addr, dev))
        yield
    finally:
        for addr, dev in added:
            lab.run(lab.internet, ["ip", "addr", "del", f"{addr}/{128 if ':' in addr else 32}", "dev", dev],
                    check=False)
        tmp = lab.dns_records.with_name(f".{lab.dns_records.name}.restore")
        tmp.write_text(records)
        os.replace(tmp, lab.dns_records)  # atomic: the DNS server reloads on a new inode
        every = {a for a, _ in HOSTS} | {a for fam in REBIND.values() for a, _ in fam}
        _purge(lab, every)


def _cli(lab, *args: str) -> subprocess.CompletedProcess:
    return lab.run(lab.node, [sys.executable, "-m", "runtime.cli.main", *args], check=False, timeout=60)


def _refresh_once(lab, plugin, policy: str) -> subprocess.CompletedProcess:
    return _cli(lab, "policy", "refresh", "--once", "--policy", policy, "--state-dir", str(plugin.state_dir))


def _explain(lab, plugin, policy: str, addr: str, port: int) -> subprocess.CompletedProcess:
    return _cli(lab, "policy", "explain", addr, str(port), "tcp", "--policy", policy,
                "--state-dir", str(plugin.state_dir))


def _reachable(lab, ns: str, addr: str, port: int) -> bool:
    return lab.probe(ns, "tcp", addr, port, timeout=1.0).ok


@pytest.mark.parametrize("family", [4, 6])
def test_rebinding_answers_open_nothing(lab, plugin, attached, lab_hosts, family):
    good = GOOD[0] if family == 4 else GOOD[1]
    targets = REBIND[family]
    policy = plugin.conf["policyFile"]
    assert not _reachable(lab, attached, good, 587)  # a Google range: closed until resolved
    lab.set_dns(SMTP, [good, *(a for a, _ in targets)], ttl=30)
    r = _refresh_once(lab, plugin, policy)
    assert r.returncode == 0, r.stdout + r.stderr
    # The Google-range answer of the same reply opens, on the exception's ports only.
    assert _reachable(lab, attached, good, 587) and _reachable(lab, attached, good, 465)
    assert not _reachable(lab, attached, good, 443)
    opened = {a for a, _, _ in _dns_elements(lab)}
    assert good in opened
    failures = []
    for addr, why in targets:
        if addr in opened:
            failures.append(f"{addr} is in the set")
        if _reachable(lab, attached, addr, 587):
            failures.append(f"{addr}:587 reachable from the container")
        dropped = [line for line in r.stdout.splitlines() if f"dropped {addr} " in line]
        if not dropped or why not in dropped[0] or "tcp/465, tcp/587" not in dropped[0]:
            failures.append(f"{addr}: --once output lacks the drop and '{why}': {dropped}")
        if not any("dropped answer" in line and f" {addr} " in line and why in line and "WARNING" in line
                   for line in r.stderr.splitlines()):
            failures.append(f"{addr}: no warning naming host, address and '{why}'")
    assert not failures, "\n".join(failures) + "\n" + r.stdout + r.stderr
    # explain reads resolved.json (dropped answers included) and says what happened.
    e = _explain(lab, plugin, policy, good, 587)
    assert e.returncode == 0 and SMTP in e.stdout, e.stdout + e.stderr
    addr, why = targets[3]  # the private host / the ULA
    e = _explain(lab, plugin, policy, addr, 587)
    assert e.returncode == 3 and "REFUSE" in e.stdout, e.stdout + e.stderr
    assert f"{addr} was an answer for {SMTP}, dropped" in e.stdout and why in e.stdout
    record = json.loads(resolved_record(str(plugin.state_dir)).read_text())
    assert good in record[SMTP] and not any(a in record[SMTP] for a, _ in targets)


def test_allowed_answers_open_the_named_private_range(lab, plugin, attached, lab_hosts, tmp_path):
    """An operator's hostname exception whose allowedAnswers names a private range opens
    its host there, on its port only; the pools and the rest stay shut."""
    policy = str(write_lab_policy(tmp_path / "db.json", exceptions=[
        {"destination": DB, "protocols": ["tcp"], "ports": [443],
         "allowedAnswers": ["10.0.0.0/8", "fd00::/8"]}]))
    for addr in (PRIVATE4, ULA6):  # blocked ranges: closed without the exception
        assert not _reachable(lab, attached, addr, 443)
    answers = [PRIVATE4, ULA6, METADATA4, "10.77.254.254", "fd77:5067:6174::fe", LAB.internet_v4]
    lab.set_dns(DB, answers, ttl=30)
    r = _refresh_once(lab, plugin, policy)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _reachable(lab, attached, PRIVATE4, 443) and _reachable(lab, attached, ULA6, 443)
    assert not _reachable(lab, attached, PRIVATE4, 587) and not _reachable(lab, attached, ULA6, 587)
    assert "accepted: inside allowedAnswers 10.0.0.0/8" in r.stderr, r.stderr
    dropped = {line.split()[1]: line for line in r.stdout.splitlines() if line.strip().startswith("dropped ")}
    assert set(dropped) == {METADATA4, "10.77.254.254", "fd77:5067:6174::fe", LAB.internet_v4}, r.stdout
    assert "container pool 10.77.0.0/16" in dropped["10.77.254.254"]  # inside 10/8, still not
    assert not _reachable(lab, attached, METADATA4, 443) and not _reachable(lab, attached, LAB.internet_v4, 443)
    opened = {a for a, _, _ in _dns_elements(lab)}
    assert {PRIVATE4, ULA6} <= opened and not opened & set(dropped)
    e = _explain(lab, plugin, policy, PRIVATE4, 443)
    assert e.returncode == 0 and DB in e.stdout, e.stdout + e.stderr


def test_lab_dns_fails_one_family_on_request(lab, lab_hosts):
    lab.set_dns(SMTP, GOOD, ttl=30, fail={"AAAA": "servfail"})
    a, aaaa = lab.dns_query(lab.node, SMTP, "A"), lab.dns_query(lab.node, SMTP, "AAAA")
    assert a.ok and a.rcode == "NOERROR" and a.addresses == [GOOD[0]]
    assert aaaa.ok and aaaa.rcode == "SERVFAIL" and not aaaa.addresses
    lab.set_dns(SMTP, GOOD, ttl=30, fail={"A": "timeout"})
    a, aaaa = lab.dns_query(lab.node, SMTP, "A", timeout=1.0), lab.dns_query(lab.node, SMTP, "AAAA")
    assert not a.ok and a.error == "timeout"
    assert aaaa.ok and aaaa.addresses == [GOOD[1]]


OLD = ("142.250.10.211", "2607:f8b0:400e:c00::d3")
NEW = GOOD


@pytest.fixture
def more_hosts(lab, lab_hosts) -> Iterator[None]:
    for addr in OLD:
        lab.run(lab.internet, ["ip", "addr", "add", addr + ("/128" if ":" in addr else "/32"), "dev", "lo"]
                + (["nodad"] if ":" in addr else []))
    try:
        yield
    finally:
        for addr in OLD:
            lab.run(lab.internet, ["ip", "addr", "del", addr + ("/128" if ":" in addr else "/32"), "dev", "lo"],
                    check=False)
        _purge(lab, set(OLD))


@pytest.mark.parametrize("failing,mode", [("AAAA", "servfail"), ("A", "timeout")])
def test_one_family_failing_keeps_the_other(lab, plugin, attached, more_hosts, tmp_path, failing, mode):
    bad, ok = (1, 0) if failing == "AAAA" else (0, 1)  # index into (v4, v6)
    log = tmp_path / "refresh.log"
    lab.set_dns(SMTP, OLD, ttl=2)
    refresher = lab.popen(lab.node, [sys.executable, "-m", "runtime.cli.main", "policy", "refresh",
                                     "--policy", plugin.conf["policyFile"], "--state-dir", str(plugin.state_dir)],
                          log=log)
    try:
        def reachable(addr: str) -> bool:
            return _reachable(lab, attached, addr, 587)

        _wait_for(lambda: all(reachable(a) for a in OLD), 15, "both old answers open")
        lab.set_dns(SMTP, NEW, ttl=2, fail={failing: mode})
        # The family that answers moves on to its new address ...
        _wait_for(lambda: reachable(NEW[ok]), 15, f"new {NEW[ok]} open")
        # ... the failed one opens nothing new, and its old address runs out (ttl 2 s + grace).
        _wait_for(lambda: not reachable(OLD[bad]), 20, f"old {OLD[bad]} closed")
        assert not reachable(NEW[bad])
        # Backoff, per family: the second failure waits twice as long. (A timing out
        # takes a second per try, so the second try may come after the old address
        # closed.)
        _wait_for(lambda: "retry in 2s" in log.read_text(), 15, "a second, longer backoff")
        text = log.read_text()
        assert f"resolving {SMTP} {failing} failed" in text, text[-3000:]
        assert "retry in 1s" in text, text[-3000:]
        assert NEW[bad] not in text  # never resolved, never opened
        assert f"resolved {SMTP} {'A' if failing == 'AAAA' else 'AAAA'}: {NEW[ok]}" in text, text[-3000:]
        # Once the family answers again, its retry picks it up.
        lab.set_dns(SMTP, NEW, ttl=2)
        _wait_for(lambda: reachable(NEW[bad]), 45, f"new {NEW[bad]} open after recovery")
    finally:
        refresher.terminate()
        refresher.wait(10)


def test_node_view_in_the_node(lab, plugin, attached):
    """What the refresher reads of the node: its uplink address, gateway and network,
    the pools in the table; not the container veths' routes."""
    code = ("import json, dataclasses; from runtime.agent.resolver import node_view; "
            "print(json.dumps(dataclasses.asdict(node_view())))")
    view = json.loads(lab.run(lab.node, [sys.executable, "-c", code]).stdout)
    own = {a for a, _ in view["addresses"]}
    assert {LAB.node_uplink_v4, LAB.node_uplink_v6} <= own
    gateways, on_link = view["gateways"], view["on_link"]
    assert [LAB.internet_v4, LAB.uplink_if] in gateways and [LAB.internet_v6, LAB.uplink_if] in gateways
    assert ["198.18.0.0/24", LAB.uplink_if] in on_link and ["2001:db8:5067::/64", LAB.uplink_if] in on_link
    assert set(LAB.container_pools) <= set(view["pools"])
    assert all(not dev.startswith("sg") for _, dev in view["on_link"]), view["on_link"]
