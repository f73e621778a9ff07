"""What Kubernetes workloads need from the policy, with real packets: kubelet's probes
from the node's own netns (`"source": "node"` ingress), and ClusterFirst DNS through a
kube-proxy-like DNAT in the node (`clusterDns`). And the packets meant to get around
either rule."""
from __future__ import annotations

import ipaddress
import json
import sys
import time
from pathlib import Path

import pytest

from netpolicy.ruleset import GATEWAY_V6
from runtime.lab import LAB
from tests.support import attacks as atk
from tests.support import k8s
from tests.support.k8s import COREDNS_IP, SERVICE_IP

pytestmark = pytest.mark.lab
PROBE_PORT = 8080     # the port the policy lets the node open
OTHER_PORT = 8081     # a port it doesn't
HTTP_PORT = 8090      # an httpGet probe's port, also listed


def _policy(plugin, tmp_path: Path, name: str, **extra) -> None:
    """The lab's policy plus `extra`, in force for the plugin's next ADD."""
    doc = json.loads(Path(plugin.lab_policy).read_text())
    doc.update(extra)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    plugin.conf = dict(plugin.conf, policyFile=str(path))


@pytest.fixture(autouse=True)
def _lab_policy(plugin):
    plugin.lab_policy = plugin.conf["policyFile"]  # before any test changes it


def _start_http(lab, ns: str, tmp_path: Path) -> None:
    """A tiny HTTP server in the container's netns (both families), answering 200."""
    root = tmp_path / "www"
    root.mkdir(exist_ok=True)
    (root / "healthz").write_text("ok\n")
    lab.popen(ns, [sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "::", "--directory", str(root)],
              log=tmp_path / "http.log")
    deadline = time.monotonic() + 10
    while True:  # ready once it answers inside its own netns
        got = k8s.http_get(lab, ns, "::1", HTTP_PORT)
        if got == "200":
            return
        assert time.monotonic() < deadline, f"the container's HTTP server never answered: {got}"
        time.sleep(0.1)


def _container(plugin, app, lab, tmp_path: Path, name: str) -> dict:
    ns = app()
    res = plugin.add(name, ns)
    lab.start_echo(ns, [PROBE_PORT, OTHER_PORT])
    _start_http(lab, ns, tmp_path)
    return {"ns": ns, "v4": res["ips"][0]["address"].split("/")[0], "v6": res["ips"][1]["address"].split("/")[0]}


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_node_probes_pass_on_listed_ports_only(lab, plugin, app, tmp_path, family):
    """kubelet's tcpSocket and httpGet probes from the node netns: answered on the
    ports the `"source": "node"` rule lists (the echo and the HTTP status are the
    container's replies getting back to the node), refused on any other."""
    _policy(plugin, tmp_path, "probes", ingress=[{"source": "node", "protocols": ["tcp"],
                                                  "ports": [PROBE_PORT, HTTP_PORT]}])
    c = _container(plugin, app, lab, tmp_path, "probed")
    r = lab.probe(lab.node, "tcp", c[family], PROBE_PORT, timeout=2.0)
    assert r.ok and r.echo_ok, r
    assert k8s.http_get(lab, lab.node, c[family], HTTP_PORT) == "200"
    r = lab.probe(lab.node, "tcp", c[family], OTHER_PORT, timeout=1.0)
    assert not r.ok and not r.echo_ok, f"the node opened unlisted port {OTHER_PORT}: {r}"
    # Nothing but the node: the same port from the internet stays closed.
    r = lab.probe(lab.internet, "tcp", c[family], PROBE_PORT, timeout=1.0)
    assert not r.ok, f"the internet opened the node's probe port: {r}"


_CONNECT_FROM = r"""
import json, socket, sys
dst, port, src, ifname = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(2)
s.bind((src, 0, 0, socket.if_nametoindex(ifname)))
try:
    s.connect((dst, port, 0, 0))
    s.sendall(b"probe\n")
    print(json.dumps({"echo": s.recv(100).decode(errors="replace")}))
except OSError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def test_a_probe_from_the_veths_link_local_address_passes_without_an_agent(lab, plugin, app, tmp_path):
    """A node with no other IPv6 address probes from fe80::1, its end of every container
    veth (README). Review 9: without an agent, the ADD loaded the table before it gave
    the veth that address, and nothing read the node's addresses again: the probe was
    dropped as node-to-container. fe80::1 is in node6 whether a veth holds it or not."""
    _policy(plugin, tmp_path, "probes", ingress=[{"source": "node", "protocols": ["tcp"], "ports": [PROBE_PORT]}])
    c = _container(plugin, app, lab, tmp_path, "probed")
    veth = json.loads(plugin.calls[-1].stdout)["interfaces"][0]["name"]  # the ADD's result
    cp = lab.run(lab.node, [sys.executable, "-c", _CONNECT_FROM, c["v6"], str(PROBE_PORT), GATEWAY_V6, veth])
    got = json.loads(cp.stdout)
    # The echo server greets with one JSON line; the echoed "probe" may come in the same read.
    assert "echo" in got and json.loads(got["echo"].splitlines()[0])["peer"] == GATEWAY_V6, got


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_node_probes_refused_by_default(lab, plugin, app, tmp_path, family):
    """Without a `"source": "node"` rule, both probes fail (the lab's policy has none)."""
    c = _container(plugin, app, lab, tmp_path, "unprobed")
    r = lab.probe(lab.node, "tcp", c[family], PROBE_PORT, timeout=1.0)
    assert not r.ok and not r.echo_ok, r
    assert k8s.http_get(lab, lab.node, c[family], HTTP_PORT) in k8s.STOPPED


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_container_still_cannot_open_a_flow_to_the_node(lab, plugin, app, tmp_path, family):
    """The node rule opens the reply path of the node's own flows, nothing else: the
    container connecting to the node, even from the probe port (so that its packets
    look like replies), is refused; so is UDP from that port (a forged reply, which
    the node's echo server would answer if it arrived)."""
    _policy(plugin, tmp_path, "probes-both", ingress=[{"source": "node", "protocols": ["tcp", "udp"],
                                                       "ports": [PROBE_PORT]}])
    c = _container(plugin, app, lab, tmp_path, "client")
    listener = lab.start_echo(lab.node, [PROBE_PORT + 100])
    try:
        node = LAB.node_uplink_v4 if family == "v4" else LAB.node_uplink_v6
        # Control: the node's listener answers the node itself.
        r = lab.probe(lab.node, "tcp", node, PROBE_PORT + 100)
        assert r.ok and r.echo_ok, r
        for proto in ("tcp", "udp"):
            r = lab.probe(c["ns"], proto, node, PROBE_PORT + 100, timeout=1.0, bind_port=PROBE_PORT)
            assert not r.ok and not r.echo_ok, f"the container reached the node over {proto}: {r}"
            r = lab.probe(c["ns"], proto, node, PROBE_PORT + 100, timeout=1.0)
            assert not r.ok and not r.echo_ok, f"the container reached the node over {proto}: {r}"
    finally:
        listener.kill()
        listener.wait(10)


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_forwarded_packet_claiming_the_nodes_address_is_dropped(lab, plugin, app, tmp_path, family):
    """An outside host forging the node's own address as source must not pass as the
    node, even when an ingress CIDR covers the node's network: counted as
    spoofed-node and dropped; the real source under the same CIDR gets in."""
    uplink = {"v4": (f"{LAB.internet_v4}/24", LAB.node_uplink_v4, LAB.internet_v4),
              "v6": (f"{LAB.internet_v6}/64", LAB.node_uplink_v6, LAB.internet_v6)}[family]
    net, node, real = uplink
    _policy(plugin, tmp_path, "cidr-and-node",
            ingress=[{"source": str(ipaddress.ip_network(net, strict=False)),
                      "protocols": ["udp"], "ports": [PROBE_PORT]},
                     {"source": "node", "protocols": ["udp"], "ports": [PROBE_PORT]}])
    c = _container(plugin, app, lab, tmp_path, "target")
    r = lab.probe(lab.internet, "udp", c[family], PROBE_PORT, bind=real, timeout=2.0)
    assert r.ok and r.echo_ok, f"control: the CIDR's real source did not get in: {r}"
    before = atk.drop_counters(lab)
    assert lab.spoof_udp(lab.internet, node, c[family], PROBE_PORT, payload=b"forged-node").ok
    time.sleep(0.5)
    drops = atk.delta(before, atk.drop_counters(lab))
    # Had it been delivered, the node would hold its flow (and the container's echo
    # would have come back to the node as a "reply").
    listed = lab.run(lab.node, ["conntrack", "-L", "-p", "udp", "-s", node, "-d", c[family],
                                *(["-f", "ipv6"] if family == "v6" else [])], check=False).stdout
    assert not listed.strip(), listed
    # IPv6 reaches the rule; Linux drops an IPv4 packet whose source is a local
    # address as a martian before the forward hook (net.ipv4.conf.*.accept_local=0).
    assert drops.get("spoofed-node", 0) == (1 if family == "v6" else 0), drops


# --- cluster DNS through a kube-proxy-like DNAT ---------------------------------------

@pytest.fixture
def cluster_dns(lab, tmp_path):
    with k8s.cluster_dns_server(lab, tmp_path / "coredns.log"):
        yield


def test_cluster_dns_through_the_dnat_with_the_opt_in_only(lab, plugin, app, tmp_path, cluster_dns):
    k8s.kubeproxy_dnat(lab, (53, 9000))
    # Control: the endpoint answers the node on both ports (the lab's echo has 9000).
    assert lab.dns_query(lab.node, "smtp.gmail.com", server=COREDNS_IP).ok
    assert lab.probe(lab.node, "tcp", COREDNS_IP, 9000).ok

    _policy(plugin, tmp_path, "cluster-dns", clusterDns={"services": [SERVICE_IP]})
    ns = app()
    plugin.add("pod", ns)
    for tcp in (False, True):
        r = lab.dns_query(ns, "smtp.gmail.com", server=SERVICE_IP, tcp=tcp)
        assert r.ok and r.addresses and set(r.addresses) <= set(LAB.gmail["smtp.gmail.com"]), r
    # Port 53 only: the same service and DNAT on another port is refused.
    for proto in ("tcp", "udp"):
        r = lab.probe(ns, proto, SERVICE_IP, 9000, timeout=1.0)
        assert not r.ok and not r.echo_ok, f"{proto} 9000 of the service got through: {r}"
    # The endpoint itself stays a private address like any other.
    assert not lab.dns_query(ns, "smtp.gmail.com", server=COREDNS_IP, timeout=1.0).ok

    # Only through the DNAT: without it the service address is one more private host
    # (the lab's internet answers on it, so a pass would show).
    k8s.remove_kubeproxy_dnat(lab)
    assert not lab.dns_query(ns, "smtp.gmail.com", server=SERVICE_IP, timeout=1.0).ok
    k8s.kubeproxy_dnat(lab, (53,))

    # Without the opt-in (the lab's own policy, loaded by the next ADD) it is refused.
    _policy(plugin, tmp_path, "no-cluster-dns")
    plugin.add("pod2", app())
    for tcp in (False, True):
        r = lab.dns_query(ns, "smtp.gmail.com", server=SERVICE_IP, tcp=tcp, timeout=1.0)
        assert not r.ok, r
    # Google Public DNS (dnsPolicy: None) works either way.
    assert lab.dns_query(ns, "smtp.gmail.com", server=LAB.dns_v4[0]).ok


def test_agent_keeps_the_nodes_addresses_current(lab, plugin, app, agent, tmp_path):
    """An address added to the node after the table was loaded is in node4 within the
    agent's check period, and gone again once removed."""
    extra = "198.18.0.77"
    def loaded() -> list[str]:
        listing = json.loads(lab.run(lab.node, ["nft", "-j", "list", "set", "inet", "sockgate", "node4"]).stdout)
        return [e for item in listing["nftables"] for e in item.get("set", {}).get("elem", [])]

    plugin.add("first", app())
    assert LAB.node_uplink_v4 in loaded() and extra not in loaded()
    lab.run(lab.node, ["ip", "addr", "add", f"{extra}/32", "dev", LAB.uplink_if])
    try:
        deadline = time.monotonic() + 10
        while extra not in loaded():
            assert time.monotonic() < deadline, loaded()
            time.sleep(0.2)
    finally:
        lab.run(lab.node, ["ip", "addr", "del", f"{extra}/32", "dev", LAB.uplink_if], check=False)
    deadline = time.monotonic() + 10
    while extra in loaded():
        assert time.monotonic() < deadline, loaded()
        time.sleep(0.2)
