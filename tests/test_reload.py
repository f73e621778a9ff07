"""A table reload on a busy node: `nft flush ruleset` while ADDs and DELs run. The
agent loads the table again with every ready attachment's elements in the same
transaction; ADD and DEL can't slip between (runtime.state.store.table_lock). Billing stays
exact across the reload, also for a counter that climbs past its last billed value
before the next flush: its elements are of a new generation, so it counts from zero."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest

from tests.conftest import AgentProcess
from tests.test_billing import attach, billed, cli_flush, counted, internet_table, named_counters, total, traffic

pytestmark = pytest.mark.lab
__all__ = ["counted"]  # the fixture, shared with tests/test_billing.py


def _counted_comments(lab) -> set[str]:
    out = set()
    for set_name in ("tx4", "tx6", "rx"):
        listing = json.loads(lab.run(lab.node, ["nft", "-j", "list", "set", "inet", "sockgate", set_name]).stdout)
        for item in listing["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                out.add(elem["elem"]["comment"].split()[0])
    return out


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_flush_during_churn_restores_every_attachment_and_bills_exactly(lab, plugin, app, counted, tmp_path):
    agent = AgentProcess(lab, plugin, tmp_path, ("--metrics-address", "", "--billing-interval", "3600")).start()
    try:
        counted(lab.internet, internet_table(["a"]))
        # Two containers alive across the flushes, with adjacent addresses: a reload
        # restores both in one transaction (their addresses merge in the pool sets).
        a, b = attach(plugin, app, ["a", "b"])
        traffic(lab, a)
        cli_flush(lab, plugin)      # billed up to here; a sends nothing until the flushes are over

        # Churn: ADD then DEL of fresh containers, two at a time, while the ruleset is
        # flushed three times.
        stop, calls, lock = threading.Event(), [], threading.Lock()
        namespaces = [app() for _ in range(8)]

        def churn(worker: int) -> None:
            n = 0
            while not stop.is_set():
                ns, cid = namespaces[worker * 4 + n % 4], f"churn-{worker}-{n}"
                add = plugin("ADD", cid, ns)
                delete = plugin("DEL", cid, ns)
                with lock:
                    calls.append((cid, add.rc, add.stdout, delete.rc, delete.stdout))
                n += 1
        workers = [threading.Thread(target=churn, args=(w,)) for w in range(2)]
        for w in workers:
            w.start()
        try:
            for _ in range(3):
                time.sleep(0.4)
                lab.run(lab.node, ["nft", "flush", "ruleset"])
            time.sleep(0.4)
        finally:
            stop.set()
            for w in workers:
                w.join(60)
        assert len(calls) >= 6, calls
        failed = [c for c in calls if c[1] != 0 or c[3] != 0]
        assert not failed, failed

        # The containers alive across the flushes have their elements and traffic back.
        for c in (a, b):
            _wait(lambda: plugin("CHECK", c.cid, c.ns).rc == 0, 10, f"{c.cid}'s elements were not restored")
        assert _counted_comments(lab) == {a.host, b.host}, "elements of a deleted container were left (or restored)"
        agent_log = agent.log.read_text()
        # a and b, and churn containers that were ready at that moment.
        restored = [int(n) for n in re.findall(r"was loaded with the elements of (\d+) attachment", agent_log)]
        assert restored and max(restored) >= 2, agent_log[-2000:]
        assert "cannot reload" not in agent_log, agent_log[-2000:]

        # Twice the traffic billed before the flush: the new counter climbs past the
        # last billed value. It is a new one all the same.
        traffic(lab, a)
        traffic(lab, a)
        cli_flush(lab, plugin)
        time.sleep(0.3)
        plugin.delete(a.cid, a.ns)
        plugin.delete(b.cid, b.ns)
        recs = billed(plugin.state_dir / "billing")[a.cid]
        assert len(recs) == 3 and recs[1].get("counter_reset") and recs[1]["tx_bytes"] == recs[1]["counter_tx_bytes"]
        assert recs[0]["counter_generation"] != recs[1]["counter_generation"]
        assert recs[1]["counter_tx_bytes"] > recs[0]["counter_tx_bytes"]
        far = named_counters(lab, lab.internet, "sgtest_bill")
        assert (total(recs, "tx_packets"), total(recs, "tx_bytes")) == far["a_tx"]
        assert plugin.records() == []
    finally:
        agent.stop()


def test_final_record_of_an_attachment_whose_elements_never_came_back(lab, plugin, app, tmp_path):
    """Without an agent a flushed table is loaded again by the next ADD, or by a DEL
    while other containers remain: the DEL of the last one finds no counters and still
    closes the attachment's billing, saying so."""
    ns = app()
    plugin.add("gone", ns)
    lab.run(lab.node, ["nft", "flush", "ruleset"])
    plugin.delete("gone", ns)
    recs = [r for r in billed(plugin.state_dir / "billing").get("gone", [])]
    assert len(recs) == 1 and recs[0]["final"] and recs[0]["counters_missing"] and recs[0]["tx_bytes"] == 0


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_flows_opened_while_the_table_was_missing_end_at_the_reload(lab, plugin, app, family):
    """Without sockgate's table a container's packets go out unfiltered and
    unmasqueraded; where something else keeps conntrack on in the node's netns (on a
    real node: Docker's or kube-proxy's rules) each gets a conntrack entry, which the
    reloaded rules would accept as established for the kernel's 5 days (found by
    scripts/soak). The reload ends such flows: the container's next packet starts a
    new flow, filtered and masqueraded."""
    from runtime.lab import LAB
    from tests.support.attacks import conntrack_entries, conntrack_lines, forget_flows
    from tests.test_hostile import Holder

    ns = app()
    own = plugin.add("escape", ns)["ips"][0 if family == "ipv4" else 1]["address"].split("/")[0]
    server = LAB.public_v4 if family == "ipv4" else LAB.public_v6
    forget_flows(lab, own)  # entries of earlier tests' containers that had this address
    other = "table inet sgtest_ct {\n chain c {\n  type filter hook prerouting priority 0;\n  ct state new counter\n }\n}\n"
    lab.run(lab.node, ["nft", "-f", "-"], input=other)
    holder = None
    try:
        # Only sockgate's table goes (no agent: nothing reloads it yet).
        lab.run(lab.node, ["nft", "delete", "table", "inet", "sockgate"])
        holder = Holder(lab, ns, server, 9000)
        first = holder.exchange("in the window")
        assert first["reply"] and first["reply"]["peer"] == own, first   # unfiltered, not masqueraded
        lines = conntrack_lines(lab, own)
        assert [line.split()[0] for line in lines] == ["udp"], "\n".join(lines)
        plugin.add("reloader", app())                   # an ADD finds no table and loads it
        assert conntrack_entries(lab, own) == [], "the flow opened without the table outlived the reload"
        again = holder.exchange("after the reload")
        assert again["reply"] and again["reply"]["peer"] != own, again   # a new flow, masqueraded
    finally:
        if holder is not None:
            holder.close()
        lab.run(lab.node, ["nft", "delete", "table", "inet", "sgtest_ct"], check=False)
