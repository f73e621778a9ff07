"""The operator's commands on the lab (real kernel): `sockgate status` with the agent
up and down, `sockgate doctor` on a healthy node netns and on broken ones (each
broken state made only inside the lab's node netns), `sockgate gc` and the agent's
sweep removing a container that vanished behind sockgate's back while leaving the
others, and never an attachment being added."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runtime.agent.event_log import last_events
from runtime.fsutil import atomic_write_json
from runtime.kernel import segment_meter
from runtime.kernel.netns import in_netns
from runtime.lab import LAB
from runtime.state.store import host_ifname
from runtime.version import version
from tests.support.plugin import node_links

pytestmark = pytest.mark.lab

POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=u1"


def sockgate(lab, plugin, *args: str, paths: bool = True) -> subprocess.CompletedProcess:
    """`sockgate ARGS` in the lab's node netns, aimed at the plugin's dirs."""
    c = plugin.conf
    where = ["--state-dir", c["stateDir"], "--run-dir", c["runDir"], "--policy", c["policyFile"]] if paths else []
    return lab.run(lab.node, [sys.executable, "-m", "runtime.cli.main", *args, *where], check=False, timeout=120)


def status_json(lab, plugin, *args: str) -> dict:
    cp = sockgate(lab, plugin, "status", "--json", *args)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    return json.loads(cp.stdout)


def doctor(lab, plugin, *args: str) -> tuple[int, dict[str, dict]]:
    cp = sockgate(lab, plugin, "doctor", "--json", *args)
    assert cp.returncode in (0, 1), cp.stdout + cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["ok"] is (cp.returncode == 0)
    return cp.returncode, {c["name"]: c for c in doc["checks"]}


def failed(checks: dict[str, dict]) -> set[str]:
    return {name for name, c in checks.items() if not c["ok"]}


def in_node(lab, *argv: str) -> None:
    lab.run(lab.node, list(argv))


def wait_for(what: str, cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def conf_dir(plugin, tmp_path: Path) -> str:
    """A CNI config dir holding the plugin's config, as a runtime's would."""
    d = tmp_path / "net.d"
    d.mkdir(exist_ok=True)
    c = plugin.conf
    (d / "00-sockgate.conflist").write_text(json.dumps({
        "cniVersion": c["cniVersion"], "name": c["name"],
        "plugins": [{k: v for k, v in c.items() if k not in ("cniVersion", "name")}]}))
    return str(d)


def veth_gone(lab, plugin, cid: str) -> bool:
    return host_ifname(plugin.conf["name"], cid, "eth0") not in node_links(lab.ns_path(lab.node))


# --- status ---------------------------------------------------------------------------

def test_status_on_a_healthy_lab(plugin, agent, app, lab, tmp_path):
    pod_ns, other_ns = app(), app()
    plugin.add("pod-a", pod_ns, cni_args=POD_ARGS)
    plugin.add("plain-b", other_ns)
    assert lab.probe(pod_ns, "tcp", LAB.public_v4, 9000).ok
    # A refusal: the agent writes its event line (runtime/agent/events.py).
    assert not lab.probe(pod_ns, "tcp", LAB.public_v4, 25, timeout=1).ok
    wait_for("the refusal's event", lambda: last_events(plugin.conf["stateDir"], 1))
    st = status_json(lab, plugin, "--cni-conf-dir", conf_dir(plugin, tmp_path))

    a = st["agent"]
    assert a["up"] is True and a["pid"] == int(agent.ready.read_text()) and a["version"] == version()
    assert 0 <= a["uptime_seconds"] < 600
    assert st["table"]["loaded"] and st["table"]["current"] is True
    assert st["table"]["loaded_revision"] == st["table"]["policy_revision"]
    assert st["ranges"]["exists"] and st["ranges"]["ipv4"] > 0 and st["policy"]["exists"]
    pools = {(p["network"], p["family"]): p for p in st["pools"]}
    v4 = pools[(plugin.conf["name"], "ipv4")]
    assert (v4["pool"], v4["size"], v4["leased"], v4["outside"]) == ("10.77.0.0/16", 65534, 2, 0)
    assert pools[(plugin.conf["name"], "ipv6")]["leased"] == 2
    rows = {r["container_id"]: r for r in st["attachments"]}
    assert rows["pod-a"]["pod"] == "shop/web-0" and rows["plain-b"]["pod"] is None
    assert all(r["state"] == "ready" and r["veth"] is True for r in rows.values())
    # The counters billing reads: the probe's bytes on pod-a only.
    assert rows["pod-a"]["tx_bytes"] > 0 and rows["pod-a"]["tx_packets"] > 0 and rows["plain-b"]["tx_bytes"] == 0
    assert [(e["pod"], e["destination"], e["port"], e["reason"]) for e in st["refusals"]] == [
        ("shop/web-0", LAB.public_v4, 25, "blocked-port")]
    # The same as tables.
    text = sockgate(lab, plugin, "status", "--cni-conf-dir", conf_dir(plugin, tmp_path)).stdout
    assert "agent:    up, pid" in text and "shop/web-0" in text and st["refusals"][0]["rule"] in text


def test_status_with_the_agent_down(plugin, agent, app, lab):
    plugin.add("kept", app())
    assert agent.stop(signal.SIGTERM) == 0
    st = status_json(lab, plugin)
    assert st["agent"]["up"] is False and "no socket" in st["agent"]["detail"]
    assert st["agent"]["pid"] is None  # a clean stop removes agent.json
    assert [r["container_id"] for r in st["attachments"]] == ["kept"]
    assert st["table"]["loaded"] is True  # the data plane stays without the agent
    agent.start()
    pid = int(agent.ready.read_text())
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    st = status_json(lab, plugin)
    assert st["agent"]["up"] is False and st["agent"]["pid"] == pid
    assert "refuses connections" in st["agent"]["detail"] and "did not stop cleanly" in st["agent"]["detail"]
    assert "DOWN" in sockgate(lab, plugin, "status").stdout


# --- doctor ---------------------------------------------------------------------------

def test_doctor_on_a_healthy_lab_node(plugin, agent, app, lab):
    plugin.add("healthy", app())
    cp = sockgate(lab, plugin, "doctor")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "checks passed" in cp.stdout
    rc, checks = doctor(lab, plugin)
    assert rc == 0 and len(checks) == 13
    assert "1 attachments' network namespaces open here" in checks["netns-pins"]["detail"]
    assert "1 container end(s) with segmentation offload TCP's metered, the others off" in checks["segmentation"]["detail"]


def test_doctor_finds_a_container_that_turned_segmentation_offload_back_on(plugin, agent, app, lab):
    """What CAP_NET_ADMIN in the container could do: billing would count each of its
    super-packets once (README "Billing")."""
    ns = app()
    plugin.add("offloaded", ns)
    plugin.add("kept-off", app())
    lab.run(ns, ["ethtool", "-K", "eth0", "tso", "on", "tx-udp-segmentation", "on"])
    rc, checks = doctor(lab, plugin)
    assert rc == 1 and failed(checks) == {"segmentation"}
    detail = checks["segmentation"]["detail"]
    assert detail.startswith("1 container end(s) with segmentation offload on: offloaded (")
    # TCP's are metered (runtime/kernel/segment_meter.py): not named.
    assert "tx-udp-segmentation" in detail and "tcp" not in detail and "kept-off" not in detail
    assert "CAP_NET_ADMIN" in checks["segmentation"]["fix"]


def test_doctor_finds_tcp_offload_left_on_for_a_segment_meter_that_is_gone(plugin, agent, app, lab):
    """ADD leaves TCP's offload on for the node's segment meter; with its pins removed
    since, nothing counts what those super-packets become on the wire. The agent puts
    a meter back within seconds (test_hostile.py::test_a_meter_removed_under_the_agent_
    is_put_back_and_nothing_is_billed_twice); with the agent stopped, doctor names it."""
    plugin.add("metered", app())
    node = f"/run/netns/{lab.node}"
    rc, checks = doctor(lab, plugin)
    assert rc == 0 and "TCP's metered" in checks["segmentation"]["detail"], checks["segmentation"]
    agent.stop()
    in_netns(node, segment_meter.remove)
    try:
        rc, checks = doctor(lab, plugin)
        assert rc == 1 and failed(checks) == {"segmentation", "agent"}
        assert "not the segment meter the table counts along: metered (tx-tcp" in checks["segmentation"]["detail"]
        assert checks["segmentation"]["fix"].startswith("the meter's pins (under /run/sockgate/bpf")
        assert "the next ADD or DEL does" in checks["segmentation"]["fix"]
    finally:
        assert in_netns(node, segment_meter.install)


def test_doctor_finds_forwarding_off(plugin, agent, app, lab):
    plugin.add("fw", app())
    try:
        in_node(lab, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        rc, checks = doctor(lab, plugin)
        assert rc == 1 and failed(checks) == {"forwarding"}
        assert "net.ipv4.ip_forward=0" in checks["forwarding"]["detail"]
        assert checks["forwarding"]["fix"].startswith("sysctl -w net.ipv4.ip_forward=1")
        text = sockgate(lab, plugin, "doctor").stdout
        assert "What to do:" in text and "- forwarding: sysctl -w net.ipv4.ip_forward=1" in text
    finally:
        in_node(lab, "sysctl", "-qw", "net.ipv4.ip_forward=1")


def test_doctor_finds_container_veths_above_the_uplinks_mtu(plugin, agent, app, lab):
    """The network's mtu (1500) above the uplink's: the node would answer a container's
    oversized packet before any rule, to a forged source (README "Threat model")."""
    plugin.add("big", app())
    try:
        in_node(lab, "ip", "link", "set", LAB.uplink_if, "mtu", "1400")
        rc, checks = doctor(lab, plugin)
        assert rc == 1 and failed(checks) == {"mtu"}
        assert "1 of 1 container veths" in checks["mtu"]["detail"] and "above 1400" in checks["mtu"]["detail"]
        assert checks["mtu"]["fix"].startswith("set the network's mtu to 1400 or less")
    finally:
        in_node(lab, "ip", "link", "set", LAB.uplink_if, "mtu", "1500")
    rc, checks = doctor(lab, plugin)
    assert rc == 0 and "at most the default route's MTU 1500" in checks["mtu"]["detail"]


def test_doctor_finds_the_ranges_cache_missing(plugin, app, lab):
    """No agent here: one would compute the cache again from the lab policy's files
    at its next table check."""
    plugin.add("ranges", app())  # in-process: loads the table, writes the cache
    cache = Path(plugin.conf["stateDir"]) / "ranges" / "google.json"
    assert cache.exists()
    cache.rename(cache.with_name("moved.json"))
    rc, checks = doctor(lab, plugin)
    assert rc == 1 and failed(checks) == {"ranges-cache", "agent"}
    assert "no Google ranges cache" in checks["ranges-cache"]["detail"]
    assert checks["ranges-cache"]["fix"].startswith("sockgate ranges update")
    assert checks["table"]["ok"] and "can't be told" in checks["table"]["detail"]
    assert not cache.exists()  # doctor read only: it did not compute the cache


def test_doctor_finds_docker_forward_drop_without_docker_user_rules(plugin, agent, app, lab):
    """What dockerd leaves in the node's netns: FORWARD policy DROP, a DOCKER-USER
    chain it jumps to first, and nothing in it for sockgate's veths. Made with
    iptables-nft in the lab's node netns only."""
    ns = app()
    plugin.add("dk", ns)
    try:
        for tool in ("iptables-nft", "ip6tables-nft"):
            in_node(lab, tool, "-w", "5", "-N", "DOCKER-USER")
            in_node(lab, tool, "-w", "5", "-A", "FORWARD", "-j", "DOCKER-USER")
            in_node(lab, tool, "-w", "5", "-P", "FORWARD", "DROP")
        rc, checks = doctor(lab, plugin)
        assert rc == 1 and failed(checks) == {"docker-forward"}
        detail = checks["docker-forward"]["detail"]
        assert "iptables-nft: FORWARD policy DROP and no ACCEPT for -i sg+ and -o sg+ in DOCKER-USER" in detail
        assert "ip6tables-nft" in detail and "--docker-socket" in checks["docker-forward"]["fix"]
        # What the check claims: the container's traffic is dropped there.
        assert not lab.probe(ns, "tcp", LAB.public_v4, 9000, timeout=1).ok
        # The rules the fix names (the agent's Docker door adds the same).
        for tool in ("iptables-nft", "ip6tables-nft"):
            for flag in ("-i", "-o"):
                in_node(lab, tool, "-w", "5", "-I", "DOCKER-USER", flag, "sg+", "-j", "ACCEPT")
        rc, checks = doctor(lab, plugin)
        assert rc == 0, checks
        assert lab.probe(ns, "tcp", LAB.public_v4, 9000).ok
    finally:
        # The tables iptables-nft made, in the lab's node netns (no other is touched).
        for family in ("ip", "ip6"):
            lab.run(lab.node, ["nft", "delete", "table", family, "filter"], check=False)


# --- gc and the agent's sweep ---------------------------------------------------------

def test_gc_removes_vanished_containers_and_leaves_the_others(plugin, app, lab):
    netns_gone, veth_deleted, kept = app(), app(), app()
    plugin.add("netns-gone", netns_gone, cni_args=POD_ARGS)
    plugin.add("veth-gone", veth_deleted)
    plugin.add("kept", kept)
    # Behind sockgate's back: the container's netns deleted (the kernel then deletes
    # its veth, both ends), another's node-side veth deleted.
    subprocess.run(["ip", "netns", "del", os.path.basename(netns_gone)], check=True)
    in_node(lab, "ip", "link", "del", host_ifname(plugin.conf["name"], "veth-gone", "eth0"))
    wait_for("the deleted netns's veth to go", lambda: veth_gone(lab, plugin, "netns-gone"))

    cp = sockgate(lab, plugin, "gc", "--json", "--network", plugin.conf["name"])
    assert cp.returncode == 0, cp.stdout + cp.stderr
    report = json.loads(cp.stdout)
    removed = {r["container_id"]: r for r in report["removed"]}
    assert set(removed) == {"netns-gone", "veth-gone"}
    assert removed["netns-gone"]["pod"] == "shop/web-0" and "does not exist" in removed["netns-gone"]["why"]
    assert "still opens" in removed["veth-gone"]["why"]
    assert [rec.split("--")[0] for rec in plugin.records()] == ["kept"]
    assert len(plugin.leases()) == 2
    assert plugin("CHECK", "kept", kept).rc == 0  # veth, addresses, routes, elements all there
    assert lab.probe(kept, "tcp", LAB.public_v4, 9000).ok
    again = sockgate(lab, plugin, "gc")
    assert again.returncode == 0 and "no attachment whose container vanished" in again.stdout


def test_gc_refuses_outside_the_node_netns(plugin, app, lab):
    plugin.add("elsewhere", app())
    c = plugin.conf
    # The test's own netns (the host's) has neither the lab's veths nor its table.
    if subprocess.run(["nft", "list", "table", "inet", "sockgate"], capture_output=True).returncode == 0:
        pytest.fail("this host has a table inet sockgate: the refusal can't be shown here")
    cp = subprocess.run([sys.executable, "-m", "runtime.cli.main", "gc", "--state-dir", c["stateDir"],
                         "--run-dir", c["runDir"], "--policy", c["policyFile"]], capture_output=True, text=True)
    assert cp.returncode == 1 and "node's network namespace" in cp.stderr
    assert [r.split("--")[0] for r in plugin.records()] == ["elsewhere"]


def test_the_agent_sweeps_a_vanished_container(plugin, app, lab, tmp_path):
    from tests.conftest import AgentProcess
    gone_ns, kept_ns = app(), app()
    agent = AgentProcess(lab, plugin, tmp_path, ("--sweep-interval", "0.5")).start()
    try:
        plugin.add("gone", gone_ns)
        plugin.add("kept", kept_ns)
        subprocess.run(["ip", "netns", "del", os.path.basename(gone_ns)], check=True)
        wait_for("the sweep to remove the vanished attachment",
                 lambda: [r.split("--")[0] for r in plugin.records()] == ["kept"])
        assert len(plugin.leases()) == 2
        assert plugin("CHECK", "kept", kept_ns).rc == 0
        assert "removed attachment gone/eth0" in agent.log.read_text()
    finally:
        agent.stop()


def test_the_sweep_never_takes_an_attachment_being_added(plugin, app, lab, tmp_path):
    """Parallel ADDs under a sweep every 50 ms all stay; and the state an ADD is in
    before its veth exists (record `adding`, leases, no veth) survives sweeps too."""
    from tests.conftest import AgentProcess
    namespaces = [app() for _ in range(12)]
    agent = AgentProcess(lab, plugin, tmp_path, ("--sweep-interval", "0.05")).start()
    try:
        with ThreadPoolExecutor(12) as pool:
            adds = list(pool.map(lambda i: plugin("ADD", f"p{i}", namespaces[i]), range(12)))
        assert all(r.rc == 0 for r in adds), [r.stdout for r in adds if r.rc]
        # Mid-ADD as on disk: the record says adding and the veth is not made yet.
        record = next((plugin.state_dir / "networks" / plugin.conf["name"] / "attachments").glob("p0--*.json"))
        # Atomically, as sockgate writes records: a sweep that read it half written would
        # rightly remove an unreadable record (seen once in CI).
        atomic_write_json(record, dict(json.loads(record.read_text()), state="adding"), durable=False)
        in_node(lab, "ip", "link", "del", host_ifname(plugin.conf["name"], "p0", "eth0"))
        time.sleep(1.0)  # twenty sweeps
        assert len(plugin.records()) == 12 and len(plugin.leases()) == 24
        assert all(plugin("CHECK", f"p{i}", namespaces[i]).rc == 0 for i in range(1, 12))
        assert "removed attachment" not in agent.log.read_text()
        # gc leaves it too; the runtime's DEL (after a failed ADD) is what removes it.
        cp = sockgate(lab, plugin, "gc", "--json")
        assert cp.returncode == 0 and json.loads(cp.stdout)["removed"] == []
        plugin.delete("p0", namespaces[0])
        assert len(plugin.records()) == 11
    finally:
        agent.stop()


# --- teardown -------------------------------------------------------------------------

def test_teardown_refuses_while_anything_needs_the_table_then_removes_it_and_the_meter(plugin, agent, app, lab):
    """An uninstall that only removes files leaves the table's hooks on every packet of
    the node and the meter's BPF programs attached by their pins. `sockgate teardown`
    takes both, but never from under the agent (it would load them again) or a
    container (its packets would leave unfiltered)."""
    c = plugin.conf
    node = f"/run/netns/{lab.node}"

    def teardown(*args: str) -> tuple[int, dict]:
        cp = sockgate(lab, plugin, "teardown", "--json", "--state-dir", c["stateDir"], "--run-dir", c["runDir"],
                      *args, paths=False)
        assert cp.returncode in (0, 1), cp.stdout + cp.stderr
        return cp.returncode, json.loads(cp.stdout)

    def blocked_by() -> set[str]:
        code, doc = teardown()
        assert (code == 1) is bool(doc["blockers"]) and not doc["removed"]
        return {b["kind"] for b in doc["blockers"]}

    def table_there() -> bool:
        return lab.run(lab.node, ["nft", "list", "table", "inet", "sockgate"], check=False).returncode == 0

    ns = app()
    plugin.add("kept", ns)
    assert blocked_by() == {"agent", "attachment"}
    assert agent.stop(signal.SIGTERM) == 0
    assert blocked_by() == {"attachment"}
    plugin.delete("kept", ns)
    # Another state dir's container: only its veth in sockgate's interface group says so.
    in_node(lab, "ip", "link", "add", "sgt-other", "group", str(0x5347), "type", "veth", "peer", "name", "sgt-peer")
    try:
        assert blocked_by() == {"veth"}
    finally:
        in_node(lab, "ip", "link", "del", "sgt-other")
    assert table_there() and in_netns(node, segment_meter.installed)
    code, doc = teardown("--check")
    assert code == 0 and not doc["removed"] and doc["present"][0] == "nft table inet sockgate"
    assert len(doc["present"]) == 2 and table_there()
    code, doc = teardown()
    assert code == 0 and doc["removed"]
    assert not table_there()
    assert not in_netns(node, segment_meter.installed) and not in_netns(node, segment_meter.pin_dir).exists()
    assert teardown() == (0, {"blockers": [], "present": [], "removed": False})  # nothing left: idempotent
    text = sockgate(lab, plugin, "teardown", "--state-dir", c["stateDir"], "--run-dir", c["runDir"], paths=False)
    assert text.returncode == 0 and "nothing to remove" in text.stdout


def test_teardown_finds_the_meter_under_either_pin_root_and_refuses_one_it_cannot_see(plugin, app, lab):
    """Review 9: run where another bpffs sits at /sys/fs/bpf (a shell with the host's
    mounted, the meter pinned under /run/sockgate/bpf by a process without it),
    teardown took the table and left the meter attached. It looks under both roots
    now, and refuses while the table counts along a meter it can't see."""
    c = plugin.conf
    node = f"/run/netns/{lab.node}"
    ns = app()
    plugin.add("gone-soon", ns)
    plugin.delete("gone-soon", ns)
    assert in_netns(node, segment_meter.installed)
    teardown = f"{sys.executable} -m runtime.cli.main teardown --json --state-dir {c['stateDir']} --run-dir {c['runDir']}"

    def in_private_mounts(setup: str) -> tuple[int, dict]:
        cp = lab.run(lab.node, ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{setup} && exec {teardown}"],
                     check=False, timeout=120)
        assert cp.returncode in (0, 1), cp.stdout + cp.stderr
        return cp.returncode, json.loads(cp.stdout)

    # Neither root holds it in view: refused, nothing removed.
    code, doc = in_private_mounts("mount -t bpf bpf /sys/fs/bpf && mount -t tmpfs none /run/sockgate")
    assert code == 1 and [b["kind"] for b in doc["blockers"]] == ["meter"] and not doc["removed"], doc
    assert in_netns(node, segment_meter.installed)
    # /sys/fs/bpf is a bpffs, and the meter is under /run/sockgate/bpf: found and removed.
    code, doc = in_private_mounts("mount -t bpf bpf /sys/fs/bpf")
    assert code == 0 and doc["removed"] and any("/run/sockgate/bpf/net-" in p for p in doc["present"]), doc
    assert not in_netns(node, segment_meter.installed)
