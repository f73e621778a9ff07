"""kill -9 at the worst moment (review 10): a DEL, a reload or a teardown killed at an
exact point (tests/support/kill_at.py), then the follow-up the runtime or the operator
runs (the DEL again, `sockgate gc`, the next ADD, the teardown again), then: billed ==
what the far end received, one final record, and nothing left behind.

The traffic is a TCP exchange in 88-byte segments (atk "small-mss"), so that the
segment meter's part of the counters is in play."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.billing.flush import flush
from runtime.billing.ledger import Ledger
from runtime.kernel import segment_meter
from runtime.kernel.netns import in_netns
from runtime.lab import LAB
from tests.support import attacks as atk
from tests.support.plugin import nft_set, node_links
from tests.test_hostile import Holder, addrs, far, tenant
from tests.test_segment_meter import _offloads, no_bpffs

__all__ = ["far", "no_bpffs", "tenant"]  # the fixtures, shared with the modules they come from
pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = ROOT / "tests" / "support" / "kill_at.py"


def killed_at(spec: dict, netns: str, mount_ns: str | None = None) -> subprocess.CompletedProcess:
    argv = ["nsenter", *([f"--mount={mount_ns}"] if mount_ns else []), f"--net={netns}", sys.executable,
            str(KILL_AT), json.dumps(spec)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=str(ROOT))


def assert_killed(child: subprocess.CompletedProcess) -> None:
    assert child.returncode == -signal.SIGKILL, (child.returncode, child.stdout, child.stderr[-2000:])


def cni(plugin, command: str, cid: str, netns: str = "") -> dict:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
           "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1",
           "CNI_PATH": str(Path(plugin.exe).parent)}
    return {"kind": "cni", "env": env, "stdin": json.dumps(plugin.conf)}


def cli(argv: list[str], netns: str, mount_ns: str | None = None) -> subprocess.CompletedProcess:
    return killed_at({"run": {"kind": "cli", "argv": argv}}, netns, mount_ns)


def gc(plugin) -> list[str]:
    c = plugin.conf
    return ["gc", "--state-dir", c["stateDir"], "--run-dir", c["runDir"], "--policy", c["policyFile"], "--json"]


def policy_apply(plugin) -> list[str]:
    return ["policy", "apply", "--policy", plugin.conf["policyFile"], "--state-dir", plugin.conf["stateDir"]]


def leftovers(lab, plugin, app, ifindex: int) -> dict:
    node = lab.ns_path(lab.node)
    out: dict = {}
    if plugin.leases():
        out["leases"] = plugin.leases()
    if plugin.records():
        out["records"] = plugin.records()
    if app.host_if in node_links(node):
        out["veth"] = app.host_if
    for s in ("ifaces", "tx4", "tx6", "rx"):
        hits = [e for e in nft_set(node, s) if app.host_if in e or app.v4 in e or app.v6 in e
                or (s == "rx" and f'"val": {ifindex}' in e)]
        if hits:
            out[f"set {s}"] = hits
    extra = in_netns(node, lambda: segment_meter.count(ifindex))
    if extra:
        out["meter count"] = extra
    billing = plugin.state_dir / "billing"
    temps = [p.name for p in billing.iterdir() if p.name.endswith(".tmp")] if billing.is_dir() else []
    if temps:
        out["billing temps"] = temps
    return out


def billed(plugin, cid: str) -> tuple[list[dict], tuple[int, int]]:
    recs = [r for r in Ledger(plugin.state_dir / "billing").records() if r["container_id"] == cid]
    return recs, (sum(r["tx_packets"] for r in recs), sum(r["tx_bytes"] for r in recs))


def summary(recs: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ("seq", "tx_packets", "tx_bytes", "final", "counter_reset", "counters_missing",
                                   "counters_decreased")} for r in recs]


def sent(lab, far, ns: str, nbytes: int) -> tuple[int, int]:
    """(packets, bytes) that reached the far end of a TCP exchange in 88-byte segments."""
    before = far.counters()["billed"]
    assert atk.run(lab, ns, "small-mss", addrs("v4").billed, 9000, 88, nbytes)["echoed"] >= nbytes
    after = far.counters()["billed"]
    return after[0] - before[0], after[1] - before[1]


# --- a DEL killed at each of its steps -----------------------------------------------------

DEL_STEPS = {
    "after-veth-deleted": ("runtime.kernel.netns:NetlinkLinks.retire_link", "after"),
    "after-final-record": ("runtime.core.attach:final_record", "after"),
    "after-elements-removed": ("runtime.kernel.nft:_remove_elements", "after"),
    "after-meter-forgotten": ("runtime.kernel.nft:remove", "after"),
    "after-leases-released": ("runtime.state.ipam:LeaseStore.release_owner", "after"),
    "after-record-deleted": ("runtime.state.store:AttachmentStore.delete", "after"),
}


@pytest.mark.parametrize("follow", ["del", "gc"])
@pytest.mark.parametrize("step", list(DEL_STEPS))
def test_a_del_killed_at_any_step_bills_once_and_leaves_nothing(lab, plugin, tenant, far, step, follow):
    """After the runtime's DEL again, or `sockgate gc` and the agent's next flush."""
    node = lab.ns_path(lab.node)
    app = tenant("sender")
    ifindex = in_netns(node, lambda: socket.if_nametoindex(app.host_if))
    first = sent(lab, far, app.ns, 200_000)
    assert in_netns(node, lambda: flush(plugin.state_dir))  # a periodic record first
    second = sent(lab, far, app.ns, 100_000)
    target, when = DEL_STEPS[step]
    assert_killed(killed_at({"patches": [{"target": target, "when": when}],
                             "run": cni(plugin, "DEL", app.cid, app.ns)}, node))
    in_netns(node, lambda: flush(plugin.state_dir))  # the agent's next flush, before the follow-up
    if follow == "del":
        plugin.delete(app.cid, app.ns)
    else:
        r = cli(gc(plugin), node)
        assert r.returncode == 0, r.stderr
        in_netns(node, lambda: flush(plugin.state_dir))  # closes a key whose record is gone
    recs, total = billed(plugin, app.cid)
    report = {"records": summary(recs), "left": leftovers(lab, plugin, app, ifindex)}
    assert total == (first[0] + second[0], first[1] + second[1]), report
    assert [r["final"] for r in recs].count(True) == 1 and recs[-1]["final"], report
    assert report["left"] == {}, report


@pytest.mark.parametrize("reload_by", ["add", "policy-apply"])
def test_a_del_killed_after_its_final_record_bills_nothing_twice_under_a_new_meter(lab, plugin, tenant, far,
                                                                                   reload_by):
    """The killed DEL's elements stay, their veth gone; a new meter (the old one's pins
    removed: an operator, or the bpffs of the agent's pod gone with the pod) takes the
    old one's part of their counters with it. Before review 10, billing took the drop
    for a new element and billed the whole nft part again (+60 % of the bytes), and the
    retried DEL wrote a second final record."""
    node = lab.ns_path(lab.node)
    app = tenant("sender")
    wire = sent(lab, far, app.ns, 200_000)
    assert_killed(killed_at({"patches": [{"target": "runtime.core.attach:final_record", "when": "after"}],
                             "run": cni(plugin, "DEL", app.cid, app.ns)}, node))
    old = in_netns(node, segment_meter.current_id)
    assert in_netns(node, segment_meter.remove)
    if reload_by == "add":
        tenant("other")
    else:
        r = cli(policy_apply(plugin), node)
        assert r.returncode == 0, r.stderr
    assert in_netns(node, segment_meter.current_id) not in (0, old)
    in_netns(node, lambda: flush(plugin.state_dir))  # the agent's flush
    plugin.delete(app.cid, app.ns)  # the runtime's retry
    recs, total = billed(plugin, app.cid)
    assert total == wire and [r["final"] for r in recs].count(True) == 1, summary(recs)


# --- a reload killed before its last steps -------------------------------------------------

@pytest.mark.parametrize("dest", ["public", "internal"])
def test_a_reload_killed_before_it_ended_the_flows_opened_without_a_table_ends_them_at_the_next(lab, plugin, app,
                                                                                               far, dest):
    """A flow a container opened while the table was missing went out unfiltered and
    unmasqueraded; the reload ends it. Killed after the load and before that, the
    table was current already, and nothing ever ended it: the container's own address
    kept reaching the internet, and a blocked private host kept answering (review 10).
    Now the table counts as loaded only once the flows are ended: the next ADD loads it
    again and ends them. (`far` hosts the private address.)"""
    node = lab.ns_path(lab.node)
    ns = app()
    own = plugin.add("escape", ns)["ips"][0]["address"].split("/")[0]
    atk.forget_flows(lab, own)
    # Something else keeps conntrack on in the node (its hooks go with sockgate's table).
    lab.run(lab.node, ["nft", "-f", "-"], input="table inet sgtest_ct {\n chain c {\n"
            "  type filter hook prerouting priority 0;\n  ct state new counter\n }\n}\n")
    holder = None
    reloader, following = app(), app()
    try:
        lab.run(lab.node, ["nft", "delete", "table", "inet", "sockgate"])
        holder = Holder(lab, ns, LAB.public_v4 if dest == "public" else addrs("v4").internal, 9000)
        first = holder.exchange("in the window")
        assert first["reply"] and first["reply"]["peer"] == own, first  # unmasqueraded, unfiltered
        assert_killed(killed_at({"patches": [{"target": "runtime.core.restore:end_escaped_flows", "when": "before"}],
                                 "run": cni(plugin, "ADD", "reloader", reloader)}, node))
        plugin.delete("reloader", reloader)  # the runtime's DEL of the failed ADD
        plugin.add("next", following)
        again = holder.exchange("after the reload")
        # Ended: the next packet opens a new flow, masqueraded (public) or refused (internal).
        assert (again["reply"] or {}).get("peer") != own, again
        if dest == "internal":
            assert not again["reply"], again
    finally:
        if holder is not None:
            holder.close()
        lab.run(lab.node, ["nft", "delete", "table", "inet", "sgtest_ct"], check=False)
        atk.forget_flows(lab, own)


def test_a_reload_without_a_meter_killed_before_the_offloads_went_off_turns_them_off_at_the_next(lab, plugin, app,
                                                                                                 no_bpffs, far):
    """A process that can't see the meter loads the table recording none, and turns off
    TCP's offload in every container attached along the meter. Killed in between, the
    table was current, nothing turned it off, and the first container's super-packets
    were billed once each (2,583 packets and 40 % of the bytes unbilled, review 10)."""
    node = lab.ns_path(lab.node)
    metered = app()
    plugin.add("metered", metered)
    assert "tx-tcp-segmentation" in _offloads(lab, metered)
    unmetered, following = app(), app()  # before the mount namespace: it sees the netns pins made before it
    mnt = no_bpffs()
    assert_killed(killed_at({"patches": [{"target": "runtime.core.restore:stop_tcp_offload", "when": "before"}],
                             "run": cni(plugin, "ADD", "unmetered", unmetered)}, node, mnt))
    assert plugin("DEL", "unmetered", unmetered, mount_ns=mnt).rc == 0
    plugin.add("next", following, mount_ns=mnt)  # the next ADD, from the same view
    assert _offloads(lab, metered) == []
    wire = sent(lab, far, metered, 200_000)
    assert plugin("DEL", "metered", metered, mount_ns=mnt).rc == 0
    recs, total = billed(plugin, "metered")
    assert total == wire, summary(recs)


# --- `sockgate teardown` killed, then run again (what a rerun of --uninstall does) -----------

@pytest.fixture
def private_run():
    """A mount namespace where /run/sockgate is a private tmpfs: the meter's bpffs the
    test mounts at /run/sockgate/bpf is seen and unmounted there only (the lab's own, in
    the host's view, is never touched)."""
    existed = Path("/run/sockgate").is_dir()
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               "mkdir -p /run/sockgate && (umount /run/sockgate/bpf 2>/dev/null; true) && "
                               "mount -t tmpfs -o mode=0755 none /run/sockgate && "
                               "echo ready && exec sleep 900"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()
        if not existed:
            try:
                os.rmdir("/run/sockgate")
            except OSError:
                pass


def _bpffs_mounted(pid: int) -> bool:
    return any(len(p) > 8 and p[4] == "/run/sockgate/bpf" and p[p.index("-") + 1] == "bpf"
               for p in (line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()))


def _in_view(lab, mnt: str, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--mount={mnt}", f"--net={lab.ns_path(lab.node)}", sys.executable, "-c", code],
                          capture_output=True, text=True, cwd=str(ROOT), env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _clean_view(lab, mnt: str) -> None:
    """Whatever a test left in that view: the meter's pins, the table, the bpffs."""
    _in_view(lab, mnt, "from runtime.kernel import segment_meter as m, nft\n"
                       "for d in m.pinned_anywhere():\n"
                       "    [p.unlink() for p in d.iterdir()]; d.rmdir()\n"
                       "nft.delete_table(); m.unmount_if_unused()")


def _meter_state(lab, mnt: str) -> dict:
    r = _in_view(lab, mnt, "import json; from runtime.kernel import segment_meter as m, nft\n"
                           "print(json.dumps({'pins': [str(d) for d in m.pinned_anywhere()], "
                           "'table': nft.table_exists()}))")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


_UNPIN_CUT_SHORT = ("from runtime.kernel import segment_meter as sm\n"
                    "real = sm._unpin\n"
                    "def _unpin(d):\n"
                    "    if d.is_dir() and (d / 'map').exists():\n"
                    "        (d / 'map').unlink()\n"
                    "        die('in segment_meter._unpin, after the map pin, before the links')\n"
                    "    real(d)\n"
                    "sm._unpin = _unpin\n")
TEARDOWN_MOMENTS = {
    "in-unpin-after-map": {"prelude": _UNPIN_CUT_SHORT},
    "after-meter-removed": {"patches": [{"target": "runtime.kernel.segment_meter:remove", "when": "after"}]},
    "after-table-deleted": {"patches": [{"target": "runtime.kernel.nft:delete_table", "when": "after"}]},
}


@pytest.mark.parametrize("moment", list(TEARDOWN_MOMENTS))
def test_a_teardown_killed_is_finished_by_the_next(lab, plugin, private_run, moment):
    """Review 10: killed inside the meter's removal (its map pin gone, its links still
    pinned), every rerun refused ("pins under no pin root in view") and left the table
    and four BPF hooks; killed after the table went, the rerun said "nothing to remove"
    and left sockgate's bpffs mounted."""
    node = lab.ns_path(lab.node)
    mnt = f"/proc/{private_run}/ns/mnt"
    in_netns(node, segment_meter.remove)  # no meter in the host's view, no table: the view's own only
    lab.run(lab.node, ["nft", "delete", "table", "inet", "sockgate"], check=False)
    assert cli(policy_apply(plugin), node, mnt).returncode == 0
    state = _meter_state(lab, mnt)
    assert state["pins"] and state["table"] and _bpffs_mounted(private_run), state
    args = ["teardown", "--state-dir", plugin.conf["stateDir"], "--run-dir", plugin.conf["runDir"]]
    try:
        assert_killed(killed_at(dict(TEARDOWN_MOMENTS[moment], run={"kind": "cli", "argv": args}), node, mnt))
        again = cli(args, node, mnt)
        assert again.returncode == 0, again.stdout + again.stderr
        state = _meter_state(lab, mnt)
        assert not state["table"] and not state["pins"] and not _bpffs_mounted(private_run), (again.stdout, state)
    finally:  # whatever is left in that view: the meter's pins, the table, the bpffs
        _clean_view(lab, mnt)


# --- the agent killed after a DEL answered, before its reaper deleted the veth ----------------

_REAPER_KILLED = ("import time, runtime.kernel.netns as n\n"
                  "def delete_link(ifname):\n"
                  "    time.sleep(1.5)  # the DEL has answered by now\n"
                  "    die('reaper, before delete_link ' + ifname)\n"
                  "n.delete_link = delete_link\n")


def test_a_veth_left_by_an_agent_killed_before_its_reaper_deleted_it_is_deleted_by_gc(lab, plugin, app, tmp_path):
    """The DEL answered 0 and removed record and leases; the veth stayed, down, marked
    under the run dir. Before review 10 `sockgate gc` left it (only a new agent's reaper
    deleted it), and teardown named it another state dir's container."""
    node = lab.ns_path(lab.node)
    c = plugin.conf
    ready = tmp_path / "agent.ready"
    spec = {"prelude": _REAPER_KILLED, "run": {"kind": "cli", "argv": [
        "agent", "--state-dir", c["stateDir"], "--run-dir", c["runDir"], "--policy", c["policyFile"],
        "--ready-file", str(ready), "--metrics-address", ""]}}
    agent = lab.popen(lab.node, [sys.executable, str(KILL_AT), json.dumps(spec)], log=tmp_path / "agent.log",
                      cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "agent.log").read_text()[-3000:]
            time.sleep(0.05)
        ns = app()
        veth = plugin.add("reaped", ns)["interfaces"][0]["name"]
        plugin.delete("reaped", ns)  # answered by the agent
        assert agent.wait(20) == -signal.SIGKILL
        assert veth in node_links(node) and not plugin.records() and not plugin.leases()
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    r = cli(gc(plugin), node)
    assert r.returncode == 0 and json.loads(r.stdout)["retired_links"] == [veth], r.stdout + r.stderr
    assert veth not in node_links(node)
    assert not list((Path(c["runDir"]) / "retired").iterdir())


# --- an ADD killed, then its container gone without a DEL ------------------------------------

@pytest.mark.parametrize("step", ["after-record-written", "after-veth-created", "after-elements-added"])
def test_an_add_killed_whose_container_then_vanished_is_removed_by_gc(lab, plugin, app, step):
    """Review 10: its record stayed `adding` with both leases (and its elements), since
    the sweep left every record not ready to an ADD under way, and `sockgate gc` (the
    agent's sweep) never removed it; only a CNI GC or DEL did, which a runtime that died
    too never sends (nor containerd 1.6, ever). A record is a killed ADD's when nobody
    holds its ADD lock. Control: an ADD under way (holding it) is left alone."""
    node = lab.ns_path(lab.node)
    target = {"after-record-written": "runtime.core.attach:_reserve",
              "after-veth-created": "runtime.kernel.netns:NetlinkLinks.create_veth",
              "after-elements-added": "runtime.kernel.nft:add_if_current"}[step]
    ns = app()
    assert_killed(killed_at({"patches": [{"target": target, "when": "after"}],
                             "run": cni(plugin, "ADD", "lost", ns)}, node))
    assert plugin.records() == ["lost--eth0.json"] and plugin.leases()
    subprocess.run(["ip", "netns", "del", Path(ns).name], check=True)  # gone, and no DEL comes
    # Control: while a process holds the ADD's lock (an ADD under way), gc leaves it.
    lock = Path(plugin.conf["stateDir"]) / "networks" / plugin.conf["name"] / "adding" / "lost--eth0.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\ntime.sleep(60)",
                               str(lock)])
    try:
        deadline = time.monotonic() + 5
        while subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0:
            assert time.monotonic() < deadline, "the holder never took the lock"
            time.sleep(0.05)
        r = cli(gc(plugin), node)
        assert r.returncode == 0 and json.loads(r.stdout)["removed"] == [], r.stdout + r.stderr
        assert plugin.records() == ["lost--eth0.json"]
    finally:
        holder.kill()
        holder.wait()
    r = cli(gc(plugin), node)
    assert r.returncode == 0, r.stderr
    assert [x["container_id"] for x in json.loads(r.stdout)["removed"]] == ["lost"], r.stdout
    assert not plugin.records() and not plugin.leases() and not lock.exists()
    assert not [e for e in nft_set(node, "tx4") if "10.77." in e and "lost" in e]


def test_a_bpffs_hidden_under_a_later_mount_is_not_taken_for_the_meters(lab, plugin, private_run):
    """Seen while building the view above (review 10): a bpffs at /run/sockgate/bpf that
    a later mount over /run/sockgate hides kept its line in /proc/self/mountinfo, was
    taken for mounted, and every install failed to pin in a directory that wasn't there.
    Here the view's bpffs is mounted, then hidden by a second tmpfs: a load must mount a
    new one and install the meter in it."""
    node = lab.ns_path(lab.node)
    mnt = f"/proc/{private_run}/ns/mnt"
    in_netns(node, segment_meter.remove)
    lab.run(lab.node, ["nft", "delete", "table", "inet", "sockgate"], check=False)
    hide = subprocess.run(["nsenter", f"--mount={mnt}", "sh", "-c", "mkdir -p /run/sockgate/bpf && "
                           "mount -t bpf bpf /run/sockgate/bpf && mount -t tmpfs -o mode=0755 none /run/sockgate"],
                          capture_output=True, text=True)
    assert hide.returncode == 0, hide.stderr
    try:
        r = cli(policy_apply(plugin), node, mnt)
        assert r.returncode == 0, r.stdout + r.stderr
        state = _meter_state(lab, mnt)
        assert state["table"] and state["pins"], state
        assert "no segment meter" not in r.stderr, r.stderr
    finally:
        _clean_view(lab, mnt)
