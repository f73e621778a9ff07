"""Refused-flow events on the lab, with a real kernel and a real agent: each reported
refusal reason, from a real connect (or, for what no socket sends, a crafted packet),
becomes exactly one event line naming the pod, the destination, the port and the rule
that refused it; a flood from one container yields at most its configured event rate
while another container's traffic and the agent (CNI, metrics) go on; the command
filters; rotation keeps every line; the metric counts what the file holds.

One agent serves the whole module (NFLOG binds one listener per group and netns); each
test attaches its own containers, so each starts with a full event bucket."""
from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.agent.events import read_events
from runtime.lab import LAB
from runtime.lab.policy import write_lab_policy
from tests.conftest import AgentProcess, network_conf
from tests.support import attacks as atk
from tests.support.plugin import Plugin

pytestmark = pytest.mark.lab
FAMILIES = ["v4", "v6"]
# The configured per-container event rate (limits.eventsPerSecond, eventsBurst).
RATE, BURST = 3, 6
METRICS = "127.0.0.1:9469"
MAX_BYTES = 4096  # small, so that the module's events rotate
NETWORK = "tevents"
# A second network whose pools are public addresses: its pool is refused as a
# container pool (addresses in 10.77/16 and fd77::/64 are refused as private ranges
# first).
POOL_NETWORK, POOL_V4, POOL_V6 = "teventsp", "44.77.0.0/24", "2a0f:77:77::/64"
UNUSED = {"v4": "44.77.0.200", "v6": "2a0f:77:77::c8"}
APP_PORT = 8080
NODE_PORT = 45678  # the node's own UDP flow, for icmp-error


def public(family: str) -> str:
    return LAB.public_v6 if family == "v6" else LAB.public_v4


def google(family: str) -> str:
    return LAB.google_v6 if family == "v6" else LAB.google_v4


def node(family: str) -> str:
    return LAB.node_uplink_v6 if family == "v6" else LAB.node_uplink_v4


@dataclass(frozen=True)
class Tenant:
    cid: str
    ns: str
    v4: str
    v6: str
    host_if: str
    pod: str

    def ip(self, family: str) -> str:
        return self.v6 if family == "v6" else self.v4


@dataclass
class EventsLab:
    lab: object
    plugin: Plugin
    pool_plugin: Plugin
    agent: AgentProcess
    policy: Path
    base: dict
    state_dir: Path

    def events(self, cid: str) -> list[dict]:
        return [e for e in read_events(self.state_dir, container=cid) if e["container_id"] == cid]

    def wait(self, cid: str, n: int = 1, timeout: float = 5.0, settle: float = 0.6) -> list[dict]:
        """The container's events once there are n of them, after `settle` seconds
        more in which any further one would have come (the kernel sends a batch within
        0.1 s)."""
        deadline = time.monotonic() + timeout
        while len(self.events(cid)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(settle)
        return self.events(cid)

    @contextlib.contextmanager
    def limits(self, **limits: int) -> Iterator[None]:
        """The policy's limits changed for the block, and back after; each time until
        the agent loaded the table with them."""
        def apply(doc: dict, expect: str) -> None:
            self.policy.write_text(json.dumps(doc))
            deadline = time.monotonic() + 15
            while expect not in self.lab.run(self.lab.node, ["nft", "list", "chain", "inet", "sockgate",
                                                             "from_container"]).stdout:
                assert time.monotonic() < deadline, f"the agent did not apply {limits}"
                time.sleep(0.1)

        def shown(lim: dict) -> str:
            return (f"ct count over {lim.get('maxFlows', 1024)}" if "maxFlows" in limits else
                    f"limit rate over {lim.get('newFlowsPerSecond', 100)}/second "
                    f"burst {lim.get('newFlowsBurst', 200)} packets")
        apply(dict(self.base, limits=dict(self.base["limits"], **limits)), shown(limits))
        try:
            yield
        finally:
            apply(self.base, shown({}))


@pytest.fixture(scope="module")
def ev(lab, cni_exe, tmp_path_factory) -> Iterator[EventsLab]:
    tmp = tmp_path_factory.mktemp("events")
    policy = write_lab_policy(tmp / "policy.json", limits={"eventsPerSecond": RATE, "eventsBurst": BURST})
    plugin = Plugin(cni_exe, lab.ns_path(lab.node), network_conf(NETWORK, tmp, str(policy)))
    pool_plugin = Plugin(cni_exe, lab.ns_path(lab.node), network_conf(POOL_NETWORK, tmp, str(policy),
                                                                       ipv4Pool=POOL_V4, ipv6Pool=POOL_V6))
    agent = AgentProcess(lab, plugin, tmp, ("--metrics-address", METRICS, "--events-max-bytes", str(MAX_BYTES),
                                            "--events-keep", "1000", "--table-check-interval", "0.5"))
    try:
        agent.start()
        deadline = time.monotonic() + 10
        while "listening to NFLOG group" not in agent.log.read_text():
            assert time.monotonic() < deadline, agent.log.read_text()[-2000:]
            time.sleep(0.05)
        yield EventsLab(lab, plugin, pool_plugin, agent, policy, json.loads(policy.read_text()), tmp / "state")
    finally:
        agent.stop()
        for p in (plugin, pool_plugin):
            gc = p("GC", conf=dict(p.conf, **{"cni.dev/valid-attachments": []}))
            assert gc.rc == 0, gc.stdout
        for pool, set_name in ((POOL_V4, "pools4"), (POOL_V6, "pools6")):
            lab.run(lab.node, ["nft", "delete", "element", "inet", "sockgate", set_name, f"{{ {pool} }}"],
                    check=False)
    failed = [line for line in agent.log.read_text().splitlines() if '"runtime.agent.events"' in line
              and ('"level": "error"' in line or '"level": "critical"' in line)]
    assert failed == []


@pytest.fixture
def tenant(ev, lab, app, request) -> Iterator[Callable[..., Tenant]]:
    """Attach a container as pod ns/<name> (DEL at teardown, its flows forgotten)."""
    made: list[tuple[Plugin, Tenant]] = []
    stem = request.node.name.split("[")[0].removeprefix("test_")[:20].replace("_", "-")
    family = request.node.callspec.id if hasattr(request.node, "callspec") else ""

    def attach(name: str, plugin: Plugin | None = None) -> Tenant:
        plugin = plugin or ev.plugin
        pod = "-".join(filter(None, (name, family)))
        cid = f"{stem}-{pod}"
        ns = app()
        res = plugin.add(cid, ns, cni_args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=evt;K8S_POD_NAME={pod}")
        t = Tenant(cid, ns, res["ips"][0]["address"].split("/")[0], res["ips"][1]["address"].split("/")[0],
                   res["interfaces"][0]["name"], f"evt/{pod}")
        made.append((plugin, t))
        return t
    yield attach
    for plugin, t in made:
        plugin.delete(t.cid, t.ns)
    atk.forget_flows(lab, *(a for _, t in made for a in (t.v4, t.v6)))


def expect_one(ev: EventsLab, who: Tenant, **fields) -> dict:
    events = ev.wait(who.cid)
    assert len(events) == 1, json.dumps(events, indent=1)
    e = events[0]
    assert e["pod"] == who.pod and e["network"] in (NETWORK, POOL_NETWORK) and e["ifname"] == who.host_if, e
    for key, value in fields.items():
        if key == "element_has":
            assert e["element"] and value in e["element"], e
        else:
            assert e[key] == value, (key, e)
    return e


# --- one event per refusal, per reason ---------------------------------------------

def _refused_connect(lab, ns: str, dst: str, port: int) -> None:
    r = lab.probe(ns, "tcp", dst, port, timeout=2.0)
    assert r.error == "ECONNREFUSED" and r.elapsed < 1.0, r


@pytest.mark.parametrize("family", FAMILIES)
def test_blocked_range(ev, lab, tenant, family):
    a = tenant("app")
    _refused_connect(lab, a.ns, google(family), 443)
    expect_one(ev, a, reason="blocked-range", family=f"ip{family}", protocol="tcp", source=a.ip(family),
               destination=google(family), port=443, rule="blocked-range: blocked destination range (C7)",
               element_has="Google range (goog.json minus cloud.json)")


@pytest.mark.parametrize("family", FAMILIES)
def test_blocked_port(ev, lab, tenant, family):
    a = tenant("app")
    _refused_connect(lab, a.ns, public(family), 25)
    expect_one(ev, a, reason="blocked-port", protocol="tcp", destination=public(family), port=25,
               rule="blocked-port: blocked port (C4, C6)", element="tcp 25: SMTP port 25 (C6)")


@pytest.mark.parametrize("family", FAMILIES)
def test_container_pool(ev, lab, tenant, family):
    a = tenant("app")
    tenant("pool", ev.pool_plugin)  # its ADD puts its network's pools in the table
    _refused_connect(lab, a.ns, UNUSED[family], APP_PORT)
    expect_one(ev, a, reason="container-pool", destination=UNUSED[family], port=APP_PORT,
               rule="container-pool: container address pool", element=POOL_V6 if family == "v6" else POOL_V4)


@pytest.mark.parametrize("family", FAMILIES)
def test_protocol(ev, lab, tenant, family):
    """An ICMP echo request (what ping sends; no socket of the contract does)."""
    a = tenant("app")
    src, dst = a.ip(family), public(family)
    if family == "v6":
        pkt = atk.ipv6(src, dst, 58, atk.icmp6(src, dst, 128, 0, b"\0\1\0\1", b"ping"))
    else:
        pkt = atk.ipv4(src, dst, 1, atk.icmp4(8, 0, b"\0\1\0\1", b"ping"))
    assert atk.send(lab, a.ns, [pkt])["sent"] == 1
    proto = "ipv6-icmp" if family == "v6" else "icmp"
    expect_one(ev, a, reason="protocol", protocol=proto, destination=dst, port=None, source_port=None,
               rule="tcp-udp-only: only TCP and UDP leave a container (C3)", element=f"protocol {proto}")


@pytest.mark.parametrize("family", FAMILIES)
def test_container_to_container(ev, lab, tenant, family):
    a, b = tenant("app"), tenant("other")
    _refused_connect(lab, a.ns, b.ip(family), APP_PORT)
    expect_one(ev, a, reason="container-to-container", destination=b.ip(family), port=APP_PORT,
               rule="container-to-container: containers can't reach each other (C1)",
               element=f"{b.ip(family)} is another container")
    assert ev.events(b.cid) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_container_to_node(ev, lab, tenant, family):
    a = tenant("app")
    _refused_connect(lab, a.ns, node(family), APP_PORT)
    expect_one(ev, a, reason="container-to-node", destination=node(family), port=APP_PORT,
               rule="node-address: the node is not a service for containers",
               element=f"{node(family)} is one of the node's own addresses")


@pytest.mark.parametrize("family", FAMILIES)
def test_inbound(ev, lab, tenant, family):
    """From the internet into the container: named after the container it was going to.
    (The probe gives up before TCP would send its SYN again.)"""
    a = tenant("app")
    r = lab.probe(lab.internet, "tcp", a.ip(family), APP_PORT, timeout=0.6)
    assert r.error == "timeout", r
    expect_one(ev, a, reason="inbound", destination=a.ip(family), port=APP_PORT, protocol="tcp",
               rule="inbound: nothing from outside opens a connection into a container (C2)", element=None)


@pytest.mark.parametrize("family", FAMILIES)
def test_node_to_container(ev, lab, tenant, family):
    a = tenant("app")
    r = lab.probe(lab.node, "tcp", a.ip(family), APP_PORT, timeout=0.6)
    assert r.error == "timeout", r
    expect_one(ev, a, reason="node-to-container", destination=a.ip(family), port=APP_PORT,
               rule="node-to-container: the node opens no connection into a container unless an ingress "
                    "rule allows it (C2)")


def test_the_nodes_own_multicast_is_counted_apart_and_not_reported(ev, lab, tenant):
    """A new veth's first seconds: the node sends its MLD reports into it. They are no
    connection the node opened, so `node-to-container` neither counts nor reports them;
    `node-multicast` counts them. What the node does open, other than TCP or UDP (an
    echo request), is still a `node-to-container` event."""
    tenant("first")  # (the table is there)
    before = atk.drop_counters(lab)
    a = tenant("app")
    time.sleep(3)  # the kernel repeats a new link's reports within its first seconds
    drops = atk.delta(before, atk.drop_counters(lab), noise=())
    assert drops.get("node-multicast", 0) > 0 and "node-to-container" not in drops, drops
    assert ev.events(a.cid) == []
    echo = atk.icmp6(LAB.node_uplink_v6, a.v6, 128, 0, bytes(4), b"sockgate-lab-echo")
    # (a packet the output hook drops fails the node's own send with EPERM)
    assert atk.send(lab, lab.node, [atk.ipv6(LAB.node_uplink_v6, a.v6, 58, echo)])["errors"] == {"1": 1}
    expect_one(ev, a, reason="node-to-container", protocol="ipv6-icmp", destination=a.v6, port=None)
    assert atk.delta(before, atk.drop_counters(lab))["node-to-container"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_spoofed_source(ev, lab, tenant, family):
    a = tenant("app")
    forged = {"v4": "10.77.123.45", "v6": "fd77:5067:6174::dead"}[family]
    assert lab.spoof_udp(a.ns, forged, public(family), 9000).ok
    expect_one(ev, a, reason="spoofed-source", source=forged, destination=public(family), port=9000,
               protocol="udp", rule="spoofed-source: a container sends only from its own addresses",
               element=f"{forged} is not this container's address")


def test_spoofed_node(ev, lab, tenant):
    """IPv6 only: Linux drops an IPv4 packet claiming a local source as a martian before
    the forward hook (tests/test_k8s_policy.py)."""
    a = tenant("app")
    assert lab.spoof_udp(lab.internet, LAB.node_uplink_v6, a.v6, APP_PORT).ok
    expect_one(ev, a, reason="spoofed-node", source=LAB.node_uplink_v6, destination=a.v6, port=APP_PORT,
               element=f"{LAB.node_uplink_v6} is one of the node's own addresses")


@pytest.mark.parametrize("family", FAMILIES)
def test_tcp_without_flow(ev, lab, tenant, family):
    """A lone ACK, as a socket sends after its flow was reclaimed."""
    a = tenant("app")
    src, dst = a.ip(family), public(family)
    ack = atk.ip_packet(src, dst, atk.IPPROTO_TCP, atk.tcp_syn(src, dst, 40001, 9000, flags=0x10))
    assert atk.send(lab, a.ns, [ack])["sent"] == 1
    expect_one(ev, a, reason="tcp-without-flow", source_port=40001, destination=dst, port=9000,
               element="tcp flags ack without a SYN")


@pytest.mark.parametrize("family", FAMILIES)
def test_icmp_error(ev, lab, tenant, family):
    """A port unreachable about the node's own flow, forged by a container."""
    a = tenant("app")
    r = lab.probe(lab.node, "udp", public(family), 9000, bind_port=NODE_PORT)
    assert r.ok, r
    quoted = atk.udp_packet(public(family), node(family), 9000, NODE_PORT, b"x")
    quoted = quoted[:48] if family == "v6" else quoted[:28]
    err = atk.icmp_error("port-unreachable", a.ip(family), public(family), quoted)
    assert atk.send(lab, a.ns, [err])["sent"] == 1
    proto, (t, c) = ("ipv6-icmp", (1, 4)) if family == "v6" else ("icmp", (3, 3))
    expect_one(ev, a, reason="icmp-error", protocol=proto, destination=public(family), port=None,
               element=f"{proto} type {t} code {c}, not about a flow of this container")


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_rate(ev, lab, tenant, family):
    a = tenant("app")
    with ev.limits(newFlowsPerSecond=1, newFlowsBurst=1):
        assert lab.probe(a.ns, "tcp", public(family), 9000).ok  # the one new flow of this second
        _refused_connect(lab, a.ns, public(family), 9000)
        expect_one(ev, a, reason="flow-rate", destination=public(family), port=9000,
                   rule="flow-rate: the container's rate of new flows (limits.newFlowsPerSecond, newFlowsBurst)",
                   element="1/second, burst 1")


UDP_FLOWS = """
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks, answered = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"flow", (host, port))
    try:
        s.recvfrom(2048)
        answered += 1
    except OSError:
        pass
    socks.append(s)
print(answered)
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_flow_limit(ev, lab, tenant, family):
    a = tenant("app")
    with ev.limits(maxFlows=16):
        # 16 live flows (answered UDP flows stay for the idle timeout), then one more.
        assert lab.run(a.ns, [sys.executable, "-c", UDP_FLOWS, public(family), "9000", "16"]).stdout.strip() == "16"
        _refused_connect(lab, a.ns, public(family), 9000)
        expect_one(ev, a, reason="flow-limit", destination=public(family), port=9000,
                   rule="flow-limit: the container's live flows (limits.maxFlows)", element="16 live flows")


# --- a flood ---------------------------------------------------------------------------

def scrape(lab) -> str:
    return lab.run(lab.node, [sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                              f"'http://{METRICS}/metrics', timeout=5).read().decode())"], timeout=10).stdout


def refused_counts(text: str, cid: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("sockgate_refused_flows_total{") and f'container_id="{cid}"' in line:
            reason = line.split('reason="')[1].split('"')[0]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_a_flood_is_held_at_the_containers_event_rate_and_nothing_else_slows(ev, lab, tenant, tmp_path, family):
    """6,000 refused connection attempts in 3 s from one container: at most its
    configured events (burst + rate per second), while another container's traffic
    passes, its own refusal is reported at once, a CNI ADD and DEL through the agent
    succeed and the metrics endpoint answers."""
    attacker, other = tenant("attacker"), tenant("other")
    src, dst = attacker.ip(family), google(family)
    packets = [atk.tcp_syn_packet(src, dst, 10000 + i, 443) for i in range(6000)]
    before = atk.drop_counters(lab)
    started = time.monotonic()
    with open(atk.spec_file(tmp_path / "flood.json", l3=packets, pps=2000)) as stdin:
        flood = lab.popen(attacker.ns, atk.argv("send"), stdin=stdin, log=tmp_path / "flood.log")
    try:
        time.sleep(0.5)
        for proto in ("tcp", "udp"):
            for fam in FAMILIES:
                r = lab.probe(other.ns, proto, public(fam), 9000, timeout=3.0)
                assert r.ok and r.echo_ok, (proto, fam, r)
        _refused_connect(lab, other.ns, google(family), 443)
        t0 = time.monotonic()
        third = tenant("third")
        added = time.monotonic() - t0
        t0 = time.monotonic()
        ev.plugin.delete(third.cid, third.ns)
        deleted = time.monotonic() - t0
        metrics = scrape(lab)
        assert flood.poll() is None, "the flood ended before the checks"
    finally:
        assert flood.wait(30) == 0
    took = time.monotonic() - started
    sent = atk.json_lines(tmp_path / "flood.log")[-1]
    assert sent == {"sent": len(packets), "errors": {}}, sent
    assert added < 5 and deleted < 5, (added, deleted)
    assert "sockgate_agent_up 1.0" in metrics
    mine = ev.wait(attacker.cid, n=BURST, settle=1.0)
    drops = atk.delta(before, atk.drop_counters(lab))
    refused = drops.get("blocked-range", 0) + drops.get("flow-rate", 0)
    assert refused >= len(packets), drops  # every attempt was refused ...
    # ... and reported at most at the container's rate (one more for a token that came
    # due as the flood ended).
    assert BURST <= len(mine) <= BURST + RATE * took + 1, (len(mine), took)
    assert {e["reason"] for e in mine} <= {"blocked-range", "flow-rate"}
    # The other container's refusal got through its own bucket.
    others = ev.events(other.cid)
    assert [(e["reason"], e["destination"]) for e in others] == [("blocked-range", google(family))]
    # The metric counts what the file holds; the agent lost nothing.
    after = scrape(lab)
    assert sum(refused_counts(after, attacker.cid).values()) == len(mine)
    assert "sockgate_events_dropped_total 0.0" in after


# --- the command, rotation, the metric -------------------------------------------------

def sockgate(ev: EventsLab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli.main", "events", "--state-dir", str(ev.state_dir),
                           *args], capture_output=True, text=True, timeout=30)


def test_the_command_filters_by_pod_and_container_and_prints_json(ev, lab, tenant):
    a, b = tenant("one"), tenant("two")
    _refused_connect(lab, a.ns, public("v4"), 25)
    _refused_connect(lab, b.ns, google("v6"), 443)
    ev.wait(a.cid), ev.wait(b.cid)
    got = sockgate(ev, "--pod", a.pod, "--json")
    assert got.returncode == 0, got.stderr
    assert [(e["container_id"], e["port"]) for e in json.loads(got.stdout)] == [(a.cid, 25)]
    got = sockgate(ev, "--container", b.cid, "--json")
    assert [(e["pod"], e["destination"]) for e in json.loads(got.stdout)] == [(b.pod, google("v6"))]
    table = sockgate(ev, "--pod", b.pod).stdout.splitlines()
    assert table[0].startswith("time") and len(table) == 3, table
    assert b.pod in table[2] and google("v6") in table[2] and "blocked-range: " in table[2]
    assert sockgate(ev, "--pod", "nobody").returncode == 2


def test_follow_prints_new_events_as_they_come(ev, lab, tenant):
    a = tenant("app")
    follower = subprocess.Popen([sys.executable, "-m", "runtime.cli.main", "events", "--state-dir",
                                 str(ev.state_dir), "--follow", "--json", "--container", a.cid],
                                stdout=subprocess.PIPE, text=True)
    try:
        got = []
        for port in (21, 25):  # one before it may have started following, one after
            _refused_connect(lab, a.ns, public("v4"), port)
            assert select.select([follower.stdout], [], [], 10)[0], f"nothing printed for port {port}"
            got.append(json.loads(follower.stdout.readline()))
        assert [(e["container_id"], e["port"]) for e in got] == [(a.cid, 21), (a.cid, 25)]
        assert got[0]["element"] == "tcp 21: FTP is not supported (C4)"
    finally:
        follower.kill()
        follower.wait(5)


def test_rotation_keeps_every_line(ev, lab, tenant):
    """Events files rotate at --events-max-bytes (4 KiB here); every line stays
    readable across them, in order."""
    a = tenant("app")
    n = 14
    for i in range(n):
        r = lab.probe(a.ns, "tcp", public("v4"), 25, timeout=2.0, bind_port=30000 + i)
        assert r.error == "ECONNREFUSED", r
        time.sleep(1 / RATE)  # within the container's event rate: every one is reported
    mine = ev.wait(a.cid, n=n)
    assert [e["source_port"] for e in mine] == [30000 + i for i in range(n)]
    directory = ev.state_dir / "events"
    files = [p for p in directory.iterdir() if p.name.startswith("events.jsonl")]
    assert all(p.stat().st_size <= MAX_BYTES for p in files)
    # n lines of ~500 bytes: they span more than one file.
    holding = [p.name for p in files if a.cid in p.read_text()]
    assert len(holding) >= 2, holding


def test_the_metric_counts_per_attachment_and_reason(ev, lab, tenant):
    a = tenant("app")
    _refused_connect(lab, a.ns, public("v4"), 25)
    _refused_connect(lab, a.ns, public("v6"), 25)
    _refused_connect(lab, a.ns, google("v4"), 443)
    events = ev.wait(a.cid, n=3)
    assert len(events) == 3
    text = scrape(lab)
    assert refused_counts(text, a.cid) == {"blocked-port": 2.0, "blocked-range": 1.0}
    line = next(ln for ln in text.splitlines() if ln.startswith("sockgate_refused_flows_total{")
                and f'container_id="{a.cid}"' in ln)
    assert 'pod_namespace="evt"' in line and f'pod_name="{a.pod.split("/")[1]}"' in line
    assert f'network="{NETWORK}"' in line and 'ifname="eth0"' in line

