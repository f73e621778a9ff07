"""scripts/soak: options, fault schedule, billing comparison, verdict and report
(pure logic; the soak itself is a benchmark run in the lab, not part of the suite)."""
from __future__ import annotations

import json
import random

import pytest

from runtime.bench.soak import (
    FAULT_KINDS,
    PLUGIN_KILL_AFTER,
    PLUGIN_KILL_DEFAULT_S,
    CniCall,
    Cycle,
    Leftovers,
    Sample,
    calls_by_outcome,
    compare_billing,
    conntrack_leftovers,
    far_table,
    fault_schedule,
    incarnations,
    kill_delay,
    log_summary,
    metric_summary,
    parse_conntrack,
    parse_options,
    render,
    sample_summary,
    verdict,
)

# --- options --------------------------------------------------------------------------

def test_defaults_are_the_issue_s_run():
    o = parse_options([])
    assert (o.minutes, o.workers, o.fault_interval, o.faults) == (20.0, 6, 120.0, FAULT_KINDS)
    assert o.max_cycles > 0 and not o.json


def test_options_parse_and_no_faults():
    o = parse_options(["--minutes", "5", "--workers", "6", "--fault-interval", "30", "--faults",
                       "nft-flush,agent-kill", "--max-cycles", "10", "--json"])
    assert (o.minutes, o.workers, o.fault_interval, o.faults, o.max_cycles, o.json) == \
        (5.0, 6, 30.0, ("nft-flush", "agent-kill"), 10, True)
    assert parse_options(["--fault-interval", "0"]).faults == ()


@pytest.mark.parametrize("argv", [["--minutes", "0"], ["--workers", "0"], ["--workers", "33"],
                                  ["--faults", "reboot"], ["--fault-interval", "1"], ["--max-cycles", "0"],
                                  ["--sample-interval", "0"], ["--hold", "-1"]])
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_options(argv)
    assert exc.value.code == 2


# --- schedule, calls, samples ------------------------------------------------------------

def test_fault_schedule_rotates_kinds_before_the_end():
    assert fault_schedule(20 * 60, 120, FAULT_KINDS) == [
        (120 * k, FAULT_KINDS[(k - 1) % 3]) for k in range(1, 10)]   # 9 faults, 3 of each kind
    assert fault_schedule(60, 30, ("nft-flush",)) == [(30, "nft-flush")]  # none at the very end
    assert fault_schedule(60, 0, FAULT_KINDS) == [] and fault_schedule(60, 10, ()) == []


def test_kill_delay_is_a_share_of_the_usual_add_time():
    rng = random.Random(3)
    lo, hi = PLUGIN_KILL_AFTER
    for recent, median in (([0.03, 0.02, 0.5, 0.025, 0.021], 0.025), ([], PLUGIN_KILL_DEFAULT_S), ([0.2], 0.2)):
        delays = [kill_delay(recent, rng) for _ in range(200)]
        assert lo * median <= min(delays) and max(delays) <= hi * median


def _cycle(cid: str, add_rc: int = 0, dels: tuple[int, ...] = (0,), start: float = 0.0, end: float = 1.0,
           far: tuple[int, int] = (0, 0), killed: bool = False, code: int | None = None) -> Cycle:
    c = Cycle(0, 0, cid, "/run/netns/x", start)
    c.add = CniCall("ADD", add_rc, code if add_rc else None, 0.03, killed)
    c.dels = [CniCall("DEL", rc, 11 if rc else None, 0.02) for rc in dels]
    c.del_ok, c.end = dels[-1] == 0, end
    c.far_packets, c.far_bytes = far
    return c


def test_calls_by_outcome_counts_codes_and_kills():
    cycles = [_cycle("a"), _cycle("b", add_rc=-9, killed=True, dels=(1, 0)), _cycle("c", add_rc=1, code=11)]
    assert calls_by_outcome(cycles) == {"ADD code 11": 1, "ADD killed (SIGKILL)": 1, "ADD ok": 1,
                                        "DEL code 11": 1, "DEL ok": 3}


def test_metric_summary_skips_gaps():
    assert metric_summary([None, 5, 9, None, 7, None]) == {"start": 5, "peak": 9, "end": 7}
    assert metric_summary([None]) == {"start": None, "peak": None, "end": None}
    samples = [Sample(t, 0, 0, 0, 0, {"tx4": e, "rx": e}, 1, 100 + t, 12, 3) for t, e in ((0, 0), (1, 2), (2, 0))]
    s = sample_summary(samples)
    assert s["elements"] == {"start": 0, "peak": 4, "end": 0} and s["rss_kib"]["peak"] == 102


def test_incarnations_split_samples_by_agent_pid():
    samples = [Sample(0, 0, 0, 0, 0, {}, 10, 100, 12, 0), Sample(2, 0, 0, 0, 0, {}, 10, 130, 14, 0),
               Sample(4, 0, 0, 0, 0, {}, None, None, None, 0), Sample(6, 0, 0, 0, 0, {}, 11, 90, 12, 0),
               Sample(8, 0, 0, 0, 0, {}, 11, 95, 12, 0)]
    got = incarnations(samples)
    assert [(i["pid"], i["rss_first"], i["rss_last"], i["rss_peak"], i["fds_peak"]) for i in got] == \
        [(10, 100, 130, 130, 14), (11, 90, 95, 95, 12)]
    assert (got[1]["t0"], got[1]["t1"]) == (6, 8)


# --- billing ---------------------------------------------------------------------------

def _rec(tx: int, pkts: int, final: bool = True, **flags) -> dict:
    return {"tx_bytes": tx, "tx_packets": pkts, "final": final, **flags}


def test_exact_billing_sums_records_per_container():
    cycles = [_cycle("a", far=(5, 900)), _cycle("b", far=(2, 100))]
    records = {"a": [_rec(600, 3, final=False), _rec(300, 2)], "b": [_rec(100, 2)]}
    out = compare_billing(cycles, records, flush_times=[])
    assert out["problems"] == []
    assert out["exact"] | {} == {"containers": 2, "billed_bytes": 1000, "billed_packets": 7, "far_bytes": 1000,
                                 "far_packets": 7, "difference_bytes": 0, "difference_packets": 0}


def test_an_unflagged_shortfall_is_a_difference_even_after_a_flush():
    # What the soak found: a reload before an attachment's first record lost bytes
    # without saying counter_reset.
    out = compare_billing([_cycle("a", start=1, end=3, far=(14, 4036))], {"a": [_rec(2068, 7)]}, flush_times=[2.0])
    assert out["exact"]["difference_bytes"] == -1968 and out["exact"]["difference_packets"] == -7
    assert len(out["problems"]) == 1 and "no counter_reset" in out["problems"][0] and "nft-flush" in out["problems"][0]


def test_declared_loss_needs_a_flush_and_never_bills_more_than_sent():
    ok = compare_billing([_cycle("a", start=1, end=3, far=(10, 1000))],
                         {"a": [_rec(0, 0, counters_missing=True)]}, flush_times=[2.0])
    assert ok["problems"] == [] and ok["declared_loss"]["unbilled_bytes"] == 1000
    assert ok["exact"]["containers"] == 0
    no_flush = compare_billing([_cycle("a", start=1, end=3, far=(10, 1000))],
                               {"a": [_rec(400, 4, final=False), _rec(100, 1, counter_reset=True)]}, flush_times=[5.0])
    assert len(no_flush["problems"]) == 1 and "no nft-flush" in no_flush["problems"][0]
    too_much = compare_billing([_cycle("a", start=1, end=3, far=(1, 100))],
                               {"a": [_rec(200, 1, counter_reset=True)]}, flush_times=[2.0])
    assert any("more than the far end" in p for p in too_much["problems"])


def test_missing_final_record_and_strangers_are_problems():
    out = compare_billing([_cycle("a", far=(0, 0))], {"a": [_rec(0, 0, final=False)], "zz": [_rec(1, 1)]}, [])
    assert any("no final billing record" in p for p in out["problems"])
    assert any("never added" in p for p in out["problems"])
    # A failed ADD whose rollback wrote nothing: no record needed.
    assert compare_billing([_cycle("b", add_rc=-9, killed=True)], {}, [])["problems"] == []


# --- conntrack, logs -----------------------------------------------------------------------

CT = """\
tcp      6 117 TIME_WAIT src=10.77.0.5 dst=93.184.215.100 sport=40000 dport=9000 src=93.184.215.100 dst=198.18.0.2 sport=9000 dport=40000 [ASSURED] mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.77.0.6 dst=93.184.215.100 sport=40001 dport=9000 src=93.184.215.100 dst=198.18.0.2 sport=9000 dport=40001 [ASSURED] mark=0 use=1
udp      17 25 src=fd77:5067:6174::7 dst=2606:2800:21f:cb07::64 sport=5000 dport=9000 src=2606:2800:21f:cb07::64 dst=2001:db8:5067::2 sport=9000 dport=5000 mark=0 use=1
udp      17 28 src=198.18.0.2 dst=8.8.8.8 sport=5353 dport=53 src=8.8.8.8 dst=198.18.0.2 sport=53 dport=5353 mark=0 use=1
conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.
"""


def test_conntrack_entries_of_containers_and_the_fair_bound():
    entries = parse_conntrack(CT, ["10.77.0.0/16", "fd77:5067:6174::/64"])
    assert [(s, t) for s, t, _ in entries] == [("TIME_WAIT", 117), ("ESTABLISHED", 431999), ("udp", 25)]
    left = conntrack_leftovers(entries, 120)
    assert len(left) == 1 and "ESTABLISHED" in left[0]


def test_log_summary_counts_warnings_and_errors_by_first_line():
    lines = [json.dumps({"level": "info", "msg": "ADD x rc=0"}),
             json.dumps({"level": "error", "msg": "nft transaction failed: File exists\nadd table inet sockgate"}),
             json.dumps({"level": "error", "msg": "nft transaction failed: File exists\nother script"}),
             json.dumps({"level": "warning", "msg": "reloaded"}), "not json"]
    assert log_summary(lines) == [("error: nft transaction failed: File exists", 2), ("warning: reloaded", 1)]


def test_far_table_counts_each_worker_s_destinations():
    text = far_table(2)
    assert text.count("counter name \"w0\"") == 2 and text.count("counter name \"w1\"") == 2
    assert "93.184.215.100" in text and "2606:2800:21f:cb07::65" in text and "dport" not in text


# --- verdict and report -------------------------------------------------------------------

def _report(**over) -> dict:
    clean = Leftovers()
    rep = {
        "lab": "sgl-000000", "cpus": 2, "kernel": "k", "churn_s": 60.0, "cycles": 2, "cycles_add_ok": 2,
        "probes": 8, "probe_failures": 0, "seconds": 70.0, "log_dir": "/tmp/x",
        "args": {"minutes": 1.0, "workers": 2, "fault_interval": 10.0, "faults": list(FAULT_KINDS),
                 "max_cycles": 100, "billing_interval": 5.0, "hold": 1.0, "rss_bound_mib": 32.0, "fd_bound": 4,
                 "seed": 1},
        "calls": {"ADD ok": 2, "DEL ok": 2}, "plugin_kills": {"armed": 2, "killed": 1}, "del_retries": {},
        "faults": [{"t": 10.0, "kind": "agent-kill", "detail": "pid 1 killed"}],
        "baseline": vars(clean), "after_dels": vars(Leftovers()), "after_gc": vars(Leftovers()),
        "stuck_netns": [], "gc": {"rc": 0, "stdout": ""},
        "conntrack": {"fair_s": 120, "start": 10, "after_dels": 50, "end": 40, "leftover": []},
        "agent": {"restarts": 1, "rss_start_kib": 47000, "fds_start": 12, "rss_end_kib": 48000, "fds_end": 12,
                  "rss_growth_kib": 1000, "fd_growth": 0},
        "agent_log": [], "samples": 3,
        "monitor": {k: {"start": 0, "peak": 1, "end": 0} for k in
                    ("veths", "leases", "records", "temps", "elements", "rss_kib", "fds", "conntrack")},
        "billing": compare_billing([_cycle("a", far=(1, 10))], {"a": [_rec(10, 1)]}, []),
        "ledger_records": 1, "ledger_problems": [],
        "cycles_detail": [{"cid": "a", "del_ok": True}],
    }
    for key, value in over.items():
        rep[key] = value
    return rep


def test_clean_run_passes_and_prints_pass():
    rep = _report()
    rep["failures"] = verdict(rep)
    assert rep["failures"] == []
    text = render(rep)
    assert "RESULT: PASS" in text and "exact (no reset flag)" in text and "agent-kill 1" in text
    assert "1 of 2 armed ADDs killed" in text


def test_each_kind_of_failure_is_reported():
    assert any("DEL never returned 0" in f for f in verdict(_report(cycles_detail=[{"cid": "a", "del_ok": False}])))
    left = vars(Leftovers(veths=1))
    fails = verdict(_report(after_gc=left, after_dels=left))
    assert any(f.startswith("left after GC: veths 1") for f in fails)
    assert any("before GC" in f for f in fails)
    # Temp files of killed writers are GC's to remove: only after GC do they count.
    assert verdict(_report(after_dels=vars(Leftovers(temps=3)))) == []
    agent = dict(_report()["agent"], rss_growth_kib=40 * 1024, fd_growth=9)
    fails = verdict(_report(agent=agent))
    assert any("RSS grew" in f for f in fails) and any("fds grew" in f for f in fails)
    ct = dict(_report()["conntrack"], leftover=["tcp 6 431999 ESTABLISHED src=10.77.0.6"])
    assert any("conntrack" in f for f in verdict(_report(conntrack=ct)))
    slow = [{"t": 30.0, "kind": "nft-flush", "detail": "", "recovered_s": 12.0},
            {"t": 60.0, "kind": "nft-flush", "detail": "", "recovered_s": None},
            {"t": 90.0, "kind": "nft-flush", "detail": "", "recovered_s": 0.02}]
    fails = [f for f in verdict(_report(faults=slow)) if "table was missing" in f]
    assert len(fails) == 2 and "12.0 s" in fails[0] and "more than 30 s" in fails[1]
    bill = compare_billing([_cycle("a", far=(2, 20))], {"a": [_rec(10, 1)]}, [])
    fails = verdict(_report(billing=bill))
    assert any(f.startswith("billing difference: -10 B, -1 packets") for f in fails)
    rep = _report(billing=bill)
    rep["failures"] = verdict(rep)
    assert "RESULT: FAIL" in render(rep)


# --- regressions of what the soak found ----------------------------------------------------

def test_reaper_marks_survive_a_killed_agent(tmp_path, monkeypatch):
    """kill -9 of the agent with links queued for its reaper left them, down, for
    good. The marks under the run dir let the next reaper delete them; a marked link
    that is up again, or recorded again (the same container added anew), is spared."""
    import threading

    from runtime.kernel import netns
    from runtime.kernel.netlink import route as rtnl
    pending = tmp_path / "retired"
    kernel = {"sgaaaaaaaaaaaa": rtnl.Link(5, "m", 0), "sgbbbbbbbbbbbb": rtnl.Link(6, "m", rtnl.IFF_UP),
              "sgcccccccccccc": rtnl.Link(7, "m", 0), "sgdddddddddddd": rtnl.Link(8, "m", 0)}
    deleted: list[str] = []

    class FakeRtnl:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def run(self, *reqs):
            return []

    monkeypatch.setattr(rtnl, "Rtnl", FakeRtnl)
    monkeypatch.setattr(netns, "links", lambda names: {n: kernel[n] for n in names if n in kernel})
    monkeypatch.setattr(netns, "delete_link", lambda name: deleted.append(name) or True)

    killed = netns.LinkReaper(pending)
    for name in ("sgaaaaaaaaaaaa", "sgbbbbbbbbbbbb", "sgcccccccccccc", "sgdddddddddddd", "sgeeeeeeeeeeee"):
        assert killed.retire(name)
    # ... and the agent dies before its reaper ran: the marks stay.
    assert sorted(p.name for p in pending.iterdir())[:2] == ["sgaaaaaaaaaaaa", "sgbbbbbbbbbbbb"]

    reaper = netns.LinkReaper(pending, in_use=lambda: {"sgcccccccccccc"})
    stop = threading.Event()
    stop.set()   # run() drains what recover() queued, then returns
    reaper.run(stop)
    # Down and unrecorded: deleted. Up, recorded, or gone: only unmarked.
    assert deleted == ["sgaaaaaaaaaaaa", "sgdddddddddddd"]
    assert list(pending.iterdir()) == []
