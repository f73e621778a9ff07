"""The node agent: the shim forwards to it, the in-process path remains, shutdown is clean."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from netpolicy.ruleset import CONTAINER_IFGROUP
from runtime.lab import LAB
from runtime.store import host_ifname
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
    keep_veth = plugin.add("keep", ns)["interfaces"][0]["name"]
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
