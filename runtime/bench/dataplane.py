"""Data-plane benchmark: what sockgate's nft table costs a container's traffic.

    scripts/bench-dataplane [--rounds 7] [--duration 3] [--containers 1000] [--ipv6] [--json]

A benchmark, not a timed test: it always exits 0 once it measured, whatever the ratio
(non-zero only when it could not measure). On one lab (runtime/lab/, nothing leaves its
namespaces) it measures iperf3 TCP throughput and UDP packet rate from one container
to the lab internet in two configurations of the *same* namespaces, veths and routes:

  A  baseline  no `inet sockgate` table; a one-rule table `inet benchbase` masquerades
               (NAT is part of both paths, so only sockgate's filtering differs);
  B  sockgate  the sockgate table with the full policy (_load_full_policy) and the
               per-container elements of all --containers attachments.

Rounds are interleaved and alternate their order (A B, B A, A B, ...) so slow drift
of the machine favours neither side; each metric's median over the rounds is
compared, and the ratio B/A is printed against the target (>= 0.97).

The containers: by default all of them are attached through the real core
(runtime.attach.attach, in-process, with this process's thread in the node netns),
each with its own app netns, veth pair and routes: 1,000 take 1-1.5 minutes on 2 CPUs.
`--fill elements` instead attaches only the measured container and adds the others'
per-container state as nft elements only (no netns, no veth): per-container state
is elements, never rules, so the table the packets traverse is the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from netpolicy import ruleset
from netpolicy.ruleset import FAMILY, TABLE, Endpoint
from runtime import netns, nft
from runtime import policy as runtime_policy
from runtime.attach import AttachRequest, attach
from runtime.lab import LAB, Lab
from runtime.lab.builder import PROJECT_ROOT
from runtime.netconf import parse_netconf
from runtime.store import host_ifname

T = TypeVar("T")

TARGET = 0.97
NETWORK = "bench"
BASELINE, SOCKGATE = "baseline", "sockgate"
CONFIG_NOTE = {BASELINE: "A", SOCKGATE: "B"}
BASE_TABLE = "benchbase"
# Same NAT as sockgate's postrouting rule (fully-random included), nothing else.
BASELINE_SCRIPT = (
    f"add table {FAMILY} {BASE_TABLE}\n"
    f"add chain {FAMILY} {BASE_TABLE} post {{ type nat hook postrouting priority srcnat; policy accept; }}\n"
    f"flush chain {FAMILY} {BASE_TABLE} post\n"
    f'add rule {FAMILY} {BASE_TABLE} post iifname "sg*" oifname != "sg*" masquerade fully-random\n'
)
ELEMENT_BATCH = 250          # endpoints (4 elements each) per `nft -f` transaction
DEFAULT_RANGES = PROJECT_ROOT.parent / "shared" / "data" / "google-ip-ranges"
PER_CONTAINER_SETS = ("ifaces", "tx4", "tx6", "rx")
UDP_LEN = 64
FAKE_IFINDEX = 1 << 30


class BenchError(Exception):
    """The benchmark could not measure (as opposed to measuring a bad ratio)."""


@dataclass(frozen=True)
class Test:
    key: str        # "tcp4"
    proto: str      # "tcp" | "udp"
    family: int     # 4 | 6

    @property
    def host(self) -> str:
        return LAB.public_v4 if self.family == 4 else LAB.public_v6

    @property
    def label(self) -> str:
        what = "throughput" if self.proto == "tcp" else "packet rate"
        return f"{self.proto.upper()} v{self.family} {what}"

    @property
    def unit(self) -> str:
        return "bit/s" if self.proto == "tcp" else "packets/s"


def _progress(msg: str) -> None:
    print(f"bench-dataplane: {msg}", file=sys.stderr, flush=True)


def _chunks(items: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _nft_json(*args: str) -> dict:
    """`nft -j ARGS` in the current (thread's) netns; {} when it fails."""
    proc = subprocess.run(["nft", "-j", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    return json.loads(proc.stdout)


def _tables() -> list[str]:
    return sorted(f'{t["table"]["family"]} {t["table"]["name"]}'
                  for t in _nft_json("list", "tables").get("nftables", []) if "table" in t)


def _set_size(name: str) -> int:
    for item in _nft_json("list", "set", FAMILY, TABLE, name).get("nftables", []):
        if "set" in item:
            return len(item["set"].get("elem", []))
    return 0


def _table_stats() -> dict[str, Any]:
    """Rules, sets and elements of the loaded sockgate table."""
    rules, sets = 0, {}
    for item in _nft_json("list", "table", FAMILY, TABLE).get("nftables", []):
        if "rule" in item:
            rules += 1
        elif "set" in item:
            sets[item["set"]["name"]] = len(item["set"].get("elem", []))
    return {"rules": rules, "sets": sets, "elements": sum(sets.values())}


# --- what config B loads -------------------------------------------------------------

def _load_full_policy(bench: Bench) -> str:
    """Load the `inet sockgate` table with the full egress policy, in the node netns
    (the caller is there). The one place that decides what "full policy" means;
    returns a one-line description for the report. The per-container elements are
    added afterwards by the caller.

    Now: the default contract, compiled and loaded exactly as an ADD does it
    (runtime.policy.apply), with Google's ranges from the snapshot (--google-ranges).
    """
    runtime_policy.apply(bench.policy_file, bench.state_dir)
    return (f"runtime.policy.apply(): default contract, Google ranges = goog minus cloud "
            f"from {bench.ranges_dir}")


# --- the benchmark ---------------------------------------------------------------------

@dataclass
class Run:
    round: int
    config: str
    test: str
    value: float
    detail: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, lab: Lab, tmp: Path, args: argparse.Namespace) -> None:
        self.lab = lab
        self.args = args
        self.node_path = lab.ns_path(lab.node)
        self.state_dir = str(tmp / "state")
        self.ranges_dir = Path(args.google_ranges)
        self.policy_file = str(tmp / "policy.json")
        Path(self.policy_file).write_text(json.dumps({"googleRanges": {
            "goog": str(self.ranges_dir / "goog.json"), "cloud": str(self.ranges_dir / "cloud.json")}}))
        self.conf = parse_netconf({
            "cniVersion": "1.1.0", "name": NETWORK, "type": "sockgate", "stateDir": self.state_dir,
            "runDir": str(tmp / "run"), "logFile": str(tmp / "sockgate.log"), "policyFile": self.policy_file})
        self.measured_ns = ""
        self.endpoints: list[Endpoint] = []
        self.current: str | None = None
        self.policy_desc = ""
        self.table: dict[str, Any] = {}
        self.checks: dict[str, dict[str, str]] = {}
        self.timings: dict[str, float] = {}

    def in_node(self, fn: Callable[[], T]) -> T:
        """fn in a thread inside the node netns: nft and pyroute2 (and the threads and
        subprocesses they start) act on the node, never on the host."""
        return netns.in_netns(self.node_path, fn)

    def check_isolation(self) -> None:
        """Before touching anything: code run through in_node, and a subprocess it
        starts (as `nft` is), really are in the node netns and not in ours."""
        want = os.stat(self.node_path).st_ino

        def probe() -> tuple[int, str]:
            child = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True, check=True)
            return os.stat("/proc/thread-self/ns/net").st_ino, child.stdout.strip()
        thread_ino, child_ns = self.in_node(probe)
        if thread_ino != want or child_ns != f"net:[{want}]" or os.stat("/proc/thread-self/ns/net").st_ino == want:
            raise BenchError(f"netns isolation check failed: node {want}, thread {thread_ino}, child {child_ns}")

    # --- containers ---
    def _attach(self, container_id: str, app: str) -> Endpoint:
        ns = self.lab.ns_path(self.lab.add_app(app))
        req = AttachRequest(conf=self.conf, container_id=container_id, ifname="eth0", netns=ns)
        att = self.in_node(lambda: attach(req))
        return Endpoint(att.host_ifname, att.host_ifindex, att.ipv4, att.ipv6)

    def setup_containers(self) -> None:
        n, mode = self.args.containers, self.args.fill
        t0 = time.monotonic()
        measured = self._attach("measured", "measured")
        self.measured_ns = self.lab.ns_path("measured")
        self.endpoints = [measured]
        if mode == "attach":
            _progress(f"attaching {n - 1} more containers through runtime.attach.attach ...")
            for i in range(1, n):
                self.endpoints.append(self._attach(f"filler-{i:04d}", f"f{i:04d}"))
                if i % 100 == 0:
                    _progress(f"  {i + 1}/{n} attached ({time.monotonic() - t0:.0f} s)")
        else:
            used = {measured.ipv4, measured.ipv6}
            v4 = (str(a) for a in self.conf.ipv4_pool.hosts() if str(a) not in used)
            v6 = (str(a) for a in self.conf.ipv6_pool.hosts() if str(a) not in used)
            for i in range(1, n):
                # An index no interface of the node has (they count up from 1).
                self.endpoints.append(Endpoint(host_ifname(NETWORK, f"filler-{i:04d}", "eth0"), FAKE_IFINDEX + i,
                                               next(v4), next(v6)))
        self.timings["containers_s"] = time.monotonic() - t0
        _progress(f"{n} containers ready ({mode}) in {self.timings['containers_s']:.1f} s")

    # --- configurations ---
    def switch(self, config: str) -> None:
        if config == self.current:
            return
        t0 = time.monotonic()
        if config == BASELINE:
            def body() -> list[str]:
                nft.delete_table()
                nft.run(BASELINE_SCRIPT)
                return _tables()
            tables = self.in_node(body)
            if f"{FAMILY} {TABLE}" in tables or f"{FAMILY} {BASE_TABLE}" not in tables:
                raise BenchError(f"baseline: unexpected tables in the node netns: {tables}")
        else:
            def body() -> tuple[str, dict[str, int], list[str], dict[str, Any]]:
                if f"{FAMILY} {BASE_TABLE}" in _tables():
                    nft.run(f"delete table {FAMILY} {BASE_TABLE}\n")
                desc = _load_full_policy(self)
                # What an ADD adds besides the endpoint: the network's pools, where the
                # policy has sets for them.
                pools = ""
                if _nft_json("list", "set", FAMILY, TABLE, "pools4"):
                    pools = ruleset.add_pools((str(self.conf.ipv4_pool), str(self.conf.ipv6_pool)))
                for chunk in _chunks(self.endpoints, ELEMENT_BATCH):
                    nft.run(pools + "".join(ruleset.add_endpoint(ep) for ep in chunk))
                return desc, {s: _set_size(s) for s in PER_CONTAINER_SETS}, _tables(), _table_stats()
            self.policy_desc, sizes, tables, self.table = self.in_node(body)
            n = len(self.endpoints)
            if any(v != n for v in sizes.values()) or f"{FAMILY} {BASE_TABLE}" in tables:
                raise BenchError(f"sockgate: expected {n} elements per set, got {sizes}; tables {tables}")
        self.current = config
        self.timings.setdefault("switch_s", 0.0)
        self.timings["switch_s"] += time.monotonic() - t0
        self._check_path(config)

    def _check_path(self, config: str) -> None:
        """The measured path works and is NATed; and, for the record, whether the
        policy is in force (a Google-range destination refused)."""
        seen = {}
        for fam, host, node_addr in ((4, LAB.public_v4, LAB.node_uplink_v4), (6, LAB.public_v6, LAB.node_uplink_v6)):
            if fam == 6 and not self.args.ipv6:
                continue
            r = self.lab.probe(self.measured_ns, "tcp", host, 9000, timeout=2.0)
            if not r.ok or r.peer_seen != node_addr:
                raise BenchError(f"{config}: path check to {host}:9000 failed: {r.error or ''} "
                                 f"server saw {r.peer_seen!r}, expected {node_addr}")
            seen[f"tcp v{fam} {host}:9000"] = f"open, NATed to {r.peer_seen}"
        r = self.lab.probe(self.measured_ns, "tcp", LAB.google_v4, 443, timeout=1.0)
        seen[f"tcp v4 {LAB.google_v4}:443 (Google range)"] = "open" if r.ok else f"refused ({r.error})"
        self.checks[config] = seen

    # --- iperf3 ---
    def start_servers(self) -> None:
        hosts = [LAB.public_v4] + ([LAB.public_v6] if self.args.ipv6 else [])
        for host in hosts:
            argv = ["iperf3", "-s", "-B", host, "-p", str(LAB.iperf_port)]
            self.lab.popen(self.lab.internet, argv, log=self.lab.run_dir / f"iperf3-server-v{6 if ':' in host else 4}.log",
                           die_with_parent=True)
        want = {f"{h}:{LAB.iperf_port}" if ":" not in h else f"[{h}]:{LAB.iperf_port}" for h in hosts}
        deadline = time.monotonic() + 10
        while True:
            out = self.lab.run(self.lab.internet, ["ss", "-Hltn"]).stdout
            if all(w in out for w in want):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"iperf3 servers not listening on {sorted(want)}: {out}")
            time.sleep(0.1)

    def client_argv(self, test: Test) -> list[str]:
        argv = ["iperf3", "-c", test.host, "-p", str(LAB.iperf_port), "-J", "-t", str(self.args.duration)]
        if test.proto == "tcp":
            argv += ["-O", "1"]  # the first second (slow start) is not counted
        else:
            argv += ["-u", "-b", "0", "-l", str(UDP_LEN)]
        cpus = self.args.tcp_cpus if test.proto == "tcp" else self.args.udp_cpus
        if cpus is not None:
            argv += ["-A", f"{cpus[0]},{cpus[1]}"]  # client's CPU, server's CPU for this test
        return argv

    def iperf(self, test: Test) -> tuple[float, dict[str, Any]]:
        argv = self.client_argv(test)
        errors = []
        for attempt in range(3):
            if attempt:
                time.sleep(2)  # "the server is busy": it is still finishing the last test
            cp = self.lab.run(self.measured_ns, argv, timeout=self.args.duration + 40, check=False)
            try:
                d = json.loads(cp.stdout)
            except ValueError:
                errors.append(f"rc {cp.returncode}, no JSON: {cp.stderr.strip()[-300:]}")
                continue
            if cp.returncode != 0 or "error" in d:
                errors.append(f"rc {cp.returncode}: {d.get('error', cp.stderr.strip()[-300:])}")
                continue
            return self._parse(test, d)
        raise BenchError(f"iperf3 {' '.join(argv)} failed 3 times: {errors}")

    @staticmethod
    def _parse(test: Test, d: dict) -> tuple[float, dict[str, Any]]:
        end = d["end"]
        recv, sent = end["sum_received"], end["sum_sent"]
        if test.proto == "tcp":
            return float(recv["bits_per_second"]), {"retransmits": sent.get("retransmits"),
                                                    "seconds": recv["seconds"]}
        received = recv["packets"] - recv["lost_packets"]
        pps = received / recv["seconds"]
        return pps, {"received_packets": received, "sent_pps": sent["packets"] / sent["seconds"],
                     "lost_percent": recv["lost_percent"], "seconds": recv["seconds"]}


# --- report ----------------------------------------------------------------------------

def _fmt(test: Test, v: float) -> str:
    return f"{v / 1e9:.3f}" if test.proto == "tcp" else f"{v / 1e3:.1f}"


def _unit(test: Test) -> str:
    return "Gbit/s" if test.proto == "tcp" else "kpps received"


def summarize(tests: list[Test], runs: list[Run]) -> dict[str, Any]:
    """The verdict is median(B) / median(A). Also, as a noise gauge, the ratios of
    each round's adjacent B and A runs: when some are above the target and some
    below, this run's verdict is not firm."""
    out: dict[str, Any] = {"medians": {}, "ratios": {}}
    for t in tests:
        vals = {c: {r.round: r.value for r in runs if r.config == c and r.test == t.key}
                for c in (BASELINE, SOCKGATE)}
        med = {c: statistics.median(v.values()) for c, v in vals.items()}
        out["medians"][t.key] = med
        ratio = med[SOCKGATE] / med[BASELINE] if med[BASELINE] else float("nan")
        paired = [vals[SOCKGATE][i] / vals[BASELINE][i] for i in sorted(vals[BASELINE])
                  if vals[BASELINE][i] and i in vals[SOCKGATE]]
        out["ratios"][t.key] = {
            "metric": t.label, "ratio": ratio, "target": TARGET, "met": ratio >= TARGET,
            "per_round": paired, "per_round_median": statistics.median(paired),
            "uncertain": min(paired) < TARGET <= max(paired)}
    return out


def print_report(rep: dict[str, Any], tests: list[Test], runs: list[Run]) -> None:
    c, a = rep["containers"], rep["args"]
    print(f"sockgate data-plane benchmark: lab {rep['lab']}, {rep['cpus']} CPUs, kernel {rep['kernel']}, "
          f"{rep['iperf3']}")
    print(f"containers: {c['count']} attached to one network; {c['how']} ({c['seconds']:.1f} s)")
    print(f"  measured: container 'measured' ({c['measured']['ipv4']}, {c['measured']['ipv6']}, "
          f"host veth {c['measured']['host_ifname']})")
    print(f"config A {BASELINE}: same namespaces, veths, routes; no `{FAMILY} {TABLE}` table; "
          f"`{FAMILY} {BASE_TABLE}` masquerades (one rule)")
    tb = rep["table"]
    print(f"config B {SOCKGATE}: {rep['policy']}")
    print(f"  table {FAMILY} {TABLE}: {tb['rules']} rules, {tb['elements']} set elements "
          f"({', '.join(f'{k} {v}' for k, v in tb['sets'].items() if v)})")
    for cfg in (BASELINE, SOCKGATE):
        print(f"  path check {cfg}: " + "; ".join(f"{k}: {v}" for k, v in rep["checks"].get(cfg, {}).items()))
    print(f"iperf3: server in the internet netns on port {LAB.iperf_port}; client in the measured container; "
          f"TCP `-t {a['duration']} -O 1`, UDP `-u -b 0 -l {UDP_LEN} -t {a['duration']}`; "
          f"CPUs (client,server) TCP {_pin(a['tcp_cpus'])}, UDP {_pin(a['udp_cpus'])}; "
          f"{a['rounds']} rounds, order {' '.join(rep['order'])}")
    print()
    rounds = a["rounds"]
    head = ["config", "metric", "unit", *[f"round {i + 1}" for i in range(rounds)], "median"]
    rows = []
    for t in tests:
        for cfg in (BASELINE, SOCKGATE):
            vals = {r.round: r for r in runs if r.config == cfg and r.test == t.key}
            rows.append([f"{CONFIG_NOTE[cfg]} {cfg}", t.label, _unit(t),
                         *[_fmt(t, vals[i].value) if i in vals else "-" for i in range(rounds)],
                         _fmt(t, rep["medians"][t.key][cfg])])
            if t.proto == "udp":
                rows.append(["", "  (UDP sent / loss)", "kpps / %",
                             *[f"{vals[i].detail['sent_pps'] / 1e3:.1f}/{vals[i].detail['lost_percent']:.1f}"
                               if i in vals else "-" for i in range(rounds)], ""])
            else:
                rows.append(["", "  (TCP retransmits)", "segments",
                             *[str(vals[i].detail.get("retransmits")) if i in vals else "-" for i in range(rounds)], ""])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(str(v).ljust(w) if i < 3 else str(v).rjust(w)
                        for i, (v, w) in enumerate(zip(row, widths))).rstrip())
    print()
    print(f"ratio {SOCKGATE}/{BASELINE} = median B / median A    (per round: B/A of the same round)")
    for t in tests:
        r = rep["ratios"][t.key]
        rounds_txt = " ".join(f"{x:.3f}" for x in r["per_round"])
        print(f"  {t.label:<24} {r['ratio']:.3f}   target >= {TARGET}: {'met' if r['met'] else 'not met':<8}"
              f"  (per round: {rounds_txt}; median {r['per_round_median']:.3f})")
    unsure = [rep["ratios"][t.key]["metric"] for t in tests if rep["ratios"][t.key]["uncertain"]]
    if unsure:
        print(f"  note: the per-round ratios of {', '.join(unsure)} lie on both sides of the target, so "
              "that verdict is not firm: more --rounds, a longer --duration or a quieter machine")
    print(f"took {rep['seconds']:.0f} s (containers {c['seconds']:.0f} s, switching tables "
          f"{rep['timings'].get('switch_s', 0):.1f} s, lab teardown {rep['timings'].get('teardown_s', 0):.1f} s)")


def _pin(cpus: tuple[int, int] | None) -> str:
    return "unpinned" if cpus is None else f"{cpus[0]},{cpus[1]}"


def _iperf_version() -> str:
    try:
        return subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    except OSError:
        return "iperf3 missing"


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Test], list[Run]]:
    t_start = time.monotonic()
    tests = [Test(f"{p}{f}", p, f) for f in ((4, 6) if args.ipv6 else (4,)) for p in ("tcp", "udp")]
    runs: list[Run] = []
    order = []
    with tempfile.TemporaryDirectory(prefix="sockgate-bench-") as tmp:
        lab = Lab()
        with lab:
            _progress(f"lab {lab.prefix} up")
            bench = Bench(lab, Path(tmp), args)
            bench.check_isolation()
            bench.setup_containers()
            bench.switch(SOCKGATE)  # also adds the fillers' elements in --fill elements
            bench.start_servers()
            for rnd in range(args.rounds):
                configs = (BASELINE, SOCKGATE) if rnd % 2 == 0 else (SOCKGATE, BASELINE)
                order.append("".join(CONFIG_NOTE[c] for c in configs))
                for cfg in configs:
                    bench.switch(cfg)
                    for t in tests:
                        value, detail = bench.iperf(t)
                        runs.append(Run(rnd, cfg, t.key, value, detail))
                        _progress(f"round {rnd + 1}/{args.rounds} {cfg:<8} {t.label:<24} "
                                  f"{_fmt(t, value)} {_unit(t)}")
                        time.sleep(0.5)
            measured = bench.endpoints[0]
            t_down = time.monotonic()
        bench.timings["teardown_s"] = time.monotonic() - t_down
    rep: dict[str, Any] = {
        "benchmark": "dataplane",
        "lab": lab.prefix,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "iperf3": _iperf_version(),
        "args": {"rounds": args.rounds, "duration": args.duration, "containers": args.containers,
                 "fill": args.fill, "ipv6": args.ipv6, "tcp_cpus": args.tcp_cpus,
                 "udp_cpus": args.udp_cpus},
        "containers": {
            "count": args.containers, "fill": args.fill, "seconds": bench.timings["containers_s"],
            "how": ("all attached through runtime.attach.attach (each with its own netns, veth pair, "
                    "routes and set elements)" if args.fill == "attach" else
                    f"1 attached through runtime.attach.attach, {args.containers - 1} more as set "
                    "elements only (no netns/veth)"),
            "measured": dataclasses.asdict(measured),
        },
        "policy": bench.policy_desc,
        "table": bench.table,
        "checks": bench.checks,
        "order": order,
        "commands": {t.key: " ".join(bench.client_argv(t)) for t in tests},
        "runs": [dataclasses.asdict(r) for r in runs],
        "timings": bench.timings,
    }
    rep |= summarize(tests, runs)
    rep["seconds"] = time.monotonic() - t_start
    return rep, tests, runs


def _cpu_pair(text: str) -> tuple[int, int]:
    try:
        client, server = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CLIENT,SERVER CPU numbers such as 0,1, not {text!r}") from None
    if not all(0 <= c < (os.cpu_count() or 1) for c in (client, server)):
        raise argparse.ArgumentTypeError(f"CPU out of range 0-{(os.cpu_count() or 1) - 1}: {text!r}")
    return client, server


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench-dataplane",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Measure what sockgate's nftables table costs a container's traffic: iperf3 TCP
throughput and UDP packet rate (64-byte datagrams) from one container to the lab
internet, in two configurations of the same namespaces, veths, routes and NAT:

  A baseline  no sockgate table; a one-rule table `inet {BASE_TABLE}` masquerades
  B sockgate  the sockgate table with the full policy and --containers attached

Rounds interleave A and B (order A B, B A, A B, ...). Prints every run, the medians
and the ratios B/A (target >= {TARGET}). Everything runs in throwaway lab network
namespaces: nothing leaves the machine, the host's netns is never touched, and the
lab (iperf3 included) is torn down at the end, also on errors. Needs root.""",
        epilog="""\
PINNING: TCP runs keep client and server on one CPU. With them on two CPUs the
sender transmits both from its own CPU and from the softirq that takes in the ACKs
on the receiver's CPU, veth queues per CPU, and segments overtake each other
(nstat: TCPSACKReorder, DSACKs): throughput then swings by 15 %% between identical
runs. UDP runs put the receiver on the other CPU, so the sender's packet rate is
measured and not how the scheduler splits one CPU between sender and receiver.

Exit status: 0 once measured, whatever the ratios (it is a benchmark); 1 when it
could not measure; 2 on bad usage. Progress goes to stderr, the report (or --json)
to stdout. Takes about 4 minutes with the defaults on 2 CPUs.""")
    p.add_argument("--rounds", type=int, default=7, help="rounds; each measures both configs (default %(default)s)")
    p.add_argument("--duration", type=int, default=3, help="seconds per iperf3 run (default %(default)s)")
    p.add_argument("--containers", type=int, default=1000,
                   help="containers attached to the network, the measured one included (default %(default)s)")
    p.add_argument("--fill", choices=("attach", "elements"), default="attach",
                   help="how the other containers exist: attach = through the real core, each with netns "
                        "and veth (about 0.1 s each); elements = their nft set elements only, which is all "
                        "the data plane sees of them (default %(default)s)")
    p.add_argument("--ipv6", action="store_true", help="also measure the IPv6 path (doubles the iperf3 time)")
    two = (os.cpu_count() or 1) > 1
    p.add_argument("--tcp-cpus", type=_cpu_pair, default=(0, 0), metavar="C,S",
                   help="CPUs of the iperf3 client and server in the TCP runs (iperf3 -A C,S; default 0,0: "
                        "one CPU, see PINNING below)")
    p.add_argument("--udp-cpus", type=_cpu_pair, default=(0, 1) if two else (0, 0), metavar="C,S",
                   help="CPUs of the iperf3 client and server in the UDP runs (default %s)" %
                        ("0,1" if two else "0,0"))
    p.add_argument("--no-pin", action="store_true", help="let the scheduler place iperf3 (overrides the two above)")
    p.add_argument("--google-ranges", default=str(DEFAULT_RANGES), metavar="DIR",
                   help="dir with goog.json and cloud.json for the policy's Google ranges (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object instead of tables")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.containers < 1:
        parser.error("--rounds, --duration and --containers must be >= 1")
    if args.no_pin:
        args.tcp_cpus = args.udp_cpus = None
    if os.geteuid() != 0:
        print("bench-dataplane: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    for f in ("goog.json", "cloud.json"):
        if not (Path(args.google_ranges) / f).is_file():
            print(f"bench-dataplane: {Path(args.google_ranges) / f} missing (see --google-ranges)", file=sys.stderr)
            return 2
    try:
        rep, tests, runs = run(args)
    except KeyboardInterrupt:
        print("bench-dataplane: interrupted; lab torn down", file=sys.stderr)
        return 130
    except Exception as exc:  # a benchmark that could not measure
        print(f"bench-dataplane: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_report(rep, tests, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
