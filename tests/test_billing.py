"""Billing with real packets: what the ledger bills equals, byte for byte and packet
for packet, what an independent counter on the lab's internet side saw, also when the
flusher is killed with SIGKILL at any moment."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtime.billing.ledger import Ledger
from runtime.billing.report import report
from runtime.lab import LAB
from runtime.state.store import host_ifname
from tests.test_unit_billing import CHILD, PROJECT

pytestmark = pytest.mark.lab

# Each container talks to its own destination, so the internet side can count per container.
DESTS = {"a": (LAB.public_v4, LAB.public_v6), "b": (LAB.cloud_v4, LAB.cloud_v6),
         "c": ("93.184.215.34", "2606:2800:21f:cb07::34")}
EXTRA = DESTS["c"]
PORT = 9000  # only the billed traffic uses it: the node's own packets (ND, DNS) don't count
TCP_SIZES = (1, 1400, 20_000, 300_000)
UDP_SIZES = (1, 200, 1200)  # replies (header + payload) stay under the MTU: no fragments


@dataclass
class App:
    name: str
    cid: str
    ns: str
    host: str  # host veth


def _lo(lab, action: str, addr: str) -> None:
    plen = 128 if ":" in addr else 32
    lab.run(lab.internet, ["ip", "addr", action, f"{addr}/{plen}", "dev", "lo"]
            + (["nodad"] if ":" in addr and action == "add" else []), check=action == "add")


def internet_table(names) -> str:
    """Per container: packets the node forwarded to its destination (tx) and replies
    from it (rx), counted on the internet's side of the wire."""
    lines = ["table inet sgtest_bill {"]
    lines += [f"  counter {n}_{d} {{ }}" for n in names for d in ("tx", "rx")]
    lines.append("  chain pre { type filter hook prerouting priority -300; policy accept;")
    for n in names:
        v4, v6 = DESTS[n]
        lines.append(f'    iifname "{LAB.downlink_if}" ip saddr {LAB.node_uplink_v4} ip daddr {v4} '
                     f'meta l4proto {{ tcp, udp }} th dport {PORT} counter name "{n}_tx"')
        lines.append(f'    iifname "{LAB.downlink_if}" ip6 saddr {LAB.node_uplink_v6} ip6 daddr {v6} '
                     f'meta l4proto {{ tcp, udp }} th dport {PORT} counter name "{n}_tx"')
    lines.append("  }")
    lines.append("  chain post { type filter hook postrouting priority 300; policy accept;")
    for n in names:
        v4, v6 = DESTS[n]
        lines.append(f'    oifname "{LAB.downlink_if}" ip daddr {LAB.node_uplink_v4} ip saddr {v4} '
                     f'meta l4proto {{ tcp, udp }} th sport {PORT} counter name "{n}_rx"')
        lines.append(f'    oifname "{LAB.downlink_if}" ip6 daddr {LAB.node_uplink_v6} ip6 saddr {v6} '
                     f'meta l4proto {{ tcp, udp }} th sport {PORT} counter name "{n}_rx"')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def node_table(apps) -> str:
    """Everything the node forwards into each container's veth once sockgate's table
    accepted it (replies to the container's flows), counted by a table of our own on
    the forward hook after sockgate's."""
    lines = ["table inet sgtest_billrx {"]
    lines += [f"  counter {a.name}_rx {{ }}" for a in apps]
    lines.append("  chain forwarded { type filter hook forward priority 10; policy accept;")
    lines += [f'    oifname "{a.host}" counter name "{a.name}_rx"' for a in apps]
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def named_counters(lab, ns: str, table: str) -> dict[str, tuple[int, int]]:
    out = lab.run(ns, ["nft", "-j", "list", "counters", "table", "inet", table]).stdout
    return {c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
            for c in json.loads(out)["nftables"] if "counter" in c}


@pytest.fixture
def counted(lab):
    """The extra destination of container c, and the counting tables, removed after."""
    _lo(lab, "add", EXTRA[0])
    _lo(lab, "add", EXTRA[1])
    made: list[tuple[str, str]] = []

    def install(ns: str, script: str) -> None:
        lab.run(ns, ["nft", "-f", "-"], input=script)
        made.append((ns, script.split()[2]))

    try:
        yield install
    finally:
        for ns, table in made:
            lab.run(ns, ["nft", "delete", "table", "inet", table], check=False)
        _lo(lab, "del", EXTRA[0])
        _lo(lab, "del", EXTRA[1])


def attach(plugin, app, names, **labels) -> list[App]:
    out = []
    for n in names:
        ns, cid = app(), f"bill-{n}"
        args = "IgnoreUnknown=1" + "".join(f";{k}={v}" for k, v in labels.get(n, {}).items())
        res = plugin.add(cid, ns, cni_args=args)
        host = res["interfaces"][0]["name"]
        assert host == host_ifname(plugin.conf["name"], cid, "eth0")
        out.append(App(n, cid, ns, host))
    return out


def traffic(lab, a: App, sizes_tcp=TCP_SIZES, sizes_udp=UDP_SIZES) -> None:
    v4, v6 = DESTS[a.name]
    for dst in (v4, v6):
        for size in sizes_tcp:
            r = lab.probe(a.ns, "tcp", dst, PORT, payload=os.urandom(size), timeout=10)
            assert r.ok and r.echo_ok, (a.name, dst, size, r)
        for size in sizes_udp:
            r = lab.probe(a.ns, "udp", dst, PORT, payload=os.urandom(size))
            assert r.ok and r.echo_ok, (a.name, dst, size, r)


def cli_flush(lab, plugin) -> subprocess.CompletedProcess:
    cp = lab.run(lab.node, [sys.executable, "-m", "runtime.cli.main", "billing", "flush",
                            "--state-dir", str(plugin.state_dir)], check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    return cp


def billed(bdir: Path) -> dict[str, list[dict]]:
    """Records per container id, checked for the ledger's invariants on the way."""
    by_key: dict[str, list[dict]] = {}
    for rec in Ledger(bdir).records():
        by_key.setdefault(rec["attachment"], []).append(rec)
    out: dict[str, list[dict]] = {}
    for key, recs in by_key.items():
        recs.sort(key=lambda r: r["seq"])
        assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1)), f"{key}: a record lost or duplicated"
        assert all(b["start"] == a["end"] for a, b in zip(recs, recs[1:])), f"{key}: intervals don't chain"
        assert [r["final"] for r in recs].count(True) == 1 and recs[-1]["final"], f"{key}: one final record, last"
        out[recs[0]["container_id"]] = recs
    return out


def total(recs: list[dict], field: str) -> int:
    return sum(r[field] for r in recs)


def test_billed_bytes_equal_what_the_internet_saw(lab, plugin, app, counted):
    labels = {"a": {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web-0", "K8S_POD_UID": "u-a"}}
    counted(lab.internet, internet_table(DESTS))
    names = list(DESTS)
    hosts = [App(n, f"bill-{n}", "", host_ifname(plugin.conf["name"], f"bill-{n}", "eth0")) for n in names]
    counted(lab.node, node_table(hosts))
    apps = {a.name: a for a in attach(plugin, app, names, **labels)}
    bdir = plugin.state_dir / "billing"

    for a in apps.values():
        traffic(lab, a)
    cli_flush(lab, plugin)
    first = {r["container_id"]: r for r in Ledger(bdir).records()}
    assert set(first) == {a.cid for a in apps.values()} and all(r["tx_bytes"] > 300_000 for r in first.values())

    # Refused attempts (Google range, port 25, TCP and UDP, v4 and v6) bill nothing sent.
    c = apps["c"]
    for proto, dst, port in (("tcp", LAB.google_v4, 443), ("tcp", LAB.google_v6, 443), ("tcp", LAB.public_v4, 25),
                             ("udp", LAB.public_v4, 25), ("tcp", LAB.public_v6, 25), ("udp", LAB.public_v6, 25)):
        r = lab.probe(c.ns, proto, dst, port, payload=os.urandom(500), timeout=1.0)
        assert not r.ok, (proto, dst, port, r)
    time.sleep(0.2)
    cli_flush(lab, plugin)
    after_block = [r for r in Ledger(bdir).records() if r["container_id"] == c.cid and r["seq"] > 1]
    # The refusals are the node's own packets: nothing left the node, nothing was forwarded in.
    assert all(r["tx_bytes"] == 0 and r["tx_packets"] == 0 for r in after_block), after_block

    # More traffic after the periodic records, so the final record has a delta of its own.
    for a in apps.values():
        traffic(lab, a, sizes_tcp=(5000,), sizes_udp=(100,))
    time.sleep(0.3)  # let the last FIN/ACKs go out
    for a in apps.values():
        plugin.delete(a.cid, a.ns)
    assert plugin.records() == []

    far = named_counters(lab, lab.internet, "sgtest_bill")
    near = named_counters(lab, lab.node, "sgtest_billrx")
    recs = billed(bdir)
    for a in apps.values():
        mine = recs[a.cid]
        assert mine[-1]["tx_bytes"] > 0, "the final record bills what came after the last flush"
        assert (total(mine, "tx_packets"), total(mine, "tx_bytes")) == far[f"{a.name}_tx"], a.name
        # Everything forwarded into the container: the replies to its flows.
        assert (total(mine, "rx_packets"), total(mine, "rx_bytes")) == near[f"{a.name}_rx"], a.name
        replies = far[f"{a.name}_rx"]
        assert 0 < replies[1] <= total(mine, "rx_bytes")
        assert mine[-1]["counter_tx_bytes"] == total(mine, "tx_bytes")
        assert all(r["network"] == plugin.conf["name"] and r["ifname"] == "eth0" and r["netns"] == a.ns
                   and r["host_ifname"] == a.host for r in mine)
    assert {(r["pod_namespace"], r["pod_name"], r["pod_uid"]) for r in recs[apps["a"].cid]} == {("shop", "web-0", "u-a")}

    # The report sums the same numbers.
    cp = lab.run(lab.node, [sys.executable, "-m", "runtime.cli.main", "billing", "report", "--dir", str(bdir),
                            "--by", "pod", "--json"])
    rows = {r["group"]: r for r in json.loads(cp.stdout)["rows"]}
    assert rows["shop/web-0"]["tx_bytes"] == far["a_tx"][1]
    assert rows[apps["b"].cid]["tx_bytes"] == far["b_tx"][1] and rows[apps["c"].cid]["tx_bytes"] == far["c_tx"][1]


def _kill(proc: subprocess.Popen) -> int:
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(10)


def test_kill_9_of_the_flusher_loses_nothing_and_bills_nothing_twice(lab, plugin, app, counted):
    names = ["a", "b"]
    counted(lab.internet, internet_table(names))
    apps = attach(plugin, app, names)
    bdir = plugin.state_dir / "billing"
    state = str(plugin.state_dir)
    flusher_cmd = [sys.executable, "-m", "runtime.cli.main", "billing", "flush", "--state-dir", state,
                   "--every", "0.01", "--max-bytes", "1500"]  # tiny files (about 4 records): rotations happen too
    rng = random.Random(4242)

    # 1. A flusher flushing every 10 ms, with traffic, SIGKILLed at random moments.
    # Each life waits for the flusher's first record before the traffic and the random
    # kill: its start (0.3-0.4 s of Python) could otherwise outlast them, and on a slow
    # run no life flushed at all (no rotation, the kills landing before any flush).
    for i in range(16):
        for a in apps:  # what this life's first flush bills
            assert lab.probe(a.ns, "tcp", DESTS[a.name][0], PORT, payload=b"x").ok
        records = sum(1 for _ in Ledger(bdir).records())
        proc = lab.popen(lab.node, flusher_cmd, log=bdir.parent / "flusher.log")
        deadline = time.monotonic() + 10
        while sum(1 for _ in Ledger(bdir).records()) == records:
            assert proc.poll() is None and time.monotonic() < deadline, "the flusher wrote nothing"
            time.sleep(0.01)
        for a in apps:
            size = rng.choice((1, 700, 9000, 60_000))
            assert lab.probe(a.ns, rng.choice(("tcp", "udp")) if size < 1300 else "tcp",
                             DESTS[a.name][i % 2], PORT, payload=os.urandom(size), timeout=10).ok
        time.sleep(rng.uniform(0, 0.3))
        assert _kill(proc) == -signal.SIGKILL
    assert len(Ledger(bdir).rotated()) >= 2

    # 2. Killed at chosen points of a flush, reading the real counters.
    for point in ("counters", "torn_first", "mid_write", "before_fsync", "before_cache", "after_rotate"):
        for a in apps:
            assert lab.probe(a.ns, "tcp", DESTS[a.name][0], PORT, payload=os.urandom(3000)).ok
        size = (bdir / "billing.jsonl").stat().st_size if (bdir / "billing.jsonl").exists() else 0
        limit = str(size + 10 if point == "after_rotate" else 1 << 20)
        cp = lab.run(lab.node, [sys.executable, "-c", CHILD, str(PROJECT), state, str(bdir), "-", point, limit],
                     check=False)
        assert cp.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), (point, cp.stderr)
        if point in ("mid_write", "torn_first"):
            assert not (bdir / "billing.jsonl").read_bytes().endswith(b"\n"), "the kill tore the line"
        if point == "after_rotate":
            assert not (bdir / "billing.jsonl").exists()

    # 3. A torn line written by hand, with a checkpoint cache older than the file.
    for a in apps:
        assert lab.probe(a.ns, "udp", DESTS[a.name][1], PORT, payload=os.urandom(999)).ok
    cache = (bdir / "checkpoint.json").read_bytes()
    cli_flush(lab, plugin)
    cur = bdir / "billing.jsonl"
    data = cur.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") >= 2
    cur.write_bytes(data[:-7])
    (bdir / "checkpoint.json").write_bytes(cache)

    # 4. A flusher that stays up through the DELs, then stops cleanly.
    proc = lab.popen(lab.node, [*flusher_cmd[:-2], "--max-bytes", "100000"], log=bdir.parent / "flusher.log")
    for a in apps:
        assert lab.probe(a.ns, "tcp", DESTS[a.name][1], PORT, payload=os.urandom(50_000), timeout=10).ok
    time.sleep(0.3)
    for a in apps:
        plugin.delete(a.cid, a.ns)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 0

    far = named_counters(lab, lab.internet, "sgtest_bill")
    recs = billed(bdir)  # seq 1..n per attachment: nothing duplicated, nothing skipped
    for a in apps:
        mine = recs[a.cid]
        assert (total(mine, "tx_packets"), total(mine, "tx_bytes")) == far[f"{a.name}_tx"], a.name
    assert not any(r.get("counter_reset") for rs in recs.values() for r in rs)
    rows, dups = report(Ledger(bdir).records(), by="container")
    assert dups == 0
    assert {r.group: r.tx_bytes for r in rows} == {a.cid: far[f"{a.name}_tx"][1] for a in apps}
