"""ADD / CHECK / DEL / GC / STATUS / VERSION through the real executable, in the lab."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runtime.lab.builder import PROJECT_ROOT
from runtime.state.store import host_ifname
from tests.support.plugin import nft_set, node_links, temp_files, wait_until_ready
from tests.support.stop_at_replace import wait_stopped

pytestmark = [pytest.mark.lab, pytest.mark.shims("compiled", "python")]


def in_ns(netns: str, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--net={netns}", *argv], capture_output=True, text=True,
                          check=True).stdout


def test_add_check_del_del(plugin, app):
    ns = app()
    res = plugin.add("c1", ns)
    assert res["cniVersion"] == "1.1.0"
    v4 = res["ips"][0]["address"].split("/")[0]
    v6 = res["ips"][1]["address"].split("/")[0]
    addrs = in_ns(ns, "ip", "-j", "addr", "show", "eth0")
    assert v4 in addrs and v6 in addrs
    routes = in_ns(ns, "ip", "route") + in_ns(ns, "ip", "-6", "route")
    assert "default via 169.254.1.1 dev eth0" in routes and "default via fe80::1 dev eth0" in routes
    assert "127.0.0.1" in in_ns(ns, "ip", "addr", "show", "lo") and "UP" in in_ns(ns, "ip", "link", "show", "lo")
    host = host_ifname(plugin.conf["name"], "c1", "eth0")
    assert host == res["interfaces"][0]["name"] and host in node_links(plugin.node_netns)
    assert any(host in e for e in nft_set(plugin.node_netns, "ifaces"))
    assert plugin("CHECK", "c1", ns).rc == 0

    plugin.delete("c1", ns)
    assert host not in node_links(plugin.node_netns)
    assert not any(host in e for e in nft_set(plugin.node_netns, "tx4"))
    assert plugin.leases() == [] and plugin.records() == []
    assert "eth0" not in in_ns(ns, "ip", "-br", "link")
    plugin.delete("c1", ns)  # again: already gone is success


def test_del_with_missing_netns_and_with_empty_netns(plugin, app, lab):
    ns1, ns2 = app(), app()
    plugin.add("gone", ns1)
    plugin.add("empty", ns2)
    # The container's netns disappears before DEL (the runtime already tore it down).
    subprocess.run(["ip", "netns", "del", os.path.basename(ns1)], check=True)
    plugin.delete("gone", ns1)
    plugin.delete("empty", "")  # ctr run --cni sends DEL with an empty CNI_NETNS
    assert plugin.leases() == [] and plugin.records() == []
    for cid in ("gone", "empty"):
        assert host_ifname(plugin.conf["name"], cid, "eth0") not in node_links(plugin.node_netns)


def test_second_add_for_same_container_and_ifname_is_refused(plugin, app):
    ns = app()
    first = plugin.add("dup", ns)
    again = plugin("ADD", "dup", ns)
    assert again.rc != 0 and again.code == 101
    assert "already attached" in again.json["msg"]
    # The refused ADD took nothing: still exactly the first attachment's two leases.
    assert len(plugin.leases()) == 2 and plugin("CHECK", "dup", ns).rc == 0
    # A second interface for the same container is a different attachment.
    second = plugin.add("dup", ns, ifname="net1")
    assert second["ips"][0]["address"] != first["ips"][0]["address"]


@pytest.mark.parametrize("damage", ["route", "address", "element", "host-link"])
def test_check_detects_damage(plugin, app, damage):
    ns = app()
    res = plugin.add("chk", ns)
    v4 = res["ips"][0]["address"].split("/")[0]
    host = res["interfaces"][0]["name"]
    node = plugin.node_netns
    if damage == "route":
        in_ns(ns, "ip", "route", "del", "default")
    elif damage == "address":
        in_ns(ns, "ip", "addr", "del", f"{v4}/32", "dev", "eth0")
    elif damage == "element":
        in_ns(node, "nft", "delete", "element", "inet", "sockgate", "tx4", "{", f"\"{host}\" . {v4}", "}")
    else:
        in_ns(node, "ip", "link", "del", host)
    call = plugin("CHECK", "chk", ns)
    assert call.rc != 0 and call.code == 103, call.stdout
    assert call.json["details"]


def test_check_of_unknown_container_fails(plugin, app):
    call = plugin("CHECK", "nobody", app())
    assert call.rc != 0 and call.code == 103


def test_gc_removes_only_invalid_attachments(plugin, app):
    keep, drop = app(), app()
    plugin.add("keep", keep)
    plugin.add("drop", drop)
    gc = plugin("GC", conf=dict(plugin.conf, **{
        "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}))
    assert gc.rc == 0, gc.stdout
    links = node_links(plugin.node_netns)
    assert host_ifname(plugin.conf["name"], "keep", "eth0") in links
    assert host_ifname(plugin.conf["name"], "drop", "eth0") not in links
    assert not any(host_ifname(plugin.conf["name"], "drop", "eth0") in e
                   for e in nft_set(plugin.node_netns, "ifaces"))
    assert plugin.records() == ["keep--eth0.json"] and len(plugin.leases()) == 2
    assert plugin("CHECK", "keep", keep).rc == 0


def test_gc_without_valid_list_is_refused(plugin, app):
    plugin.add("c", app())
    call = plugin("GC")
    assert call.rc != 0 and call.code == 7
    assert len(plugin.records()) == 1


def test_crash_after_reserving_is_cleaned_by_del_and_gc(plugin, app):
    """A plugin killed after writing its lease (before the record or the veth): DEL and GC
    must still find and free it. Simulated by writing what such a crash leaves."""
    leases = plugin.state_dir / "networks" / plugin.conf["name"] / "leases"
    leases.mkdir(parents=True)
    (leases / "10.77.200.1").write_text("crashed\neth0\n")
    (leases / "10.77.200.2").write_text("crashed2\neth0\n")
    plugin.delete("crashed", "")
    assert "10.77.200.1" not in plugin.leases()
    gc = plugin("GC", conf=dict(plugin.conf, **{"cni.dev/valid-attachments": []}))
    assert gc.rc == 0 and plugin.leases() == []


def test_killed_add_leaves_nothing_after_del(plugin, app, lab):
    """SIGKILL the plugin at several points of a real ADD, then DEL: nothing remains."""
    for delay in (0.05, 0.15, 0.25, 0.35):
        ns = app()
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "ADD",
               "CNI_CONTAINERID": "killed", "CNI_NETNS": ns, "CNI_IFNAME": "eth0"}
        proc = subprocess.Popen(["nsenter", f"--net={plugin.node_netns}", plugin.exe], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdin.write(json.dumps(plugin.conf).encode())
        proc.stdin.close()
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)])
            proc.kill()
        proc.wait()
        plugin.delete("killed", ns)
        assert plugin.leases() == [] and plugin.records() == []
        host = host_ifname(plugin.conf["name"], "killed", "eth0")
        assert host not in node_links(plugin.node_netns)
        assert not [e for s in ("ifaces", "tx4", "tx6", "rx") for e in nft_set(plugin.node_netns, s) if host in e]


def _attachments_dir(plugin) -> Path:
    return plugin.state_dir / "networks" / plugin.conf["name"] / "attachments"


def _valid(*cids: str) -> dict:
    return {"cni.dev/valid-attachments": [{"containerID": c, "ifname": "eth0"} for c in cids]}


def _nothing_left(plugin, cid: str) -> None:
    # leases() and records() list the temp files of their directories too.
    assert plugin.leases() == [] and plugin.records() == []
    host = host_ifname(plugin.conf["name"], cid, "eth0")
    assert host not in node_links(plugin.node_netns)
    assert not [e for s in ("ifaces", "tx4", "tx6", "rx") for e in nft_set(plugin.node_netns, s) if host in e]


def _start_add(plugin, cid: str, ns: str, argv: list[str] | None = None) -> subprocess.Popen:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid,
           "CNI_NETNS": ns, "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1",
           "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen(["nsenter", f"--net={plugin.node_netns}", *(argv or [plugin.exe])], env=env,
                            cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(json.dumps(plugin.conf).encode())
    proc.stdin.close()
    return proc


@pytest.mark.parametrize("cleanup", ["DEL", "GC"])
def test_agent_killed_in_a_record_write_leaves_nothing(plugin, app, lab, tmp_path, cleanup):
    """kill -9 of the agent between writing an attachment record's temp file and renaming
    it (it stops itself there: tests/support/stop_at_replace). While it is stopped, a
    GC from another process leaves that temp file alone (a live writer's); once it is
    killed, DEL or GC leaves no file behind, nor veth nor element."""
    record = "k--eth0.json"
    c = plugin.conf
    log, ready = tmp_path / "agent.log", tmp_path / "agent.ready"
    # The record's second write: ADD's "ready" one, made after the veth and elements,
    # outside the network lock (the first is under it, and would hold GC up).
    agent = lab.popen(lab.node, [sys.executable, "-m", "tests.support.stop_at_replace", record, "2",
                                 "runtime.cli.main", "agent", "--state-dir", c["stateDir"], "--run-dir", c["runDir"],
                                 "--policy", c["policyFile"], "--ready-file", str(ready)], log=log)
    add = None
    try:
        wait_until_ready(agent, ready, log, 30)
        ns = app()
        add = _start_add(plugin, "k", ns)
        wait_stopped(agent.pid)
        attachments = _attachments_dir(plugin)
        assert temp_files(attachments) == [f".{record}.tmp"]
        # Stopped right between the two: the ready record is written, not yet renamed.
        assert json.loads((attachments / f".{record}.tmp").read_text())["state"] == "ready"
        assert json.loads((attachments / record).read_text())["state"] == "adding"
        # In-process (no agent at this runDir): the stopped agent can't answer.
        offline = dict(c, runDir=str(tmp_path / "no-agent"), **_valid("k"))
        gc = plugin("GC", conf=offline)
        assert gc.rc == 0, gc.stdout
        assert temp_files(attachments) == [f".{record}.tmp"]
        agent.kill()
        agent.wait(timeout=30)
        assert add.wait(timeout=60) != 0  # the ADD never got its answer
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=30)
        if add is not None and add.poll() is None:
            add.kill()
            add.wait(timeout=30)
    assert temp_files(_attachments_dir(plugin)) == [f".{record}.tmp"]
    if cleanup == "DEL":
        plugin.delete("k", ns)
    else:
        gc = plugin("GC", conf=dict(c, **_valid()))
        assert gc.rc == 0, gc.stdout
    _nothing_left(plugin, "k")


@pytest.mark.shims("compiled")  # the ADD runs the plugin's module itself, not the executable
def test_plugin_killed_in_its_first_record_write_leaves_nothing_after_del(plugin, app):
    """The in-process plugin (no agent), stopped then killed in the record's first
    write, under the network lock: the kernel drops both locks with it, and DEL
    finds and removes the temp file, the leases and the record."""
    ns = app()
    add = _start_add(plugin, "p", ns, [sys.executable, "-m", "tests.support.stop_at_replace", "p--eth0.json", "1",
                                       "cni_plugin"])
    try:
        wait_stopped(add.pid)
        assert plugin.records() == [".p--eth0.json.tmp"]  # no record yet, only its temp file
        assert len(plugin.leases()) == 2
    finally:
        add.kill()
        add.wait(timeout=30)
    plugin.delete("p", ns)
    _nothing_left(plugin, "p")


def test_gc_removes_an_earlier_version_s_crash_leftovers(plugin, app):
    """What the issue found after a kill -9 of an earlier version: a zero-byte
    `.<record>.<pid>.<thread>.tmp`; and a lease cursor's temp symlink, and a lease left
    empty by a kill between its create and its write. GC removes them (a record's temp
    once it is a minute old: those writers took no lock to ask)."""
    plugin.add("live", app())
    attachments = _attachments_dir(plugin)
    old = attachments / ".gone--eth0.json.4242.139871.tmp"
    young = attachments / ".young--eth0.json.4243.139871.tmp"
    old.touch()
    young.touch()
    os.utime(old, (time.time() - 120, time.time() - 120))
    leases = attachments.parent / "leases"
    (leases / "10.77.250.250").touch()
    os.symlink("10.77.0.9", leases / ".last-v4.4242.139871.tmp")  # the cursor's, any age: written under the lock
    gc = plugin("GC", conf=dict(plugin.conf, **_valid("live")))
    assert gc.rc == 0, gc.stdout
    assert plugin.records() == ["live--eth0.json", young.name]
    assert len(plugin.leases()) == 2 and "10.77.250.250" not in plugin.leases()


@pytest.mark.parametrize("link", ["kept", "gone"])
def test_del_finds_elements_when_the_record_lacks_the_index(plugin, app, link):
    """A crash after the elements were added but before the record's last write leaves
    a record without the veth's index (the elements' key): DEL finds them by their
    comment, whether the veth still exists or went with its netns."""
    ns = app()
    res = plugin.add("noidx", ns)
    host = res["interfaces"][0]["name"]
    record = next((plugin.state_dir / "networks" / plugin.conf["name"] / "attachments").glob("noidx--*.json"))
    data = json.loads(record.read_text())
    assert data["host_ifindex"] > 0
    record.write_text(json.dumps(dict(data, host_ifindex=0, state="adding")))
    if link == "gone":
        in_ns(plugin.node_netns, "ip", "link", "del", host)
    before = {s: [e for e in nft_set(plugin.node_netns, s) if host in e] for s in ("ifaces", "tx4", "tx6", "rx")}
    assert all(len(v) == 1 for v in before.values()), before
    plugin.delete("noidx", ns)
    assert not [e for s in before for e in nft_set(plugin.node_netns, s) if host in e]
    assert plugin.leases() == [] and plugin.records() == []


def test_parallel_add_then_parallel_del(plugin, app):
    namespaces = [app() for _ in range(20)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda i: plugin("ADD", f"par{i}", namespaces[i]), range(20)))
    assert all(r.rc == 0 for r in results), [r.stdout for r in results if r.rc]
    v4 = {r.json["ips"][0]["address"] for r in results}
    v6 = {r.json["ips"][1]["address"] for r in results}
    assert len(v4) == 20 and len(v6) == 20
    assert len(plugin.leases()) == 40
    with ThreadPoolExecutor(20) as pool:
        dels = list(pool.map(lambda i: plugin("DEL", f"par{i}", namespaces[i]), range(20)))
    assert all(d.rc == 0 for d in dels), [d.stdout for d in dels if d.rc]
    hosts = {host_ifname(plugin.conf["name"], f"par{i}", "eth0") for i in range(20)}
    assert not hosts & node_links(plugin.node_netns)
    for set_name in ("ifaces", "tx4", "tx6", "rx"):
        assert not any(h in e for h in hosts for e in nft_set(plugin.node_netns, set_name))
    assert plugin.leases() == [] and plugin.records() == []


def test_k8s_args_and_runtime_config_kept(plugin, app):
    ns = app()
    plugin.add("pod", ns, cni_args="IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;"
                                   "K8S_POD_UID=1234;K8S_POD_INFRA_CONTAINER_ID=pod")
    record = json.loads((plugin.state_dir / "networks" / plugin.conf["name"] / "attachments"
                         / "pod--eth0.json").read_text())
    assert record["labels"] == {"pod_namespace": "shop", "pod_name": "web-0", "pod_uid": "1234"}
    plugin.add("rc", app(), conf=dict(plugin.conf, runtimeConfig={"portMappings": []}))
    record = json.loads((plugin.state_dir / "networks" / plugin.conf["name"] / "attachments"
                         / "rc--eth0.json").read_text())
    assert record["runtime_config"] == {"portMappings": []}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_every_supported_version(plugin, app, version):
    conf = dict(plugin.conf, cniVersion=version)
    res = plugin.add(f"v{version.replace('.', '')}", app(), conf=conf)
    assert res["cniVersion"] == version
    assert ("version" in res["ips"][0]) == version.startswith("0.")


def test_version_and_status(plugin):
    call = plugin("VERSION", conf={"cniVersion": "0.4.0"})
    assert call.rc == 0
    assert call.json["cniVersion"] == "0.4.0"
    assert set(call.json["supportedVersions"]) == {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}
    status = plugin("STATUS")
    assert status.rc == 0 and status.stdout.strip() == ""


def test_stale_table_is_reloaded_and_keeps_elements(plugin, app):
    ns = app()
    plugin.add("old", ns)
    node = plugin.node_netns
    # What a node upgraded from another sockgate version looks like: different rules,
    # a set of the earlier layout that a rule uses, and a hook chain of that layout
    # (`fragments`, before before_routing took over) that would stay hooked.
    in_ns(node, "nft", "flush", "chain", "inet", "sockgate", "forward")
    in_ns(node, "nft", "add", "set", "inet", "sockgate", "acct_tx", "{", "typeof", "iifname;", "counter;", "}")
    in_ns(node, "nft", "add", "rule", "inet", "sockgate", "forward", "iifname", "@acct_tx", "accept")
    in_ns(node, "nft", "add", "chain", "inet", "sockgate", "fragments",
          "{ type filter hook prerouting priority -450; policy accept; }")
    in_ns(node, "nft", "add", "rule", "inet", "sockgate", "fragments", "meta", "iifgroup", "0x5347", "counter", "drop")
    plugin.add("new", app())
    assert "jump from_container" in in_ns(node, "nft", "list", "chain", "inet", "sockgate", "forward")
    assert "acct_tx" not in in_ns(node, "nft", "list", "sets", "inet")
    chains = in_ns(node, "nft", "list", "chains", "inet")
    assert "chain fragments" not in chains and "chain before_routing {" in chains
    assert plugin("CHECK", "old", ns).rc == 0  # the reload kept existing containers' elements
