"""Soak: container churn with faults, then a leak and billing audit (issue #11).

    scripts/soak [--minutes 20] [--workers 6] [--residents 2] [--fault-interval 120]
                 [--max-cycles 100000] [--json]      (--help: every option)

What is churned, the faults, what is monitored and exactly what the verdict checks:
docs/benchmarks.md ("soak").
"""
from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime import textable
from runtime.bench import report

FAULT_KINDS = ("agent-kill", "nft-flush", "plugin-kill")
NETWORK = "sgsoak"
FAR_TABLE = "sgsoak_far"
PORT = 9000
RING = 3                    # app netns per worker, used in turn
RESTART_DELAY = 0.5         # systemd's RestartSec is 100 ms by default; a little more
# A killed ADD gets SIGKILL after this share of the worker's recent ADD times (median):
# mid-ADD, before or after the shim forwarded the request to the agent.
PLUGIN_KILL_AFTER = (0.2, 0.9)
PLUGIN_KILL_DEFAULT_S = 0.02   # before the worker timed any ADD
SETTLE_TIMEOUT = 90.0       # reaper: ~25 links a second
NETNS_FREE_TIMEOUT = 20.0   # a worker's netns whose old interface stays longer is a leak
FAR_SETTLE = 0.1            # after DEL, before reading the far-end counter (veth backlog)
# After a flush the agent reloads at once (nf_tables announces it), else at its next
# check (every 2 s): longer without the table means containers' traffic leaves
# unfiltered, un-NATed and unbilled.
RELOAD_BOUND = 5.0
RELOAD_WAIT = 30.0
RESIDENT_PERIOD = 3.0       # s between a resident's traffic bursts
COUNTED_SETS = ("tx4", "tx6", "rx", "ifaces")
TCP_SIZES = (1, 1400, 20_000)
UDP_SIZES = (1, 200, 1200)  # replies stay under the MTU: containers can't send fragments


def _progress(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


# --- options -------------------------------------------------------------------------

@dataclass
class Options:
    """What parse_options checked; the defaults are the parser's (--help shows them)."""

    minutes: float
    workers: int
    residents: int
    fault_interval: float
    faults: tuple[str, ...]
    max_cycles: int
    sample_interval: float
    billing_interval: float
    hold: float
    del_timeout: float
    rss_bound_mib: float
    fd_bound: int
    seed: int
    json: bool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="soak",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Churn containers through the sockgate CNI executable and agent with N workers for a
given time, injecting faults at intervals (kill -9 of the agent, then a restart;
`nft flush ruleset` in the lab's node netns; SIGKILL of the CNI executable mid-ADD,
then DEL until it returns 0), while sampling veths, leases, records, temp files, nft
set elements, the agent's RSS and fds and conntrack entries. Then GC, and a table of
what was left, errors by CNI code, billed against far-end bytes and packets.
Everything runs in a throwaway lab (network namespaces; nothing leaves the machine,
the host's netns, nft tables and processes are never touched), torn down at the end,
also on errors and Ctrl-C. Needs root. The module docstring (runtime/bench/soak.py)
says exactly what is checked.""",
        epilog="""\
Exit status: 0 no leak, no billing difference, every DEL returned 0 eventually;
1 any of those failed; 2 bad usage; 3 the soak could not run. Progress goes to
stderr, the report (or --json) to stdout.""")
    p.add_argument("--minutes", type=float, default=20.0, help="churn time (default %(default)s)")
    p.add_argument("--workers", type=int, default=6, help="parallel churn workers (default %(default)s)")
    p.add_argument("--residents", type=int, default=2,
                   help="long-lived containers besides the churn: attached (adjacent addresses) before it, "
                        "sending every few seconds through every fault, deleted at the end (default %(default)s)")
    p.add_argument("--fault-interval", type=float, default=120.0, metavar="SECONDS",
                   help="one fault every SECONDS, kinds in rotation; 0: no faults (default %(default)s)")
    p.add_argument("--faults", default=",".join(FAULT_KINDS),
                   help="fault kinds, comma-separated, in rotation order (default %(default)s)")
    p.add_argument("--max-cycles", type=int, default=100_000,
                   help="stop after this many ADD/DEL cycles, all workers together (default %(default)s)")
    p.add_argument("--sample-interval", type=float, default=2.0, metavar="SECONDS",
                   help="monitoring period (default %(default)s)")
    p.add_argument("--billing-interval", type=float, default=5.0, metavar="SECONDS",
                   help="the agent's --billing-interval: periodic records during the churn (default %(default)s)")
    p.add_argument("--hold", type=float, default=1.0, metavar="SECONDS",
                   help="at most this long (random) between a container's two traffic bursts (default %(default)s)")
    p.add_argument("--del-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="retry a failed DEL for this long before calling it never succeeded (default %(default)s)")
    p.add_argument("--rss-bound-mib", type=float, default=32.0,
                   help="allowed agent RSS growth, idle after warm-up to idle at the end (default %(default)s)")
    p.add_argument("--fd-bound", type=int, default=4,
                   help="allowed growth of the agent's open fds, same moments (default %(default)s)")
    p.add_argument("--seed", type=int, default=1,
                   help="random seed of sizes, holds and kill delays (default %(default)s)")
    report.add_json_flag(p, help="print the report as one JSON object")
    return p


def parse_options(argv: Sequence[str] | None = None) -> Options:
    """Parse and check; argparse's error (exit 2) on bad values."""
    parser = build_parser()
    a = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in a.faults.split(",") if k.strip())
    if unknown := [k for k in kinds if k not in FAULT_KINDS]:
        parser.error(f"--faults: unknown kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}")
    if not 0 < a.minutes <= 24 * 60:
        parser.error("--minutes must be more than 0 and at most 1440")
    if not 1 <= a.workers <= 32 or not 0 <= a.residents <= 8:
        parser.error("--workers must be 1..32 and --residents 0..8")
    if a.fault_interval < 0 or (kinds and 0 < a.fault_interval < 5):
        parser.error("--fault-interval must be 0 (no faults) or at least 5 s")
    if a.max_cycles < 1:
        parser.error("--max-cycles must be >= 1")
    for name in ("sample_interval", "billing_interval", "del_timeout"):
        if getattr(a, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be more than 0")
    if a.hold < 0 or a.rss_bound_mib < 0 or a.fd_bound < 0:
        parser.error("--hold, --rss-bound-mib and --fd-bound must be >= 0")
    return Options(minutes=a.minutes, workers=a.workers, residents=a.residents, fault_interval=a.fault_interval,
                   faults=kinds if a.fault_interval > 0 else (), max_cycles=a.max_cycles,
                   sample_interval=a.sample_interval, billing_interval=a.billing_interval, hold=a.hold,
                   del_timeout=a.del_timeout, rss_bound_mib=a.rss_bound_mib, fd_bound=a.fd_bound,
                   seed=a.seed, json=a.json)


# --- records of the run (plain data) ------------------------------------------------------

@dataclass
class CniCall:
    command: str
    rc: int
    code: int | None      # the CNI error code, when the plugin printed an error
    seconds: float
    killed: bool = False  # we SIGKILLed the plugin (plugin-kill fault)
    msg: str = ""


@dataclass
class Cycle:
    worker: int
    index: int
    cid: str
    netns: str
    add_start: float      # seconds since the churn started
    add: CniCall | None = None
    dels: list[CniCall] = field(default_factory=list)
    del_ok: bool = False
    end: float = 0.0      # when the last DEL returned
    probes: int = 0
    probe_failures: int = 0
    far_packets: int = 0
    far_bytes: int = 0
    kill_armed: bool = False  # a plugin-kill fault was meant for this ADD


@dataclass
class Sample:
    t: float
    veths: int
    leases: int
    records: int
    temps: int
    elements: dict[str, int]
    agent_pid: int | None
    rss_kib: int | None
    fds: int | None
    conntrack: int | None


@dataclass
class FaultEvent:
    t: float
    kind: str
    detail: str = ""
    recovered_s: float | None = None  # nft-flush: until sockgate's table was back (None: not within RELOAD_WAIT)


@dataclass
class Leftovers:
    """Things that should be back to the start: counts, and a few names for the report."""
    veths: int = 0
    leases: int = 0
    records: int = 0
    temps: int = 0
    elements: int = 0
    app_ifaces: int = 0
    names: dict[str, list[str]] = field(default_factory=dict)


# --- pure logic (unit-tested) --------------------------------------------------------------

def fault_schedule(duration_s: float, interval_s: float, kinds: Sequence[str]) -> list[tuple[float, str]]:
    """(time, kind) of each fault: one every interval, strictly before the end, the
    kinds in rotation."""
    if not kinds or interval_s <= 0:
        return []
    out, k = [], 1
    while k * interval_s < duration_s:
        out.append((k * interval_s, kinds[(k - 1) % len(kinds)]))
        k += 1
    return out


def kill_delay(recent: Sequence[float], rng: random.Random) -> float:
    """When to SIGKILL an ADD: a random share of the worker's median recent ADD time,
    so that the kill lands while the plugin runs, whatever the agent's state makes
    that time (~20 ms forwarded, ~200 ms in-process)."""
    base = sorted(recent)[len(recent) // 2] if recent else PLUGIN_KILL_DEFAULT_S
    return rng.uniform(*PLUGIN_KILL_AFTER) * base


def call_key(call: CniCall) -> str:
    """How a call counts in "errors by code"."""
    if call.rc == 0:
        return f"{call.command} ok"
    if call.killed:
        return f"{call.command} killed (SIGKILL)"
    return f"{call.command} code {call.code}" if call.code is not None else f"{call.command} exit {call.rc}"


def calls_by_outcome(cycles: Sequence[Cycle]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for c in cycles:
        for call in ([c.add] if c.add else []) + c.dels:
            counts[call_key(call)] += 1
    return dict(sorted(counts.items()))


def metric_summary(values: Sequence[int | None]) -> dict[str, int | None]:
    """start / peak / end of a sampled metric (None samples, e.g. the agent being
    restarted, are skipped)."""
    seen = [v for v in values if v is not None]
    if not seen:
        return {"start": None, "peak": None, "end": None}
    return {"start": seen[0], "peak": max(seen), "end": seen[-1]}


def sample_summary(samples: Sequence[Sample]) -> dict[str, dict[str, int | None]]:
    out = {name: metric_summary([getattr(s, name) for s in samples])
           for name in ("veths", "leases", "records", "temps", "rss_kib", "fds", "conntrack")}
    out["elements"] = metric_summary([sum(s.elements.values()) for s in samples])
    return out


def incarnations(samples: Sequence[Sample]) -> list[dict[str, Any]]:
    """Per agent process (pid), in order: its RSS and fds at its first and last sample
    and their peaks. A kill -9 starts a new one, so growth shows within each."""
    out: list[dict[str, Any]] = []
    for s in samples:
        if s.agent_pid is None or s.rss_kib is None or s.fds is None:
            continue
        if not out or out[-1]["pid"] != s.agent_pid:
            out.append({"pid": s.agent_pid, "t0": s.t, "t1": s.t, "rss_first": s.rss_kib, "rss_last": s.rss_kib,
                        "rss_peak": s.rss_kib, "fds_first": s.fds, "fds_last": s.fds, "fds_peak": s.fds})
        cur = out[-1]
        cur.update(t1=s.t, rss_last=s.rss_kib, fds_last=s.fds, rss_peak=max(cur["rss_peak"], s.rss_kib),
                   fds_peak=max(cur["fds_peak"], s.fds))
    return out


def _overlaps(times: Sequence[float], start: float, end: float) -> bool:
    return any(start <= t <= end for t in times)


def compare_billing(cycles: Sequence[Cycle], records: dict[str, list[dict]],
                    flush_times: Sequence[float]) -> dict[str, Any]:
    """Per container: its billing records (by container id) against the far end.

    exact     no record flagged: sum of tx_bytes / tx_packets == far end, exactly;
    declared  a record says counter_reset or counters_missing (README: what was sent
              before the counters' re-creation is unknown): billed <= far end, and an
              nft-flush happened during the container's life (else the flag itself
              is a problem);
    and: every container whose ADD succeeded has a final record."""
    problems: list[str] = []
    exact = {"containers": 0, "billed_bytes": 0, "billed_packets": 0, "far_bytes": 0, "far_packets": 0}
    declared = dict(exact)
    for c in cycles:
        recs = records.get(c.cid, [])
        billed_b = sum(r.get("tx_bytes", 0) for r in recs)
        billed_p = sum(r.get("tx_packets", 0) for r in recs)
        flags = sorted({f for r in recs for f in ("counter_reset", "counters_missing") if r.get(f)})
        if c.add is not None and c.add.rc == 0 and not any(r.get("final") for r in recs):
            problems.append(f"{c.cid}: ADD succeeded but no final billing record")
        bucket = declared if flags else exact
        bucket["containers"] += 1
        bucket["billed_bytes"] += billed_b
        bucket["billed_packets"] += billed_p
        bucket["far_bytes"] += c.far_bytes
        bucket["far_packets"] += c.far_packets
        if not flags:
            if (billed_b, billed_p) != (c.far_bytes, c.far_packets):
                during = _overlaps(flush_times, c.add_start, c.end)
                flushed = " (an nft-flush happened during its life)" if during else ""
                problems.append(f"{c.cid}: billed {billed_b} B / {billed_p} pkts, far end {c.far_bytes} B / "
                                f"{c.far_packets} pkts, no counter_reset or counters_missing{flushed}")
        else:
            if billed_b > c.far_bytes or billed_p > c.far_packets:
                problems.append(f"{c.cid}: billed {billed_b} B / {billed_p} pkts, more than the far end saw "
                                f"({c.far_bytes} B / {c.far_packets} pkts), records flagged {flags}")
            if not _overlaps(flush_times, c.add_start, c.end):
                problems.append(f"{c.cid}: records flagged {flags} but no nft-flush during its life "
                                f"({c.add_start:.1f}-{c.end:.1f} s)")
    for key in ("bytes", "packets"):
        exact[f"difference_{key}"] = exact[f"billed_{key}"] - exact[f"far_{key}"]
        declared[f"unbilled_{key}"] = declared[f"far_{key}"] - declared[f"billed_{key}"]
    known = {c.cid for c in cycles}
    strangers = sorted(set(records) - known)
    if strangers:
        problems.append(f"billing records of containers the soak never added: {strangers[:5]}")
    return {"exact": exact, "declared_loss": declared, "problems": problems}


def conntrack_leftovers(entries: Sequence[tuple[str, int, str]], fair_s: int) -> list[str]:
    """entries: (state or protocol, remaining timeout s, line) of conntrack entries of
    container addresses once nothing is attached. Those that outlive fair_s leak."""
    return [line for _, timeout, line in entries if timeout > fair_s]


def verdict(rep: dict[str, Any]) -> list[str]:
    """Every reason to fail, from the collected numbers."""
    fails: list[str] = []
    never = [c["cid"] for c in rep["cycles_detail"] if not c["del_ok"]]
    if never:
        fails.append(f"DEL never returned 0 for {len(never)} container(s): {never[:5]}")
    base, after_dels, end = rep["baseline"], rep["after_dels"], rep["after_gc"]
    for what in ("veths", "leases", "records", "temps", "elements", "app_ifaces"):
        if end[what] > base[what]:
            fails.append(f"left after GC: {what} {end[what]} (start {base[what]})")
    for what in ("veths", "leases", "records", "elements", "app_ifaces"):
        if after_dels[what] > base[what]:
            fails.append(f"left after every DEL returned 0 (before GC): {what} {after_dels[what]} "
                         f"(start {base[what]})")
    if rep["stuck_netns"]:
        fails.append(f"a container interface stayed in its netns for more than {NETNS_FREE_TIMEOUT:.0f} s after "
                     f"DEL: {rep['stuck_netns'][:5]}")
    ct = rep["conntrack"]
    if ct["leftover"]:
        fails.append(f"{len(ct['leftover'])} conntrack entr(ies) of deleted containers outlive "
                     f"{ct['fair_s']} s: {ct['leftover'][:3]}")
    agent = rep["agent"]
    if agent["rss_growth_kib"] is not None and agent["rss_growth_kib"] > rep["args"]["rss_bound_mib"] * 1024:
        fails.append(f"agent RSS grew {agent['rss_growth_kib'] / 1024:.1f} MiB "
                     f"(bound {rep['args']['rss_bound_mib']} MiB)")
    if agent["fd_growth"] is not None and agent["fd_growth"] > rep["args"]["fd_bound"]:
        fails.append(f"agent fds grew by {agent['fd_growth']} (bound {rep['args']['fd_bound']})")
    if agent["rss_growth_kib"] is None or agent["fd_growth"] is None:
        fails.append("agent RSS/fds could not be measured at the start or the end")
    for f in rep["faults"]:
        if f["kind"] == "nft-flush" and (f.get("recovered_s") is None or f["recovered_s"] > RELOAD_BOUND):
            took = "more than " + str(int(RELOAD_WAIT)) if f.get("recovered_s") is None else f"{f['recovered_s']:.1f}"
            fails.append(f"after the nft flush at {f['t']:.0f} s sockgate's table was missing for {took} s "
                         f"(bound {RELOAD_BOUND:g} s): containers unfiltered, un-NATed, unbilled")
    bill = rep["billing"]
    if bill["exact"]["difference_bytes"] or bill["exact"]["difference_packets"]:
        fails.append(f"billing difference: {bill['exact']['difference_bytes']} B, "
                     f"{bill['exact']['difference_packets']} packets")
    fails += [f"billing: {p}" for p in bill["problems"][:20]]
    if len(bill["problems"]) > 20:
        fails.append(f"billing: ... {len(bill['problems']) - 20} more")
    fails += [f"ledger: {p}" for p in rep["ledger_problems"]]
    if rep["gc"]["rc"] != 0:
        fails.append(f"GC failed: {rep['gc']}")
    return fails


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def render(rep: dict[str, Any]) -> str:
    a = rep["args"]
    out = [f"sockgate soak: lab {rep['lab']}, {rep['cpus']} CPUs, kernel {rep['kernel']}; "
           f"{a['workers']} workers + {a.get('residents', 0)} resident containers for {a['minutes']:g} min "
           f"(max {a['max_cycles']} cycles), "
           f"fault every {a['fault_interval']:g} s ({', '.join(a['faults']) or 'none'}), "
           f"agent billing interval {a['billing_interval']:g} s",
           f"churn {rep['churn_s']:.0f} s: {rep['cycles']} cycles ({rep['cycles_add_ok']} ADDs ok), "
           f"{rep['probes']} probes ({rep['probe_failures']} failed), agent restarts {rep['agent']['restarts']}",
           ""]
    out.append("left behind")
    rows = [[what, str(rep["baseline"][what]), str(rep["after_dels"][what]), str(rep["after_gc"][what])]
            for what in ("veths", "leases", "records", "temps", "elements", "app_ifaces")]
    ct = rep["conntrack"]
    rows.append(["conntrack (node)", _fmt(ct["start"]), _fmt(ct["after_dels"]), _fmt(ct["end"])])
    rows.append([f"  of deleted containers, > {ct['fair_s']} s left", "-", "-", str(len(ct["leftover"]))])
    out += ["  " + line for line in textable.lines(["what", "start", "after DELs", "after GC"], rows, left=(0,))]
    if ct.get("by_state"):
        out.append("  conntrack entries of deleted containers at the end, by state (longest remaining s): "
                   + ", ".join(f"{k} {v} ({ct['longest_by_state'].get(k, '?')})" for k, v in ct["by_state"].items()))
    out.append("")
    out.append("CNI calls by outcome")
    out += ["  " + line for line in textable.lines(["call", "count"], [[k, str(v)] for k, v in rep["calls"].items()],
                                                        left=(0,))]
    if rep["del_retries"]:
        out.append(f"  DELs that needed retries: {rep['del_retries']['containers']} container(s), "
                   f"max {rep['del_retries']['max_attempts']} attempts, longest {rep['del_retries']['max_s']:.1f} s; "
                   f"never succeeded: {rep['del_retries']['never']}")
    out.append("")
    b = rep["billing"]
    ex, dl = b["exact"], b["declared_loss"]
    out.append("billing (tx: billed = sum of the containers' records; far end = counted in the internet netns)")
    rows = [["exact (no reset flag)", str(ex["containers"]), str(ex["billed_bytes"]), str(ex["far_bytes"]),
             str(ex["difference_bytes"]), str(ex["billed_packets"]), str(ex["far_packets"]),
             str(ex["difference_packets"])],
            ["counter_reset/missing", str(dl["containers"]), str(dl["billed_bytes"]), str(dl["far_bytes"]),
             str(-dl["unbilled_bytes"]), str(dl["billed_packets"]), str(dl["far_packets"]),
             str(-dl["unbilled_packets"])]]
    out += ["  " + line for line in textable.lines(["containers", "n", "billed B", "far-end B", "diff B", "billed pkts",
                                                        "far-end pkts", "diff pkts"], rows, left=(0,))]
    problems = len(b["problems"]) + len(rep["ledger_problems"])
    out.append(f"  ledger: {rep['ledger_records']} records; problems: {problems}")
    out.append("")
    out.append("faults injected")
    by_kind = Counter(f["kind"] for f in rep["faults"])
    out.append("  " + (", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())) or "none"))
    pk = rep["plugin_kills"]
    if pk["armed"]:
        out.append(f"  plugin-kill: {pk['killed']} of {pk['armed']} armed ADDs killed while running "
                   f"(the rest had finished)")
    for f in rep["faults"]:
        out.append(f"    {f['t']:7.1f} s  {f['kind']:<12} {f['detail']}")
    out.append("")
    m, ag = rep["monitor"], rep["agent"]
    out.append(f"monitoring ({rep['samples']} samples; start/peak/end)")
    rows = [[name, _fmt(m[key]["start"]), _fmt(m[key]["peak"]), _fmt(m[key]["end"])]
            for name, key in (("veths", "veths"), ("leases", "leases"), ("records", "records"),
                              ("temp files", "temps"), ("set elements", "elements"), ("agent RSS KiB", "rss_kib"),
                              ("agent fds", "fds"), ("conntrack", "conntrack"))]
    out += ["  " + line for line in textable.lines(["metric", "start", "peak", "end"], rows, left=(0,))]
    out.append(f"  agent idle after warm-up: RSS {_fmt(ag['rss_start_kib'])} KiB, {_fmt(ag['fds_start'])} fds; "
               f"idle at the end: RSS {_fmt(ag['rss_end_kib'])} KiB, {_fmt(ag['fds_end'])} fds "
               f"(bounds +{a['rss_bound_mib']:g} MiB, +{a['fd_bound']} fds)")
    for inc in rep.get("agent_incarnations", []):
        out.append(f"  agent pid {inc['pid']} ({inc['t0']:.0f}-{inc['t1']:.0f} s): RSS {inc['rss_first']} -> "
                   f"{inc['rss_last']} KiB (peak {inc['rss_peak']}), fds {inc['fds_first']} -> {inc['fds_last']} "
                   f"(peak {inc['fds_peak']})")
    if rep["agent_log"]:
        out.append("  agent log, warnings and errors: " + "; ".join(f"{n}x {msg}" for msg, n in rep["agent_log"][:8]))
    out.append("")
    fails = rep["failures"]
    out.append("RESULT: " + ("PASS: no leak, 0 billing difference, every DEL returned 0" if not fails else
                             f"FAIL ({len(fails)})"))
    out += [f"  - {f}" for f in fails]
    out.append(f"took {rep['seconds']:.0f} s; agent log, plugin log and ledger kept in {rep.get('log_dir', '?')}")
    return "\n".join(out)


def log_summary(lines: Sequence[str]) -> list[tuple[str, int]]:
    """Warnings and errors of the agent's JSON log, counted by message (the variable
    parts after ':' cut off), most frequent first."""
    counts: Counter[str] = Counter()
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("level") in ("warning", "error", "critical"):
            msg = str(e.get("msg", "")).splitlines()[0] if e.get("msg") else ""
            counts[f"{e['level']}: {msg[:100]}"] += 1
    return counts.most_common()


def parse_conntrack(text: str, pools: Sequence[str]) -> list[tuple[str, int, str]]:
    """(state or protocol, remaining timeout, line) of `conntrack -L` lines whose
    original source (the first src=) is in one of the container pools."""
    nets = [ipaddress.ip_network(p) for p in pools]
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 4 or not words[2].isdigit():
            continue
        try:
            src = ipaddress.ip_address(next(w[4:] for w in words if w.startswith("src=")))
        except (StopIteration, ValueError):
            continue
        if not any(src in n for n in nets):
            continue
        proto, timeout = words[0], int(words[2])
        state = words[3] if words[3].isupper() else proto
        out.append((state, timeout, line.strip()))
    return out


# --- the run ----------------------------------------------------------------------------

class SoakError(Exception):
    """The soak could not run (as opposed to finding a leak)."""


def destination(worker: int) -> tuple[str, str]:
    """The worker's own far-end addresses (public-looking, next to the lab's public_v4 /
    public_v6, which the lab policy allows)."""
    return f"93.184.215.{100 + worker}", f"2606:2800:21f:cb07::{100 + worker:x}"


def far_table(workers: int) -> str:
    """One named counter per worker: every packet the node sends to its destination."""
    from runtime.lab import LAB
    lines = [f"table inet {FAR_TABLE} {{"]
    lines += [f"  counter w{w} {{ }}" for w in range(workers)]
    lines.append("  chain pre { type filter hook prerouting priority -300; policy accept;")
    for w in range(workers):
        v4, v6 = destination(w)
        lines.append(f'    iifname "{LAB.downlink_if}" ip daddr {v4} counter name "w{w}"')
        lines.append(f'    iifname "{LAB.downlink_if}" ip6 daddr {v6} counter name "w{w}"')
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


class Soak:
    def __init__(self, lab: Any, tmp: Path, opts: Options) -> None:
        from runtime.cli.install import install_cni
        from runtime.lab.policy import write_lab_policy
        from tests.conftest import network_conf
        from tests.support.plugin import Plugin
        self.lab, self.tmp, self.opts = lab, tmp, opts
        self.node_path = lab.ns_path(lab.node)
        self.exe = str(install_cni(str(tmp / "bin")))
        policy = write_lab_policy(tmp / "policy.json")
        self.conf = network_conf(NETWORK, tmp, str(policy))
        self.plugin = Plugin(self.exe, self.node_path, self.conf)  # GC, agent set-up
        self.state = Path(self.conf["stateDir"])
        self.agent: Any = None
        self.agent_lock = threading.Lock()   # the injector swaps the agent; the sampler reads it
        self.restarts = 0
        self.stop = threading.Event()
        self.t0 = 0.0
        self.cycles: list[Cycle] = []
        self.cycles_lock = threading.Lock()
        self.cycle_budget = opts.max_cycles
        self.samples: list[Sample] = []
        self.faults: list[FaultEvent] = []
        self.kill_armed: set[int] = set()    # workers whose next ADD gets SIGKILLed
        self.add_times: dict[int, list[float]] = {}  # worker -> its last successful ADDs' durations
        self.rings: dict[int, list[str]] = {}
        self.stuck: list[str] = []
        self.app_names = itertools.count(1)  # workers and residents make netns concurrently
        self.resident_ns: list[str] = []
        self.errors: list[str] = []          # exceptions in threads: the soak could not run properly

    # --- set-up ---
    def now(self) -> float:
        return time.monotonic() - self.t0

    def setup_far_end(self) -> None:
        from tests.test_billing import _lo  # adds an address to the internet's lo
        counters = self.opts.workers + self.opts.residents
        for w in range(counters):
            for addr in destination(w):
                _lo(self.lab, "add", addr)
        self.lab.run(self.lab.internet, ["nft", "-f", "-"], input=far_table(counters))

    def new_app(self) -> str:
        return self.lab.ns_path(self.lab.add_app(f"s{next(self.app_names):04d}"))

    def start_agent(self) -> None:
        from tests.conftest import AgentProcess
        agent = AgentProcess(self.lab, self.plugin, self.tmp,
                             ("--metrics-address", "", "--billing-interval", str(self.opts.billing_interval)))
        try:
            agent.start(timeout=60)
        except RuntimeError as exc:
            raise SoakError(str(exc)) from None
        with self.agent_lock:
            self.agent = agent

    def agent_pid(self) -> int | None:
        with self.agent_lock:
            a = self.agent
        return a.proc.pid if a is not None and a.proc is not None and a.proc.poll() is None else None

    # --- one CNI call, as a runtime makes it ---
    def cni(self, command: str, cid: str, netns: str, kill_after: float | None = None) -> CniCall:
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
               "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1",
               "CNI_PATH": str(Path(self.exe).parent)}
        t0 = time.monotonic()
        # nsenter execs the plugin (no fork): the pid we kill is the plugin's.
        proc = subprocess.Popen(["nsenter", f"--net={self.node_path}", self.exe], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        killed = False
        data = json.dumps(self.conf).encode()
        try:
            out, _ = proc.communicate(data, timeout=kill_after if kill_after is not None else 120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            killed = kill_after is not None
        code, msg = None, ""
        if proc.returncode != 0 and out.strip():
            try:
                err = json.loads(out)
                code, msg = err.get("code"), str(err.get("msg", ""))
            except ValueError:
                msg = out.decode(errors="replace")[:200]
        return CniCall(command, proc.returncode, code, time.monotonic() - t0, killed, msg)

    # --- a worker ---
    def netns_free(self, netns: str) -> bool:
        out = self.lab.run(netns, ["ip", "-o", "link", "show"], check=False).stdout
        return len(out.splitlines()) <= 1   # only lo

    def take_netns(self, worker: int, n: int) -> str:
        """The ring's next netns once its last container's interface is gone (the
        agent's reaper deletes the host veth, and the peer with it). One that stays
        taken is reported and replaced."""
        ring = self.rings[worker]
        slot = n % len(ring)
        deadline = time.monotonic() + NETNS_FREE_TIMEOUT
        while not self.netns_free(ring[slot]):
            if time.monotonic() > deadline:
                self.stuck.append(ring[slot])
                _progress(f"worker {worker}: {ring[slot]} still holds an interface {NETNS_FREE_TIMEOUT:.0f} s "
                          "after its container's DEL; using a new netns")
                ring[slot] = self.new_app()
                break
            time.sleep(0.1)
        return ring[slot]

    def traffic(self, cycle: Cycle, rng: random.Random, v6_first: bool) -> None:
        v4, v6 = destination(cycle.worker)
        for proto, dst in (("tcp", v6 if v6_first else v4), ("udp", v4 if v6_first else v6)):
            size = rng.choice(TCP_SIZES if proto == "tcp" else UDP_SIZES)
            cycle.probes += 1
            try:
                r = self.lab.probe(cycle.netns, proto, dst, PORT, payload=os.urandom(size), timeout=3)
            except (subprocess.SubprocessError, OSError, ValueError):
                # The far end counts whatever did arrive: a failed probe costs no exactness.
                cycle.probe_failures += 1
                continue
            cycle.probe_failures += 0 if r.ok and r.echo_ok else 1

    def far_reset(self, worker: int) -> tuple[int, int]:
        """(packets, bytes) the far end counted for the worker since the last call."""
        out = self.lab.run(self.lab.internet, ["nft", "-j", "reset", "counter", "inet", FAR_TABLE, f"w{worker}"]).stdout
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                return int(item["counter"]["packets"]), int(item["counter"]["bytes"])
        raise SoakError(f"far-end counter w{worker} not found")

    def run_cycle(self, worker: int, n: int, rng: random.Random, cid: str = "") -> Cycle:
        netns = self.take_netns(worker, n)
        cycle = Cycle(worker, n, cid or f"soak-w{worker}-{n:05d}", netns, self.now())
        kill_after = None
        if worker in self.kill_armed:
            self.kill_armed.discard(worker)
            cycle.kill_armed = True
            kill_after = kill_delay(self.add_times.get(worker, []), rng)
        cycle.add = self.cni("ADD", cycle.cid, netns, kill_after)
        if cycle.add.rc == 0:
            times = self.add_times.setdefault(worker, [])
            times[:] = [*times[-19:], cycle.add.seconds]
        if cycle.add.rc == 0:
            self.traffic(cycle, rng, v6_first=False)
            time.sleep(rng.uniform(0, self.opts.hold))
            self.traffic(cycle, rng, v6_first=True)
        self.finish(cycle)
        return cycle

    def finish(self, cycle: Cycle) -> None:
        """DEL until it returns 0 (as a runtime retries; bounded), then what the far end
        counted for this container."""
        deadline = time.monotonic() + self.opts.del_timeout
        while True:
            call = self.cni("DEL", cycle.cid, cycle.netns)
            cycle.dels.append(call)
            if call.rc == 0:
                cycle.del_ok = True
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        cycle.end = self.now()
        time.sleep(FAR_SETTLE)
        cycle.far_packets, cycle.far_bytes = self.far_reset(cycle.worker)

    def resident(self, r: int, attached: threading.Event) -> None:
        """A long-lived container: attached before the churn, sending every
        RESIDENT_PERIOD seconds, deleted at the end. Residents are added one after the
        other, so their addresses are adjacent, as on any node whose first containers
        stay; they live through every fault, flush included."""
        idx = self.opts.workers + r
        rng = random.Random(self.opts.seed * 1000 + idx)
        try:
            cycle = Cycle(idx, 0, f"soak-resident-{r}", self.new_app(), self.now())
            self.resident_ns.append(cycle.netns)
            cycle.add = self.cni("ADD", cycle.cid, cycle.netns)
            attached.set()
            n = 0
            while not self.stop.wait(RESIDENT_PERIOD):
                if cycle.add.rc == 0:
                    self.traffic(cycle, rng, v6_first=bool(n % 2))
                    n += 1
            self.finish(cycle)
            with self.cycles_lock:
                self.cycles.append(cycle)
        except Exception as exc:  # noqa: BLE001 -- reported
            self.errors.append(f"resident {r}: {type(exc).__name__}: {str(exc)[:300]}")
            attached.set()

    def status(self) -> str:
        s = self.samples[-1] if self.samples else None
        with self.cycles_lock:
            done, bad = len(self.cycles), sum(1 for c in self.cycles if not c.del_ok)
        return (f"{done} cycles, {len(self.faults)} faults, DEL never ok {bad}"
                + (f"; veths {s.veths}, leases {s.leases}, elements {sum(s.elements.values())}, agent RSS "
                   f"{s.rss_kib} KiB fds {s.fds}, conntrack {s.conntrack}" if s else ""))

    def worker(self, worker: int) -> None:
        rng = random.Random(self.opts.seed * 1000 + worker)
        n = 0
        try:
            while not self.stop.is_set():
                with self.cycles_lock:
                    if self.cycle_budget <= 0:
                        return
                    self.cycle_budget -= 1
                cycle = self.run_cycle(worker, n, rng)
                with self.cycles_lock:
                    self.cycles.append(cycle)
                n += 1
        except Exception as exc:  # noqa: BLE001 -- reported; the other workers go on
            self.errors.append(f"worker {worker}: {type(exc).__name__}: {str(exc)[:300]}")
            _progress(f"worker {worker} stopped: {type(exc).__name__}: {str(exc)[:300]}")

    # --- faults ---
    def inject(self, kind: str) -> FaultEvent:
        t = self.now()
        if kind == "agent-kill":
            with self.agent_lock:
                agent, self.agent = self.agent, None
            if agent is None or agent.proc is None:
                raise SoakError("no agent to kill")
            pid = agent.proc.pid
            agent.stop(signal.SIGKILL, timeout=10)
            time.sleep(RESTART_DELAY)
            t1 = time.monotonic()
            self.start_agent()
            self.restarts += 1
            return FaultEvent(t, kind, f"pid {pid} killed; new agent ready {time.monotonic() - t1:.1f} s "
                                       f"after the restart (pid {self.agent_pid()})")
        if kind == "nft-flush":
            self.lab.run(self.lab.node, ["nft", "flush", "ruleset"])   # the lab's node netns only
            t1 = time.monotonic()
            while not self.table_exists():
                if time.monotonic() - t1 > RELOAD_WAIT:
                    return FaultEvent(t, kind, f"in the lab node netns; table NOT back within {RELOAD_WAIT:.0f} s")
                time.sleep(0.05)
            back = time.monotonic() - t1
            return FaultEvent(t, kind, f"in the lab node netns; table back after {back:.2f} s", back)
        if kind == "plugin-kill":
            self.kill_armed = set(range(self.opts.workers))
            return FaultEvent(t, kind, f"next ADD of each of the {self.opts.workers} workers, "
                                       f"{PLUGIN_KILL_AFTER[0]:.0%}-{PLUGIN_KILL_AFTER[1]:.0%} of its usual "
                                       "duration after the exec")
        raise ValueError(kind)

    def injector(self, schedule: list[tuple[float, str]]) -> None:
        for at, kind in schedule:
            if self.stop.wait(max(0.0, at - self.now())):
                return
            try:
                ev = self.inject(kind)
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"fault {kind}: {type(exc).__name__}: {exc}")
                ev = FaultEvent(self.now(), kind, f"FAILED: {exc}")
                if self.agent_pid() is None:   # never leave the churn without an agent for good
                    try:
                        self.start_agent()
                    except SoakError as exc2:
                        self.errors.append(f"agent restart: {exc2}")
            self.faults.append(ev)
            _progress(f"{ev.t:6.1f} s fault {ev.kind}: {ev.detail}")

    # --- monitoring ---
    def table_exists(self) -> bool:
        return self.lab.run(self.lab.node, ["nft", "list", "table", "inet", "sockgate"], check=False).returncode == 0

    def node_veths(self) -> list[str]:
        out = self.lab.run(self.lab.node, ["ip", "-br", "link", "show"], timeout=60).stdout
        return [line.split("@")[0].split()[0] for line in out.splitlines() if line.startswith("sg")]

    def state_files(self) -> dict[str, list[str]]:
        from runtime.fsutil import is_temp_name
        from tests.support.plugin import state_leftovers
        left = state_leftovers(self.state, NETWORK)
        temps = []
        for d, _, files in os.walk(self.state):
            temps += [str(Path(d, f).relative_to(self.state)) for f in files if is_temp_name(f)]
        return {"leases": [n for n in left["leases"] if not is_temp_name(n)],
                "records": [n for n in left["records"] if not is_temp_name(n)], "temps": sorted(temps)}

    def elements(self) -> dict[str, int]:
        from tests.support.plugin import nft_set
        return {name: len(nft_set(self.node_path, name)) for name in COUNTED_SETS}

    def conntrack_count(self) -> int | None:
        cp = self.lab.run(self.lab.node, ["cat", "/proc/sys/net/netfilter/nf_conntrack_count"], check=False)
        return int(cp.stdout) if cp.returncode == 0 and cp.stdout.strip().isdigit() else None

    @staticmethod
    def proc_usage(pid: int | None) -> tuple[int | None, int | None]:
        """(VmRSS KiB, open fds) of a live process."""
        if pid is None:
            return None, None
        try:
            rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))
            return rss, len(os.listdir(f"/proc/{pid}/fd"))
        except (OSError, StopIteration, ValueError):
            return None, None

    def sample(self) -> Sample:
        files = self.state_files()
        pid = self.agent_pid()
        rss, fds = self.proc_usage(pid)
        return Sample(self.now(), len(self.node_veths()), len(files["leases"]), len(files["records"]),
                      len(files["temps"]), self.elements(), pid, rss, fds, self.conntrack_count())

    def sampler(self) -> None:
        while not self.stop.wait(self.opts.sample_interval):
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # noqa: BLE001 -- a missed sample is not a reason to stop
                _progress(f"sample failed: {type(exc).__name__}: {exc}")

    def leftovers(self) -> Leftovers:
        files = self.state_files()
        veths = self.node_veths()
        elems = self.elements()
        busy = [ns for ns in [*(ns for ring in self.rings.values() for ns in ring), *self.resident_ns]
                if not self.netns_free(ns)]
        return Leftovers(len(veths), len(files["leases"]), len(files["records"]), len(files["temps"]),
                         sum(elems.values()), len(busy),
                         {"veths": veths[:10], "leases": files["leases"][:10], "records": files["records"][:10],
                          "temps": files["temps"][:10], "elements": [f"{k} {v}" for k, v in elems.items() if v],
                          "app_ifaces": busy[:10]})

    def settle(self, baseline: int) -> float:
        """Wait until the reaper deleted retired veths (at most SETTLE_TIMEOUT)."""
        t0 = time.monotonic()
        while len(self.node_veths()) > baseline and time.monotonic() - t0 < SETTLE_TIMEOUT:
            time.sleep(0.25)
        return time.monotonic() - t0

    def conntrack_audit(self) -> dict[str, Any]:
        from runtime.lab import LAB
        keys = ("nf_conntrack_tcp_timeout_time_wait", "nf_conntrack_tcp_timeout_fin_wait",
                "nf_conntrack_tcp_timeout_last_ack", "nf_conntrack_tcp_timeout_close_wait",
                "nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream")
        # sockgate gives containers' flows a ct timeout of the policy's idleTimeout.
        from netpolicy.policy import parse_policy
        fair = parse_policy(json.loads(Path(self.conf["policyFile"]).read_text())).idle_timeout
        for k in keys:
            cp = self.lab.run(self.lab.node, ["cat", f"/proc/sys/net/netfilter/{k}"], check=False)
            if cp.returncode == 0 and cp.stdout.strip().isdigit():
                fair = max(fair, int(cp.stdout))
        text = ""
        for family in ("ipv4", "ipv6"):
            cp = self.lab.run(self.lab.node, ["conntrack", "-L", "-f", family], check=False)
            text += cp.stdout
        entries = parse_conntrack(text, LAB.container_pools)
        longest: dict[str, int] = {}
        for state, timeout, _ in entries:
            longest[state] = max(longest.get(state, 0), timeout)
        return {"fair_s": fair, "of_containers": len(entries), "by_state": dict(Counter(s for s, _, _ in entries)),
                "longest_by_state": longest, "leftover": conntrack_leftovers(entries, fair)}


@dataclass
class Start:
    """The node before the churn: an idle agent that served one cycle (warm-up)."""
    warm_cid: str
    rss_kib: int | None
    fds: int | None
    left: Leftovers
    conntrack: int | None


@dataclass
class Audit:
    """The node after the churn, before and after GC, and the ledger."""
    churn_s: float
    after_dels: Leftovers
    after_gc: Leftovers
    settle_s: dict[str, float]
    gc: dict[str, Any]
    conntrack: dict[str, Any]
    rss_kib: int | None
    fds: int | None
    sigterm_rc: int
    records: dict[str, list[dict]]
    ledger_problems: list[str]
    log_lines: list[str]


def warm_up(soak: Soak) -> Start:
    """One cycle through the agent (not part of the verdict's numbers), so that the
    idle agent measured here is one that served requests."""
    for w in range(soak.opts.workers):
        soak.rings[w] = [soak.new_app() for _ in range(RING)]
    soak.t0 = time.monotonic()
    warm = soak.run_cycle(0, RING - 1, random.Random(0), cid="soak-warm-up")
    if not (warm.add and warm.add.rc == 0 and warm.del_ok):
        raise SoakError(f"warm-up cycle failed: {warm}")
    soak.settle(0)
    time.sleep(1.0)
    rss, fds = soak.proc_usage(soak.agent_pid())
    start = Start(warm.cid, rss, fds, soak.leftovers(), soak.conntrack_count())
    soak.samples.append(soak.sample())
    return start


def churn(soak: Soak) -> float:
    """Workers, fault injector and sampler until the time is up (or the cycle budget
    is spent); then the cycles in flight finish. Returns the churn's duration."""
    opts = soak.opts
    duration = opts.minutes * 60
    schedule = fault_schedule(duration, opts.fault_interval, opts.faults)
    soak.t0 = time.monotonic()
    residents = []
    for r in range(opts.residents):   # one after the other: adjacent addresses
        attached = threading.Event()
        residents.append(threading.Thread(target=soak.resident, args=(r, attached), name=f"soak-r{r}", daemon=True))
        residents[-1].start()
        attached.wait(60)
    workers = [threading.Thread(target=soak.worker, args=(w,), name=f"soak-w{w}", daemon=True)
               for w in range(opts.workers)]
    others = [threading.Thread(target=soak.injector, args=(schedule,), name="soak-faults", daemon=True),
              threading.Thread(target=soak.sampler, name="soak-sampler", daemon=True)]
    for t in workers + others:
        t.start()
    last = 0.0
    while soak.now() < duration and any(t.is_alive() for t in workers):
        time.sleep(1.0)
        if soak.now() - last >= 30:
            last = soak.now()
            _progress(f"{last:6.0f} s: " + soak.status())
    soak.stop.set()
    _progress("time is up; waiting for the cycles in flight")
    for t in workers + residents + others:
        t.join(opts.del_timeout + 120)
    return soak.now()


def audit(soak: Soak, start: Start, churn_s: float, billed: Any, ledger_cls: Any) -> Audit:
    """Reaper, state after the DELs, GC, reaper, state after GC; the idle agent; the
    conntrack table; the agent's SIGTERM (its last billing flush); the ledger."""
    if soak.agent_pid() is None:   # a fault's restart failed: GC and the last flush need an agent
        soak.start_agent()
    settle = {"after_dels": soak.settle(start.left.veths)}
    after_dels = soak.leftovers()
    ct_after_dels = soak.conntrack_count()
    gc = soak.plugin("GC", conf=dict(soak.conf, **{"cni.dev/valid-attachments": []}))
    settle["after_gc"] = soak.settle(start.left.veths)
    time.sleep(1.0)
    rss, fds = soak.proc_usage(soak.agent_pid())
    soak.samples.append(soak.sample())
    ct = soak.conntrack_audit()
    ct.update(start=start.conntrack, after_dels=ct_after_dels, end=soak.conntrack_count())
    with soak.agent_lock:
        agent, soak.agent = soak.agent, None
    rc = agent.stop(signal.SIGTERM, timeout=60)
    if rc != 0:
        soak.errors.append(f"the agent exited {rc} on SIGTERM")
    after_gc = soak.leftovers()   # after the agent's last flush, which clears the checkpoint's temp file
    bdir = soak.state / "billing"
    problems: list[str] = []
    try:
        records = billed(bdir)    # checks the ledger's invariants on the way
    except AssertionError as exc:
        problems.append(str(exc).splitlines()[0])
        records = {}
        for rec in ledger_cls(bdir).records():
            records.setdefault(rec["container_id"], []).append(rec)
    records.pop(start.warm_cid, None)
    log_lines = agent.log.read_text(errors="replace").splitlines() if agent.log.exists() else []
    return Audit(churn_s, after_dels, after_gc, settle, {"rc": gc.rc, "stdout": gc.stdout[:500]}, ct,
                 rss, fds, rc, records, problems, log_lines)


def build_report(soak: Soak, start: Start, au: Audit) -> dict[str, Any]:
    opts, cycles = soak.opts, soak.cycles
    retried = [c for c in cycles if len(c.dels) > 1 or not c.del_ok]
    flush_times = [f.t for f in soak.faults if f.kind == "nft-flush"]
    armed = [c for c in cycles if c.kill_armed]
    rep: dict[str, Any] = {
        **report.header("soak", soak.lab.prefix),
        "args": {"minutes": opts.minutes, "workers": opts.workers, "residents": opts.residents,
                 "fault_interval": opts.fault_interval,
                 "faults": list(opts.faults), "max_cycles": opts.max_cycles,
                 "billing_interval": opts.billing_interval, "hold": opts.hold,
                 "rss_bound_mib": opts.rss_bound_mib, "fd_bound": opts.fd_bound, "seed": opts.seed},
        "churn_s": au.churn_s,
        "cycles": len(cycles),
        "cycles_add_ok": sum(1 for c in cycles if c.add and c.add.rc == 0),
        "probes": sum(c.probes for c in cycles),
        "probe_failures": sum(c.probe_failures for c in cycles),
        "calls": calls_by_outcome(cycles),
        "plugin_kills": {"armed": len(armed), "killed": sum(1 for c in armed if c.add and c.add.killed)},
        "del_retries": {"containers": len(retried), "max_attempts": max((len(c.dels) for c in retried), default=0),
                        "max_s": max((sum(d.seconds for d in c.dels) for c in retried), default=0.0),
                        "never": sum(1 for c in cycles if not c.del_ok)} if retried else {},
        "faults": [asdict(f) for f in soak.faults],
        "baseline": asdict(start.left), "after_dels": asdict(au.after_dels), "after_gc": asdict(au.after_gc),
        "settle_s": au.settle_s,
        "gc": au.gc,
        "stuck_netns": soak.stuck,
        "conntrack": au.conntrack,
        "agent": {"restarts": soak.restarts, "rss_start_kib": start.rss_kib, "fds_start": start.fds,
                  "rss_end_kib": au.rss_kib, "fds_end": au.fds,
                  "rss_growth_kib": None if start.rss_kib is None or au.rss_kib is None else au.rss_kib - start.rss_kib,
                  "fd_growth": None if start.fds is None or au.fds is None else au.fds - start.fds,
                  "sigterm_rc": au.sigterm_rc},
        "agent_log": log_summary(au.log_lines),
        "monitor": sample_summary(soak.samples),
        "agent_incarnations": incarnations(soak.samples),
        "samples": len(soak.samples),
        "sample_series": [asdict(s) for s in soak.samples],
        "billing": compare_billing(cycles, au.records, flush_times),
        "ledger_records": sum(len(v) for v in au.records.values()),
        "ledger_problems": au.ledger_problems,
        "thread_errors": soak.errors,
        "cycles_detail": [asdict(c) for c in cycles],
    }
    rep["failures"] = verdict(rep) + [f"soak: {e}" for e in soak.errors]
    return rep


def run(opts: Options) -> dict[str, Any]:
    from runtime.bench.cni import bench_lab
    from runtime.billing.ledger import Ledger
    from tests.test_billing import billed

    t_start = time.monotonic()
    # The lab is torn down on the way out of `with`, also on errors and Ctrl-C (and on
    # SIGTERM by the lab's own handler).
    with bench_lab("soak", _progress) as (lab, tmp, _):
        soak = Soak(lab, tmp, opts)
        try:
            soak.setup_far_end()
            soak.start_agent()
            start = warm_up(soak)
            _progress(f"warm-up done; agent idle: RSS {start.rss_kib} KiB, {start.fds} fds; churn "
                      f"{opts.minutes:g} min with {opts.workers} workers")
            churn_s = churn(soak)
            au = audit(soak, start, churn_s, billed, Ledger)
            rep = build_report(soak, start, au)
        finally:
            soak.stop.set()
            with soak.agent_lock:
                agent = soak.agent
            if agent is not None:
                agent.stop(signal.SIGKILL, timeout=10)
            log_dir = keep_logs(tmp, soak.state / "billing")
            _progress(f"agent log, plugin log and ledger kept in {log_dir}")
    rep["log_dir"] = log_dir
    rep["seconds"] = time.monotonic() - t_start
    return rep


def keep_logs(tmp: Path, bdir: Path) -> str:
    """Copy the agent's and the plugin's logs and the ledger out of the temp dir, which
    goes with the lab: the evidence for whatever the report says."""
    keep = Path(tempfile.mkdtemp(prefix="sockgate-soak-logs-"))
    for name in ("agent.log", "cni.log"):
        if (tmp / name).exists():
            shutil.copyfile(tmp / name, keep / name)
    if bdir.is_dir():
        shutil.copytree(bdir, keep / "billing")
    return str(keep)


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    if report.not_root("soak"):
        return 2
    rep, status = report.measure("soak", lambda: run(opts), could_not=3)
    if rep is None:
        return status
    if opts.json:
        print(json.dumps(rep, indent=1, default=str))
    else:
        print(render(rep))
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
