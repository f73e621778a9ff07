"""The outbound contract (rows C3-C9) from inside an attached container, with real
sockets, v4 and v6. Blocked destinations get a "bait": the lab's internet answers on
them, so an allowed packet would reach a server and show in its event log."""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.lab import LAB
from tests.conftest import network_conf
from tests.support.plugin import Plugin

pytestmark = pytest.mark.lab

BAITS = ("10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.169.254", "192.0.0.170",
         "192.0.2.1", "192.88.99.1", "198.51.100.1", "203.0.113.1", "64:ff9b::a00:1",
         "64:ff9b:1::a00:1", "2002:a00:1::1", "2001:0:a00:1::1", "2001:db8::1", "3fff::1", "100::1",
         "fd00::1", "fc00::1", "5f00::1")
SMTP, POP, IMAP = (LAB.gmail[h] for h in ("smtp.gmail.com", "pop.gmail.com", "imap.gmail.com"))


@dataclass(frozen=True)
class Case:
    what: str
    dst: str
    port: int
    proto: str
    allowed: bool
    fast: bool = True  # a refusal must come at once (reset / ICMP), not as a timeout


CASES = [
    *(Case(f"exception {dst} {proto}/53 (DNS)", dst, 53, proto, True)
      for dst in (*LAB.dns_v4, *LAB.dns_v6) for proto in ("udp", "tcp")),
    Case("exception off its port: 8.8.8.8 tcp/443", "8.8.8.8", 443, "tcp", False),
    Case("exception off its port: 8.8.8.8 udp/443", "8.8.8.8", 443, "udp", False),
    Case("exception off its port: 2001:4860:4860::8888 tcp/443", "2001:4860:4860::8888", 443, "tcp", False),
    *(Case(f"smtp.gmail.com {a} tcp/{p}", a, p, "tcp", True) for a in SMTP for p in (465, 587)),
    *(Case(f"smtp.gmail.com {a} tcp/25", a, 25, "tcp", False) for a in SMTP),
    *(Case(f"imap.gmail.com {a} tcp/993", a, 993, "tcp", True) for a in IMAP),
    *(Case(f"imap.gmail.com {a} tcp/995", a, 995, "tcp", False) for a in IMAP),
    *(Case(f"pop.gmail.com {a} tcp/995", a, 995, "tcp", True) for a in POP),
    *(Case(f"pop.gmail.com {a} tcp/993", a, 993, "tcp", False) for a in POP),
    *(Case(f"cloud.json address {a} (not a Google range)", a, 443, "tcp", True)
      for a in (LAB.cloud_v4, LAB.cloud_v6)),
    *(Case(f"Google range {a}", a, 443, proto, False)
      for a in (LAB.google_v4, LAB.google_v6) for proto in ("tcp", "udp")),
    *(Case(f"public {a} {proto}/25", a, 25, proto, False)
      for a in (LAB.public_v4, LAB.public_v6) for proto in ("tcp", "udp")),
    *(Case(f"public {a} tcp/587", a, 587, "tcp", True) for a in (LAB.public_v4, LAB.public_v6)),
    *(Case(f"FTP {a} tcp/21", a, 21, "tcp", False) for a in (LAB.public_v4, LAB.public_v6)),
    *(Case(f"public {a} {proto}/80", a, 80, proto, True)
      for a in (LAB.public_v4, LAB.public_v6) for proto in ("tcp", "udp")),
    *(Case(f"special-purpose {a}", a, 80, "tcp", False) for a in BAITS),
    Case("special-purpose udp 10.1.2.3", "10.1.2.3", 80, "udp", False),
    Case("special-purpose udp fd00::1", "fd00::1", 80, "udp", False),
    Case("IPv4-mapped ::ffff:10.1.2.3", "::ffff:10.1.2.3", 80, "tcp", False),
    Case("benchmarking range 198.18.0.1 (the lab's router)", LAB.internet_v4, 80, "tcp", False),
    Case("node's own address v4", LAB.node_uplink_v4, 80, "tcp", False),
    Case("node's own address v6", LAB.node_uplink_v6, 80, "tcp", False),
    Case("unattached pool address", "10.77.254.254", 80, "tcp", False),
    Case("multicast 239.1.2.3", "239.1.2.3", 80, "udp", False, fast=False),
    Case("multicast ff0e::1", "ff0e::1", 80, "udp", False, fast=False),
    Case("reserved 240.0.0.1", "240.0.0.1", 80, "tcp", False, fast=False),
    Case("limited broadcast", "255.255.255.255", 80, "udp", False, fast=False),
]


@pytest.fixture(scope="module")
def sandbox(lab, cni_exe, policy_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    plugin = Plugin(cni_exe, lab.ns_path(lab.node), network_conf("contract", tmp, policy_file))
    ns = lab.ns_path(lab.add_app("contract"))
    for addr in BAITS:
        lab.add_internet_address(addr)
    try:
        plugin.add("contract", ns)
        refresh = lab.run(lab.node, [sys.executable, "-m", "runtime.cli.main", "policy", "refresh", "--once",
                                     "--policy", policy_file, "--state-dir", str(tmp / "state")], check=False)
        assert refresh.returncode == 0, refresh.stdout + refresh.stderr
        yield {"ns": ns, "plugin": plugin, "state": str(tmp / "state")}
    finally:
        plugin.delete("contract", ns)
        lab.remove_app("contract")
        for addr in BAITS:
            lab.remove_internet_address(addr)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.what)
def test_contract(lab, sandbox, case):
    since = len(lab.server_events())
    if case.port == 53 and case.allowed:
        r = lab.dns_query(sandbox["ns"], "smtp.gmail.com", "A", server=case.dst, tcp=case.proto == "tcp")
        assert r.ok and r.rcode == "NOERROR" and SMTP[0] in r.addresses, r
        return
    r = lab.probe(sandbox["ns"], case.proto, case.dst, case.port, timeout=1.5)
    if case.allowed:
        assert r.ok and r.echo_ok, r
        return
    assert not r.ok, f"{case.what}: reached {case.dst}:{case.port}/{case.proto}: {r}"
    if case.fast:
        assert r.error != "timeout" and r.elapsed < 0.5, f"blocked attempt must fail at once: {r}"
    time.sleep(0.05)
    assert not lab.reached(case.dst, since), f"a packet to {case.dst} reached the internet"


def test_other_protocols_are_dropped_and_related_icmp_arrives(lab, sandbox):
    """ICMP echo and raw IP protocols (SCTP 132, GRE 47) never leave; an ICMP error
    about the container's own UDP flow (port unreachable) does come back."""
    lab.run(lab.internet, ["nft", "-f", "-"], input=(
        "table inet sgtest_count {\n chain c { type filter hook prerouting priority -300;\n"
        "  meta l4proto { icmp, ipv6-icmp, sctp, gre } ip saddr 198.18.0.2 counter\n"
        "  meta l4proto { ipv6-icmp, sctp, gre } ip6 saddr 2001:db8:5067::2 counter\n }\n}\n"))
    try:
        script = (
            "import socket\n"
            f"for fam, dst, proto, data in ((socket.AF_INET, '{LAB.public_v4}', 1, b'\\x08\\x00\\xf7\\xff\\x00\\x00\\x00\\x00'),"
            f" (socket.AF_INET, '{LAB.public_v4}', 132, b'x'*16), (socket.AF_INET, '{LAB.public_v4}', 47, b'x'*8),"
            f" (socket.AF_INET6, '{LAB.public_v6}', 58, b'\\x80\\x00\\x00\\x00\\x00\\x01\\x00\\x01'),"
            f" (socket.AF_INET6, '{LAB.public_v6}', 132, b'x'*16)):\n"
            "    s = socket.socket(fam, socket.SOCK_RAW, proto)\n"
            "    try:\n        s.sendto(data, (dst, 0))\n    except OSError as e:\n        print('send', proto, e)\n"
            "    s.close()\n")
        lab.run(sandbox["ns"], [sys.executable, "-c", script])
        time.sleep(0.3)
        counters = lab.run(lab.internet, ["nft", "list", "table", "inet", "sgtest_count"]).stdout
        assert "packets 0 bytes 0" in counters and "packets 1" not in counters, counters
    finally:
        lab.run(lab.internet, ["nft", "delete", "table", "inet", "sgtest_count"], check=False)
    # Related ICMP: UDP to a closed port of an allowed host gets "port unreachable" back.
    r = lab.probe(sandbox["ns"], "udp", LAB.public_v4, LAB.iperf_port, timeout=1.5)
    assert r.error == "ECONNREFUSED", r
    r6 = lab.probe(sandbox["ns"], "udp", LAB.public_v6, LAB.iperf_port, timeout=1.5)
    assert r6.error == "ECONNREFUSED", r6


def test_no_ftp_helper(lab, sandbox):
    ruleset = lab.run(lab.node, ["nft", "list", "ruleset"]).stdout
    assert "ct helper" not in ruleset and "helper" not in ruleset
    helper = Path("/proc/sys/net/netfilter/nf_conntrack_helper")
    if helper.exists():
        value = lab.run(lab.node, ["cat", str(helper)]).stdout.strip()
        assert value == "0"


def test_policy_explain_names_the_rule(lab, sandbox, policy_file):
    def explain(*args: str) -> subprocess.CompletedProcess:
        return lab.run(lab.node, [sys.executable, "-m", "runtime.cli.main", "policy", "explain", *args,
                                  "--policy", policy_file, "--state-dir", sandbox["state"]], check=False)

    r = explain("8.8.8.8", "53", "udp")
    assert r.returncode == 0 and "ACCEPT" in r.stdout and "exception" in r.stdout
    r = explain("8.8.8.8", "443", "tcp")
    assert r.returncode == 3 and "REFUSE" in r.stdout and "Google range" in r.stdout
    r = explain(SMTP[0], "465", "tcp")
    assert r.returncode == 0 and "smtp.gmail.com" in r.stdout
    r = explain("169.254.169.254", "80", "tcp")
    assert r.returncode == 3 and "169.254.0.0/16" in r.stdout
    r = explain(LAB.node_uplink_v4, "80", "tcp")
    assert r.returncode == 3 and "node" in r.stdout
    # The lab's pools sit inside 10/8 and fc00::/7 (blocked anyway); a pool carved from
    # public space is refused by its own rule.
    r = explain("93.184.216.5", "80", "tcp", "--pool", "93.184.216.0/24")
    assert r.returncode == 3 and "container-pool" in r.stdout
