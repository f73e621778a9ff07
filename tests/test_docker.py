"""The Docker door against a real dockerd (Debian's docker.io 20.10), driven with the
docker SDK: `docker network create -d sockgate`, `docker run --network`, the
outbound contract from inside the container, billing by container name, nothing
left after `docker rm -f`, agent and dockerd restarts, and Docker's own firewall
(FORWARD policy DROP) with the iptables-nft and the iptables-legacy backends.

Each backend gets a lab of its own: dockerd leaves its iptables rules (and the
FORWARD policy DROP) in the node netns, which the session's shared lab must not see.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import docker
import pytest

from runtime.kernel import segment_meter
from runtime.lab import LAB, ProbeResult
from runtime.lab.builder import PROBE_PY
from tests.support.attacks import offloads_on
from tests.support.dockerd import IMAGE, DockerEnv, docker_env
from tests.support.plugin import nft_set

pytestmark = [pytest.mark.lab, pytest.mark.clients]
CORE_NET = "docker"  # the core network of Docker networks with the default pools


# --- fixtures --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def image_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def denv(tmp_path_factory, image_cache) -> Iterator[DockerEnv]:
    with docker_env(tmp_path_factory.mktemp("docker-nft"), image_cache, "nft") as env:
        yield env


@pytest.fixture
def net(denv: DockerEnv, request) -> Iterator[docker.models.networks.Network]:
    """A sockgate network of its own; the test's containers are removed at the end."""
    name = "sg-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8]
    client = denv.client
    network = client.networks.create(name, driver="sockgate", ipam=docker.types.IPAMConfig(driver="null"))
    yield network
    for c in client.containers.list(all=True, filters={"network": network.id}):
        c.remove(force=True)
    network.remove()


def run(env: DockerEnv, network, name: str, **kw) -> docker.models.containers.Container:
    return env.client.containers.run(IMAGE, ["sleep", "3600"], name=name, network=network.name, detach=True,
                                     stop_signal="SIGKILL", **kw)


# --- helpers ---------------------------------------------------------------------------

def sh(container, script: str) -> tuple[int, str]:
    res = container.exec_run(["sh", "-c", script])
    return res.exit_code, res.output.decode(errors="replace")


def tcp(container, host: str, port: int) -> tuple[dict | None, str]:
    """busybox nc from inside: the lab's echo server answers with one JSON line
    naming the source address it saw, then echoes."""
    rc, out = sh(container, f"echo sockgate | nc -w 3 {host} {port}")
    first = out.splitlines()[0] if out.strip() else ""
    if rc == 0 and first.startswith("{"):
        return json.loads(first), out
    return None, out


def pid_of(container) -> int:
    container.reload()
    return container.attrs["State"]["Pid"]


def probe_in(container_or_pid, proto: str, host: str, port: int, timeout: float = 2.0) -> ProbeResult:
    """The lab's probe (host Python, stdlib only) in the container's netns, for what
    busybox can't do (UDP) or while dockerd is down (no `docker exec`)."""
    pid = container_or_pid if isinstance(container_or_pid, int) else pid_of(container_or_pid)
    out = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-I", "-S", str(PROBE_PY),
                          proto, host, str(port), "--timeout", str(timeout)],
                         capture_output=True, text=True, timeout=timeout + 10).stdout
    return ProbeResult.parse(out)


def addresses(container) -> tuple[str, str]:
    _, v4 = sh(container, "ip -4 -o addr show dev eth0")
    _, v6 = sh(container, "ip -6 -o addr show dev eth0 scope global")
    return v4.split()[3].split("/")[0], v6.split()[3].split("/")[0]


def attachment(env: DockerEnv, container) -> dict | None:
    container.reload()
    ep = next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["EndpointID"]
    for path in (env.state / "networks" / CORE_NET / "attachments").glob(f"{ep}--*.json"):
        return json.loads(path.read_text())
    return None


def wait_for(check, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def leftovers(env: DockerEnv) -> dict[str, list[str]]:
    """What a removed container could have left behind on the node and on disk."""
    links = json.loads(subprocess.run(["nsenter", f"--net={env.node}", "ip", "-j", "link", "show"],
                                      capture_output=True, text=True, check=True).stdout)
    core = env.state / "networks" / CORE_NET
    out = {
        "links": sorted(link["ifname"] for link in links if link["ifname"].startswith(("sg", "dk"))),
        "leases": sorted(p.name for p in (core / "leases").glob("*") if not p.name.startswith(".")),
        "records": sorted(p.name for p in (core / "attachments").glob("*.json")),
        "endpoints": sorted(p.name for p in (env.state / "docker" / "endpoints").glob("*.json")),
    }
    for set_name in ("ifaces", "tx4", "tx6", "rx"):
        out[f"nft {set_name}"] = nft_set(env.node, set_name)
    return out


def clean(env: DockerEnv, what: str = "cleanup") -> None:
    wait_for(lambda: not any(leftovers(env).values()), timeout=15, what=what)
    assert not any(leftovers(env).values()), leftovers(env)


def assert_contract(env: DockerEnv, container) -> None:
    """The outbound contract, seen from inside the container."""
    for dst, node_addr in ((LAB.public_v4, LAB.node_uplink_v4), (LAB.public_v6, LAB.node_uplink_v6)):
        seen, out = tcp(container, dst, 9000)
        assert seen is not None, f"outbound TCP to {dst} failed: {out}"
        assert seen["peer"] == node_addr, "egress leaves with the node's address"
    udp = probe_in(container, "udp", LAB.public_v4, 9000)
    assert udp.ok and udp.peer_seen == LAB.node_uplink_v4, udp
    for dst, port in ((LAB.google_v4, 443), (LAB.google_v6, 443), (LAB.public_v4, 25), (LAB.public_v4, 21)):
        seen, out = tcp(container, dst, port)
        assert seen is None and "refused" in out.lower(), f"{dst}:{port} must be refused at once: {out}"
    seen, _ = tcp(container, LAB.cloud_v4, 443)
    assert seen is not None, "Compute Engine addresses are not Google ranges"


# --- tests -----------------------------------------------------------------------------

def test_network_create_run_and_contract(denv, net):
    ct = run(denv, net, f"{net.name}-app")
    v4, v6 = addresses(ct)
    assert v4.startswith("10.77.") and v6.startswith("fd77:5067:6174:")
    # docker inspect shows the addresses the container really has (null IPAM).
    ct.reload()
    settings = ct.attrs["NetworkSettings"]["Networks"][net.name]
    assert (settings["IPAddress"], settings["GlobalIPv6Address"]) == (v4, v6)
    _, routes = sh(ct, "ip route; ip -6 route")
    assert "default via 169.254.1.1 dev eth0" in routes and "default via fe80::1 dev eth0" in routes, routes
    # No second way out: one interface, no docker_gwbridge endpoint.
    _, links = sh(ct, "ls /sys/class/net")
    assert sorted(links.split()) == ["eth0", "lo"]
    # The container's kernel cuts its packets itself (billing counts what leaves), all
    # but TCP's, which the node's segment meter counts, in super-packets of at most the
    # segments the meter lets through.
    net = ["nsenter", f"--net=/proc/{pid_of(ct)}/ns/net"]
    offloads = subprocess.run([*net, "ethtool", "-k", "eth0"], capture_output=True, text=True, check=True).stdout
    on = offloads_on(offloads)
    assert "tx-tcp-segmentation" in on and all("tcp" in f for f in on), offloads
    link = json.loads(subprocess.run([*net, "ip", "-d", "-j", "link", "show", "eth0"], capture_output=True,
                                     text=True, check=True).stdout)[0]
    assert link["gso_max_segs"] == segment_meter.MAX_SEGMENTS
    assert_contract(denv, ct)
    # The agent timed Docker's calls, by call and result.
    calls = {line.split("{", 1)[1].split("}", 1)[0]: float(line.split()[-1]) for line in denv.agent.scrape().splitlines()
             if line.startswith("sockgate_docker_request_duration_seconds_count{")}
    for call in ("CreateNetwork", "CreateEndpoint", "Join"):
        assert calls.get(f'call="{call}",result="ok"', 0) >= 1, calls


def test_no_neighbour_resolution_and_a_mac_asked_for(denv, net):
    """Both veth ends share one MAC and are NOARP (the node ignores what a container
    says about neighbours); `--mac-address` gives both ends that MAC, else Docker would
    set it on the container end alone and the container could reach nothing."""
    mac = "02:42:5a:0c:00:99"
    ct = run(denv, net, f"{net.name}-mac", mac_address=mac)
    _, link = sh(ct, "ip link show eth0")
    assert mac in link and "NOARP" in link, link
    host = attachment(denv, ct)["host_ifname"]
    node_link = subprocess.run(["nsenter", f"--net={denv.node}", "ip", "link", "show", host],
                               capture_output=True, text=True, check=True).stdout
    assert mac in node_link and "NOARP" in node_link, node_link
    assert_contract(denv, ct)


def test_inbound_and_other_containers_refused(denv, net):
    a, b = run(denv, net, f"{net.name}-a"), run(denv, net, f"{net.name}-b")
    a_v4, a_v6 = addresses(a)
    a.exec_run(["nc", "-ll", "-p", "8080", "-e", "/bin/cat"], detach=True)
    wait_for(lambda: tcp(a, "127.0.0.1", 8080)[1].strip() == "sockgate", what="listener in a")
    for target in (a_v4, a_v6):
        assert tcp(b, target, 8080)[0] is None and "sockgate" not in tcp(b, target, 8080)[1]
        for source in (denv.lab.internet, denv.lab.node):
            r = denv.lab.probe(source, "tcp", target, 8080, timeout=1.0)
            assert not r.ok, f"{source} opened a connection into the container: {r}"


def test_docker_firewall_forward_drop_is_coexisted_with(denv, net):
    """dockerd set FORWARD's policy to DROP; sockgate's veths pass through rules the
    agent keeps in DOCKER-USER (v4) and at the top of FORWARD (v6, dockerd 20.10 has
    no ip6tables DOCKER-USER). Without them traffic stops; the agent puts them back."""
    ct = run(denv, net, f"{net.name}-fw")
    v4 = denv.host.run(["iptables-nft", "-S"]).stdout
    v6 = denv.host.run(["ip6tables-nft", "-S"]).stdout
    assert "-P FORWARD DROP" in v4 and "-P FORWARD DROP" in v6
    assert "-A DOCKER-USER -i sg+" in v4 and "-A DOCKER-USER -o sg+" in v4, v4
    assert "-A FORWARD -i sg+" in v6 and "-A FORWARD -o sg+" in v6, v6
    assert tcp(ct, LAB.public_v4, 9000)[0] is not None
    def ours() -> list[str]:
        out = denv.host.run(["iptables-nft", "-S", "DOCKER-USER"]).stdout
        return [line for line in out.splitlines() if "sg+" in line]

    for _ in range(5):  # the agent checks every few seconds: try between two checks
        for rule in ours():
            denv.host.run(["iptables-nft", "-D", *shlex.split(rule)[1:]])
        blocked = tcp(ct, LAB.public_v4, 9000)[0] is None
        if not ours():
            break
    assert blocked, "Docker's DROP policy applies without our rules"
    wait_for(lambda: "-A DOCKER-USER -i sg+" in denv.host.run(["iptables-nft", "-S", "DOCKER-USER"]).stdout,
             timeout=15, what="the agent to restore its DOCKER-USER rules")
    assert tcp(ct, LAB.public_v4, 9000)[0] is not None
    # Our accept is not the last word: the sockgate table still refuses.
    assert tcp(ct, LAB.google_v4, 443)[0] is None


def test_billing_carries_the_container_name(denv, net):
    name = f"{net.name}-billed"
    ct = run(denv, net, name)
    att = wait_for(lambda: (lambda a: a if a and a["labels"].get("container_name") else None)(attachment(denv, ct)),
                   what="the agent to learn the endpoint's container")
    assert att["labels"]["container_name"] == name
    assert att["labels"]["docker_container_id"] == ct.id
    assert att["labels"]["docker_network"] == net.name and att["labels"]["docker_network_id"] == net.id
    payload = "x" * 5000
    rc, out = sh(ct, f"printf '{payload}' | nc -w 3 {LAB.public_v4} 9000 >/dev/null; echo rc=$?")
    assert "rc=0" in out
    ct.remove(force=True)
    ledger = denv.state / "billing"
    records = [json.loads(line) for f in sorted(ledger.glob("billing*.jsonl")) for line in f.read_text().splitlines()
               if line.strip()]
    mine = [r for r in records if r.get("container_id") == att["container_id"]]
    assert mine, f"no billing record for endpoint {att['container_id'][:12]} in {ledger}"
    final = [r for r in mine if r.get("final")]
    assert final and final[-1].get("container_name") == name, final
    assert sum(r.get("tx_bytes", 0) for r in mine) >= len(payload)


def test_rm_f_leaves_nothing_behind(denv, net):
    before = leftovers(denv)
    cts = [run(denv, net, f"{net.name}-{i}") for i in range(2)]
    during = leftovers(denv)
    assert len(during["leases"]) == len(before["leases"]) + 4
    assert len(during["nft tx4"]) == len(before["nft tx4"]) + 2
    for ct in cts:
        ct.remove(force=True)
    wait_for(lambda: leftovers(denv) == before, timeout=10, what="docker rm -f to leave nothing")


def test_containers_start_concurrently(denv, net):
    """CreateEndpoint/Join of different containers arrive at once."""
    errors: list[BaseException] = []
    cts: list = []

    def one(i: int) -> None:
        try:
            cts.append(run(denv, net, f"{net.name}-c{i}"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # dockerd's own words (APIError.explanation), and its log's tail: the repr says only "500".
    assert not errors, ([getattr(e, "explanation", None) or repr(e) for e in errors], denv.host.log_tail(40))
    addrs = [addresses(ct) for ct in cts]
    assert len({a for a, _ in addrs}) == len({b for _, b in addrs}) == 6
    for ct in cts:
        assert tcp(ct, LAB.public_v4, 9000)[0] is not None


def test_agent_restart_keeps_containers_and_networks(denv, net):
    ct = run(denv, net, f"{net.name}-before")
    assert tcp(ct, LAB.public_v4, 9000)[0] is not None
    assert denv.agent.stop() == 0
    try:
        # The data plane is the kernel's: no agent needed for running containers.
        assert tcp(ct, LAB.public_v6, 9000)[0] is not None
    finally:
        denv.agent.start()
    assert tcp(ct, LAB.public_v4, 9000)[0] is not None
    # Docker doesn't replay CreateNetwork: the agent knew the network from its state.
    after = run(denv, net, f"{net.name}-after")
    assert_contract(denv, after)
    ct.remove(force=True)
    after.remove(force=True)
    clean(denv, "cleanup after an agent restart")


def test_dockerd_restart_with_live_restore(denv, net):
    ct = run(denv, net, f"{net.name}-live")
    pid = pid_of(ct)
    denv.host.stop_dockerd()
    try:
        r = probe_in(pid, "tcp", LAB.public_v4, 9000)
        assert r.ok and r.peer_seen == LAB.node_uplink_v4, "the container keeps working while dockerd is down"
    finally:
        denv.host.start_dockerd()
    ct = denv.client.containers.get(ct.id)
    assert ct.status == "running"
    assert tcp(ct, LAB.public_v4, 9000)[0] is not None
    new = run(denv, net, f"{net.name}-new")
    assert tcp(new, LAB.public_v6, 9000)[0] is not None
    ct.remove(force=True)
    new.remove(force=True)
    clean(denv, "cleanup after a dockerd restart")


def test_dockerd_restart_without_live_restore(denv, net):
    """dockerd stops its containers (Leave, DeleteEndpoint: cleaned up), and restarts
    the ones with a restart policy (new endpoints)."""
    ct = run(denv, net, f"{net.name}-always", restart_policy={"Name": "always"})
    first = attachment(denv, ct)
    denv.host.stop_dockerd()
    denv.host.set_live_restore(False)
    try:
        denv.host.start_dockerd()   # now without live-restore
        denv.host.stop_dockerd()    # stops the container: our records must go
        clean(denv, "cleanup when dockerd stopped its containers")
        denv.host.start_dockerd()   # restarts it on a new endpoint
        ct = denv.client.containers.get(ct.id)
        wait_for(lambda: denv.client.containers.get(ct.id).status == "running", what="the restart policy")
        second = wait_for(lambda: attachment(denv, ct), what="the new endpoint")
        assert second["container_id"] != first["container_id"]
        assert tcp(ct, LAB.public_v4, 9000)[0] is not None
    finally:
        denv.host.stop_dockerd()
        denv.host.set_live_restore(True)
        denv.host.start_dockerd()
    denv.client.containers.get(ct.id).remove(force=True)
    clean(denv)


def test_driver_refusals(denv):
    client = denv.client
    with pytest.raises(docker.errors.APIError, match="--ipam-driver null"):
        client.networks.create("sg-default-ipam", driver="sockgate")
    with pytest.raises(docker.errors.APIError, match="unknown sockgate network option 'ipv4pool'"):
        client.networks.create("sg-typo", driver="sockgate", options={"ipv4pool": "10.99.0.0/16"},
                               ipam=docker.types.IPAMConfig(driver="null"))
    network = client.networks.create("sg-refusals", driver="sockgate", ipam=docker.types.IPAMConfig(driver="null"))
    try:
        with pytest.raises(docker.errors.APIError, match="outbound-only"):
            client.containers.run(IMAGE, ["sleep", "60"], name="sg-published", network=network.name, detach=True,
                                  ports={"8080/tcp": 18080})
    finally:
        for c in client.containers.list(all=True, filters={"network": network.id}):
            c.remove(force=True)
        for c in client.containers.list(all=True, filters={"name": "sg-published"}):
            c.remove(force=True)
        network.remove()
    # Overlapping custom pools would hand out the same addresses twice.
    a = client.networks.create("sg-pool-a", driver="sockgate", options={"ipv4Pool": "10.99.0.0/16"},
                               ipam=docker.types.IPAMConfig(driver="null"))
    try:
        with pytest.raises(docker.errors.APIError, match="overlaps"):
            client.networks.create("sg-pool-b", driver="sockgate", options={"ipv4Pool": "10.99.128.0/17"},
                                   ipam=docker.types.IPAMConfig(driver="null"))
    finally:
        a.remove()


def test_plugin_protocol_edges(denv):
    """What dockerd never sends, but a handler must survive: the socket answers the
    plugin handshake with no Content-Type, and malformed requests get an Err."""
    path = str(denv.host.plugin_dir / "sockgate.sock")

    def post(method: str, body: bytes) -> tuple[int, dict]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(f"POST /{method} HTTP/1.1\r\nHost: plugin\r\nContent-Length: {len(body)}\r\n"
                      f"Connection: close\r\n\r\n".encode() + body)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)

    assert post("Plugin.Activate", b"") == (200, {"Implements": ["NetworkDriver"]})
    assert post("NetworkDriver.GetCapabilities", b"") == (200, {"Scope": "local", "ConnectivityScope": "local"})
    status, body = post("NetworkDriver.Join", b"{not json")
    assert status == 400 and "Err" in body
    status, body = post("NetworkDriver.Join", json.dumps({"NetworkID": "x", "EndpointID": "y"}).encode())
    assert status == 200 and "malformed NetworkID" in body["Err"]
    status, body = post("NetworkDriver.Nonsense", b"{}")
    assert status == 404 and "Err" in body
    # Leave/DeleteEndpoint of something unknown: nothing to do, no error.
    unknown = "ab" * 32
    assert post("NetworkDriver.DeleteEndpoint", json.dumps({"NetworkID": unknown, "EndpointID": unknown}).encode()) \
        == (200, {})


def test_legacy_iptables_backend(tmp_path, image_cache):
    """A dockerd whose `iptables` is iptables-legacy: its DROP policy lives in the
    legacy tables, which the nft tools don't see; the agent finds them and puts its
    rules there."""
    with docker_env(tmp_path, image_cache, "legacy") as env:
        client = env.client
        network = client.networks.create("sg-legacy", driver="sockgate", ipam=docker.types.IPAMConfig(driver="null"))
        ct = run(env, network, "sg-legacy-app")
        legacy = env.host.run(["iptables-legacy", "-S"]).stdout
        assert "-P FORWARD DROP" in legacy and "-A DOCKER-USER -i sg+" in legacy, legacy
        legacy6 = env.host.run(["ip6tables-legacy", "-S"]).stdout
        assert "-P FORWARD DROP" in legacy6 and "-A FORWARD -i sg+" in legacy6, legacy6
        # Docker made no nft tables of its own here.
        tables = env.host.run(["nft", "list", "tables"]).stdout
        assert "ip filter" not in tables, tables
        assert_contract(env, ct)
        ct.remove(force=True)
        network.remove()
        clean(env)


# --- unit tests (no root, no dockerd) ---------------------------------------------------

def test_unit_network_options():
    from runtime.docker.options import DriverError, parse_options, sockgate_network_name
    generic = "com.docker.network.generic"
    assert parse_options({generic: {"ipv4Pool": "10.9.0.0/16", "com.docker.network.driver.mtu": "1400",
                                    "com.docker.network.bridge.name": "ignored"}}) == \
        {"ipv4Pool": "10.9.0.0/16", "mtu": "1400"}
    assert parse_options(None) == {}
    with pytest.raises(DriverError, match="unknown sockgate network option 'ipv4pool'"):
        parse_options({generic: {"ipv4pool": "10.9.0.0/16"}})
    with pytest.raises(DriverError, match="--internal"):
        parse_options({"com.docker.network.internal": True, generic: {}})
    assert sockgate_network_name({}) == "docker"
    assert sockgate_network_name({"ipv4Pool": "10.77.0.0/16"}) == "docker"
    custom = sockgate_network_name({"ipv4Pool": "10.9.0.0/16"})
    assert custom.startswith("docker-") and custom == sockgate_network_name({"ipv4Pool": "10.9.0.0/16"})
    assert custom != sockgate_network_name({"ipv4Pool": "10.9.0.0/16", "ipv6Pool": "fd00:9::/64"})


def test_unit_bounded_calls_and_ipam_refusal(tmp_path):
    from runtime.docker.driver import DockerDriver
    from runtime.docker.options import DriverConfig
    d = DockerDriver(DriverConfig(state_dir=str(tmp_path), run_dir=str(tmp_path), policy_file="", op_timeout=0.2))
    nid = "a" * 64
    status, body = d.dispatch("/NetworkDriver.CreateNetwork", {
        "NetworkID": nid, "Options": {}, "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "172.18.0.0/16"}]})
    assert status == 200 and "--ipam-driver null" in body["Err"]
    status, body = d.dispatch("/NetworkDriver.CreateNetwork", {
        "NetworkID": nid, "Options": {"com.docker.network.generic": {}},
        "IPv4Data": [{"AddressSpace": "null", "Pool": "0.0.0.0/0"}], "IPv6Data": []})
    assert (status, body) == (200, {})
    assert d.store.networks.get(nid).sockgate_network == "docker"
    # A handler that hangs: Docker gets an answer anyway.
    release = threading.Event()
    d.routes["/NetworkDriver.Join"] = lambda req, op: release.wait(5) or {}
    d.routes["/NetworkDriver.Leave"] = lambda req, op: release.wait(5) or {}
    t0 = time.monotonic()
    status, body = d.dispatch("/NetworkDriver.Join", {})
    assert "did not finish" in body["Err"] and time.monotonic() - t0 < 2
    assert d.dispatch("/NetworkDriver.Leave", {}) == (200, {})  # teardown: answered, goes on
    release.set()
    d.ops.wait_idle(5)
    assert d.dispatch("/NetworkDriver.Nonsense", {})[0] == 404


def test_unit_firewall_rule_placement():
    from runtime.docker.firewall import ForwardAccept

    class FakeIptables:
        """iptables-nft with Docker's v4 chains; ip6tables-nft with a DROP policy only."""

        def __init__(self):
            self.rules = {"iptables-nft": {"DOCKER-USER": [], "FORWARD": ["-j DOCKER-USER"]},
                          "ip6tables-nft": {"FORWARD": []}}
            self.policy = {"iptables-nft": "DROP", "ip6tables-nft": "DROP"}

        def __call__(self, argv):
            tool = argv[0].rsplit("/", 1)[-1]
            args = argv[3:]  # after "-w 5"
            chains = self.rules.get(tool)
            ok = subprocess.CompletedProcess(argv, 0, "", "")
            fail = subprocess.CompletedProcess(argv, 1, "", "No chain/target/match by that name.")
            if chains is None:
                return fail
            if args[0] == "-S":
                if args[1] not in chains:
                    return fail
                head = f"-P {args[1]} {self.policy[tool]}\n" if args[1] == "FORWARD" else f"-N {args[1]}\n"
                return subprocess.CompletedProcess(argv, 0, head + "".join(f"-A {args[1]} {r}\n" for r in chains[args[1]]), "")
            spec = " ".join(args[2:] if args[0] == "-C" else args[3:])
            if args[0] == "-C":
                return ok if spec in chains[args[1]] else fail
            if args[0] == "-I":
                chains[args[1]].insert(int(args[2]) - 1, spec)
                return ok
            return fail

    fake = FakeIptables()
    fw = ForwardAccept(run=fake)
    fw._legacy_table_exists = staticmethod(lambda family: False)
    placed = fw.ensure()
    assert placed == {"nft/4": "DOCKER-USER", "nft/6": "FORWARD"}
    assert [r.split()[:2] for r in fake.rules["iptables-nft"]["DOCKER-USER"]] == [["-i", "sg+"], ["-o", "sg+"]]
    assert fake.rules["iptables-nft"]["FORWARD"] == ["-j DOCKER-USER"]  # Docker's jump untouched
    assert len(fake.rules["ip6tables-nft"]["FORWARD"]) == 2
    fw.ensure()  # idempotent
    assert len(fake.rules["iptables-nft"]["DOCKER-USER"]) == 2
    # No DROP policy and no DOCKER-USER: nothing to do.
    fake.policy["ip6tables-nft"] = "ACCEPT"
    fake.rules["ip6tables-nft"]["FORWARD"] = []
    assert fw.ensure() == {"nft/4": "DOCKER-USER"}
