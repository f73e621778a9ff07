"""Pods the way a cluster runs them: a private containerd with its CRI plugin, driven over
CRI v1 gRPC as kubelet drives it (tests/support/cri.py), with sockgate laid out by the
DaemonSet's install script and its agent run with the DaemonSet's arguments.

Every test starts its own containerd; at teardown (pass or fail) every pod is stopped
and removed through CRI, then containerd, its shims, cgroups and files go."""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest

from runtime.lab import LAB
from tests.support import images
from tests.support.cri import CriApi, CriContainerd, InstalledNode, Pod, compile_cri_api
from tests.support.plugin import nft_set, node_links, state_leftovers, wait_until_ready
from tests.support.podman import CONTRACT_SCRIPT, assert_contract, sections

pytestmark = [pytest.mark.lab, pytest.mark.clients]
NFT_SETS = ("ifaces", "tx4", "tx6", "rx")


@pytest.fixture(scope="session")
def cri_api(tmp_path_factory) -> CriApi:
    return compile_cri_api(tmp_path_factory.mktemp("cri-api"))


class CriNode:
    """One node: the DaemonSet's install, containerd with CRI, and (optionally) the agent."""

    def __init__(self, lab, api: CriApi, tmp: Path, *, agent: bool = True, netns_under_state_dir: bool = False,
                 bundle_dependencies: bool = False) -> None:
        self.lab, self.tmp = lab, tmp
        self.node_netns = lab.ns_path(lab.node)
        self.node = InstalledNode(tmp / "node", bundle_dependencies=bundle_dependencies)
        self.install_log = self.node.install()
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
            argv = self.ctd.agent_argv(self.node.agent_args(ready))
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

    def leftovers(self) -> dict:
        """Everything an attachment leaves: host veths, leases, records, set elements."""
        state = state_leftovers(self.node.state, InstalledNode.NETWORK)
        return {"links": sorted(node_links(self.node_netns) - self.links_before), **state,
                "elements": {s: [e for e in nft_set(self.node_netns, s) if e not in self.nft_before[s]]
                             for s in NFT_SETS}}

    @staticmethod
    def clean() -> dict:
        return {"links": [], "leases": [], "records": [], "elements": {s: [] for s in NFT_SETS}}

    def pod_with_busybox(self, name: str, **kw) -> tuple[Pod, str]:
        pod = self.cri.run_pod(self.cri.pod_config(name, **kw))
        cid = self.cri.start_container(pod, "main", images.BUSYBOX_REF, ["sleep", "3600"])
        return pod, cid


@pytest.fixture
def cri_node(lab, cri_api, tmp_path) -> Iterator[Callable[..., CriNode]]:
    made: list[CriNode] = []

    def make(**kw) -> CriNode:
        n = CriNode(lab, cri_api, tmp_path / f"n{len(made)}", **kw)
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
    assert "sockgate/00-sockgate.conflist" in n.install_log or "00-sockgate.conflist" in n.install_log
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
    assert n.leftovers() == n.clean()
    assert n.cri.list_pods() == []
