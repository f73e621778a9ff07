"""Pods the way a cluster runs them: a private containerd with its CRI plugin, driven over
CRI v1 gRPC as kubelet drives it (tests/support/cri.py), with sockgate laid out by the
DaemonSet's install script and its agent run with the DaemonSet's arguments.

Every test starts its own containerd; at teardown (pass or fail) every pod is stopped
and removed through CRI, then containerd, its shims, cgroups and files go."""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest

from runtime.lab import LAB
from tests.support import images, k8s
from tests.support.cri import CriApi, CriContainerd, Exec, InstalledNode, Pod, compile_cri_api
from tests.support.plugin import nft_set, node_links, state_leftovers, wait_until_ready
from tests.support.podman import CONTRACT_SCRIPT, assert_contract, sections

pytestmark = [pytest.mark.lab, pytest.mark.clients, pytest.mark.shims("compiled", "python")]
NFT_SETS = ("ifaces", "tx4", "tx6", "rx")
# Policy and billing the agent applies to pods already running: the CNI executable
# that attached them plays no part, so these run with the default one only.
agent_side = pytest.mark.shims("compiled")


@pytest.fixture(scope="session")
def cri_api(tmp_path_factory) -> CriApi:
    return compile_cri_api(tmp_path_factory.mktemp("cri-api"))


class CriNode:
    """One node: the DaemonSet's install, containerd with CRI, and (optionally) the agent."""

    def __init__(self, lab, api: CriApi, tmp: Path, *, agent: bool = True, netns_under_state_dir: bool = False,
                 bundle_dependencies: bool = False, agent_mount_ns: str = "runtime-slave",
                 policy: dict | None = None, shim: str = "auto") -> None:
        self.lab, self.tmp = lab, tmp
        # "runtime-slave": a slave of containerd's mount namespace (as the DaemonSet's
        # HostToContainer volumes); "host": the test process's own (as conftest's agents).
        self.agent_mount_ns = agent_mount_ns
        self.node_netns = lab.ns_path(lab.node)
        # policy: keys set on the lab's policy in the ConfigMap, before the install.
        self.node = InstalledNode(tmp / "node", bundle_dependencies=bundle_dependencies, policy=policy)
        self.install_log = self.node.install()
        self.node.use_shim(shim)  # the test's CNI executable (tests/conftest.py: shims)
        # Unix socket paths are short: containerd's own dir outside pytest's long tmp path.
        self.ctd_dir = Path(tempfile.mkdtemp(prefix="sgcri-"))
        self.ctd = CriContainerd(self.node_netns, self.ctd_dir / "c", api, cni_bin_dir=self.node.bin_dir,
                                 cni_conf_dir=self.node.conf_dir, netns_under_state_dir=netns_under_state_dir)
        self.links_before = node_links(self.node_netns)
        self.nft_before = {s: nft_set(self.node_netns, s) for s in NFT_SETS}
        self.agent_proc = None
        self.agent_log = tmp / "agent.log"
        self.want_agent = agent

    def start(self) -> "CriNode":
        self.ctd.start()
        self.ctd.import_images(self.tmp / "images")
        if self.want_agent:
            ready = self.tmp / "agent.ready"
            args = self.node.agent_args(ready)
            argv = (self.ctd.agent_argv(args) if self.agent_mount_ns == "runtime-slave"
                    else [sys.executable, "-m", "runtime.cli.main", *args])
            self.agent_proc = self.lab.popen(self.lab.node, argv, log=self.agent_log)
            wait_until_ready(self.agent_proc, ready, self.agent_log, 30)
        return self

    def stop(self) -> None:
        try:
            self.ctd.stop()
        finally:
            if self.agent_proc is not None and self.agent_proc.poll() is None:
                self.agent_proc.terminate()
                self.agent_proc.wait(30)
            shutil.rmtree(self.ctd_dir, ignore_errors=True)

    @property
    def cri(self):
        return self.ctd.cri

    def policies_applied(self) -> int:
        return self.agent_log.read_text().count("policy applied from ")

    def change_policy(self, timeout: float = 15.0, **extra) -> None:
        """An operator's edit of the ConfigMap's policy (the lab's, with ``extra``'s
        keys), carried to the node by the policy-sync sidecar's script and in force once
        the agent has re-applied it (it watches the file)."""
        before = self.policies_applied()
        self.node.set_configmap_policy(**extra)
        self.node.sync_policy()
        deadline = time.monotonic() + timeout
        while self.policies_applied() == before:
            assert time.monotonic() < deadline, self.agent_log.read_text()
            time.sleep(0.1)

    def leftovers(self) -> dict:
        """Everything an attachment leaves: host veths, leases, records, set elements."""
        state = state_leftovers(self.node.state, InstalledNode.NETWORK)
        return {"links": sorted(node_links(self.node_netns) - self.links_before), **state,
                "elements": {s: [e for e in nft_set(self.node_netns, s) if e not in self.nft_before[s]]
                             for s in NFT_SETS}}

    @staticmethod
    def clean() -> dict:
        return {"links": [], "leases": [], "records": [], "elements": {s: [] for s in NFT_SETS}}

    def assert_clean(self, timeout: float = 10.0) -> None:
        """Nothing left of removed pods. Leases, records and set elements go before
        the DEL returns; a DEL only takes the veth down and the agent's reaper deletes
        it moments later, so the links are given ``timeout`` seconds."""
        left = self.leftovers()
        assert {**left, "links": []} == self.clean(), left
        deadline = time.monotonic() + timeout
        while left["links"] and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.leftovers()
        assert left == self.clean(), left

    def pod_with_busybox(self, name: str, **kw) -> tuple[Pod, str]:
        pod = self.cri.run_pod(self.cri.pod_config(name, **kw))
        cid = self.cri.start_container(pod, "main", images.BUSYBOX_REF, ["sleep", "3600"])
        return pod, cid


@pytest.fixture
def cri_node(lab, cri_api, tmp_path, shim) -> Iterator[Callable[..., CriNode]]:
    made: list[CriNode] = []

    def make(**kw) -> CriNode:
        n = CriNode(lab, cri_api, tmp_path / f"n{len(made)}", shim=shim, **kw)
        made.append(n)
        return n.start()

    yield make
    for n in reversed(made):
        n.stop()


def in_pool(ip: str) -> bool:
    import ipaddress
    return any(ipaddress.ip_address(ip) in ipaddress.ip_network(p) for p in LAB.container_pools)


def test_pod_gets_sockgate_addresses_and_the_contract_holds(cri_node) -> None:
    n = cri_node()
    # The DaemonSet's installer laid out what CRI's CNI config points at.
    assert f"the runtime uses {n.node.conf_dir}/00-sockgate.conflist" in n.install_log, n.install_log
    v = n.cri.version()
    assert v.runtime_name == "containerd" and v.runtime_api_version == "v1", v
    assert n.cri.conditions() == {"RuntimeReady": True, "NetworkReady": True}
    assert n.cri.image_present(images.BUSYBOX_REF)

    pod, cid = n.pod_with_busybox("web", namespace="shop")
    st = n.cri.pod_status(pod.id).status
    assert st.state == 0 and st.metadata.name == "web" and st.metadata.namespace == "shop"
    ips = n.cri.pod_ips(pod.id)
    assert len(ips) == 2 and ":" not in ips[0] and ":" in ips[1], ips
    assert all(in_pool(ip) for ip in ips), ips

    r = n.cri.exec_sync(cid, ["sh", "-c", CONTRACT_SCRIPT], timeout=60)
    assert r.exit_code == 0, r
    assert_contract(r.stdout)
    # The container's eth0 holds what CRI reported.
    addr = sections(r.stdout)["addr"]
    assert all(ip in addr for ip in ips), addr

    n.cri.remove_pod(pod.id)
    n.assert_clean()
    assert n.cri.list_pods() == []


def served(log: Path) -> list[dict]:
    """The agent's one line per CNI request."""
    lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    return [e for e in lines if e.get("logger") == "sockgate.agent" and " rc=" in e.get("msg", "")]


def test_billing_records_carry_the_pod(cri_node) -> None:
    n = cri_node()
    pod, cid = n.pod_with_busybox("billed", namespace="team-a", uid="0b1c2d3e-0000-4000-8000-00000000abcd")
    r = n.cri.exec_sync(cid, ["sh", "-c", f"echo hello | nc -w 3 {LAB.public_v4} 9000"])
    assert r.exit_code == 0 and "hello" in r.stdout, r
    # The agent answered the ADD (not the CNI executable's in-process fallback).
    assert any("ADD" in e["msg"] and " rc=0" in e["msg"] for e in served(n.agent_log)), n.agent_log.read_text()
    n.cri.remove_pod(pod.id)   # DEL writes the attachment's final record
    recs = [r for r in n.node.billing_records() if r.get("pod_name") == "billed"]
    assert recs, n.node.billing_records()
    for rec in recs:
        assert (rec["pod_namespace"], rec["pod_name"], rec["pod_uid"]) == \
            ("team-a", "billed", "0b1c2d3e-0000-4000-8000-00000000abcd"), rec
        assert rec["container_id"] == pod.id, rec
    assert sum(r["tx_bytes"] for r in recs) > 0 and sum(r["rx_bytes"] for r in recs) > 0, recs
    n.assert_clean()


@agent_side
def test_dns_policy_none_with_google_dns(cri_node) -> None:
    """kubelet's dnsPolicy: None with dnsConfig.nameservers [8.8.8.8]: CRI writes the
    pod's resolv.conf; the lab's Google Public DNS answers there."""
    n = cri_node()
    pod, cid = n.pod_with_busybox("dns", dns_servers=[LAB.dns_v4[0]], dns_searches=["example.com"],
                                  dns_options=["ndots:1"])
    resolv = n.cri.exec_sync(cid, ["cat", "/etc/resolv.conf"])
    assert f"nameserver {LAB.dns_v4[0]}" in resolv.stdout and "search example.com" in resolv.stdout, resolv
    r = n.cri.exec_sync(cid, ["nslookup", "smtp.gmail.com"])
    assert r.exit_code == 0 and "Address: " + LAB.gmail["smtp.gmail.com"][0] in r.stdout, r
    # Control: a server the pod has no business asking (the node's gateway) is refused.
    r = n.cri.exec_sync(cid, ["sh", "-c", f"echo x | nc -w 3 {LAB.internet_v4} 53 2>&1; echo rc=$?"])
    assert "Connection refused" in r.stdout and r.stdout.rstrip().endswith("rc=1"), r
    n.cri.remove_pod(pod.id)
    n.assert_clean()


def test_netns_under_containerds_state_dir(cri_node) -> None:
    """netns_mounts_under_state_dir = true: CNI_NETNS is <state>/netns/cni-…, a path the
    DaemonSet doesn't mount today; the agent, in a slave of the runtime's mount
    namespace, opens it."""
    n = cri_node(netns_under_state_dir=True)
    pod, cid = n.pod_with_busybox("statens")
    info = json.loads(n.cri.pod_status(pod.id, verbose=True).info["info"])
    netns = next(ns["path"] for ns in info["runtimeSpec"]["linux"]["namespaces"] if ns["type"] == "network")
    assert netns.startswith(str(n.ctd.workdir / "state") + "/"), netns
    adds = [e for e in served(n.agent_log) if "ADD" in e["msg"]]
    assert adds and all(" rc=0" in e["msg"] for e in adds), adds
    ips = n.cri.pod_ips(pod.id)
    assert len(ips) == 2 and all(in_pool(ip) for ip in ips), ips
    r = n.cri.exec_sync(cid, ["sh", "-c", f"echo hi | nc -w 3 {LAB.public_v4} 9000"])
    assert r.exit_code == 0 and "hi" in r.stdout, r
    n.cri.remove_pod(pod.id)
    n.assert_clean()


def test_twenty_pods_in_parallel(cri_node) -> None:
    n = cri_node()
    cri = n.cri
    pods = [cri.pod_config(f"p{i}", namespace="par") for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(cri.run_pod, pods))
    ips = [cri.pod_ips(p.id) for p in pods]
    v4 = [x[0] for x in ips]
    v6 = [x[1] for x in ips]
    assert len(set(v4)) == 20 and len(set(v6)) == 20, ips
    assert all(in_pool(ip) for ip in v4 + v6)
    assert len(n.leftovers()["links"]) == 20
    assert len(n.leftovers()["records"]) == 20
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(cri.remove_pod, [p.id for p in pods]))
    assert cri.list_pods() == []
    n.assert_clean()


PROBE_PORT = 8080     # the port the policy lets the node open
OTHER_PORT = 8081     # one it doesn't, listening too
HTTP_PORT = 8090      # an httpGet probe's port, also listed
NODE_PROBES = {"ingress": [{"source": "node", "protocols": ["tcp"], "ports": [PROBE_PORT, HTTP_PORT]}]}
# The probed container: busybox's nc listening on PROBE_PORT and OTHER_PORT (-ll: for
# ever, one `cat` per connection) and its httpd answering GET /healthz on HTTP_PORT.
PROBED = ["sh", "-c", f"mkdir -p /www && echo ok > /www/healthz && httpd -p {HTTP_PORT} -h /www && "
          f"{{ nc -ll -p {OTHER_PORT} -e cat & }} && exec nc -ll -p {PROBE_PORT} -e cat"]


def wait_listening(n: CriNode, cid: str, ports: tuple[int, ...], timeout: float = 10.0) -> None:
    """Until the container listens on every port (so a refusal later is the policy's)."""
    deadline = time.monotonic() + timeout
    while True:
        out = n.cri.exec_sync(cid, ["netstat", "-ltn"]).stdout
        if all(f":{p} " in out for p in ports):
            return
        assert time.monotonic() < deadline, out
        time.sleep(0.1)


def probes_at_once(lab, probes: list[tuple[Callable[..., str], str, int]], timeout: float = 1.0) -> list[str]:
    """Each (probe, ip, port) from the node netns, all at once; their results in order."""
    with ThreadPoolExecutor(len(probes)) as pool:
        return list(pool.map(lambda p: p[0](lab, lab.node, p[1], p[2], timeout), probes))


@agent_side
def test_kubelet_probes_from_the_node(lab, cri_node) -> None:
    """kubelet's tcpSocket and httpGet probes, from the node netns to the pod's IPs:
    with a `"source": "node"` ingress rule they pass on its ports and are refused on
    another; once the operator's policy has no such rule (the lab's, synced to the node
    and re-applied by the agent), both are refused."""
    n = cri_node(policy=NODE_PROBES)
    pod = n.cri.run_pod(n.cri.pod_config("probed", namespace="web"))
    cid = n.cri.start_container(pod, "main", images.BUSYBOX_REF, PROBED)
    wait_listening(n, cid, (PROBE_PORT, OTHER_PORT, HTTP_PORT))
    ips = n.cri.pod_ips(pod.id)
    assert len(ips) == 2, ips
    for ip in ips:
        assert k8s.tcp_probe(lab, lab.node, ip, PROBE_PORT) == "open", ip
        assert k8s.http_get(lab, lab.node, ip, HTTP_PORT) == "200", ip
    # A stopped probe lasts its whole timeout (a drop): they run side by side.
    got = probes_at_once(lab, [(k8s.tcp_probe, ip, OTHER_PORT) for ip in ips])
    assert all(g in k8s.STOPPED for g in got), f"the node opened unlisted port {OTHER_PORT}: {got}"

    n.change_policy()   # the lab's policy: no node rule
    got = probes_at_once(lab, [(probe, ip, port) for ip in ips
                               for probe, port in ((k8s.tcp_probe, PROBE_PORT), (k8s.http_get, HTTP_PORT))])
    assert all(g in k8s.STOPPED for g in got), got
    # The container still serves: the refusals are the policy's.
    wait_listening(n, cid, (PROBE_PORT, HTTP_PORT), timeout=0)
    n.cri.remove_pod(pod.id)
    n.assert_clean()


# kubelet's resolv.conf for dnsPolicy: ClusterFirst (the cluster DNS service, the pod's
# namespace's search domains, ndots:5).
CLUSTER_FIRST = {"dns_servers": [k8s.SERVICE_IP], "dns_options": ["ndots:5"],
                 "dns_searches": ["shop.svc.cluster.local", "svc.cluster.local", "cluster.local"]}


def nslookup(n: CriNode, cid: str, *args: str) -> Exec:
    # busybox's nslookup retries for ~10 s on no answer: capped.
    return n.cri.exec_sync(cid, ["timeout", "3", "nslookup", *args])


@agent_side
def test_cluster_first_dns_through_kube_proxys_dnat(lab, cri_node, tmp_path) -> None:
    """A ClusterFirst pod asks the cluster DNS service's IP; kube-proxy (here our own nft
    table in the node netns) DNATs it to an endpoint the policy otherwise refuses. With
    `clusterDns` listing the service, the pod's nslookup answers; once the operator's
    policy drops the opt-in (synced to the node, re-applied by the agent), it fails."""
    with k8s.cluster_dns_server(lab, tmp_path / "coredns.log"):
        k8s.kubeproxy_dnat(lab, (53,))
        n = cri_node(policy={"clusterDns": {"services": [k8s.SERVICE_IP]}})
        pod, cid = n.pod_with_busybox("resolver", namespace="shop", **CLUSTER_FIRST)
        resolv = n.cri.exec_sync(cid, ["cat", "/etc/resolv.conf"]).stdout
        assert f"nameserver {k8s.SERVICE_IP}" in resolv and "options ndots:5" in resolv, resolv
        want = "Address: " + LAB.gmail["smtp.gmail.com"][0]
        r = nslookup(n, cid, "smtp.gmail.com")
        assert r.exit_code == 0 and want in r.stdout, r
        # The endpoint itself is one more private address.
        r = nslookup(n, cid, "smtp.gmail.com", k8s.COREDNS_IP)
        assert r.exit_code != 0 and want not in r.stdout, r

        n.change_policy()   # the lab's policy: no clusterDns
        r = nslookup(n, cid, "smtp.gmail.com")
        assert r.exit_code != 0 and want not in r.stdout, r
        n.cri.remove_pod(pod.id)
        n.assert_clean()


def p50_run_pod(n: CriNode, count: int) -> float:
    secs = []
    for i in range(count):
        pod = n.cri.run_pod(n.cri.pod_config(f"lat{i}"))
        secs.append(pod.seconds)
        n.cri.remove_pod(pod.id)
    return statistics.median(secs)


def test_run_pod_sandbox_latency(cri_node, capsys) -> None:
    """Not a benchmark: RunPodSandbox's median over 6 sequential pods, with the agent
    and with the CNI executable handling ADD in-process (the image bundle with its
    dependencies, as when no agent runs). Printed for the record; only sanity-checked."""
    with_agent = cri_node(bundle_dependencies=True)
    p_agent = p50_run_pod(with_agent, 6)
    with_agent.assert_clean()
    with_agent.stop()
    without = cri_node(agent=False, bundle_dependencies=True)
    p_alone = p50_run_pod(without, 6)
    without.assert_clean()
    with capsys.disabled():
        print(f"\nRunPodSandbox p50 over 6 pods: with agent {p_agent * 1000:.0f} ms, "
              f"without agent (in-process CNI) {p_alone * 1000:.0f} ms")
    assert 0 < p_agent < 30 and 0 < p_alone < 30
