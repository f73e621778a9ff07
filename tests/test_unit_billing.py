"""The billing ledger on temporary dirs, with counters handed in (no kernel): records,
checkpoints, torn writes, rotation, reports, and kill -9 at chosen points of a flush."""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runtime.billing.flush import BillingFlusher, final_record, flush
from runtime.billing.ledger import Ledger
from runtime.billing.report import report
from runtime.billing.schema import FIELDS, attachment_key, parse_time
from runtime.cli.main import main as cli_main
from runtime.core.netconf import parse_netconf
from runtime.errors import SockgateError
from runtime.kernel.nft import Counters
from runtime.state.store import ADDING, READY, Attachment, AttachmentStore, host_ifname

PROJECT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


class Clock:
    def __init__(self, t: dt.datetime = T0) -> None:
        self.t = t

    def __call__(self) -> dt.datetime:
        return self.t

    def tick(self, seconds: float = 60) -> None:
        self.t += dt.timedelta(seconds=seconds)


def make_att(state: Path, cid: str, network: str = "net", created: str = "2024-05-01T11:59:00+00:00",
             **labels: str) -> Attachment:
    att = Attachment(network=network, container_id=cid, ifname="eth0", netns=f"/run/netns/{cid}",
                     host_ifname=host_ifname(network, cid, "eth0"), ipv4="10.77.0.2", ipv6="fd77::2",
                     labels=labels, state=READY, created=created)
    AttachmentStore(state / "networks" / network / "attachments").save(att)
    return att


def drop_att(state: Path, att: Attachment) -> None:
    AttachmentStore(state / "networks" / att.network / "attachments").delete(att.container_id, att.ifname)


class Kernel:
    """Stands in for the nft counters: {host veth: Counters}."""

    def __init__(self) -> None:
        self.c: dict[str, Counters] = {}

    def send(self, att: Attachment, tx: int, rx: int = 0, packets: int = 1) -> None:
        old = self.c.get(att.host_ifname, Counters())
        self.c[att.host_ifname] = Counters(old.tx_bytes + tx, old.tx_packets + packets,
                                           old.rx_bytes + rx, old.rx_packets + (packets if rx else 0))

    def __call__(self) -> dict[str, Counters]:
        return dict(self.c)


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    kernel = Kernel()
    state, bdir = tmp_path / "state", tmp_path / "billing"

    def ledger(**kw) -> Ledger:
        return Ledger(bdir, clock=clock, node="node-1", **kw)

    def do_flush(**kw) -> list[dict]:
        return flush(state, ledger=ledger(**kw), read_counters=kernel)

    class Env:
        pass
    e = Env()
    e.clock, e.kernel, e.state, e.dir, e.ledger, e.flush = clock, kernel, state, bdir, ledger, do_flush
    e.conf = parse_netconf({"cniVersion": "1.1.0", "name": "net", "type": "sockgate",
                            "stateDir": str(state), "billingDir": str(bdir)})
    e.final = lambda att: final_record(e.conf, att, read_counters=kernel, clock=clock)
    return e


def all_records(bdir: Path) -> list[dict]:
    return list(Ledger(bdir).records())


def check_ledger(bdir: Path, expected: dict[str, Counters]) -> dict[str, list[dict]]:
    """The invariants billing promises: per attachment the deltas add up to the
    kernel counters exactly, seq runs 1..n with no gap or duplicate, and each
    interval starts where the previous one ended."""
    by_key: dict[str, list[dict]] = {}
    for rec in all_records(bdir):
        by_key.setdefault(rec["attachment"], []).append(rec)
    for key, recs in by_key.items():
        recs.sort(key=lambda r: r["seq"])
        assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1)), (key, [r["seq"] for r in recs])
        for a, b in zip(recs, recs[1:]):
            assert b["start"] == a["end"]
    got = {}
    for key, recs in by_key.items():
        host = recs[-1]["host_ifname"]
        got[host] = Counters(*(sum(r[f] for r in recs) for f in FIELDS))
    assert got == {h: c for h, c in expected.items() if c}, "billed totals differ from the counters"
    return by_key


# --- records ------------------------------------------------------------------------

def test_record_fields_deltas_and_intervals(env):
    att = make_att(env.state, "c1", pod_namespace="ns1", pod_name="web-0", pod_uid="u-1")
    env.kernel.send(att, tx=1000, rx=300, packets=3)
    [r1] = env.flush()
    assert r1 == {
        "v": 1, "attachment": "net/c1/eth0/2024-05-01T11:59:00+00:00", "seq": 1,
        "start": "2024-05-01T11:59:00.000Z", "end": "2024-05-01T12:00:00.000Z", "node": "node-1",
        "network": "net", "container_id": "c1", "ifname": "eth0", "netns": "/run/netns/c1",
        "host_ifname": att.host_ifname, "attachment_created": "2024-05-01T11:59:00+00:00",
        "pod_namespace": "ns1", "pod_name": "web-0", "pod_uid": "u-1",
        "tx_bytes": 1000, "tx_packets": 3, "rx_bytes": 300, "rx_packets": 3,
        "counter_tx_bytes": 1000, "counter_tx_packets": 3, "counter_rx_bytes": 300, "counter_rx_packets": 3,
        "final": False}
    env.clock.tick(60)
    env.kernel.send(att, tx=50, packets=1)
    [r2] = env.flush()
    assert (r2["seq"], r2["start"], r2["end"]) == (2, r1["end"], "2024-05-01T12:01:00.000Z")
    assert (r2["tx_bytes"], r2["tx_packets"], r2["rx_bytes"], r2["rx_packets"]) == (50, 1, 0, 0)
    assert (r2["counter_tx_bytes"], r2["counter_tx_packets"]) == (1050, 4)
    # What's on disk is exactly what flush returned, one line each.
    lines = (env.dir / "billing.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [r1, r2]


def test_same_counters_flushed_twice_bill_once(env):
    a, b = make_att(env.state, "a"), make_att(env.state, "b")
    env.kernel.send(a, tx=10)
    assert len(env.flush()) == 1  # b never sent anything: no record
    env.clock.tick()
    assert env.flush() == []
    assert env.flush() == []
    env.kernel.send(b, tx=7)
    assert [r["container_id"] for r in env.flush()] == ["b"]
    check_ledger(env.dir, env.kernel.c)


def test_docker_container_name_label_and_missing_labels(env):
    att = make_att(env.state, "d1", container_name="/shop_web_1")
    plain = make_att(env.state, "p1")
    env.kernel.send(att, tx=5)
    env.kernel.send(plain, tx=5)
    recs = {r["container_id"]: r for r in env.flush()}
    assert recs["d1"]["container_name"] == "/shop_web_1" and "pod_name" not in recs["d1"]
    assert not {"pod_name", "pod_namespace", "pod_uid", "container_name"} & set(recs["p1"])


def test_final_record_once_then_nothing(env):
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=100)
    env.flush()
    env.kernel.send(att, tx=23)
    env.clock.tick(5)
    rec = env.final(att)
    assert rec["final"] is True and rec["tx_bytes"] == 23 and rec["seq"] == 2
    # DEL retried after a crash before the elements went: frozen counters, no new record.
    assert env.final(att) is None
    # The periodic flush doesn't bill a finished attachment either.
    assert env.flush() == []
    check_ledger(env.dir, env.kernel.c)


def test_final_record_for_idle_billed_and_never_billed(env):
    idle, never = make_att(env.state, "idle"), make_att(env.state, "never")
    env.kernel.send(idle, tx=9)
    env.flush()
    env.kernel.c[never.host_ifname] = Counters()
    # Billed before, idle since: a zero final record closes it.
    rec = env.final(idle)
    assert rec["final"] and rec["tx_bytes"] == 0 and rec["counter_tx_bytes"] == 9
    # Never sent a byte and never billed: nothing to say.
    assert env.final(never) is None
    # Its elements gone (an ADD rolled back before nft.add): nothing either.
    del env.kernel.c[never.host_ifname]
    assert env.final(dataclasses.replace(never, state=ADDING)) is None


def test_final_record_says_counters_missing_for_a_ready_attachment_without_elements(env):
    """Elements deleted behind sockgate's back and never restored (a flushed table):
    whether or not it was billed before, its end is on the ledger, with what is known."""
    never, billed = make_att(env.state, "never"), make_att(env.state, "billed")
    env.kernel.send(billed, tx=40)
    env.flush()
    env.kernel.c.clear()
    for att, counter in ((never, 0), (billed, 40)):
        rec = env.final(att)
        assert rec["final"] and rec["counters_missing"] and rec["tx_bytes"] == 0
        assert rec["counter_tx_bytes"] == counter
    by_key = {r["attachment"]: r for r in all_records(env.dir) if r["final"]}
    assert len(by_key) == 2 and all(r["seq"] == (1 if "never" in k else 2) for k, r in by_key.items())


def test_a_recreated_counter_is_a_reset_whatever_value_it_reached(env):
    """The table was reloaded between two flushes: the elements are new (another
    generation) and their counters started from zero, even where they have already
    climbed past the value of the last record."""
    att = make_att(env.state, "c1")
    env.kernel.c[att.host_ifname] = Counters(tx_bytes=100, tx_packets=2, generation="aaaa")
    first = env.flush()[0]
    assert first["counter_generation"] == "aaaa" and first["tx_bytes"] == 100
    env.kernel.c[att.host_ifname] = Counters(tx_bytes=150, tx_packets=3, generation="bbbb")
    env.clock.tick(60)
    rec = env.flush()[0]
    assert rec["counter_reset"] and (rec["tx_bytes"], rec["tx_packets"]) == (150, 3)
    assert rec["counter_generation"] == "bbbb"
    # Same generation again: an ordinary delta.
    env.kernel.c[att.host_ifname] = Counters(tx_bytes=170, tx_packets=4, generation="bbbb")
    env.clock.tick(60)
    rec = env.flush()[0]
    assert "counter_reset" not in rec and rec["tx_bytes"] == 20


def test_a_reload_before_the_first_record_is_a_reset(env):
    """The table was reloaded before the attachment's first record (found by
    scripts/soak: an nft flush between ADD and DEL): its elements are not the ones ADD
    created, and what those counted is lost. The first record says so."""
    att = make_att(env.state, "c1")
    att.generation = "aaaa"
    AttachmentStore(env.state / "networks" / "net" / "attachments").save(att)
    env.kernel.c[att.host_ifname] = Counters(tx_bytes=40, tx_packets=1, generation="bbbb")
    rec = env.final(att)
    assert rec["counter_reset"] and (rec["tx_bytes"], rec["tx_packets"]) == (40, 1)
    # The elements ADD created, or a record of a version that kept no generation: no reset.
    for cid, created_gen, counter_gen in (("c2", "cccc", "cccc"), ("c3", "", "dddd")):
        other = make_att(env.state, cid)
        other.generation = created_gen
        env.kernel.c[other.host_ifname] = Counters(tx_bytes=40, tx_packets=1, generation=counter_gen)
        assert "counter_reset" not in env.final(other)


def test_final_record_disabled_and_orphan(env, tmp_path):
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=9)
    off = parse_netconf({"cniVersion": "1.1.0", "name": "net", "type": "sockgate",
                         "stateDir": str(env.state), "billingDir": ""})
    assert final_record(off, att, read_counters=env.kernel) is None and not env.dir.exists()
    orphan = Attachment(network="net", container_id="c1", ifname="eth0", netns="", host_ifname=att.host_ifname)
    assert env.final(orphan) is None and not env.dir.exists()


def test_final_record_failure_fails_del_but_not_a_rollback(env):
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=9)
    env.dir.parent.mkdir(exist_ok=True)
    env.dir.write_text("not a directory")
    with pytest.raises(SockgateError) as info:
        env.final(att)
    assert info.value.code == 5 and str(env.dir) in info.value.details
    att.state = "adding"
    assert env.final(att) is None


def test_counters_gone_at_final_close_the_key(env):
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=40)
    env.flush()
    del env.kernel.c[att.host_ifname]  # the table was deleted under us
    rec = env.final(att)
    assert rec["final"] and rec["counters_missing"] and rec["tx_bytes"] == 0 and rec["counter_tx_bytes"] == 40


def test_counter_reset_bills_the_new_count(env):
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=1000, rx=1000)
    env.flush()
    env.kernel.c[att.host_ifname] = Counters(300, 2, 1500, 3)  # tx re-created, rx went on
    env.clock.tick()
    [rec] = env.flush()
    assert rec["counter_reset"] is True
    assert (rec["tx_bytes"], rec["tx_packets"]) == (300, 2)   # from zero
    assert (rec["rx_bytes"], rec["rx_packets"]) == (500, 2)   # a plain delta
    env.clock.tick()
    env.kernel.send(att, tx=1)
    [rec] = env.flush()
    assert "counter_reset" not in rec and rec["tx_bytes"] == 1


def test_the_same_counters_going_down_bill_nothing_twice(env):
    """The same elements (same generation) whose counters went down lost a part of
    them (the segment meter's counts): billing what is left again would bill it twice
    (reviews 6 and 7 found 31 % billed twice that way). The interval bills 0 and says
    so; the next one counts on from there."""
    att = make_att(env.state, "c1")
    env.kernel.c[att.host_ifname] = Counters(tx_bytes=1000, tx_packets=20, rx_bytes=50, rx_packets=1,
                                             generation="aaaa")
    env.flush()
    env.kernel.c[att.host_ifname] = Counters(tx_bytes=600, tx_packets=5, rx_bytes=80, rx_packets=2,
                                             generation="aaaa")
    env.clock.tick()
    [rec] = env.flush()
    assert rec["counters_decreased"] and "counter_reset" not in rec
    assert (rec["tx_bytes"], rec["tx_packets"], rec["rx_bytes"], rec["rx_packets"]) == (0, 0, 30, 1)
    env.kernel.c[att.host_ifname] = Counters(tx_bytes=700, tx_packets=6, rx_bytes=80, rx_packets=2,
                                             generation="aaaa")
    env.clock.tick()
    [rec] = env.flush()
    assert "counters_decreased" not in rec and (rec["tx_bytes"], rec["tx_packets"]) == (100, 1)


def test_same_key_after_final_counts_a_new_element_from_zero(env):
    """DEL and a new ADD of the same ids within one second give the same key; the
    new element's counters must not be offset by the old one's."""
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=500)
    assert env.final(att)["tx_bytes"] == 500
    env.kernel.c[att.host_ifname] = Counters(700, 5, 0, 0)  # new element, already past 500
    [rec] = env.flush()
    assert rec["tx_bytes"] == 700 and rec["counter_reset"] and not rec["final"] and rec["seq"] == 2


def test_the_final_records_own_elements_bill_nothing_more_whatever_their_counters_do(env):
    """Review 10: a DEL killed after its final record, then a new segment meter: the
    gone veth's elements lost the old meter's part of their counters, and a flush (or
    the retried DEL) took that for a new element and billed the whole nft part again.
    The same generation says they are the elements the final record read."""
    att = make_att(env.state, "c1")
    env.kernel.c[att.host_ifname] = Counters(tx_bytes=5000, tx_packets=80, generation="aaaa")
    assert env.final(att)["tx_bytes"] == 5000
    env.kernel.c[att.host_ifname] = Counters(tx_bytes=3000, tx_packets=20, generation="aaaa")  # the meter's part gone
    env.clock.tick()
    assert env.flush() == []
    assert env.final(att) is None  # the retried DEL
    # A new element under the same key (a new ADD of the same ids) still counts from zero.
    env.kernel.c[att.host_ifname] = Counters(tx_bytes=700, tx_packets=5, generation="bbbb")
    env.clock.tick()
    [rec] = env.flush()
    assert rec["tx_bytes"] == 700 and rec["counter_reset"] and not rec["final"]


def test_vanished_attachment_is_closed_then_forgotten(env):
    gone, stays = make_att(env.state, "gone"), make_att(env.state, "stays")
    env.kernel.send(gone, tx=10)
    env.kernel.send(stays, tx=10)
    env.flush()
    # Its DEL ran with billing off, or its record was lost: no final record exists.
    drop_att(env.state, gone)
    del env.kernel.c[gone.host_ifname]
    env.clock.tick()
    [rec] = env.flush()
    assert rec["container_id"] == "gone" and rec["final"] and rec["counters_missing"] and rec["tx_bytes"] == 0
    env.clock.tick()
    assert env.flush() == []
    cache = json.loads((env.dir / "checkpoint.json").read_text())
    assert set(cache["marks"]) == {attachment_key(stays)}  # finished keys leave the cache
    # ... but not the files: a rebuild still knows the key is final.
    (env.dir / "checkpoint.json").unlink()
    assert env.flush() == []
    # An unreadable attachment record keeps its network out of the sweep.
    (env.state / "networks" / "net" / "attachments" / "broken--eth0.json").write_text("{")
    drop_att(env.state, stays)
    assert env.flush() == []


# --- crash safety -----------------------------------------------------------------

def test_torn_last_line_is_cut_and_billed_again(env):
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=100)
    env.flush()
    cache = (env.dir / "checkpoint.json").read_bytes()
    env.kernel.send(att, tx=11)
    env.clock.tick()
    [lost] = env.flush()
    # Emulate a kill -9 in the middle of that write: half the line, and a cache from before.
    path = env.dir / "billing.jsonl"
    data = path.read_bytes()
    line = json.dumps(lost, separators=(",", ":")).encode() + b"\n"
    path.write_bytes(data[:-len(line)] + line[:len(line) // 2])
    (env.dir / "checkpoint.json").write_bytes(cache)
    env.clock.tick()
    [again] = env.flush()  # a new Ledger, as after a restart
    assert again["seq"] == 2 and again["tx_bytes"] == 11
    assert path.read_bytes().endswith(b"\n") and all(json.loads(x) for x in path.read_text().splitlines())
    check_ledger(env.dir, env.kernel.c)


@pytest.mark.parametrize("tail", [b"\0" * 300, b'{"attachment": "x", "seq": 1}\n', b"garbage\n"])
def test_unreadable_last_line_is_cut(env, tail):
    """Power loss can leave a zero-filled or half-flushed tail that does end in a newline."""
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=100)
    env.flush()
    (env.dir / "checkpoint.json").unlink()
    with open(env.dir / "billing.jsonl", "ab") as fh:
        fh.write(tail)
    env.kernel.send(att, tx=1)
    env.clock.tick()
    env.flush()
    assert tail not in (env.dir / "billing.jsonl").read_bytes()
    check_ledger(env.dir, env.kernel.c)


def test_checkpoint_cache_catches_up_or_rebuilds(env, caplog):
    atts = [make_att(env.state, f"c{i}") for i in range(3)]
    for a in atts:
        env.kernel.send(a, tx=100)
    env.flush()
    old_cache = (env.dir / "checkpoint.json").read_bytes()
    for a in atts:
        env.kernel.send(a, tx=5)
    env.clock.tick()
    env.flush()
    # A cache older than the file (a crash between the append and the cache refresh):
    # caught up from its offset, nothing billed twice, and no rebuild needed.
    (env.dir / "checkpoint.json").write_bytes(old_cache)
    caplog.clear()
    assert env.flush() == []
    assert "rebuilding" not in caplog.text
    # Missing, corrupt, or describing other bytes: rebuilt from the files.
    for damage in ("missing", "corrupt", "not json", "tail"):
        if damage == "missing":
            (env.dir / "checkpoint.json").unlink()
        elif damage == "corrupt":
            (env.dir / "checkpoint.json").write_text('{"version": 1, "file": 3}')
        elif damage == "not json":
            (env.dir / "checkpoint.json").write_bytes(b"\0" * 50)
        else:
            c = json.loads(old_cache)
            c["file"]["tail"] = hashlib.sha256(b"other").hexdigest()
            c["marks"] = {}
            (env.dir / "checkpoint.json").write_text(json.dumps(c))
        caplog.clear()
        assert env.flush() == [], damage
        assert "rebuilding" in caplog.text
    check_ledger(env.dir, env.kernel.c)


def test_del_leaves_the_cache_behind_and_the_next_session_catches_up(env, caplog):
    """DEL's final record skips the cache refresh (up to DEL_CACHE_LAG of ledger); the
    next session reads the records after the cached offset, the flush refreshes it."""
    atts = [make_att(env.state, f"c{i}") for i in range(4)]
    for a in atts:
        env.kernel.send(a, tx=10)
    env.flush()
    cached = json.loads((env.dir / "checkpoint.json").read_text())["file"]["offset"]
    for a in atts[:3]:
        env.kernel.send(a, tx=1)
        assert env.final(a)["final"]
        assert env.final(a) is None  # caught up: billed already
    assert json.loads((env.dir / "checkpoint.json").read_text())["file"]["offset"] == cached
    assert (env.dir / "billing.jsonl").stat().st_size > cached
    env.kernel.send(atts[3], tx=1)
    caplog.clear()
    [rec] = env.flush()
    assert rec["container_id"] == "c3" and "rebuilding" not in caplog.text
    assert json.loads((env.dir / "checkpoint.json").read_text())["file"]["offset"] == (
        env.dir / "billing.jsonl").stat().st_size
    check_ledger(env.dir, env.kernel.c)


def test_rebuild_equals_the_incremental_checkpoint(env):
    atts = [make_att(env.state, f"c{i}") for i in range(4)]
    for step in range(30):
        env.kernel.send(atts[step % 4], tx=100 + step, rx=step)
        env.clock.tick(3600)  # crosses days: rotation too
        env.flush(max_bytes=2000)
    incremental = json.loads((env.dir / "checkpoint.json").read_text())["marks"]
    (env.dir / "checkpoint.json").unlink()
    marks, dirty = env.ledger()._load()
    assert dirty and marks == incremental
    assert len(Ledger(env.dir).rotated()) >= 2


def test_concurrent_writers_never_duplicate(env):
    """The agent's flush and plugins' DEL append from several processes; the lock
    serialises read-counters-and-append, so no counter is billed twice."""
    atts = [make_att(env.state, f"c{i}") for i in range(5)]
    lock = threading.Lock()
    errors = []

    def worker(n: int) -> None:
        try:
            for i in range(40):
                with lock:
                    env.kernel.send(atts[(n + i) % 5], tx=n + i + 1)
                flush(env.state, ledger=Ledger(env.dir, max_bytes=3000), read_counters=env.kernel)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    env.flush()
    check_ledger(env.dir, env.kernel.c)


# kill -9 at chosen points of a flush, in a child process: billing must come out exact
# once a fresh process (a restarted agent) flushes again.
CHILD = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from runtime.billing import flush, ledger
from runtime.kernel.nft import Counters
state, bdir, counters_file, point, max_bytes = sys.argv[2:7]
# "-": the real nft counters of this netns (the lab's node, in tests/test_billing.py)
counters = None if counters_file == "-" else {
    k: Counters(*v) for k, v in json.load(open(counters_file)).items()}
real_write, real_fsync, real_fsync_dir = os.write, os.fsync, ledger.fsync_dir

def die():
    os.kill(os.getpid(), signal.SIGKILL)

class Os:
    def __getattr__(self, name):
        return getattr(os, name)

proxy = Os()
if point == "counters":
    def read():
        die()
elif point == "before_write":
    proxy.write = lambda fd, data: die()
elif point in ("mid_write", "torn_first"):
    def write(fd, data):
        # the batch's first line, or its last one, cut in the middle
        data = bytes(data)
        last = data.rfind(b"\n", 0, len(data) - 1) + 1
        cut = data.index(b"\n") // 2 if point == "torn_first" else last + (len(data) - last) // 2
        real_write(fd, data[:cut]); real_fsync(fd); die()
    proxy.write = write
elif point == "before_fsync":
    import fcntl
    def fsync(fd):  # the append's fsync, not the torn-tail repair's
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            die()
        real_fsync(fd)
    proxy.fsync = fsync
elif point == "before_cache":
    ledger.write_cache = lambda path, data: die()
elif point == "mid_cache":
    def write_cache(path, data):
        tmp = path.with_name("." + path.name + ".%d.tmp" % os.getpid())
        tmp.write_bytes(data[:100]); die()
    ledger.write_cache = write_cache
elif point == "after_rotate":
    def fsync_dir(d):
        real_fsync_dir(d)
        if any(p.name.startswith("billing-") for p in d.iterdir()):
            die()
    ledger.fsync_dir = fsync_dir
elif point != "none":
    raise SystemExit("unknown point " + point)
ledger.os = proxy
read = read if point == "counters" else flush.kernel_counters if counters is None else (lambda: counters)
flush.flush(state, ledger=ledger.Ledger(bdir, max_bytes=int(max_bytes)), read_counters=read)
"""

POINTS = ["counters", "before_write", "torn_first", "mid_write", "before_fsync", "before_cache", "mid_cache",
          "after_rotate"]


def run_child(env, point: str, max_bytes: int = 1 << 20) -> subprocess.CompletedProcess:
    cfile = env.dir.parent / "counters.json"
    cfile.write_text(json.dumps({k: list(v.__dict__.values()) for k, v in env.kernel.c.items()}))
    return subprocess.run([sys.executable, "-c", CHILD, str(PROJECT), str(env.state), str(env.dir), str(cfile),
                           point, str(max_bytes)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_any_point_of_a_flush(env, point):
    atts = [make_att(env.state, f"c{i}") for i in range(3)]
    for a in atts:
        env.kernel.send(a, tx=1000, rx=10)
    assert run_child(env, "none").returncode == 0
    size = (env.dir / "billing.jsonl").stat().st_size
    for a in atts:
        env.kernel.send(a, tx=333, rx=3)
    # after_rotate: a size limit the next append passes, so it rotates first.
    limit = size + 10 if point == "after_rotate" else 1 << 20
    proc = run_child(env, point, max_bytes=limit)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    current = env.dir / "billing.jsonl"
    cache = json.loads((env.dir / "checkpoint.json").read_text())
    # The crash left what it should have: proof the point was reached.
    if point in ("mid_write", "torn_first"):
        assert not current.read_bytes().endswith(b"\n")
    if point in ("before_fsync", "before_cache", "mid_cache"):
        assert cache["file"]["offset"] < current.stat().st_size  # the cache is older than the file
    if point == "after_rotate":
        assert Ledger(env.dir).rotated() and not current.exists()
    # Restart, with more traffic meanwhile, and flush twice.
    for a in atts:
        env.kernel.send(a, tx=7)
    assert run_child(env, "none", max_bytes=limit).returncode == 0
    assert run_child(env, "none", max_bytes=limit).returncode == 0
    by_key = check_ledger(env.dir, env.kernel.c)
    assert len(by_key) == 3


def test_kill_9_during_a_rotation_then_rebuild(env):
    """Even with the cache lost after a crash mid-rotation, the files alone give the
    checkpoint back."""
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=10)
    run_child(env, "none")
    env.kernel.send(att, tx=10)
    assert run_child(env, "after_rotate", max_bytes=10).returncode == -signal.SIGKILL
    (env.dir / "checkpoint.json").unlink()
    env.kernel.send(att, tx=10)
    assert run_child(env, "none", max_bytes=10).returncode == 0
    check_ledger(env.dir, env.kernel.c)


def test_two_rotations_since_the_cache_was_written_bill_nothing_twice(env):
    """Killed after a rotation and before the cache refresh, twice running: the cache
    names a file rotated two files ago, and c1's last record sits in the file rotated
    in between. It must count, or c1's next record repeats a seq and bills its bytes
    again (found by tests/test_billing.py's random kills)."""
    c1, c2 = make_att(env.state, "c1"), make_att(env.state, "c2")
    for a in (c1, c2):
        env.kernel.send(a, tx=10)
    env.flush()
    anchored = json.loads((env.dir / "checkpoint.json").read_text())["file"]["ino"]
    for a in (c1, c2):  # each child bills only the one that sent, rotates, and dies
        env.kernel.send(a, tx=10)
        env.clock.tick(1)
        assert run_child(env, "before_cache", max_bytes=10).returncode == -signal.SIGKILL
    assert json.loads((env.dir / "checkpoint.json").read_text())["file"]["ino"] == anchored
    assert len(Ledger(env.dir).rotated()) == 2
    env.kernel.send(c1, tx=10)
    env.clock.tick(1)
    [rec] = env.flush(max_bytes=1 << 20)
    assert rec["seq"] == 3 and rec["tx_bytes"] == 10
    check_ledger(env.dir, env.kernel.c)


# --- rotation -----------------------------------------------------------------------

def test_rotation_by_size_keeps_old_files_intact(env):
    atts = [make_att(env.state, f"c{i}") for i in range(3)]
    frozen: dict[Path, bytes] = {}
    for step in range(40):
        for a in atts:
            env.kernel.send(a, tx=step + 1)
        env.clock.tick(1)
        env.flush(max_bytes=4096)
        for p in Ledger(env.dir).rotated():
            frozen.setdefault(p, p.read_bytes())
            assert p.read_bytes() == frozen[p], f"{p.name} changed after its rotation"
    rotated = Ledger(env.dir).rotated()
    assert len(rotated) >= 3
    for p in rotated + [env.dir / "billing.jsonl"]:
        assert p.stat().st_size <= 4096
        first = json.loads(p.read_text().splitlines()[0])
        if p in rotated:
            stamp = parse_time(first["end"]).strftime("%Y%m%dT%H%M%SZ")
            assert p.name.startswith(f"billing-{stamp}"), (p.name, first["end"])
    assert len({p.name for p in rotated}) == len(rotated)
    check_ledger(env.dir, env.kernel.c)


def test_rotations_within_one_second_and_a_rebuild(env):
    """Rotated names collide within a second ("-1", "-2" sort before the plain name),
    so file order isn't record order: the checkpoint takes the highest seq."""
    att, other = make_att(env.state, "c1"), make_att(env.state, "c2")
    for _ in range(6):
        env.kernel.send(att, tx=10)
        env.flush(max_bytes=10)  # the clock stands still: every file has the same first end
    env.kernel.send(other, tx=10)
    env.flush(max_bytes=10)  # c1's last record now sits in a rotated file, not the current one
    names = [p.name for p in Ledger(env.dir).rotated()]
    assert len(names) == 6 and "billing-20240501T120000Z.jsonl" in names and "billing-20240501T120000Z-5.jsonl" in names
    (env.dir / "checkpoint.json").unlink()
    assert env.flush() == []  # rebuilt: nothing billed twice
    env.kernel.send(att, tx=1)
    [rec] = env.flush()
    assert rec["seq"] == 7 and rec["tx_bytes"] == 1
    check_ledger(env.dir, env.kernel.c)


def test_rotation_by_utc_day(env):
    att = make_att(env.state, "c1")
    env.clock.t = dt.datetime(2024, 5, 1, 23, 58, tzinfo=dt.timezone.utc)
    env.kernel.send(att, tx=1)
    env.flush()
    env.clock.tick(60)
    env.kernel.send(att, tx=1)
    env.flush()
    assert Ledger(env.dir).rotated() == []
    env.clock.tick(120)  # 2024-05-02 00:01 UTC
    env.kernel.send(att, tx=1)
    env.flush()
    [old] = Ledger(env.dir).rotated()
    assert old.name == "billing-20240501T235800Z.jsonl"
    assert [json.loads(x)["seq"] for x in old.read_text().splitlines()] == [1, 2]
    assert [json.loads(x)["end"] for x in (env.dir / "billing.jsonl").read_text().splitlines()] == [
        "2024-05-02T00:01:00.000Z"]


# --- report ------------------------------------------------------------------------

def test_report_sums_groups_and_time_window(env, capsys):
    p1 = make_att(env.state, "p1", pod_namespace="shop", pod_name="web-0", pod_uid="u1")
    p2 = make_att(env.state, "p2", pod_namespace="shop", pod_name="web-0", pod_uid="u2")  # same pod, re-created
    d1 = make_att(env.state, "d1", container_name="db")
    env.kernel.send(p1, tx=100, rx=10, packets=2)
    env.kernel.send(d1, tx=7, rx=1)
    env.flush(max_bytes=600)  # 12:00, rotates as it goes: the report reads every file
    env.clock.tick(3600)
    env.kernel.send(p2, tx=1000, rx=100, packets=5)
    env.kernel.send(d1, tx=3)
    env.flush(max_bytes=600)  # 13:00
    assert Ledger(env.dir).rotated()
    rows, dups = report(Ledger(env.dir).records(), by="pod")
    assert dups == 0
    assert [(r.group, r.tx_bytes, r.tx_packets, r.rx_bytes, r.rx_packets, r.records) for r in rows] == [
        ("db", 10, 2, 1, 1, 2), ("shop/web-0", 1100, 7, 110, 7, 2)]
    rows, _ = report(Ledger(env.dir).records(), by="container")
    assert {r.group: r.tx_bytes for r in rows} == {"d1": 10, "p1": 100, "p2": 1000}
    rows, _ = report(Ledger(env.dir).records(), by="pod", since=parse_time("2024-05-01T12:30:00"))
    assert {r.group: r.tx_bytes for r in rows} == {"db": 3, "shop/web-0": 1000}
    rows, _ = report(Ledger(env.dir).records(), by="pod", until=parse_time("2024-05-01T12:00:00Z"))
    assert {r.group: r.tx_bytes for r in rows} == {"db": 7, "shop/web-0": 100}

    assert cli_main(["billing", "report", "--dir", str(env.dir), "--by", "pod"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["pod", "tx_bytes", "tx_packets", "rx_bytes", "rx_packets", "records"]
    assert out[1].split() == ["db", "10", "2", "1", "1", "2"]
    assert out[-1].split() == ["total", "1110", "9", "111", "8", "4"]
    assert cli_main(["billing", "report", "--dir", str(env.dir), "--by", "container", "--json",
                     "--since", "2024-05-01T12:30:00+00:00"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["group"]: r["tx_bytes"] for r in data["rows"]} == {"d1": 3, "p2": 1000}
    assert cli_main(["billing", "report", "--dir", str(env.dir / "nope")]) == 1


def test_report_ignores_duplicates_and_a_torn_tail(env):
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=100)
    [rec] = env.flush()
    with open(env.dir / "billing.jsonl", "a") as fh:
        fh.write(json.dumps(rec) + "\n")  # a copy (e.g. concatenated exports)
        fh.write(json.dumps(dict(rec, seq=2))[:40])  # an append in progress
    rows, dups = report(Ledger(env.dir).records(), by="attachment")
    assert dups == 1 and [(r.tx_bytes, r.records) for r in rows] == [(100, 1)]


def test_report_reads_a_read_only_copy(env, tmp_path):
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=100)
    env.flush()
    copy = tmp_path / "archive"
    copy.mkdir()
    for p in Ledger(env.dir).files():
        (copy / p.name).write_bytes(p.read_bytes())
    if os.geteuid() == 0:
        (copy / "billing.lock").mkdir()  # root ignores the mode: make the lock impossible instead
    copy.chmod(0o555)
    try:
        rows, _ = report(Ledger(copy).records(), by="container")
        assert [(r.group, r.tx_bytes) for r in rows] == [("c1", 100)]
    finally:
        copy.chmod(0o755)


def test_unparseable_created_does_not_stop_billing(env):
    bad = make_att(env.state, "bad", created="yesterday-ish")
    good = make_att(env.state, "good")
    env.kernel.send(bad, tx=5)
    env.kernel.send(good, tx=5)
    recs = {r["container_id"]: r for r in env.flush()}
    assert recs["bad"]["start"] == recs["bad"]["end"] == "2024-05-01T12:00:00.000Z"
    assert recs["good"]["tx_bytes"] == 5


# --- configuration and the flusher ----------------------------------------------------

def test_billing_dir_config():
    base = {"cniVersion": "1.1.0", "name": "n", "type": "sockgate"}
    assert parse_netconf(base).billing_dir == "/var/lib/sockgate/billing"
    assert parse_netconf(dict(base, stateDir="/srv/sg")).billing_dir == "/srv/sg/billing"
    assert parse_netconf(dict(base, billingDir="")).billing_dir == ""
    assert parse_netconf(dict(base, billingDir="/b")).billing_dir == "/b"
    with pytest.raises(SockgateError) as info:
        parse_netconf(dict(base, billingDir=3))
    assert info.value.code == 7 and "billingDir" in info.value.msg


def test_flusher_flushes_periodically_and_at_stop(env):
    att = make_att(env.state, "c1")
    flusher = BillingFlusher(env.state, env.dir, interval=0.05, read_counters=env.kernel)
    stop = threading.Event()
    t = threading.Thread(target=flusher.run, args=(stop,))
    t.start()
    try:
        for _ in range(5):
            env.kernel.send(att, tx=10)
            threading.Event().wait(0.08)
        env.kernel.send(att, tx=1)
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive() and flusher.errors == 0
    recs = all_records(env.dir)
    assert len(recs) >= 3  # several intervals...
    assert recs[-1]["counter_tx_bytes"] == 51  # ...and the last one at stop
    check_ledger(env.dir, env.kernel.c)


def test_flusher_survives_a_failing_flush(env):
    att = make_att(env.state, "c1")
    env.kernel.send(att, tx=10)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise SockgateError(102, "cannot read the accounting counters")
        return env.kernel()

    flusher = BillingFlusher(env.state, env.dir, interval=0.02, read_counters=flaky)
    stop = threading.Event()
    t = threading.Thread(target=flusher.run, args=(stop,))
    t.start()
    threading.Event().wait(0.15)
    stop.set()
    t.join(5)
    assert flusher.errors == 1 and len(calls) >= 2
    check_ledger(env.dir, env.kernel.c)


def test_flush_of_an_empty_state_dir_writes_nothing(tmp_path):
    flusher = BillingFlusher(tmp_path / "state", read_counters=lambda: {})
    assert flusher.flush() == []
    assert os.listdir(tmp_path / "state" / "billing") == ["billing.lock"]
