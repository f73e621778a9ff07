"""CNI control-plane benchmark: how long a runtime waits for ADD and DEL.

    scripts/bench-cni [--containers 50] [--parallel 8] [--rounds 1] [--json]
    scripts/bench-cni --attached 1000 [--containers 30] [--parallel 4] [--rounds 2] [--json]

Exits 0 once it measured, whatever the ratios. Method: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime import textable, wire
from runtime.bench import report
from runtime.cli.install import NotBuilt, install_cni
from runtime.lab import Lab
from runtime.lab.agent import log_entries
from runtime.lab.builder import RUN_DIR
from runtime.lab.policy import write_lab_policy
from runtime.state.store import host_ifname
from tests.support.cnitool import CNI, CNIError

# Issue #14's target for the compiled executable with the agent: p50 against the
# reference chain's, per operation.
TARGETS = {"ADD": 0.25, "DEL": 0.15}
STOCK_DIR = Path("/usr/lib/cni")
CNI_VERSION = "1.0.0"  # the newest the stock plugins (1.1.1) speak; sockgate speaks it too
SG_AGENT, SG_PY_AGENT, SG_INPROC, REFERENCE = "sockgate-agent", "sockgate-python-agent", "sockgate", "reference"
PLUGINS = (SG_AGENT, SG_PY_AGENT, SG_INPROC, REFERENCE)
AGENT_PLUGINS = (SG_AGENT, SG_PY_AGENT)
LABELS = {SG_AGENT: "sockgate compiled + agent", SG_PY_AGENT: "sockgate python + agent",
          SG_INPROC: "sockgate, no agent", REFERENCE: "bridge+host-local+portmap+firewall"}
SHORT = {SG_AGENT: "sga", SG_PY_AGENT: "sgp", SG_INPROC: "sgn", REFERENCE: "ref"}
SEQUENTIAL, PARALLEL = "sequential", "parallel"
MODES = (SEQUENTIAL, PARALLEL)
OPS = ("ADD", "DEL")
SG_NETWORK = "sgbench"
REF_NETWORK = "refbench"
REF_SUBNET = "10.88.0.0/16"
CNI_ARGS = {"IgnoreUnknown": "1"}
CAPABILITY_ARGS: dict[str, Any] = {"portMappings": []}  # what runtimes send for a container without ports
STOP_TIMEOUT = 60.0
BUSY_WARN = 0.10  # other processes using more than this share of the machine disturb the numbers


class BenchError(Exception):
    """The benchmark could not measure (as opposed to measuring a bad ratio)."""


def _progress(msg: str) -> None:
    print(f"bench-cni: {msg}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: int) -> float:
    """q-th percentile, linear interpolation between closest ranks (numpy's default)."""
    data = sorted(values)
    if not data:
        return float("nan")
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def stats(values: Sequence[float]) -> dict[str, float]:
    """Milliseconds."""
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "mean": statistics.fmean(ms) if ms else float("nan"),
            "min": min(ms) if ms else float("nan"), "max": max(ms) if ms else float("nan")}


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy so far (/proc/stat: all but idle and
    iowait; guest time is already inside user)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that were waited for (plugins,
    nsenter, the agent once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """How much of the machine something else used meanwhile: a noise gauge. Kernel
    work done outside our processes (softirqs, kworkers) counts as "other" too."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.monotonic(), _busy_cpu_s(), _own_cpu_s()

    def read(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        busy, own = _busy_cpu_s() - self.busy0, _own_cpu_s() - self.own0
        other = max(0.0, busy - own)
        cpus = os.cpu_count() or 1
        return {"wall_s": wall, "busy_cpu_s": busy, "own_cpu_s": own, "other_cpu_s": other,
                "other_share": other / (wall * cpus) if wall > 0 else 0.0}


@dataclass
class Scenario:
    round: int
    plugin: str
    mode: str
    seconds: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    phase_seconds: dict[str, float] = field(default_factory=dict)   # wall time of all N ADDs / DELs
    per_plugin: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # op -> plugin type -> s
    agent_side_ms: dict[str, list[float]] = field(default_factory=dict)  # op -> handler time in the agent
    agent_stop_s: float | None = None
    warmup_s: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CpuMeter over the whole scenario


def handled_ms(lines: Sequence[str]) -> dict[str, dict[str, float]]:
    """From agent log lines: op -> container id -> handler time (ms) of the requests
    that succeeded ("ADD cid/eth0 rc=0 in 12.3 ms")."""
    out: dict[str, dict[str, float]] = {op: {} for op in OPS}
    for entry in log_entries(lines):
        if entry.get("logger") != "sockgate.agent":
            continue
        words = str(entry.get("msg", "")).split()
        if len(words) >= 6 and words[0] in out and words[2] == "rc=0" and words[3] == "in" and words[5] == "ms":
            try:
                out[words[0]][words[1].rsplit("/", 1)[0]] = float(words[4])
            except ValueError:
                continue
    return out


class Agent:
    """`sockgate agent` in the lab's node netns, for the sockgate network's dirs."""

    def __init__(self, lab: Lab, conf: dict[str, Any], tmp: Path, tag: str) -> None:
        self.lab, self.conf = lab, conf
        self.log = tmp / f"agent-{tag}.log"
        self.ready = tmp / f"agent-{tag}.ready"
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 30.0) -> Agent:
        self.ready.unlink(missing_ok=True)
        c = self.conf
        self.proc = self.lab.popen(self.lab.node, [sys.executable, "-m", "runtime.cli.main", "agent",
                                                   "--state-dir", c["stateDir"], "--run-dir", c["runDir"],
                                                   "--policy", c["policyFile"], "--ready-file", str(self.ready)],
                                   log=self.log)
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the agent did not get ready: {self._tail()}")
            time.sleep(0.05)
        return self

    def stop(self) -> float:
        """SIGTERM: the agent finishes requests in flight and drains its link reaper
        before it exits. Returns how long that took."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise BenchError(f"the agent did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM: {self._tail()}") from None
        if rc != 0:
            raise BenchError(f"the agent exited {rc} on SIGTERM: {self._tail()}")
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def _tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return "(no log)"

    def handled_ms(self) -> dict[str, dict[str, float]]:
        """From the agent's log: op -> container id -> handler time (ms)."""
        return handled_ms(self.log.read_text().splitlines())


class Bench:
    def __init__(self, lab: Lab, tmp: Path, args: argparse.Namespace) -> None:
        self.lab, self.tmp, self.args = lab, tmp, args
        self.node_path = lab.ns_path(lab.node)
        # Two bin dirs: the compiled executable (the Python launcher beside it runs the
        # no-agent scenario's requests), and the Python launcher alone.
        self.bin_dir = tmp / "bin"
        self.python_bin_dir = tmp / "bin-python"
        try:
            self.exe = install_cni(str(self.bin_dir), shim="compiled")
        except NotBuilt as exc:
            raise BenchError(str(exc)) from None
        install_cni(str(self.python_bin_dir), shim="python")
        self.bridge = "cbr" + lab.prefix.split("-")[-1]  # unique to the run; never "sg*" (sockgate's iifname)
        self.hostlocal_dir = tmp / "host-local"
        policy = write_lab_policy(tmp / "policy.json")
        self.sg_plugin = {"type": "sockgate", "stateDir": str(tmp / "sg-state"), "runDir": str(tmp / "sg-run"),
                          "logFile": str(tmp / "sockgate.log"), "policyFile": str(policy)}
        self.conflists: dict[str, dict[str, Any]] = {
            "sockgate": {"cniVersion": CNI_VERSION, "name": SG_NETWORK, "plugins": [self.sg_plugin]},
            REFERENCE: {"cniVersion": CNI_VERSION, "name": REF_NETWORK, "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "dataDir": str(self.hostlocal_dir),
                          "ranges": [[{"subnet": REF_SUBNET, "gateway": "10.88.0.1"}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "firewall", "backend": "iptables"},
            ]},
        }
        self.path = [self.bin_dir, STOCK_DIR]
        self.python_path = [self.python_bin_dir, STOCK_DIR]
        self.apps: list[str] = []     # netns paths of the measured containers
        self.warm_ns = ""
        self.agent: Agent | None = None
        self.timings: dict[str, float] = {}

    def runner(self, plugin: str) -> CNI:
        conflist = self.conflists[REFERENCE if plugin == REFERENCE else "sockgate"]
        path = self.python_path if plugin == SG_PY_AGENT else self.path
        return CNI(conflist, path, self.tmp / f"cache-{SHORT[plugin]}", runner_netns=self.node_path)

    # --- set-up and checks (never timed) ---
    def preflight(self) -> dict[str, Any]:
        missing = [t for t in ("bridge", "host-local", "portmap", "firewall") if not (STOCK_DIR / t).is_file()]
        if missing:
            raise BenchError(f"missing in {STOCK_DIR}: {missing} (apt-get install containernetworking-plugins)")
        versions = {}
        for name, plugin_type, conflist, path in (
                ("sockgate", "sockgate", self.conflists["sockgate"], self.path),
                ("sockgate python", "sockgate", self.conflists["sockgate"], self.python_path),
                ("bridge", "bridge", self.conflists[REFERENCE], self.path)):
            cni = CNI(conflist, path, self.tmp / "cache-version", runner_netns=self.node_path)
            out = cni.version_info(plugin_type, CNI_VERSION)
            if CNI_VERSION not in out.get("supportedVersions", []):
                raise BenchError(f"{name} does not support cniVersion {CNI_VERSION}: {out}")
            versions[name] = out["supportedVersions"]
        ipt = subprocess.run(["iptables", "--version"], check=False, capture_output=True, text=True)
        pkg = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "containernetworking-plugins"],
                             check=False, capture_output=True, text=True)
        return {"iptables": ipt.stdout.strip() or ipt.stderr.strip(),
                "containernetworking-plugins": pkg.stdout.strip() or "?", "supportedVersions": versions}

    def make_apps(self) -> None:
        t0 = time.monotonic()
        self.warm_ns = self.lab.ns_path(self.lab.add_app("warm"))
        for i in range(self.args.containers):
            self.apps.append(self.lab.ns_path(self.lab.add_app(f"c{i:04d}")))
        self.timings["apps_s"] = time.monotonic() - t0
        _progress(f"{self.args.containers} app netns (+1 for warm-up) created in {self.timings['apps_s']:.1f} s")

    def _node_links(self) -> list[dict[str, Any]]:
        return json.loads(self.lab.run(self.lab.node, ["ip", "-j", "link", "show"]).stdout)

    def attached(self, plugin: str, ids: Sequence[str] | None = None) -> int:
        """Node-side veths: of the containers `ids`, or all of the plugin's."""
        links = self._node_links()
        if plugin == REFERENCE:
            return sum(1 for link in links if link.get("master") == self.bridge)
        names = {host_ifname(SG_NETWORK, cid, "eth0") for cid in ids} if ids is not None else None
        return sum(1 for link in links if link["ifname"].startswith("sg")
                   and (names is None or link["ifname"] in names))

    def leases(self, plugin: str) -> list[str]:
        if plugin == REFERENCE:
            d = self.hostlocal_dir / REF_NETWORK
            return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.is_dir() else []
        d = Path(self.sg_plugin["stateDir"]) / "networks" / SG_NETWORK
        found = []
        for sub in ("leases", "attachments"):
            if (d / sub).is_dir():
                found += [f"{sub}/{p.name}" for p in (d / sub).iterdir() if not p.name.startswith(".")]
        return sorted(found)

    def check_clean(self, plugin: str, where: str) -> None:
        left = []
        if n := self.attached(plugin):
            left.append(f"{n} node-side links")
        if leases := self.leases(plugin):
            left.append(f"leases/records {leases[:5]}{'...' if len(leases) > 5 else ''}")
        busy = []
        for ns in [self.warm_ns, *self.apps]:
            out = self.lab.run(ns, ["ip", "-o", "link", "show"]).stdout
            if len(out.splitlines()) != 1:  # only lo
                busy.append(ns.rsplit("-", 1)[-1])
        if busy:
            left.append(f"interfaces left in app netns {busy[:5]}")
        if left:
            raise BenchError(f"{where}: not clean: {'; '.join(left)}")

    def ensure_no_agent(self) -> None:
        sock = Path(wire.agent_socket(self.sg_plugin["runDir"]))
        if sock.exists():
            raise BenchError(f"{sock} exists: an agent would serve the no-agent scenario")

    # --- one scenario ---
    def run_scenario(self, rnd: int, plugin: str, mode: str) -> Scenario:
        sc = Scenario(rnd, plugin, mode)
        cni = self.runner(plugin)
        tag = f"{SHORT[plugin]}{mode[0]}{rnd}"
        ids = [f"{tag}-{i:04d}" for i in range(len(self.apps))]
        if plugin in AGENT_PLUGINS:
            self.agent = Agent(self.lab, self.sg_plugin, self.tmp, tag).start()
        else:
            self.ensure_no_agent()
        try:
            # Warm-up, not counted: page cache, the bridge and iptables chains of the
            # reference chain, the sockgate table and the agent's first request.
            t0 = time.perf_counter()
            self._add(cni, f"{tag}-warm", self.warm_ns)
            sc.warmup_s["ADD"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            self._del(cni, f"{tag}-warm", self.warm_ns)
            sc.warmup_s["DEL"] = time.perf_counter() - t0
            first_call = len(cni.calls)
            for op in OPS:
                fn = self._add if op == "ADD" else self._del
                jobs = list(zip(ids, self.apps))
                t0 = time.perf_counter()
                if mode == SEQUENTIAL:
                    results = [self._timed(fn, cni, cid, ns) for cid, ns in jobs]
                else:
                    with ThreadPoolExecutor(self.args.parallel, thread_name_prefix="cni") as pool:
                        results = list(pool.map(lambda job, fn=fn: self._timed(fn, cni, *job), jobs))
                sc.phase_seconds[op] = time.perf_counter() - t0
                errors = [err for _, err in results if err is not None]
                if errors:
                    raise BenchError(f"{LABELS[plugin]} {mode}: {len(errors)} of {len(jobs)} {op}s failed; "
                                     f"first: {errors[0]}")
                sc.seconds[op] = [s for s, _ in results]
                if op == "ADD" and (n := self.attached(plugin, ids)) != len(ids):
                    raise BenchError(f"{LABELS[plugin]} {mode}: {n} node-side links after {len(ids)} ADDs")
            for call in cni.calls[first_call:]:
                sc.per_plugin.setdefault(call.command, {}).setdefault(call.plugin, []).append(call.seconds)
        except BaseException:
            if self.agent is not None:  # the lab's teardown takes care of what it left
                self.agent.kill()
                self.agent = None
            raise
        if self.agent is not None:
            agent, self.agent = self.agent, None
            try:
                sc.agent_stop_s = agent.stop()
            finally:
                agent.kill()
            handled = agent.handled_ms()
            sc.agent_side_ms = {op: [handled[op][cid] for cid in ids if cid in handled[op]] for op in OPS}
        self.check_clean(plugin, f"after {LABELS[plugin]} {mode}")
        return sc

    @staticmethod
    def _add(cni: CNI, cid: str, ns: str) -> None:
        cni.add(cid, ns, "eth0", args=CNI_ARGS, capability_args=CAPABILITY_ARGS)

    @staticmethod
    def _del(cni: CNI, cid: str, ns: str) -> None:
        cni.delete(cid, ns, "eth0", args=CNI_ARGS, capability_args=CAPABILITY_ARGS)

    @staticmethod
    def _timed(fn: Callable[[CNI, str, str], None], cni: CNI, cid: str, ns: str) -> tuple[float, str | None]:
        t0 = time.perf_counter()
        try:
            fn(cni, cid, ns)
        except (CNIError, ValueError, OSError, subprocess.SubprocessError) as exc:
            return time.perf_counter() - t0, f"{cid}: {exc}"
        return time.perf_counter() - t0, None


# --- the run and the report ------------------------------------------------------------

def scenario_order(rounds: int) -> list[tuple[int, str, str]]:
    """Rounds x modes, the plugin order rotating each time so no plugin always runs
    first (right after the app netns were made) or last."""
    order, k = [], 0
    for rnd in range(rounds):
        for mode in MODES:
            plugins = PLUGINS[k % len(PLUGINS):] + PLUGINS[:k % len(PLUGINS)]
            if k % 2:
                plugins = plugins[::-1]
            order += [(rnd, p, mode) for p in plugins]
            k += 1
    return order


def summarize(scenarios: list[Scenario]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for plugin in PLUGINS:
        for mode in MODES:
            mine = [s for s in scenarios if s.plugin == plugin and s.mode == mode]
            for op in OPS:
                samples = [v for s in mine for v in s.seconds[op]]
                entry: dict[str, Any] = stats(samples)
                entry["phase_s"] = sum(s.phase_seconds.get(op, 0.0) for s in mine)
                by_type: dict[str, list[float]] = {}
                for s in mine:
                    for ptype, secs in s.per_plugin.get(op, {}).items():
                        by_type.setdefault(ptype, []).extend(secs)
                entry["per_plugin_p50_ms"] = {t: percentile([v * 1000 for v in secs], 50)
                                              for t, secs in by_type.items()}
                agent_ms = [v for s in mine for v in s.agent_side_ms.get(op, [])]
                if agent_ms:
                    entry["agent_side_p50_ms"] = percentile(agent_ms, 50)
                results[f"{plugin}/{mode}/{op}"] = entry
    ratios: dict[str, Any] = {}
    for plugin in PLUGINS[:-1]:
        for mode in MODES:
            for op in OPS:
                ref = results[f"{REFERENCE}/{mode}/{op}"]["p50"]
                r = results[f"{plugin}/{mode}/{op}"]["p50"] / ref if ref else float("nan")
                ratios[f"{plugin}/{mode}/{op}"] = {"ratio": r, "met": r <= TARGETS[op]}
    target = {mode: all(ratios[f"{SG_AGENT}/{mode}/{op}"]["met"] for op in OPS) for mode in MODES}
    return {"results": results, "ratios": ratios, "target": {"max_ratio": TARGETS, "met": target,
                                                             "met_all": all(target.values())}}


def other_labs(mine: str) -> list[str]:
    """Prefixes of other lab runs on this machine (they compete for the CPUs)."""
    return sorted(p.stem for p in RUN_DIR.glob("*.pid") if p.stem != mine) if RUN_DIR.is_dir() else []


@contextmanager
def bench_lab(name: str, progress: Callable[[str], None]) -> Iterator[tuple[Lab, Path, list[str]]]:
    """A temp dir and a lab for one benchmark run, both gone on the way out (also on
    errors and Ctrl-C); yields (lab, temp dir, other lab runs on the machine at the
    start), and says so when there are any: they compete for the CPUs."""
    with tempfile.TemporaryDirectory(prefix=f"sockgate-{name}-") as tmp_name:
        with Lab() as lab:
            progress(f"lab {lab.prefix} up")
            others = other_labs(lab.prefix)
            if others:
                progress(f"note: other lab runs exist on this machine (they compete for the CPUs): {others}")
            yield lab, Path(tmp_name), others


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    load_start = os.getloadavg()
    scenarios: list[Scenario] = []
    order = scenario_order(args.rounds)
    # With the lab's servers: the agent's policy keeper resolves the exception
    # hostnames through the lab's DNS, as it would on a node (without them its lookups
    # time out and retry in the background).
    with bench_lab("bench-cni", _progress) as (lab, tmp, others):
        bench = Bench(lab, tmp, args)
        info = bench.preflight()
        bench.make_apps()
        try:
            for i, (rnd, plugin, mode) in enumerate(order, 1):
                t0 = time.monotonic()
                meter = CpuMeter()
                sc = bench.run_scenario(rnd, plugin, mode)
                sc.cpu = meter.read()
                scenarios.append(sc)
                s_add, s_del = stats(sc.seconds["ADD"]), stats(sc.seconds["DEL"])
                _progress(f"[{i}/{len(order)}] round {rnd + 1} {LABELS[plugin]:<34} {mode:<10} "
                          f"ADD p50 {s_add['p50']:6.1f} ms  DEL p50 {s_del['p50']:6.1f} ms  "
                          f"({time.monotonic() - t0:.1f} s"
                          + (f", agent stop {sc.agent_stop_s:.1f} s" if sc.agent_stop_s is not None else "")
                          + f", other processes {sc.cpu['other_share']:.0%} of the CPUs)")
        finally:
            if bench.agent is not None:
                bench.agent.kill()
        bench.timings["scenarios_s"] = time.monotonic() - t_start - bench.timings["apps_s"]
        others = sorted(set(others) | set(other_labs(lab.prefix)))
        t_down = time.monotonic()
    bench.timings["teardown_s"] = time.monotonic() - t_down
    rep: dict[str, Any] = {
        **report.header("cni", lab.prefix),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "other_labs": others,
        "args": {"containers": args.containers, "parallel": args.parallel, "rounds": args.rounds},
        "tools": info,
        "cni_version": CNI_VERSION,
        "conflists": {k: json.loads(json.dumps(v).replace(str(tmp), "$TMP")) for k, v in bench.conflists.items()},
        "cni_args": CNI_ARGS, "capability_args": CAPABILITY_ARGS,
        "order": [f"r{rnd + 1}:{SHORT[p]}:{m}" for rnd, p, m in order],
        "scenarios": [{"round": s.round, "plugin": s.plugin, "mode": s.mode, "seconds": s.seconds,
                       "phase_seconds": s.phase_seconds, "warmup_s": s.warmup_s, "agent_stop_s": s.agent_stop_s,
                       "cpu": s.cpu}
                      for s in scenarios],
        "timings": bench.timings,
    }
    rep |= summarize(scenarios)
    rep["seconds"] = time.monotonic() - t_start
    return rep


def print_report(rep: dict[str, Any]) -> None:
    a, tools = rep["args"], rep["tools"]
    print(f"sockgate CNI benchmark: lab {rep['lab']}, {rep['cpus']} CPUs, kernel {rep['kernel']}, "
          f"containernetworking-plugins {tools['containernetworking-plugins']}, {tools['iptables']}")
    print(f"{a['containers']} containers per scenario (each its own app netns, made beforehand), "
          f"{a['rounds']} round(s); sequential = one at a time, parallel = {a['parallel']} workers; "
          f"one warm-up ADD+DEL per scenario not counted")
    print(f"every plugin exec'd by a libcni-style runner (tests/support/cnitool.py) in the lab's node netns, "
          f"conflist cniVersion {rep['cni_version']}, CNI_ARGS IgnoreUnknown=1, capability portMappings []")
    print(f"  {LABELS[SG_AGENT]:<36} network {SG_NETWORK!r}: the compiled CNI executable (install-cni --shim "
          "compiled), `sockgate agent` in the node netns (started before, SIGTERM after each scenario)")
    print(f"  {LABELS[SG_PY_AGENT]:<36} the same network and agent, the Python launcher (install-cni --shim python)")
    print(f"  {LABELS[SG_INPROC]:<36} the compiled executable and the same network config, no agent: it execs "
          "the Python launcher beside it (in-process)")
    ref = rep["conflists"][REFERENCE]["plugins"]
    print(f"  {LABELS[REFERENCE]:<36} /usr/lib/cni: bridge {ref[0]['bridge']} (isGateway, ipMasq, hairpinMode; "
          f"host-local {REF_SUBNET}, private dataDir) -> portmap -> firewall (backend iptables)")
    print(f"order: {' '.join(rep['order'])}")
    print()
    head = ["plugin", "mode", "op", "n", "p50 ms", "p90 ms", "mean ms", "max ms", "all N s", "per plugin p50 ms"]
    rows = []
    for plugin in PLUGINS:
        for mode in MODES:
            for op in OPS:
                r = rep["results"][f"{plugin}/{mode}/{op}"]
                per = r["per_plugin_p50_ms"]
                detail = " ".join(f"{t} {v:.1f}" for t, v in per.items()) if plugin == REFERENCE else \
                    (f"plugin exec {next(iter(per.values())):.1f}" if per else "")
                if "agent_side_p50_ms" in r:
                    detail += f", in agent {r['agent_side_p50_ms']:.1f}"
                rows.append([LABELS[plugin], mode, op, str(r["n"]), f"{r['p50']:.1f}", f"{r['p90']:.1f}",
                             f"{r['mean']:.1f}", f"{r['max']:.1f}", f"{r['phase_s']:.2f}", detail])
    print(textable.render(head, rows, left=(0, 1, 2, -1)))
    print()
    goal = " and ".join(f"{op} <= {TARGETS[op]}" for op in OPS)
    print(f"ratios of p50 against {LABELS[REFERENCE]} (target: {LABELS[SG_AGENT]} {goal})")
    for plugin in PLUGINS[:-1]:
        for mode in MODES:
            parts = []
            for op in OPS:
                r = rep["ratios"][f"{plugin}/{mode}/{op}"]
                verdict = f"  <= {TARGETS[op]}: {'met' if r['met'] else 'not met'}" if plugin == SG_AGENT else ""
                parts.append(f"{op} p50 {r['ratio']:.3f}{verdict}")
            print(f"  {LABELS[plugin] + ' / reference':<40} {mode:<10}  " + ";   ".join(parts))
    t = rep["target"]
    print(f"target {LABELS[SG_AGENT]}: ADD p50 <= {TARGETS['ADD']} x and DEL p50 <= {TARGETS['DEL']} x reference: "
          + ", ".join(f"{m} {'met' if t['met'][m] else 'not met'}" for m in MODES)
          + f"  => {'met' if t['met_all'] else 'not met'}")
    stops = [s["agent_stop_s"] for s in rep["scenarios"] if s["agent_stop_s"] is not None]
    tm = rep["timings"]
    print(f"took {rep['seconds']:.0f} s (app netns {tm.get('apps_s', 0):.1f} s, scenarios "
          f"{tm.get('scenarios_s', 0):.0f} s, lab teardown {tm.get('teardown_s', 0):.1f} s; agent SIGTERM "
          f"incl. reaper drain {', '.join(f'{s:.1f}' for s in stops)} s); load average at start "
          f"{' '.join(f'{x:.2f}' for x in rep['loadavg_start'])}, at the end "
          f"{' '.join(f'{x:.2f}' for x in rep['loadavg_end'])}")
    shares = [(f"r{s['round'] + 1}:{SHORT[s['plugin']]}:{s['mode']}", s["cpu"].get("other_share", 0.0))
              for s in rep["scenarios"]]
    print("CPU used by other processes during each scenario (share of all CPUs; noise gauge): "
          + " ".join(f"{k} {v:.0%}" for k, v in shares))
    if rep["other_labs"]:
        print(f"note: other lab runs were on the machine (see the CPU gauge above): {', '.join(rep['other_labs'])}")
    if any(v > BUSY_WARN for _, v in shares):
        print(f"note: other processes used more than {BUSY_WARN:.0%} of the CPUs during some scenarios: "
              "those numbers are disturbed; rerun on a quiet machine")
