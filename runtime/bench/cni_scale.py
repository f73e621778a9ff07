"""`bench-cni --attached N`: does the cost of ADD and DEL grow with the node?

    scripts/bench-cni --attached 1000 [--containers 30] [--parallel 4] [--rounds 2] [--json]

ADD/DEL latency with BASELINE and with N containers really attached, and the ratios.
Method: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime import textable, wire
from runtime.bench import report
from runtime.bench.cni import (
    CNI_ARGS,
    CNI_VERSION,
    MODES,
    OPS,
    SEQUENTIAL,
    SG_AGENT,
    SG_NETWORK,
    Agent,
    Bench,
    BenchError,
    CpuMeter,
    bench_lab,
    handled_ms,
    other_labs,
    percentile,
    stats,
)
from runtime.lab import Lab
from runtime.lab.agent import log_entries
from tests.support.cnitool import CNI

BASELINE = 10
TARGET = 1.2
SETTLE_TIMEOUT = 180.0  # the reaper deletes ~25 links a second (an RCU grace period each)
# After a switch the kernel keeps working for seconds on the links that came or went
# (IPv6 router solicitations and MLD reports of a thousand new interfaces, RCU
# callbacks): the measurement waits until the rest of the machine is quiet.
QUIET_SHARE = 0.10
QUIET_MAX_S = 30.0


def _progress(msg: str) -> None:
    print(f"bench-cni: {msg}", file=sys.stderr, flush=True)


# --- pure parts (unit-tested) ------------------------------------------------------------

def block_order(rounds: int, n: int, baseline: int = BASELINE) -> list[int]:
    """The configuration (attachments on the node) of each block: pairs alternating
    ABBA-wise, so a linear drift weighs both equally and each switch serves two
    blocks: rounds 1 -> [10, N], 2 -> [10, N, N, 10], 3 -> [10, N, N, 10, 10, N]."""
    out: list[int] = []
    for r in range(rounds):
        out += [baseline, n] if r % 2 == 0 else [n, baseline]
    return out


def mode_order(block: int) -> tuple[str, ...]:
    """Modes of a block, alternating between blocks."""
    return MODES if block % 2 == 0 else MODES[::-1]


def _ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def summarize(blocks: Sequence[dict[str, Any]], n: int, baseline: int = BASELINE,
              target: float = TARGET) -> dict[str, Any]:
    """blocks: {"config", "mode", "seconds": {op: [s]}, "agent_ms": {op: [ms]}}, in
    run order. Pools the samples per (config, mode, op); ratios of p50 at n over at
    baseline (and of the agent's own handling time); and, per configuration measured
    in two blocks or more, the p50 of its last block over its first (noise)."""
    results: dict[str, Any] = {}
    for config in (baseline, n):
        for mode in MODES:
            mine = [b for b in blocks if b["config"] == config and b["mode"] == mode]
            for op in OPS:
                entry: dict[str, Any] = stats([v for b in mine for v in b["seconds"].get(op, [])])
                agent = [v for b in mine for v in b.get("agent_ms", {}).get(op, [])]
                entry["agent_p50"] = percentile(agent, 50)
                entry["agent_p90"] = percentile(agent, 90)
                entry["blocks_p50"] = [stats(b["seconds"].get(op, []))["p50"] for b in mine]
                results[f"{config}/{mode}/{op}"] = entry
    ratios: dict[str, Any] = {}
    for mode in MODES:
        for op in OPS:
            lo, hi = results[f"{baseline}/{mode}/{op}"], results[f"{n}/{mode}/{op}"]
            r = _ratio(hi["p50"], lo["p50"])
            ratios[f"{mode}/{op}"] = {"ratio": r, "p90_ratio": _ratio(hi["p90"], lo["p90"]),
                                      "agent_ratio": _ratio(hi["agent_p50"], lo["agent_p50"]),
                                      "met": r <= target}
    noise: dict[str, float] = {}
    for key, entry in results.items():
        if len(entry["blocks_p50"]) >= 2:
            noise[key] = _ratio(entry["blocks_p50"][-1], entry["blocks_p50"][0])
    met = {mode: all(ratios[f"{mode}/{op}"]["met"] for op in OPS) for mode in MODES}
    return {"results": results, "ratios": ratios, "noise": noise,
            "target": {"max_ratio": target, "met": met, "met_all": all(met.values())}}


# --- the reload window -----------------------------------------------------------------

RELOADS = 3  # flushes per configuration, after its measured blocks
RELOAD_TIMEOUT_S = 30.0


def reload_probe() -> None:
    """Run in the node netns (`python -c`): `nft flush ruleset`, then poll every
    millisecond until sockgate's table is back; print JSON: the window (flush done ->
    table back, ms) and how many rx elements it came back with. One libnftables
    context, so a poll costs ~0.1 ms rather than an exec."""
    from runtime.kernel.libnft import Nft
    nft = Nft()
    rc, _, err = nft.cmd("flush ruleset")
    if rc != 0:
        raise SystemExit(f"flush ruleset failed: {err}")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < RELOAD_TIMEOUT_S:
        rc, out, _ = nft.cmd("list tables inet")
        if rc == 0 and "sockgate" in out:
            window = time.perf_counter() - t0
            _, listed, _ = nft.cmd("list set inet sockgate rx", json_output=True)
            elements = [e for item in json.loads(listed)["nftables"] for e in item.get("set", {}).get("elem", [])]
            print(json.dumps({"window_ms": window * 1000, "rx_elements": len(elements)}))
            return
        time.sleep(0.001)
    print(json.dumps({"window_ms": None, "rx_elements": 0}))


_LOADED = "nft table was loaded with the elements of "


def loads_ms(lines: Sequence[str]) -> list[tuple[int, float]]:
    """(attachments, ms) of each table load the agent logged ("nft table was loaded
    with the elements of 1000 attachment(s) in 85 ms")."""
    out = []
    for entry in log_entries(lines):
        msg = str(entry.get("msg", ""))
        if msg.startswith(_LOADED):
            words = msg[len(_LOADED):].split()
            try:
                out.append((int(words[0]), float(words[3])))
            except (IndexError, ValueError):
                continue
    return out


# --- the run --------------------------------------------------------------------------

def _proc_cpu_s(pid: int) -> float:
    """CPU seconds a running process (all its threads) used so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


class Meter(CpuMeter):
    """CpuMeter that counts the running agent as ours (it is not waited for until the
    end of the run, so CpuMeter alone would call its work "other processes")."""

    def __init__(self, pid: int) -> None:
        self.pid, self.agent0 = pid, _proc_cpu_s(pid)
        super().__init__()

    def read(self) -> dict[str, float]:
        out = super().read()
        agent = _proc_cpu_s(self.pid) - self.agent0
        cpus = os.cpu_count() or 1
        out["agent_cpu_s"] = agent
        out["other_cpu_s"] = max(0.0, out["other_cpu_s"] - agent)
        out["other_share"] = out["other_cpu_s"] / (out["wall_s"] * cpus) if out["wall_s"] > 0 else 0.0
        return out


@dataclass
class Switch:
    """Attaching or detaching the fillers (not part of the measured samples)."""

    op: str
    count: int
    seconds: float
    request_s: list[float] = field(default_factory=list)
    settle_s: float = 0.0   # then waiting for the reaper
    quiet_s: float = 0.0    # and for the machine to be quiet


class ScaleBench:
    def __init__(self, lab: Lab, tmp: Path, args: argparse.Namespace) -> None:
        self.lab, self.tmp, self.args = lab, tmp, args
        self.bench = Bench(lab, tmp, args)  # the CNI executable, the network config, the measured apps
        self.conf = self.bench.sg_plugin
        self.sock = wire.agent_socket(self.conf["runDir"])
        self.base: list[tuple[str, str]] = []     # (container id, netns path)
        self.fillers: list[tuple[str, str]] = []
        self.agent: Agent | None = None
        self.attached_now = 0                      # base + fillers attached
        self.switches: list[Switch] = []
        self.timings: dict[str, float] = {}

    # --- set-up ---
    def preflight(self) -> dict[str, Any]:
        cni = CNI(self.bench.conflists["sockgate"], self.bench.path, self.tmp / "cache-version",
                  runner_netns=self.bench.node_path)
        out = cni.version_info("sockgate", CNI_VERSION)
        if CNI_VERSION not in out.get("supportedVersions", []):
            raise BenchError(f"sockgate does not support cniVersion {CNI_VERSION}: {out}")
        return {"supportedVersions": {"sockgate": out["supportedVersions"]}}

    def make_apps(self) -> None:
        t0 = time.monotonic()
        self.bench.make_apps()  # the measured containers' netns (+ warm-up)
        others = self.args.attached - BASELINE
        for i in range(BASELINE):
            self.base.append((f"base-{i:04d}", self.lab.ns_path(self.lab.add_app(f"b{i:04d}"))))
        for i in range(others):
            self.fillers.append((f"fill-{i:05d}", self.lab.ns_path(self.lab.add_app(f"f{i:05d}"))))
            if (i + 1) % 200 == 0:
                _progress(f"  {i + 1}/{others} filler netns ({time.monotonic() - t0:.0f} s)")
        self.timings["apps_s"] = time.monotonic() - t0
        _progress(f"{len(self.bench.apps) + 1 + BASELINE + others} app netns created in {self.timings['apps_s']:.1f} s")

    # --- the agent's socket, as the CNI executable uses it ---
    def _request(self, command: str, cid: str, ns: str) -> float:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": ns, "CNI_IFNAME": "eth0",
               "CNI_ARGS": ";".join(f"{k}={v}" for k, v in CNI_ARGS.items()),
               "CNI_PATH": os.pathsep.join(map(str, self.bench.path))}
        conf = dict(self.conf, name=SG_NETWORK, cniVersion=CNI_VERSION)
        t0 = time.perf_counter()
        sock = wire.connect(self.sock)
        if sock is None:
            raise BenchError(f"no agent on {self.sock}")
        try:
            rc, out = wire.exchange(sock, env, json.dumps(conf).encode())
        except (OSError, ValueError) as exc:
            raise BenchError(f"{command} {cid}: the agent did not answer ({type(exc).__name__}: {exc})") from None
        finally:
            sock.close()
        took = time.perf_counter() - t0
        if rc != 0:
            raise BenchError(f"{command} {cid} through the agent failed (exit {rc}): {out[:500]}")
        return took

    def _many(self, command: str, jobs: list[tuple[str, str]]) -> Switch:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.args.parallel, thread_name_prefix="fill") as pool:
            took = list(pool.map(lambda job: self._request(command, *job), jobs))
        return Switch(command, len(jobs), time.perf_counter() - t0, took)

    # --- the node ---
    def node_links(self) -> int:
        """sockgate's veths on the node, retired ones (down, not yet reaped) included."""
        out = self.lab.run(self.lab.node, ["ip", "-br", "link", "show"], timeout=60).stdout
        return sum(1 for line in out.splitlines() if line.startswith("sg"))

    def records(self) -> int:
        d = Path(self.conf["stateDir"]) / "networks" / SG_NETWORK / "attachments"
        return sum(1 for p in d.iterdir() if p.suffix == ".json" and not p.name.startswith(".")) if d.is_dir() else 0

    def settle(self, where: str) -> float:
        """Wait for the reaper to delete the retired veths; then the node must hold
        exactly the attachments of the configuration."""
        t0 = time.monotonic()
        while (links := self.node_links()) != self.attached_now:
            if links < self.attached_now:
                raise BenchError(f"{where}: {links} sockgate veths on the node, {self.attached_now} expected")
            if self.agent is None or self.agent.proc is None or self.agent.proc.poll() is not None:
                raise BenchError(f"{where}: the agent is gone")
            if time.monotonic() - t0 > SETTLE_TIMEOUT:
                raise BenchError(f"{where}: {links - self.attached_now} retired veths still there after "
                                 f"{SETTLE_TIMEOUT:.0f} s")
            time.sleep(0.25)
        if (n := self.records()) != self.attached_now:
            raise BenchError(f"{where}: {n} attachment records, {self.attached_now} expected")
        return time.monotonic() - t0

    def quiesce(self) -> float:
        """Wait (at most QUIET_MAX_S) until, over a second, processes other than ours
        and the agent (kernel workers included) used less than QUIET_SHARE of the
        CPUs. Returns the time waited."""
        assert self.agent is not None and self.agent.proc is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < QUIET_MAX_S:
            meter = Meter(self.agent.proc.pid)
            time.sleep(1.0)
            if meter.read()["other_share"] < QUIET_SHARE:
                break
        return time.monotonic() - t0

    def switch_to(self, config: int) -> None:
        if config == self.attached_now:
            return
        if config > self.attached_now:
            _progress(f"attaching {len(self.fillers)} fillers through the agent ...")
            sw = self._many("ADD", self.fillers)
        else:
            _progress(f"detaching {len(self.fillers)} fillers through the agent ...")
            sw = self._many("DEL", self.fillers)
        self.attached_now = config
        sw.settle_s = self.settle(f"after {sw.op} of the fillers")
        sw.quiet_s = self.quiesce()
        s = stats(sw.request_s)
        _progress(f"  {sw.count} {sw.op}s in {sw.seconds:.1f} s ({self.args.parallel} workers; per request "
                  f"p50 {s['p50']:.1f} ms, p90 {s['p90']:.1f} ms), then {sw.settle_s:.1f} s for the reaper, "
                  f"{sw.quiet_s:.1f} s until the machine was quiet")
        self.switches.append(sw)

    # --- a flush of the ruleset on the busy node ---
    def reloads(self, config: int) -> list[dict[str, Any]]:
        """RELOADS times: flush the node's ruleset, measure until the agent has the
        table back (with every attachment's elements: one transaction), and read the
        agent's own time for the load from its log."""
        assert self.agent is not None
        out = []
        for _ in range(RELOADS):
            seen = len(loads_ms(self.agent.log.read_text().splitlines()))
            probe = self.lab.run(self.lab.node, [sys.executable, "-c",
                                                 "from runtime.bench.cni_scale import reload_probe; reload_probe()"],
                                 timeout=RELOAD_TIMEOUT_S + 30)
            got = json.loads(probe.stdout.strip().splitlines()[-1])
            deadline = time.monotonic() + 10
            while len(loads := loads_ms(self.agent.log.read_text().splitlines())) <= seen:
                if time.monotonic() > deadline:
                    tail = self.agent.log.read_text().splitlines()[-5:]
                    raise BenchError(f"at {config} attachments: the agent logged no table load after a flush "
                                     f"(probe: {got}; agent log ends: {tail})")
                time.sleep(0.05)
            if got["window_ms"] is None or got["rx_elements"] != config:
                raise BenchError(f"at {config} attachments: after a flush the table came back with "
                                 f"{got['rx_elements']} rx elements ({got['window_ms']} ms)")
            out.append({"config": config, "window_ms": got["window_ms"], "load_ms": loads[-1][1],
                        "restored": loads[-1][0]})
            time.sleep(0.5)
        _progress(f"  flush at {config} attached: table back with every element in "
                  + ", ".join(f"{r['window_ms']:.0f}" for r in out) + " ms (the agent's load: "
                  + ", ".join(f"{r['load_ms']:.0f}" for r in out) + " ms)")
        return out

    # --- one measured block ---
    def measure(self, index: int, config: int, mode: str) -> dict[str, Any]:
        assert self.agent is not None
        cni = self.bench.runner(SG_AGENT)
        tag = f"m{index}{mode[0]}"
        ids = [f"{tag}-{i:04d}" for i in range(len(self.bench.apps))]
        Bench._add(cni, f"{tag}-warm", self.bench.warm_ns)
        Bench._del(cni, f"{tag}-warm", self.bench.warm_ns)

        def cycle(cid: str, ns: str) -> tuple[float, float | None, str | None]:
            t_add, err = Bench._timed(Bench._add, cni, cid, ns)
            if err is not None:
                return t_add, None, err
            t_del, err = Bench._timed(Bench._del, cni, cid, ns)
            return t_add, t_del, err

        assert self.agent.proc is not None
        meter = Meter(self.agent.proc.pid)
        jobs = list(zip(ids, self.bench.apps))
        if mode == SEQUENTIAL:
            results = [cycle(*job) for job in jobs]
        else:
            with ThreadPoolExecutor(self.args.parallel, thread_name_prefix="cni") as pool:
                results = list(pool.map(lambda job: cycle(*job), jobs))
        cpu = meter.read()
        errors = [err for _, _, err in results if err is not None]
        if errors:
            raise BenchError(f"at {config} attachments, {mode}: {len(errors)} of {len(jobs)} ADD+DEL failed; "
                             f"first: {errors[0]}")
        settle_s = self.settle(f"after the {mode} block at {config} attachments")
        handled = handled_ms(self.agent.log.read_text().splitlines())
        return {"index": index, "config": config, "mode": mode,
                "seconds": {"ADD": [a for a, _, _ in results], "DEL": [d for _, d, _ in results if d is not None]},
                "agent_ms": {op: [handled[op][cid] for cid in ids if cid in handled[op]] for op in OPS},
                "cpu": cpu, "settle_s": settle_s}


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    load_start = os.getloadavg()
    order = block_order(args.rounds, args.attached)
    blocks: list[dict[str, Any]] = []
    reloads: list[dict[str, Any]] = []
    with bench_lab("bench-cni", _progress) as (lab, tmp, others):
        sb = ScaleBench(lab, tmp, args)
        info = sb.preflight()
        sb.make_apps()
        sb.agent = Agent(lab, sb.conf, tmp, "scale").start()
        try:
            t0 = time.monotonic()
            for cid, ns in sb.base:
                sb._request("ADD", cid, ns)
            sb.attached_now = BASELINE
            sb.settle("after attaching the base containers")
            sb.quiesce()
            _progress(f"{BASELINE} base containers attached in {time.monotonic() - t0:.1f} s")
            k = 0
            measured_reloads: set[int] = set()
            for index, config in enumerate(order):
                sb.switch_to(config)
                if config not in measured_reloads:
                    measured_reloads.add(config)
                    reloads += sb.reloads(config)
                    sb.settle(f"after the flushes at {config} attachments")
                for mode in mode_order(index):
                    t0 = time.monotonic()
                    b = sb.measure(k, config, mode)
                    k += 1
                    blocks.append(b)
                    s_add, s_del = stats(b["seconds"]["ADD"]), stats(b["seconds"]["DEL"])
                    _progress(f"[{k}/{len(order) * len(MODES)}] {config:>5} attached {mode:<10} "
                              f"ADD p50 {s_add['p50']:6.1f} ms  DEL p50 {s_del['p50']:6.1f} ms  "
                              f"({time.monotonic() - t0:.1f} s, other processes "
                              f"{b['cpu']['other_share']:.0%} of the CPUs)")
            # Leave no fillers for the agent's SIGTERM to reap (the lab's teardown
            # would take them anyway): drain, timed like any switch.
            sb.switch_to(BASELINE)
            agent, sb.agent = sb.agent, None
            sb.timings["agent_stop_s"] = agent.stop()
        finally:
            if sb.agent is not None:
                sb.agent.kill()
        others = sorted(set(others) | set(other_labs(lab.prefix)))
        t_down = time.monotonic()
    sb.timings["teardown_s"] = time.monotonic() - t_down
    rep: dict[str, Any] = {
        **report.header("cni --attached", lab.prefix),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "other_labs": others,
        "args": {"attached": args.attached, "baseline": BASELINE, "containers": args.containers,
                 "parallel": args.parallel, "rounds": args.rounds},
        "tools": info, "cni_version": CNI_VERSION,
        "order": [f"{b['config']}:{b['mode'][:3]}" for b in blocks],
        "blocks": blocks,
        "switches": [{"op": s.op, "count": s.count, "seconds": s.seconds, "settle_s": s.settle_s,
                      "quiet_s": s.quiet_s, "request_ms": stats(s.request_s)} for s in sb.switches],
        "timings": sb.timings,
        "reloads": reloads,
    }
    rep |= summarize(blocks, args.attached)
    rep["seconds"] = time.monotonic() - t_start
    return rep


def print_report(rep: dict[str, Any]) -> None:
    a, n, base = rep["args"], rep["args"]["attached"], rep["args"]["baseline"]
    print(f"sockgate CNI benchmark, cost against the node's size: lab {rep['lab']}, {rep['cpus']} CPUs, "
          f"kernel {rep['kernel']}")
    print(f"sockgate + agent; {a['containers']} containers measured per block (ADD then DEL of each, "
          f"the CNI executable exec'd by a libcni-style runner in the node netns); sequential = one at a time, "
          f"parallel = {a['parallel']} workers")
    print(f"the node holds {base} or {n} attachments (each with its app netns, attached through the same agent) "
          f"besides the measured ones; blocks: {' '.join(rep['order'])}")
    print()
    head = ["attached", "mode", "op", "n", "p50 ms", "p90 ms", "mean ms", "max ms", "in agent p50/p90 ms",
            "p50 per block"]
    rows = []
    for mode in MODES:
        for op in OPS:
            for config in (base, n):
                r = rep["results"][f"{config}/{mode}/{op}"]
                rows.append([str(config), mode, op, str(r["n"]), f"{r['p50']:.1f}", f"{r['p90']:.1f}",
                             f"{r['mean']:.1f}", f"{r['max']:.1f}", f"{r['agent_p50']:.1f} / {r['agent_p90']:.1f}",
                             " ".join(f"{v:.1f}" for v in r["blocks_p50"])])
    print(textable.render(head, rows, left=(1, 2, -1)))
    print()
    print(f"ratios at {n} / at {base} attachments (target: p50 <= {rep['target']['max_ratio']})")
    for mode in MODES:
        parts = []
        for op in OPS:
            r = rep["ratios"][f"{mode}/{op}"]
            parts.append(f"{op} p50 {r['ratio']:.2f} ({'met' if r['met'] else 'not met'}), "
                         f"p90 {r['p90_ratio']:.2f}, in agent p50 {r['agent_ratio']:.2f}")
        print(f"  {mode:<10}  " + ";  ".join(parts))
    t = rep["target"]
    print(f"target ADD and DEL p50 at {n} <= {t['max_ratio']} x at {base}: "
          + ", ".join(f"{m} {'met' if t['met'][m] else 'not met'}" for m in MODES)
          + f"  => {'met' if t['met_all'] else 'not met'}")
    if rep["noise"]:
        print("noise: p50 of the last block over the first of the same configuration: "
              + "  ".join(f"{k.replace('/', ' ')} {v:.2f}" for k, v in rep["noise"].items()))
    for s in rep["switches"]:
        print(f"fillers: {s['count']} {s['op']}s through the agent socket in {s['seconds']:.1f} s "
              f"({a['parallel']} workers; per request p50 {s['request_ms']['p50']:.1f} ms, "
              f"p90 {s['request_ms']['p90']:.1f} ms), reaper done {s['settle_s']:.1f} s later, "
              f"machine quiet {s['quiet_s']:.1f} s after that")
    for config in (base, n):
        mine = [r for r in rep.get("reloads", []) if r["config"] == config]
        if mine:
            windows = " ".join(f"{r['window_ms']:.0f}" for r in mine)
            loads = " ".join(f"{r['load_ms']:.0f}" for r in mine)
            print(f"nft flush ruleset at {config} attached: table back with all {config} attachments' elements "
                  f"{windows} ms after the flush (the agent's load {loads} ms)")
    tm = rep["timings"]
    shares = [f"{b['config']}:{b['mode'][:3]} {b['cpu'].get('other_share', 0.0):.0%}" for b in rep["blocks"]]
    print(f"took {rep['seconds']:.0f} s (app netns {tm.get('apps_s', 0):.0f} s, agent SIGTERM "
          f"{tm.get('agent_stop_s', 0):.1f} s, lab teardown {tm.get('teardown_s', 0):.1f} s); load average at start "
          f"{' '.join(f'{x:.2f}' for x in rep['loadavg_start'])}, at the end "
          f"{' '.join(f'{x:.2f}' for x in rep['loadavg_end'])}")
    print("CPU used by other processes during each block (share of all CPUs; noise gauge): " + " ".join(shares))
    if rep["other_labs"]:
        print(f"note: other lab runs were on the machine: {', '.join(rep['other_labs'])}")


def main(args: argparse.Namespace, report: Callable[[dict[str, Any]], None] = print_report) -> dict[str, Any]:
    rep = run(args)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        report(rep)
    return rep
