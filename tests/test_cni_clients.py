"""Real CNI clients drive the plugin: a libcni-style conflist runner (chained with
Debian's stock plugins) and containerd's `ctr run --cni`, all in the lab's node netns."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.lab import LAB
from runtime.lab.policy import write_lab_policy
from tests.support import cnitool, images
from tests.support.containerd import Containerd, ctr_run_cni
from tests.support.plugin import node_links

pytestmark = [pytest.mark.lab, pytest.mark.clients, pytest.mark.shims("compiled", "python")]
STOCK = Path("/usr/lib/cni")


def sockgate_conf(tmp_path: Path) -> dict:
    return {"type": "sockgate", "stateDir": str(tmp_path / "state"), "runDir": str(tmp_path / "run"),
            "logFile": str(tmp_path / "cni.log"),
            "policyFile": str(write_lab_policy(tmp_path / "policy.json"))}


def leases(tmp_path: Path, net: str) -> list[str]:
    d = tmp_path / "state" / "networks" / net / "leases"
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


def test_conflist_chain_prev_result_passes_through(lab, cni_exe, app, tmp_path):
    """loopback → sockgate → tuning: sockgate keeps loopback's result and tuning gets
    sockgate's; DEL runs in reverse with the cached result."""
    conflist = {"cniVersion": "1.0.0", "name": "chain", "plugins": [
        {"type": "loopback"},
        sockgate_conf(tmp_path),
        {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.rp_filter": "2"}},
    ]}
    node = lab.ns_path(lab.node)
    cni = cnitool.CNI(conflist, [Path(cni_exe).parent, STOCK], tmp_path / "cache", runner_netns=node)
    ns = app()
    result = cni.add("chained", ns, "eth0", args={"IgnoreUnknown": "1"})
    names = [i["name"] for i in result["interfaces"]]
    assert names[0] == "lo" and "eth0" in names
    sg_call = next(c for c in cni.calls if c.plugin == "sockgate" and c.command == "ADD")
    assert sg_call.stdin["prevResult"]["interfaces"][0]["name"] == "lo"
    tuning_call = next(c for c in cni.calls if c.plugin == "tuning" and c.command == "ADD")
    assert tuning_call.stdin["prevResult"] == sg_call.stdout
    assert lab.run(ns, ["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"]).stdout.strip() == "2"
    assert len(leases(tmp_path, "chain")) == 2

    cni.check("chained", ns, "eth0", args={"IgnoreUnknown": "1"})
    cni.delete("chained", ns, "eth0", args={"IgnoreUnknown": "1"})
    assert [c.plugin for c in cni.calls if c.command == "DEL"] == ["tuning", "sockgate", "loopback"]
    assert leases(tmp_path, "chain") == []
    host = result["interfaces"][1]["name"]
    assert host not in node_links(node)


def test_legacy_conflist_with_sockgate_last(lab, cni_exe, app, tmp_path):
    """A 0.4.0 conflist with sockgate last: the result keeps the legacy IP format."""
    conflist = {"cniVersion": "0.4.0", "name": "legacy", "plugins": [
        {"type": "loopback"}, sockgate_conf(tmp_path)]}
    cni = cnitool.CNI(conflist, [Path(cni_exe).parent, STOCK], tmp_path / "cache",
                      runner_netns=lab.ns_path(lab.node))
    ns = app()
    result = cni.add("legacy", ns, "eth0")
    assert result["cniVersion"] == "0.4.0"
    assert all("version" in ip for ip in result["ips"])
    cni.delete("legacy", ns, "eth0")
    assert leases(tmp_path, "legacy") == []


def test_ctr_run_cni(lab, cni_exe, tmp_path):
    """containerd's own client: the container reaches the lab internet through sockgate
    with the node's address as source, and `--rm` (DEL with empty CNI_NETNS) cleans up."""
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    # Debian 12's containerd 1.6 links a libcni that predates CNI 1.1.0.
    (conf_dir / "10-sockgate.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "ctrnet", "plugins": [sockgate_conf(tmp_path)]}))
    archive = images.busybox_oci_archive(tmp_path / "images")
    node = lab.ns_path(lab.node)
    before = node_links(node)
    with Containerd(node, tmp_path / "ctd") as ctd:
        ctd.import_image(archive)
        script = (f"ip -4 addr show eth0; echo hello | nc -w 3 {LAB.public_v4} 9000; "
                  f"echo hello6 | nc -w 3 {LAB.public_v6} 9000")
        r = ctr_run_cni(ctd, images.BUSYBOX_REF, "web", ["sh", "-c", script], conf_dir, Path(cni_exe).parent)
        assert r.rc == 0, r.stderr
        assert "inet 10.77." in r.stdout
        peers = [json.loads(line)["peer"] for line in r.stdout.splitlines() if line.startswith("{")]
        assert peers == [LAB.node_uplink_v4, LAB.node_uplink_v6], r.stdout
        assert "hello" in r.stdout
    assert leases(tmp_path, "ctrnet") == []
    assert node_links(node) == before
