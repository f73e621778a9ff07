"""Proves the test harness (tests/support) with Debian's stock CNI plugins.

Everything runs in throwaway namespaces ``sgt-<hex>``; nothing touches the root
netns or the host's CNI directories (checked at the end of each test).
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support import cnitool, images, temp_netns
from tests.support.containerd import Containerd, ctr_run_cni

pytestmark = pytest.mark.clients

STOCK = Path("/usr/lib/cni")
HOST_PATHS = ["/etc/cni/net.d", "/opt/cni", "/var/lib/cni", "/run/containerd", "/run/cni", "/opt/containerd",
              "/run/mount", "/run/runc"]


def _snapshot_host() -> dict[str, Any]:
    return {p: sorted(os.listdir(p)) if os.path.isdir(p) else os.path.exists(p) for p in HOST_PATHS}


@pytest.fixture
def host_unchanged() -> Iterator[None]:
    before = _snapshot_host()
    yield
    assert _snapshot_host() == before, "host CNI/containerd paths changed"


@pytest.fixture
def node_netns() -> Iterator[str]:
    with temp_netns() as ns:
        yield ns


def ns_run(netns: str, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--net={netns}", *argv], check=True, capture_output=True, text=True).stdout


def leases(data_dir: Path, net: str) -> list[str]:
    d = data_dir / net
    return sorted(f for f in os.listdir(d) if f[0].isdigit()) if d.is_dir() else []


def ptp(data_dir: Path, subnet: str) -> dict[str, Any]:
    return {"type": "ptp", "ipMasq": False,
            "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": [[{"subnet": subnet}]],
                     "routes": [{"dst": "0.0.0.0/0"}]}}


def test_cnitool_conflist_add_check_del(tmp_path: Path, node_netns: str, host_unchanged: None) -> None:
    bin_dir, log = tmp_path / "bin", tmp_path / "rec.log"
    cnitool.write_recorder_plugin(bin_dir)
    conflist = {"cniVersion": "1.0.0", "name": "sgtnet", "plugins": [
        ptp(tmp_path / "ipam", "10.98.0.0/24"),
        {"type": "tuning", "dataDir": str(tmp_path / "tuning"), "sysctl": {"net.core.somaxconn": "777"}},
        {"type": "recorder", "logFile": str(log), "capabilities": {"portMappings": True, "bandwidth": False}},
    ]}
    caps = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": 1}, "ips": ["10.98.0.9/24"]}
    cni = cnitool.CNI(conflist, [bin_dir, STOCK], tmp_path / "cache", runner_netns=node_netns)
    assert "1.0.0" in cni.version_info("ptp")["supportedVersions"]

    with temp_netns() as app:
        result = cni.add("c1", app, "eth0", args={"IgnoreUnknown": "1"}, capability_args=caps)
        ip = result["ips"][0]["address"]
        assert ipaddress.ip_interface(ip) in ipaddress.ip_network("10.98.0.0/24")
        assert ip in ns_run(app, "ip", "-4", "addr", "show", "eth0")
        assert ns_run(app, "cat", "/proc/sys/net/core/somaxconn").strip() == "777"
        assert leases(tmp_path / "ipam", "sgtnet") == [ip.split("/")[0]]

        # prevResult flows: tuning got ptp's result, the recorder got tuning's.
        add_calls = [c for c in cni.calls if c.command == "ADD"]
        assert [c.plugin for c in add_calls] == ["ptp", "tuning", "recorder"]
        assert "prevResult" not in add_calls[0].stdin
        assert add_calls[1].stdin["prevResult"] == add_calls[0].stdout
        assert add_calls[2].stdin["prevResult"] == add_calls[1].stdout
        # name/cniVersion injected; runtimeConfig only for declared capabilities.
        assert all(c.stdin["name"] == "sgtnet" and c.stdin["cniVersion"] == "1.0.0" for c in add_calls)
        assert "runtimeConfig" not in add_calls[0].stdin
        assert add_calls[2].stdin["runtimeConfig"] == {"portMappings": caps["portMappings"]}
        rec = cnitool.read_records(log)[-1]
        assert rec["env"] == {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": app,
                              "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1",
                              "CNI_PATH": f"{bin_dir}:{STOCK}"}
        assert cni.cached_result("c1") == result

        cni.check("c1", app, "eth0", capability_args=caps)
        check_calls = [c for c in cni.calls if c.command == "CHECK"]
        assert [c.plugin for c in check_calls] == ["ptp", "tuning", "recorder"]
        assert all(c.stdin["prevResult"] == result for c in check_calls)

        cni.delete("c1", app, "eth0", capability_args=caps)
        del_calls = [c for c in cni.calls if c.command == "DEL"]
        assert [c.plugin for c in del_calls] == ["recorder", "tuning", "ptp"]
        assert all(c.stdin["prevResult"] == result for c in del_calls)
        assert cni.cached_result("c1") is None
        assert leases(tmp_path / "ipam", "sgtnet") == []
        assert "eth0" not in ns_run(app, "ip", "-br", "link")
        assert ns_run(node_netns, "ip", "-br", "link").split()[:1] == ["lo"]
        assert len(ns_run(node_netns, "ip", "-br", "link").splitlines()) == 1  # host veth gone
        # DEL again: nothing cached, nothing left, still succeeds, no prevResult.
        cni.delete("c1", "", "eth0")
        assert "prevResult" not in cni.calls[-1].stdin


def test_cnitool_gc_and_errors(tmp_path: Path, node_netns: str, host_unchanged: None) -> None:
    cache = tmp_path / "cache"
    cni = cnitool.CNI({"cniVersion": "1.0.0", "name": "gcnet", "plugins": [ptp(tmp_path / "ipam", "10.96.0.0/24")]},
                      [STOCK], cache, runner_netns=node_netns)
    with temp_netns() as a, temp_netns() as b:
        ra, rb = cni.add("keep", a), cni.add("stale", b)
        assert len(leases(tmp_path / "ipam", "gcnet")) == 2
        # Step 1 of GC: DEL cached attachments that are not valid (any cniVersion).
        cni.gc([("keep", "eth0")])
        assert leases(tmp_path / "ipam", "gcnet") == [ra["ips"][0]["address"].split("/")[0]]
        assert [(c.command, c.env["CNI_CONTAINERID"], c.stdin["prevResult"]) for c in cni.calls[2:]] == \
            [("DEL", "stale", rb)]
        cni.delete("keep", a)
        assert leases(tmp_path / "ipam", "gcnet") == []

    # Step 2 (cniVersion >= 1.1.0): the GC verb with both attachment keys.
    cnitool.write_recorder_plugin(tmp_path / "bin")
    rec = cnitool.CNI({"cniVersion": "1.1.0", "name": "gcnet2", "plugins": [
        {"type": "recorder", "logFile": str(tmp_path / "gc.log")}]}, [tmp_path / "bin"], cache)
    rec.gc([("c9", "eth1")])
    gc = cnitool.read_records(tmp_path / "gc.log")[-1]
    assert gc["env"]["CNI_COMMAND"] == "GC" and gc["env"]["CNI_CONTAINERID"] == ""
    want = [{"containerID": "c9", "ifname": "eth1"}]
    assert gc["stdin"]["cni.dev/valid-attachments"] == want and gc["stdin"]["cni.dev/attachments"] == want

    # Failures surface the plugin's error JSON.
    bad = cnitool.CNI({"cniVersion": "1.0.0", "name": "bad", "plugins": [
        {"type": "ptp", "ipam": {"type": "host-local", "ranges": [[{"subnet": "not-a-subnet"}]]}}]},
        [STOCK], cache, runner_netns=node_netns)
    with temp_netns() as c, pytest.raises(cnitool.CNIError) as exc:
        bad.add("x", c)
    assert exc.value.plugin == "ptp" and exc.value.code is not None and exc.value.msg
    # exec_plugin returns instead of raising: raw stdin, no CNI_* env -> code 4.
    rc, out, _ = cnitool.exec_plugin(STOCK / "ptp", "ADD", {}, b"{not json")
    assert rc != 0 and isinstance(out, dict) and out["code"] == 4 and "CNI_CONTAINERID" in out["msg"]


def test_containerd_ctr_run_cni(tmp_path: Path, node_netns: str, host_unchanged: None) -> None:
    conf_dir, bin_dir, ipam, log = tmp_path / "net.d", tmp_path / "bin", tmp_path / "ipam", tmp_path / "rec.log"
    conf_dir.mkdir()
    cnitool.write_recorder_plugin(bin_dir)
    (conf_dir / "10-sgt.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "ctrnet", "plugins": [
        ptp(ipam, "10.97.0.0/24"), {"type": "recorder", "logFile": str(log)}]}))
    # A later file must lose: ctr takes the lexically first conflist only.
    (conf_dir / "99-other.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "other", "plugins": [
        {"type": "does-not-exist"}]}))
    archive = images.busybox_oci_archive(tmp_path / "images")

    with Containerd(node_netns, tmp_path / "ctd") as ctd:
        assert images.BUSYBOX_REF in ctd.import_image(archive)

        # Foreground --rm: ADD, run, DEL with empty CNI_NETNS.
        r = ctr_run_cni(ctd, images.BUSYBOX_REF, "fg", ["ip", "-4", "addr", "show", "eth0"], conf_dir, bin_dir)
        assert r.rc == 0, r.stderr
        add, dele = cnitool.read_records(log)
        ip = add["stdin"]["prevResult"]["ips"][0]["address"]
        assert ip in r.stdout
        assert add["env"]["CNI_CONTAINERID"] == f"{ctd.namespace}-fg"
        assert add["env"]["CNI_NETNS"].startswith("/proc/") and add["env"]["CNI_IFNAME"] == "eth0"
        assert add["env"]["CNI_PATH"] == "/opt/cni/bin:/usr/lib/cni"
        assert dele["env"]["CNI_COMMAND"] == "DEL" and dele["env"]["CNI_NETNS"] == ""
        assert dele["stdin"]["prevResult"] == add["stdin"]["prevResult"]
        assert leases(ipam, "ctrnet") == []
        assert cnitool.cached_attachments(ctd.cni_cache_dir) == []

        # Detached: ctr never sends DEL; Containerd.remove() does, from ctr's cache.
        r = ctr_run_cni(ctd, images.BUSYBOX_REF, "bg", ["sleep", "600"], conf_dir, bin_dir, detach=True)
        assert r.rc == 0, r.stderr
        out = ctd.ctr("tasks", "exec", "--exec-id", "probe", "bg", "ip", "-4", "addr", "show", "eth0").stdout
        (lease,) = leases(ipam, "ctrnet")
        assert f"inet {lease}/24" in out
        ctd.remove("bg")
        last = cnitool.read_records(log)[-1]
        assert last["env"]["CNI_COMMAND"] == "DEL" and last["env"]["CNI_CONTAINERID"] == f"{ctd.namespace}-bg"
        assert leases(ipam, "ctrnet") == []
        assert ctd.ctr("containers", "ls", "-q").stdout.split() == []

        # A detached container left running is removed (with DEL) by stop().
        assert ctr_run_cni(ctd, images.BUSYBOX_REF, "left", ["sleep", "600"], conf_dir, bin_dir, detach=True).rc == 0
        assert len(leases(ipam, "ctrnet")) == 1
        namespace, address = ctd.namespace, ctd.address

    assert leases(ipam, "ctrnet") == []
    assert sorted(os.listdir(tmp_path / "ctd")) == ["containerd.log"]
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{namespace}")) and not Path(f"/sys/fs/cgroup/{namespace}").exists()
    for pid in filter(str.isdigit, os.listdir("/proc")):  # no shim or containerd of ours left
        try:
            assert address.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            pass
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
