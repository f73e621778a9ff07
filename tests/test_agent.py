"""The node agent: the shim forwards to it, the in-process path remains, shutdown is clean."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest

from netpolicy.ruleset import CONTAINER_IFGROUP
from runtime.fsutil import atomic_write_json
from runtime.lab import LAB
from runtime.lab.policy import write_lab_policy
from runtime.state.store import host_ifname
from runtime.version import version
from tests.support import dashboard
from tests.support.plugin import node_links

pytestmark = pytest.mark.lab


def in_ns(netns: str, *argv: str) -> str:
    return subprocess.run(["nsenter", f"--net={netns}", *argv], check=True, capture_output=True, text=True).stdout


def _ifgroup(netns: str, ifname: str) -> int:
    link = json.loads(in_ns(netns, "ip", "-j", "-N", "link", "show", ifname))[0]
    return int(link["group"], 0) if isinstance(link["group"], str) else link["group"]


def test_shim_forwards_to_the_agent(plugin, agent, app, lab):
    ns = app()
    res = plugin.add("via-agent", ns)
    assert plugin("CHECK", "via-agent", ns).rc == 0
    assert lab.probe(ns, "tcp", LAB.public_v4, 9000).peer_seen == LAB.node_uplink_v4
    plugin.delete("via-agent", ns)
    served = [e["msg"].split()[0] for e in agent.served()]
    assert served[:3] == ["ADD", "CHECK", "DEL"], served
    assert res["ips"][0]["address"].startswith("10.77.")
    # Errors come back through the agent with the spec's codes too.
    bad = plugin("ADD", "x", "/run/netns/sockgate-no-such-netns")
    assert bad.rc != 0 and bad.code == 3
    assert agent.served()[-1]["msg"].startswith("ADD x/eth0 rc=1")


def test_agent_serves_parallel_requests(plugin, agent, app):
    namespaces = [app() for _ in range(12)]
    with ThreadPoolExecutor(12) as pool:
        adds = list(pool.map(lambda i: plugin("ADD", f"p{i}", namespaces[i]), range(12)))
    assert all(r.rc == 0 for r in adds), [r.stdout for r in adds if r.rc]
    assert len({r.json["ips"][0]["address"] for r in adds}) == 12
    with ThreadPoolExecutor(12) as pool:
        dels = list(pool.map(lambda i: plugin("DEL", f"p{i}", namespaces[i]), range(12)))
    assert all(r.rc == 0 for r in dels)
    assert plugin.leases() == [] and plugin.records() == []
    assert len(agent.served()) == 24
    # DEL set the links down at once; the agent's reaper deletes them in the background,
    # and a SIGTERM waits until it has.
    hosts = {host_ifname(plugin.conf["name"], f"p{i}", "eth0") for i in range(12)}
    assert agent.stop(signal.SIGTERM) == 0
    assert not hosts & node_links(plugin.node_netns)


def test_links_retired_by_an_agent_killed_before_its_reaper_ran_are_deleted_by_the_next(plugin, agent, app):
    """DEL sets the link down and returns; the agent's reaper deletes it later. A kill
    -9 in between used to leave the link, down, for good: DEL had removed lease and
    record, so neither a DEL retry nor GC knew of it (found by scripts/soak)."""
    hosts: set[str] = set()
    for attempt in range(3):
        names = [f"k{attempt}-{i}" for i in range(12)]
        namespaces = [app() for _ in names]
        with ThreadPoolExecutor(12) as pool:
            assert all(r.rc == 0 for r in pool.map(lambda i: plugin("ADD", names[i], namespaces[i]), range(12)))
        hosts |= {host_ifname(plugin.conf["name"], name, "eth0") for name in names}
        # Twelve DELs at once outrun the reaper (a veth's deletion waits ~40 ms for the
        # kernel); the kill comes as soon as they returned. A race all the same: on a
        # loaded machine the reaper kept up once (CI), so it is run again then.
        with ThreadPoolExecutor(12) as pool:
            assert all(r.rc == 0 for r in pool.map(lambda i: plugin("DEL", names[i], namespaces[i]), range(12)))
        assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
        left = hosts & node_links(plugin.node_netns)
        if left:
            break
        agent.start()
    assert left, "the reaper had deleted every link before the kill, three times: nothing left to test"
    # Every link left is marked (a mark may outlive its link: deleted, then killed
    # before the unmark; the next reaper drops such marks).
    assert left <= set(os.listdir(Path(plugin.conf["runDir"]) / "retired"))
    agent.start()
    deadline = time.monotonic() + 10
    while hosts & node_links(plugin.node_netns) or os.listdir(Path(plugin.conf["runDir"]) / "retired"):
        assert time.monotonic() < deadline, f"links (or marks) retired before the kill still there: {left}"
        time.sleep(0.1)
    assert "retired by an earlier agent" in agent.log.read_text()


def test_add_into_the_netns_of_a_container_just_deleted_succeeds(plugin, agent, app):
    """DEL returns once the veth is down; the reaper deletes it (and the container's
    end) later. A runtime attaching again to the same netns and ifname meanwhile must
    not get "interface already exists"."""
    namespaces = [app() for _ in range(12)]
    with ThreadPoolExecutor(12) as pool:
        assert all(r.rc == 0 for r in pool.map(lambda i: plugin("ADD", f"q{i}", namespaces[i]), range(12)))
    ns = app()
    plugin.add("first", ns)
    # Twelve retired links ahead of first's in the reaper's queue (~40 ms each).
    with ThreadPoolExecutor(12) as pool:
        assert all(r.rc == 0 for r in pool.map(lambda i: plugin("DEL", f"q{i}", namespaces[i]), range(12)))
    plugin.delete("first", ns)
    again = plugin("ADD", "second", ns)
    assert again.rc == 0, again.stdout
    assert "deleted retired" in agent.log.read_text()
    plugin.delete("second", ns)


def test_sigterm_is_clean_and_the_shim_falls_back_in_process(plugin, agent, app):
    sock = Path(plugin.conf["runDir"]) / "agent.sock"
    assert sock.exists() and oct(sock.stat().st_mode & 0o777) == "0o600"
    assert agent.stop(signal.SIGTERM) == 0
    assert not sock.exists() and not agent.ready.exists()
    assert '"stopped"' in agent.log.read_text()
    ns = app()
    plugin.add("fallback", ns)  # no agent: same handler, in the plugin's own process
    plugin.delete("fallback", ns)


def test_killed_agent_leaves_a_stale_socket_that_nobody_trips_over(plugin, agent, app):
    assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
    sock = Path(plugin.conf["runDir"]) / "agent.sock"
    assert sock.exists()  # kill -9: nobody cleaned up
    ns = app()
    plugin.add("stale", ns)  # connection refused -> in-process
    agent.start()  # a new agent replaces the stale socket
    plugin.delete("stale", ns)
    assert agent.served()[-1]["msg"].startswith("DEL stale/eth0 rc=0")


def test_agent_reapplies_a_changed_policy_and_keeps_the_old_one_on_error(plugin, agent, app, lab, tmp_path):
    import json
    ns = app()
    plugin.add("pol", ns)
    assert lab.probe(ns, "tcp", LAB.cloud_v4, 443).ok
    policy_path = Path(plugin.conf["policyFile"])
    original = policy_path.read_text()
    try:
        doc = json.loads(original)
        policy_path.write_text(json.dumps(dict(doc, blockedRanges=[LAB.cloud_v4 + "/32"])))
        deadline = time.monotonic() + 15
        while lab.probe(ns, "tcp", LAB.cloud_v4, 443, timeout=1.0).ok:
            assert time.monotonic() < deadline, "agent did not apply the changed policy"
            time.sleep(0.3)
        policy_path.write_text('{"blockedPorts": [{"protocol": "tcp", "port": 0}]}')
        deadline = time.monotonic() + 15
        while "policy not applied" not in agent.log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert "blockedPorts[0].port" in agent.log.read_text()
        assert not lab.probe(ns, "tcp", LAB.cloud_v4, 443, timeout=1.0).ok  # the policy in force stayed
    finally:
        policy_path.write_text(original)
    deadline = time.monotonic() + 15
    while not lab.probe(ns, "tcp", LAB.cloud_v4, 443, timeout=1.0).ok:
        assert time.monotonic() < deadline
        time.sleep(0.3)


@pytest.mark.parametrize("damage", ["flushed chain", "older version", "deleted table"])
def test_agent_repairs_the_table_and_serves_adds_against_the_current_one(plugin, agent, app, lab, damage):
    """An ADD served by the agent doesn't list the table (its element transaction only
    asserts the revision); the agent checks the rules every few seconds instead."""
    ns = app()
    kept = plugin.add("keep", ns)
    keep_veth = kept["interfaces"][0]["name"]
    keep_v4, keep_v6 = (ip["address"].split("/")[0] for ip in kept["ips"])
    node = plugin.node_netns
    assert _ifgroup(node, keep_veth) == CONTAINER_IFGROUP
    if damage == "flushed chain":
        # Same revision element, no rules: only the agent's periodic check sees it.
        in_ns(node, "nft", "flush", "chain", "inet", "sockgate", "forward")
        deadline = time.monotonic() + 10
        while "jump from_container" not in in_ns(node, "nft", "list", "chain", "inet", "sockgate", "forward"):
            assert time.monotonic() < deadline, "the agent did not reload a flushed chain"
            time.sleep(0.2)
    elif damage == "older version":
        # A veth as that version made it: outside the container interface group, with
        # ARP/ND between its ends and a MAC of the container's own. (First: the agent
        # reloads the table as soon as nf_tables announces the damage below.)
        in_ns(node, "ip", "link", "set", keep_veth, "group", "0")
        in_ns(node, "ip", "link", "set", keep_veth, "arp", "on")
        in_ns(ns, "ip", "link", "set", "eth0", "arp", "on")
        in_ns(ns, "ip", "link", "set", "eth0", "address", "02:00:5e:10:00:01")
        # ... with its node end at the container's MTU and routes that don't carry one,
        in_ns(node, "ip", "link", "set", keep_veth, "mtu", "1500")
        in_ns(node, "ip", "route", "replace", f"{keep_v4}/32", "dev", keep_veth, "scope", "link")
        in_ns(node, "ip", "-6", "route", "replace", f"{keep_v6}/128", "dev", keep_veth)
        # ... with segmentation offload on, and a record that says nothing of it.
        in_ns(ns, "ethtool", "-K", "eth0", "tso", "on", "tx-udp-segmentation", "on")
        record = plugin.state_dir / "networks" / plugin.conf["name"] / "attachments" / "keep--eth0.json"
        atomic_write_json(record, {k: v for k, v in json.loads(record.read_text()).items()
                                   if k != "segmentation_off"}, durable=False)
        # Other rules and another revision: the next ADD's transaction fails its
        # assertion and the agent reloads the table before adding.
        in_ns(node, "nft", "flush", "set", "inet", "sockgate", "revision")
        in_ns(node, "nft", "add", "element", "inet", "sockgate", "revision", "{", "0x1", "}")
        in_ns(node, "nft", "flush", "chain", "inet", "sockgate", "forward")
    else:
        in_ns(node, "nft", "delete", "table", "inet", "sockgate")
    ns2 = app()
    plugin.add("after", ns2)
    assert "jump from_container" in in_ns(node, "nft", "list", "chain", "inet", "sockgate", "forward")
    # The sandbox holds for the new container: Google ranges refused, the internet not.
    assert not lab.probe(ns2, "tcp", LAB.google_v4, 443, timeout=1.0).ok
    assert lab.probe(ns2, "tcp", LAB.public_v4, 9000).ok
    # The reload put back the elements of the container attached before the damage.
    assert plugin("CHECK", "keep", ns).rc == 0
    assert lab.probe(ns, "tcp", LAB.public_v4, 9000).ok
    # v6 too: the node's end stopped resolving neighbours (the rules now drop the
    # container's ND) only after it had a permanent entry for the container.
    assert lab.probe(ns, "tcp", LAB.public_v6, 9000).ok
    assert _ifgroup(node, keep_veth) == CONTAINER_IFGROUP
    assert "NOARP" in json.loads(in_ns(node, "ip", "-j", "link", "show", keep_veth))[0]["flags"]
    # Its node end is 4 bytes narrower than the container's again, and the routes to
    # the container carry the container's MTU, locked.
    assert json.loads(in_ns(node, "ip", "-j", "link", "show", keep_veth))[0]["mtu"] == 1496
    assert "mtu lock 1500" in in_ns(node, "ip", "route", "show", f"{keep_v4}/32")
    assert "mtu lock 1500" in in_ns(node, "ip", "-6", "route", "show", f"{keep_v6}/128")
    # And the container's kernel cuts its packets itself again (billing), recorded: all
    # but TCP's, which the node's segment meter counts.
    offloads = in_ns(ns, "ethtool", "-k", "eth0")
    assert not [ln for ln in offloads.splitlines() if "segmentation: on" in ln and "tx-tcp" not in ln], offloads
    record = plugin.state_dir / "networks" / plugin.conf["name"] / "attachments" / "keep--eth0.json"
    assert json.loads(record.read_text())["segmentation_off"] is True
    plugin.delete("after", ns2)
    plugin.delete("keep", ns)


def test_agent_repairs_a_flushed_ruleset_when_nftables_announces_it(plugin, lab, app, tmp_path):
    """`nft flush ruleset` leaves containers unfiltered and unmasqueraded until the
    table is back: the agent hears of it from nf_tables' notifications, not only from
    its periodic check (here set to an hour, so only a notification can explain the
    repair)."""
    from tests.conftest import AgentProcess
    agent = AgentProcess(lab, plugin, tmp_path, ("--table-check-interval", "3600")).start()
    try:
        ns = app()
        plugin.add("flushed", ns)
        node = plugin.node_netns
        in_ns(node, "nft", "flush", "ruleset")
        deadline = time.monotonic() + 10
        while "jump from_container" not in in_ns(node, "nft", "list", "ruleset"):
            assert time.monotonic() < deadline, "the agent did not notice the flushed ruleset"
            time.sleep(0.1)
        # Back with the container's elements: it passes CHECK and its sandbox holds.
        assert plugin("CHECK", "flushed", ns).rc == 0
        assert lab.probe(ns, "tcp", LAB.public_v4, 9000).ok
        assert not lab.probe(ns, "tcp", LAB.google_v4, 443, timeout=1.0).ok
        plugin.delete("flushed", ns)
    finally:
        agent.stop()


def test_metrics_on_loopback(plugin, agent, app, lab):
    import sys
    ns = app()
    plugin.add("metered", ns, cni_args="IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0")
    assert lab.probe(ns, "tcp", LAB.public_v4, 9000, payload=b"x" * 1000).ok
    assert not lab.probe(ns, "tcp", LAB.google_v4, 443, timeout=1.0).ok
    scrape = lab.run(lab.node, [sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                                "'http://127.0.0.1:9464/metrics', timeout=5).read().decode())"]).stdout
    tx = [line for line in scrape.splitlines() if line.startswith("sockgate_tx_bytes_total{")
          and 'container_id="metered"' in line]
    assert tx and 'pod_name="web-0"' in tx[0] and float(tx[0].split()[-1]) > 1000
    drops = {line.split('"')[1]: float(line.split()[-1]) for line in scrape.splitlines()
             if line.startswith("sockgate_policy_drops_total{")}
    assert drops.get("blocked-range", 0) >= 1
    assert "sockgate_attachments 1.0" in scrape and "sockgate_agent_up 1.0" in scrape
    assert 'sockgate_cni_requests_total{command="ADD",result="ok"} 1.0' in scrape
    assert 'sockgate_cni_request_duration_seconds_count{command="ADD"} 1.0' in scrape
    assert f'sockgate_build_info{{version="{version()}"}} 1.0' in scrape
    # The dashboard asks only for what this agent exports, labels included (the
    # drop counters here come from the kernel, with their reason).
    assert dashboard.problems(dashboard.load(), dashboard.exported(scrape)) == []
    # Loopback only: the node's uplink address does not answer.
    outside = lab.run(lab.internet, [sys.executable, "-c", "import urllib.request; urllib.request.urlopen("
                                     f"'http://{LAB.node_uplink_v4}:9464/metrics', timeout=2)"], check=False)
    assert outside.returncode != 0


def test_agent_says_whether_the_conntrack_table_holds_every_container_at_its_bound(plugin, lab, app, tmp_path):
    """At start the agent logs how many containers fit in the conntrack table at their
    bound; once more are attached, it warns with the value to set."""
    from runtime.lab.policy import write_lab_policy
    from tests.conftest import AgentProcess
    # A bound so large that not even one container fits in this table.
    policy = write_lab_policy(tmp_path / "big.json", limits={"maxFlows": 1_000_000})
    plugin.conf = dict(plugin.conf, policyFile=str(policy))
    agent = AgentProcess(lab, plugin, tmp_path).start()
    try:
        # The start line: once the agent's first table load has loaded conntrack here.
        deadline = time.monotonic() + 20
        while '"conntrack: ' not in agent.log.read_text():
            assert time.monotonic() < deadline, f"no conntrack budget line at start: {agent.log.read_text()}"
            time.sleep(0.2)
        table_max = int(lab.run(lab.node, ["cat", "/proc/sys/net/netfilter/nf_conntrack_max"]).stdout)
        ns = app()
        plugin.add("big", ns)
        deadline = time.monotonic() + 20
        while "conntrack table too small" not in agent.log.read_text():
            assert time.monotonic() < deadline, "no conntrack budget warning"
            time.sleep(0.5)
        lines = [json.loads(line)["msg"] for line in agent.log.read_text().splitlines() if line.startswith("{")]
        start = next(m for m in lines if m.startswith("conntrack: "))
        assert f"nf_conntrack_max is {table_max}" in start and "holds 0 containers" in start and "0 attached" in start
        warning = next(m for m in lines if m.startswith("conntrack table too small"))
        assert "1 attached" in warning and "set net.netfilter.nf_conntrack_max to at least " in warning
        plugin.delete("big", ns)
    finally:
        agent.stop()


# --- stopping while DNS is down; clients that hang up ---------------------------------

# TEST-NET-1: no lab server has it, and _dns_dropped makes the internet netns discard
# what is sent there, without the ICMP error that could end a lookup early.
DEAF_DNS = "192.0.2.53"
# SIGTERM must stop the agent within 1 s; the margin covers the interpreter's exit and
# a busy 2-core machine (others run tests concurrently), not a lookup's timeout (5 s).
STOP_BOUND_S = 1.0
STOP_MARGIN_S = 0.5


@contextmanager
def _dns_dropped(lab, addr: str) -> Iterator[None]:
    table = f"sgtest_deaf_dns_{os.getpid()}"
    lab.run(lab.internet, ["nft", "-f", "-"],
            input=f"table ip {table} {{\n chain pre {{\n type filter hook prerouting priority -300\n"
                  f" ip daddr {addr} drop\n }}\n}}\n")
    try:
        yield
    finally:
        lab.run(lab.internet, ["nft", "delete", "table", "ip", table], check=False)


def _log_entries(log: Path) -> list[dict]:
    """Every line of the agent's stdout+stderr, parsed: a line that isn't JSON (a
    traceback, a stray print) fails the test here."""
    entries = []
    for line in log.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"agent wrote a line that is not JSON: {line!r}\n{log.read_text()[-3000:]}")
    return entries


def _when(entry: dict) -> datetime:
    return datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")


def _wait_for_log(agent, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in agent.log.read_text():
        assert agent.proc.poll() is None, agent.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in the agent's log: {agent.log.read_text()[-3000:]}"
        time.sleep(0.05)


class _Vanishing(threading.Thread):
    """Watches the ready file and the socket (1 ms polls) until both are gone: when
    each went, and whether the socket was ever gone while the ready file was not."""

    def __init__(self, ready: Path, sock: Path) -> None:
        super().__init__(daemon=True)
        self.ready, self.sock = ready, sock
        self.gone: dict[str, float] = {}
        self.socket_first = False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set() and len(self.gone) < 2:
            # The socket first: a ready file seen after a missing socket was there when
            # the socket was missing (it never comes back).
            sock = self.sock.exists()
            ready = self.ready.exists()
            now = time.monotonic()
            if not ready:
                self.gone.setdefault("ready", now)
            if not sock:
                self.gone.setdefault("socket", now)
                self.socket_first |= ready
            time.sleep(0.001)


def test_sigterm_stops_within_a_second_while_dns_does_not_answer(plugin, lab, tmp_path):
    """Lookups of the exception hostnames hang (a resolver that drops every query,
    5 s per try) and a client is connected without sending its request: SIGTERM still
    stops the agent within a second, and the ready file goes before the socket."""
    from tests.conftest import AgentProcess
    policy = write_lab_policy(tmp_path / "deaf.json",
                              resolver={"nameservers": [DEAF_DNS], "minTtl": 1, "timeout": 5})
    plugin.conf = dict(plugin.conf, policyFile=str(policy))
    with _dns_dropped(lab, DEAF_DNS):
        agent = AgentProcess(lab, plugin, tmp_path).start()
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _wait_for_log(agent, "policy applied", 20)
            time.sleep(0.5)
            # The lookups are under way and none has timed out yet.
            assert "failed" not in agent.log.read_text(), agent.log.read_text()[-3000:]
            sock = Path(plugin.conf["runDir"]) / "agent.sock"
            silent.connect(str(sock))
            watch = _Vanishing(agent.ready, sock)
            watch.start()
            signalled = time.monotonic()
            agent.proc.send_signal(signal.SIGTERM)
            rc = agent.proc.wait(30)
            took = time.monotonic() - signalled
            watch.done.set()
            watch.join(5)
        finally:
            silent.close()
            agent.stop(signal.SIGKILL)
    print(f"SIGTERM to exit: {took:.3f} s")
    assert rc == 0, agent.log.read_text()[-3000:]
    assert took < STOP_BOUND_S + STOP_MARGIN_S, f"SIGTERM took {took:.2f} s: {agent.log.read_text()[-3000:]}"
    assert not agent.ready.exists() and not sock.exists()
    assert set(watch.gone) == {"ready", "socket"} and watch.gone["ready"] <= watch.gone["socket"]
    assert not watch.socket_first, "the socket was gone while the ready file still said ready"
    entries = _log_entries(agent.log)
    msgs = [e["msg"] for e in entries]
    # The agent's own account: from the signal to the last line within the bound.
    down = next(e for e in entries if e["msg"].startswith("shutting down"))
    stopped = next(e for e in entries if e["msg"].startswith("stopped"))
    assert (_when(stopped) - _when(down)).total_seconds() < STOP_BOUND_S, msgs
    assert any("no request" in m and "shutting down" in m for m in msgs), msgs


def _hang_up_after(lab, sock: Path, request: bytes) -> None:
    """A client process sends `request` (without closing its side, so the agent waits
    for the rest) and is killed before it reads an answer."""
    script = ("import socket, sys, time\n"
              "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
              f"s.connect({str(sock)!r})\n"
              "s.sendall(sys.stdin.buffer.read())\n"
              "print('sent', flush=True)\n"
              "time.sleep(60)\n")
    client = lab.popen(lab.node, [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        client.stdin.write(request)
        client.stdin.close()
        assert client.stdout.readline() == b"sent\n"
    finally:
        client.kill()
        client.wait(10)


def _scrape(lab) -> str:
    return lab.run(lab.node, [sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                              "'http://127.0.0.1:9464/metrics', timeout=5).read().decode())"]).stdout


def test_a_client_killed_mid_request_is_logged_and_counted_without_a_traceback(plugin, agent, app, lab):
    from runtime import wire
    sock = Path(plugin.conf["runDir"]) / "agent.sock"
    ns = app()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "gone", "CNI_NETNS": ns, "CNI_IFNAME": "eth0",
           "CNI_ARGS": "IgnoreUnknown=1", "CNI_PATH": str(Path(plugin.exe).parent)}
    full = wire.encode_request(env, json.dumps(plugin.conf).encode())
    # Killed mid-send: the agent gets a truncated request, and nobody to answer.
    _hang_up_after(lab, sock, full[:30])
    # Killed after sending: the ADD is done, its answer has nowhere to go.
    _hang_up_after(lab, sock, full)
    deadline = time.monotonic() + 20
    while len([e for e in agent.served() if "not delivered" in e["msg"]]) < 2:
        assert time.monotonic() < deadline, agent.log.read_text()[-3000:]
        time.sleep(0.1)
    lost = [e for e in agent.served() if "not delivered" in e["msg"]]
    assert lost[0]["msg"].startswith("malformed request") and " rc=1 " in lost[0]["msg"], lost
    assert lost[1]["msg"].startswith("ADD gone/eth0 rc=0 "), lost
    assert all(e["level"] == "warning" for e in lost)
    # The ADD happened: the runtime that hung up will DEL it, as here.
    assert plugin("CHECK", "gone", ns).rc == 0
    plugin.delete("gone", ns)
    scrape = _scrape(lab)
    assert 'sockgate_cni_requests_total{command="ADD",result="client_gone"} 1.0' in scrape, scrape
    assert 'sockgate_cni_requests_total{command="other",result="client_gone"} 1.0' in scrape, scrape
    assert 'sockgate_cni_requests_total{command="DEL",result="ok"} 1.0' in scrape, scrape
    entries = _log_entries(agent.log)
    assert not any("Traceback" in json.dumps(e) for e in entries), entries


def test_the_plugin_answers_in_process_when_the_agent_socket_path_is_unusable(plugin, app, tmp_path):
    """A runDir too long for a unix socket's address: connecting fails before anything
    was sent, so the request runs in-process, and the output is the result, never a
    traceback."""
    conf = dict(plugin.conf, runDir=str(tmp_path / ("r" * 120)))
    ns = app()
    add = plugin("ADD", "longrun", ns, conf=conf)
    assert add.rc == 0, add.stdout + add.stderr
    assert add.json["ips"] and "Traceback" not in add.stdout + add.stderr
    gone = plugin("DEL", "longrun", ns, conf=conf)
    assert gone.rc == 0 and gone.stdout.strip() == "" and "Traceback" not in gone.stderr


def test_requests_queued_at_sigterm_are_answered(plugin, agent):
    """Clients that connected before the socket went away get their answer, also those
    the agent had not accepted yet when SIGTERM came (else: a reset, code 11, a retry)."""
    from runtime import wire
    sock = Path(plugin.conf["runDir"]) / "agent.sock"
    request = wire.encode_request({"CNI_COMMAND": "VERSION", "CNI_CONTAINERID": "", "CNI_IFNAME": ""},
                                  json.dumps(plugin.conf).encode())
    clients: list[socket.socket] = []
    try:
        for n in range(60):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect(str(sock))
            except FileNotFoundError:  # the stop removed the socket: the shim would run in-process
                client.close()
                break
            clients.append(client)
            client.sendall(request)
            client.shutdown(socket.SHUT_WR)
            if n == 20:
                agent.proc.send_signal(signal.SIGTERM)
        answers = []
        for client in clients:
            client.settimeout(20)
            data = b""
            try:
                while chunk := client.recv(65536):
                    data += chunk
            except OSError as exc:
                data = f"{type(exc).__name__}".encode()
            answers.append(data)
    finally:
        for client in clients:
            client.close()
    assert agent.proc.wait(30) == 0
    assert len(clients) > 20
    unanswered = [a[:80] for a in answers if not a.startswith(b"0\n") or b"supportedVersions" not in a]
    assert not unanswered, unanswered
    assert len([e for e in agent.served() if e["msg"].startswith("VERSION")]) == len(clients)


# --- a start that fails ------------------------------------------------------------------

@pytest.mark.parametrize("why,extra", [
    # A component that can't be made (BillingFlusher refuses a negative interval).
    ("component", ("--billing-interval", "-1")),
    # A ready file it can't write, after its components started.
    ("ready file", ()),
])
def test_a_start_that_fails_exits_and_leaves_no_socket(plugin, lab, tmp_path, why, extra) -> None:
    """Not a process that neither serves nor exits: runtimes would wait on its socket,
    and SIGTERM (whose handler only sets a flag) would not end it."""
    from runtime.lab.agent import LabAgent
    c = plugin.conf
    agent = LabAgent(lab, c["stateDir"], c["runDir"], c["policyFile"], tmp_path, extra)
    if why == "ready file":
        agent.ready = tmp_path / "no-such-dir" / "agent.ready"
    agent.proc = lab.popen(lab.node, [sys.executable, "-m", "runtime.cli.main", "agent", "--state-dir",
                                      c["stateDir"], "--run-dir", c["runDir"], "--policy", c["policyFile"],
                                      "--ready-file", str(agent.ready), "--metrics-address", "", *extra],
                           log=agent.log)
    try:
        rc = agent.proc.wait(20)
    finally:
        agent.kill()
    assert rc != 0, agent.log_text()
    assert "start failed" in agent.log_text()
    assert not (Path(c["runDir"]) / "agent.sock").exists()
