"""The egress-only sandbox with real packets: what leaves, from which address, and
what never gets in."""
from __future__ import annotations

import json
import select
import subprocess
import sys
import time

import pytest

from runtime.lab import LAB

pytestmark = [pytest.mark.lab, pytest.mark.shims("compiled", "python")]
APP_PORT = 8080
# What the kernel does with packets of containers already attached: the executable
# that attached them plays no part, so these run with the default one only.
ruleset_only = pytest.mark.shims("compiled")


@pytest.fixture
def two_apps(plugin, app, lab):
    """Two attached containers, each with a listening echo server on APP_PORT."""
    out = []
    for name in ("one", "two"):
        ns = app()
        res = plugin.add(name, ns)
        lab.start_echo(ns, [APP_PORT])
        out.append({"ns": ns, "v4": res["ips"][0]["address"].split("/")[0],
                    "v6": res["ips"][1]["address"].split("/")[0]})
    return out


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("family", ["v4", "v6"])
def test_outbound_works_and_leaves_with_the_nodes_address(lab, two_apps, proto, family):
    dst = LAB.public_v4 if family == "v4" else LAB.public_v6
    node_addr = LAB.node_uplink_v4 if family == "v4" else LAB.node_uplink_v6
    r = lab.probe(two_apps[0]["ns"], proto, dst, 9000)
    assert r.ok and r.echo_ok, r
    assert r.peer_seen == node_addr, "egress must be masqueraded to the node's address"


@ruleset_only
def test_masquerade_randomizes_source_ports(lab, two_apps):
    seen = set()
    for _ in range(4):
        r = lab.probe(two_apps[0]["ns"], "udp", LAB.public_v4, 9000, bind_port=40000)
        assert r.ok, r
        seen.add(r.raw.get("peer_port"))
    # The app bound port 40000 each time; the internet never sees that port.
    assert 40000 not in seen


@ruleset_only
@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_inbound_refused_from_internet_node_and_other_container(lab, two_apps, family, proto):
    target = two_apps[0][family]
    # Control: the listener works (the container reaching its own address).
    own = lab.probe(two_apps[0]["ns"], proto, target, APP_PORT)
    assert own.ok and own.echo_ok, own
    for source in (lab.internet, lab.node, two_apps[1]["ns"]):
        r = lab.probe(source, proto, target, APP_PORT, timeout=1.0)
        assert not r.ok, f"{source} opened a {proto} connection into the container: {r}"
        assert not r.echo_ok


@ruleset_only
def test_container_cannot_reach_the_node(lab, two_apps):
    for addr in (LAB.node_uplink_v4, LAB.node_uplink_v6):
        r = lab.probe(two_apps[0]["ns"], "tcp", addr, 22, timeout=1.0)
        assert not r.ok
        # Refused at once (a reset), not left to time out.
        assert r.elapsed < 0.5, r


@ruleset_only
@pytest.mark.parametrize("family", ["v4", "v6"])
def test_spoofed_source_is_dropped(lab, two_apps, family):
    ns = two_apps[0]["ns"]
    dst = LAB.public_v4 if family == "v4" else LAB.public_v6
    forged = {"v4": "10.77.123.45", "v6": "fd77:5067:6174::dead"}[family]
    other = two_apps[1][family]  # another container's address is no better
    real = two_apps[0][family]
    marks = {}
    for label, src in (("forged", forged), ("other", other), ("real", real)):
        marks[label] = f"spoof-{family}-{label}-{time.monotonic_ns()}".encode()
        assert lab.spoof_udp(ns, src, dst, 9000, payload=marks[label]).ok
    time.sleep(0.5)
    heads = [e.get("head", "") for e in lab.server_events() if e.get("ev") == "udp"]
    arrived = {label for label, mark in marks.items() if any(mark.decode() in h for h in heads)}
    # The raw sender works (its own address gets through, masqueraded); forged ones don't.
    assert arrived == {"real"}, arrived


# A UDP socket in a container: it sends one datagram to the echo server, prints the
# reply's header (which names the node port the flow was masqueraded to), then
# prints the payload of everything else that reaches it for `wait` seconds.
_FLOW_HOLDER = r"""
import json, socket, sys, time
host, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2.0)
s.sendto(b"open", (host, port))
print(s.recv(2048).split(b"\n")[0].decode(), flush=True)
end = time.monotonic() + wait
while time.monotonic() < end:
    s.settimeout(max(0.01, end - time.monotonic()))
    try:
        print(json.dumps(s.recv(2048).decode(errors="replace")), flush=True)
    except socket.timeout:
        pass
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().decode() if ready else ""


@ruleset_only
@pytest.mark.parametrize("family", ["v4", "v6"])
def test_container_cannot_inject_into_another_containers_flow(lab, two_apps, family):
    """A packet that matches the reply side of container one's flow is delivered to
    one only when it comes from outside: container two forging the far end's address
    (so conntrack takes it for a reply and un-NATs it towards one) is dropped."""
    far = LAB.public_v4 if family == "v4" else LAB.public_v6
    node = LAB.node_uplink_v4 if family == "v4" else LAB.node_uplink_v6
    victim = lab.popen(two_apps[0]["ns"], [sys.executable, "-c", _FLOW_HOLDER, far, "9000", "3"],
                       stdout=subprocess.PIPE)
    try:
        header = _read_line(victim, 5.0)
        assert header, "the container's flow to the echo server did not get a reply"
        nat_port = json.loads(header)["peer_port"]
        marks = {"outside": f"reply-from-outside-{time.monotonic_ns()}",
                 "container": f"forged-by-container-{time.monotonic_ns()}"}
        # The same datagram, from the far end itself (the control) and from container two.
        for label, ns in (("outside", lab.internet), ("container", two_apps[1]["ns"])):
            assert lab.spoof_udp(ns, far, node, nat_port, payload=marks[label].encode(), sport=9000).ok
        got = victim.communicate(timeout=10)[0].decode()
    finally:
        if victim.poll() is None:
            victim.kill()
    arrived = {label for label, mark in marks.items() if mark in got}
    assert arrived == {"outside"}, got


def test_ingress_allowance_opens_exactly_its_source_and_port(lab, plugin, app, tmp_path):
    """A policy's ingress allowance (a platform proxy; default none) lets its source in
    on its port, and nothing else; the container's replies take the established path
    like any flow of its own."""
    import json
    from pathlib import Path
    doc = json.loads(Path(plugin.conf["policyFile"]).read_text())
    doc["ingress"] = [{"source": f"{LAB.internet_v4}/32", "protocols": ["tcp"], "ports": [APP_PORT]}]
    policy = tmp_path / "ingress.json"
    policy.write_text(json.dumps(doc))
    plugin.conf = dict(plugin.conf, policyFile=str(policy))
    ns = app()
    v4 = plugin.add("proxied", ns)["ips"][0]["address"].split("/")[0]
    lab.start_echo(ns, [APP_PORT, APP_PORT + 1])
    r = lab.probe(lab.internet, "tcp", v4, APP_PORT, bind=LAB.internet_v4, timeout=2.0)
    assert r.ok and r.echo_ok, r
    for source, port in ((LAB.internet_v4, APP_PORT + 1), (LAB.public_v4, APP_PORT)):
        r = lab.probe(lab.internet, "tcp", v4, port, bind=source, timeout=1.0)
        assert not r.ok, f"{source} opened port {port} of the container: {r}"
    plugin.delete("proxied", ns)
