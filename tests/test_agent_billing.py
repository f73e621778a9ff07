"""Billing through the real agent: kill -9 while traffic flows and in the middle of a
DEL, restart, and the billed totals still equal what the far side received."""
from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from runtime.billing.ledger import Ledger
from runtime.lab import LAB
from tests.conftest import AgentProcess

pytestmark = pytest.mark.lab
PORTS = {"alpha": 9000, "beta": 80}  # one destination port per container: the far side tells them apart


def far_side_counter(lab):
    rules = "\n".join(
        f"  iifname \"downlink\" ip saddr {LAB.node_uplink_v4} tcp dport {port} counter comment \"{name}\""
        for name, port in PORTS.items())
    lab.run(lab.internet, ["nft", "-f", "-"], input=(
        "table inet sgtest_agentbill {\n chain c { type filter hook prerouting priority -300;\n"
        f"{rules}\n }}\n}}\n"))


def far_side_bytes(lab) -> dict[str, int]:
    listing = json.loads(lab.run(lab.internet, ["nft", "-j", "list", "table", "inet", "sgtest_agentbill"]).stdout)
    out: dict[str, int] = {}
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") in PORTS:
            out[rule["comment"]] = next(e["counter"]["bytes"] for e in rule["expr"] if "counter" in e)
    return out


def test_kill_9_while_traffic_flows_and_mid_del(lab, plugin, app, tmp_path):
    agent = AgentProcess(lab, plugin, tmp_path, ("--billing-interval", "0.2", "--metrics-address", "")).start()
    far_side_counter(lab)
    try:
        namespaces = {name: app() for name in PORTS}
        for name, ns in namespaces.items():
            plugin.add(name, ns)
        stop = threading.Event()

        def traffic(name: str) -> None:
            size = 1
            while not stop.is_set():
                lab.probe(namespaces[name], "tcp", LAB.public_v4, PORTS[name], payload=b"z" * size, timeout=2)
                size = size * 7 % 40000 + 1
        senders = [threading.Thread(target=traffic, args=(name,)) for name in PORTS]
        for t in senders:
            t.start()
        try:
            for _ in range(4):  # kill -9 at arbitrary points of its flush cycle, restart
                time.sleep(0.7)
                assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
                agent.start()
        finally:
            stop.set()
            for t in senders:
                t.join()
        # kill -9 right after a DEL reached the agent; the runtime retries the DEL.
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(call=plugin("DEL", "alpha", namespaces["alpha"])))
        worker.start()
        time.sleep(0.01)
        agent.stop(signal.SIGKILL)
        worker.join()
        agent.start()
        for name, ns in namespaces.items():
            plugin.delete(name, ns)  # the retry (alpha) and a plain DEL (beta)
        agent.stop(signal.SIGTERM)
        records = list(Ledger(tmp_path / "state" / "billing").records())
        billed = {name: sum(r["tx_bytes"] for r in records if r["container_id"] == name) for name in PORTS}
        seqs = [(json.dumps(r["attachment"], sort_keys=True), r["seq"]) for r in records]
        assert len(seqs) == len(set(seqs)), "a record was written twice"
        far = far_side_bytes(lab)
        # Everything a container sent went to its own port (payloads, ACKs, FINs).
        assert billed == {name: far[name] for name in PORTS}, (billed, far)
        assert all(v > 0 for v in billed.values())
        assert sum(1 for r in records if r.get("final")) >= 2
    finally:
        agent.stop(signal.SIGKILL)
        lab.run(lab.internet, ["nft", "delete", "table", "inet", "sgtest_agentbill"], check=False)
