"""Data-plane benchmark: what sockgate's nft table costs a container's traffic.

    scripts/bench-dataplane [--duration 60] [--segment 2] [--containers 1000] [--ipv6] [--profile] [--json]
    scripts/bench-dataplane --variants FILE [--rounds 5] [--ipv6] [--json]   (runtime/bench/variants.py)

Exits 0 once it measured, whatever the ratio. Method (the A/B alternation, why,
the containers): docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from pyroute2 import IPRoute

from netpolicy import ruleset
from netpolicy.ruleset import FAMILY, TABLE, Endpoint
from runtime import defaults, textable
from runtime.bench import profile as perf_profile
from runtime.bench import report
from runtime.bench import variants as bench_variants
from runtime.core import policy as runtime_policy
from runtime.core.attach import AttachRequest, attach
from runtime.core.netconf import parse_netconf
from runtime.core.node import Node
from runtime.errors import SockgateError
from runtime.hostport import host_port
from runtime.kernel import netns, nft, segment_meter
from runtime.lab import LAB, Lab
from runtime.lab.builder import PROJECT_ROOT
from runtime.state.store import host_ifname

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
INTERVAL_S = 0.25    # iperf3 -i
WARMUP_S = 1.0       # TCP's slow start, UDP's first burst
MARGIN_S = 0.1       # between the client's start and the test's
SETTLE_S = 0.25      # after a switch: RCU frees of the chains that went
FAKE_IFINDEX = 1 << 30
PROFILE_S = 5.0      # perf samples this long, after WARMUP_S of traffic


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


def _hooked_chains() -> list[str]:
    """Every base chain of every table in the netns: "family table chain"."""
    return sorted(f'{c["chain"]["family"]} {c["chain"]["table"]} {c["chain"]["name"]}'
                  for c in _nft_json("list", "chains").get("nftables", [])
                  if "chain" in c and "hook" in c["chain"])


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

    Now: the default contract, compiled and loaded as an ADD does it
    (runtime.core.policy.compiled, nft.ensure_table), with Google's ranges from the
    snapshot (--google-ranges). Not runtime.core.table.apply: that would also restore
    the recorded attachments' elements, which the caller adds itself.
    """
    bench.egress = runtime_policy.compiled(bench.policy_file, bench.state_dir).egress
    nft.ensure_table(bench.egress)
    return (f"the default contract compiled by runtime.core.policy, Google ranges = goog minus cloud "
            f"from {bench.ranges_dir}")


# --- the benchmark ---------------------------------------------------------------------

@dataclass
class Sample:
    """One iperf3 report interval that lay wholly inside one configuration's window."""

    test: str
    config: str
    start: float    # seconds since the iperf3 test started
    value: float    # bit/s (TCP) or packets/s received (UDP)


@dataclass
class Window:
    config: str
    start: float    # seconds since the client was started
    end: float


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
            "cniVersion": defaults.CNI_VERSION, "name": NETWORK, "type": "sockgate", "stateDir": self.state_dir,
            "runDir": str(tmp / "run"), "logFile": str(tmp / "sockgate.log"), "policyFile": self.policy_file})
        self.measured_ns = ""
        self.endpoints: list[Endpoint] = []
        self.current: str | None = None
        self.egress: ruleset.EgressPolicy | None = None   # once B was loaded
        self.policy_desc = ""
        self.table: dict[str, Any] = {}
        self.checks: dict[str, dict[str, str]] = {}
        self.timings: dict[str, float] = {}
        self.node = Node.open()  # this process's: runtime.core.attach.attach is called in-process

    @property
    def measured(self) -> Endpoint:
        """The container whose traffic is measured (the first attached)."""
        return self.endpoints[0]

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
        att = self.in_node(lambda: attach(self.node, req))
        return Endpoint(att.host_ifname, att.host_ifindex, att.ipv4, att.ipv6)

    def setup_containers(self) -> None:
        n, mode = self.args.containers, self.args.fill
        t0 = time.monotonic()
        measured = self._attach("measured", "measured")
        self.measured_ns = self.lab.ns_path("measured")
        self.endpoints = [measured]
        if mode == "attach":
            _progress(f"attaching {n - 1} more containers through runtime.core.attach.attach ...")
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
    def _hook_chains(self, on: bool) -> str:
        """sockgate's hook chains (forward, input, output, postrouting, before_routing) as the table
        renders them (on), or deleted (off). Without them no packet runs any of the
        table's rules: the kernel calls nft per hook, and a table without hook chains
        has none. Sets, elements and the other chains stay put, so a switch is a
        transaction of a few rules rather than a reload of thousands of elements,
        whose deferred kernel work (set resizes, RCU frees) would spill into the
        measured window after it."""
        t = f"{FAMILY} {TABLE}"
        if not on:
            return "".join(f"add chain {t} {name} {{ {decl} }}\ndelete chain {t} {name}\n"
                           for name, (decl, _) in ruleset.BASE_CHAINS.items())
        if self.egress is None:
            raise BenchError("sockgate's hook chains asked for before its policy was loaded")
        custom = self.args.forward_rules
        lines = []
        for line in ruleset.render_table(self.egress).splitlines():
            words = line.split(" ")
            if words[:2] not in (["add", "chain"], ["flush", "chain"], ["add", "rule"]) \
                    or words[4] not in ruleset.BASE_CHAINS:
                continue
            if custom is not None and words[:2] == ["add", "rule"] and words[4] == "forward":
                continue
            lines.append(line)
            if custom is not None and words[:2] == ["flush", "chain"] and words[4] == "forward":
                lines += [f"add rule {t} forward {rule}" for rule in custom]
        return "".join(line + "\n" for line in lines)

    def switch(self, config: str, verify: bool = False) -> None:
        """Put `config` in force in the node netns, in one transaction: a masquerade
        hook is registered at every moment, so the measured flow's NAT binding
        survives. The first switch to B loads the table and every container's
        elements; later switches only add or delete the hook chains. verify (the
        first switch to each config): check the tables, the set sizes and the path."""
        if config == self.current:
            return
        t0 = time.monotonic()
        if config == BASELINE:
            def baseline() -> list[str]:
                nft.run(BASELINE_SCRIPT + self._hook_chains(on=False))
                segment_meter.remove()  # its netfilter hooks are sockgate's too
                return _hooked_chains() if verify else []
            hooked_base = self.in_node(baseline)
            if verify and hooked_base != [f"{FAMILY} {BASE_TABLE} post"]:
                raise BenchError(f"baseline: expected only {BASE_TABLE}'s NAT chain hooked in the node netns, "
                                 f"got {hooked_base}")
        else:
            def body() -> tuple[str, dict[str, int], list[str], dict[str, Any]]:
                segment_meter.install()  # what a table load puts in place (ADD made it once)
                if self.egress is None:
                    desc = _load_full_policy(self)
                    # What an ADD adds besides the endpoint: the network's pools, where the
                    # policy has sets for them. The measured container comes first.
                    pools = ruleset.add_pools((str(self.conf.ipv4_pool), str(self.conf.ipv6_pool)))
                    for chunk in _chunks(self.endpoints, ELEMENT_BATCH):
                        nft.run(pools + "".join(ruleset.add_endpoint(ep) for ep in chunk))
                    if self.args.forward_rules is not None:
                        nft.run(self._hook_chains(on=True))
                    nft.run(f"add table {FAMILY} {BASE_TABLE}\ndelete table {FAMILY} {BASE_TABLE}\n")
                else:
                    desc = self.policy_desc
                    nft.run(self._hook_chains(on=True) + f"delete table {FAMILY} {BASE_TABLE}\n")
                if not verify:
                    return desc, {}, [], {}
                return desc, {s: _set_size(s) for s in PER_CONTAINER_SETS}, _hooked_chains(), _table_stats()
            self.policy_desc, sizes, hooked, table = self.in_node(body)
            if verify:
                self.table = table
                n = len(self.endpoints)
                if any(v != n for v in sizes.values()) or sorted(hooked) != sorted(
                        f"{FAMILY} {TABLE} {c}" for c in ruleset.BASE_CHAINS):
                    raise BenchError(f"sockgate: expected {n} elements per set and sockgate's hook chains, "
                                     f"got {sizes}; hooked {hooked}")
        self.current = config
        self.timings.setdefault("switch_s", 0.0)
        self.timings["switch_s"] += time.monotonic() - t0
        if verify:
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
            # -J: the server's own per-interval JSON reaches the client (--get-server-output),
            # which is where the UDP packets *received* per interval are.
            argv = ["iperf3", "-s", "-J", "-i", str(INTERVAL_S), "-B", host, "-p", str(LAB.iperf_port)]
            log = self.lab.run_dir / f"iperf3-server-v{6 if ':' in host else 4}.log"
            self.lab.popen(self.lab.internet, argv, log=log,
                           die_with_parent=True)
        want = {host_port(h, LAB.iperf_port) for h in hosts}
        deadline = time.monotonic() + 10
        while True:
            out = self.lab.run(self.lab.internet, ["ss", "-Hltn"]).stdout
            if all(w in out for w in want):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"iperf3 servers not listening on {sorted(want)}: {out}")
            time.sleep(0.1)

    def client_argv(self, test: Test, seconds: int | None = None) -> list[str]:
        argv = ["iperf3", "-c", test.host, "-p", str(LAB.iperf_port), "-J", "-t", str(seconds or self.args.duration),
                "-i", str(INTERVAL_S), "--get-server-output"]
        if test.proto == "tcp":
            argv += ["-C", "cubic"]  # see CONGESTION CONTROL in --help
        else:
            argv += ["-u", "-b", "0", "-l", str(UDP_LEN)]
        cpus = self.args.tcp_cpus if test.proto == "tcp" else self.args.udp_cpus
        if cpus is not None:
            argv += ["-A", f"{cpus[0]},{cpus[1]}"]  # client's CPU, server's CPU for this test
        return argv

    def measure(self, test: Test, first: str) -> tuple[list[Sample], list[Window], dict[str, Any]]:
        """One iperf3 run of --duration seconds while the configuration alternates
        every --segment seconds; each report interval is labelled with the
        configuration in force for all of it (intervals overlapping a switch, and the
        first second, are dropped)."""
        self.switch(first)
        out = self.lab.run_dir / f"iperf3-{test.key}.json"
        proc = self.lab.popen(self.measured_ns, self.client_argv(test), stdout=open(out, "wb"))
        t0 = time.monotonic()
        windows, config, since = [], first, 0.0
        next_switch = self.args.segment
        try:
            while proc.poll() is None:
                now = time.monotonic() - t0
                if now >= next_switch and now < self.args.duration - self.args.segment / 2:
                    windows.append(Window(config, since, now))
                    config = BASELINE if config == SOCKGATE else SOCKGATE
                    self.switch(config)
                    since = time.monotonic() - t0
                    next_switch = since + self.args.segment
                time.sleep(0.02)
            windows.append(Window(config, since, time.monotonic() - t0))
            proc.wait(timeout=self.args.duration + 40)
        finally:
            if proc.poll() is None:
                proc.kill()
        try:
            d = json.loads(out.read_text())
        except ValueError:
            raise BenchError(f"iperf3 {test.key}: no JSON report (rc {proc.returncode}): "
                             f"{out.read_text()[-300:]}") from None
        if "error" in d:
            raise BenchError(f"iperf3 {test.key}: {d['error']}")
        return self._label(test, d, windows), windows, self._totals(test, d)

    def use_variant(self, variant: bench_variants.Variant) -> None:
        """B with the variant's commands on top (--variants). B's hook chains are
        deleted and re-rendered first, so nothing an earlier variant did to them stays;
        what a variant adds elsewhere in the table (a set, a chain) does, and is gone
        with the lab."""
        self.switch(BASELINE)
        self.switch(SOCKGATE)
        if variant.commands:
            script = bench_variants.with_measured(self.measured, variant.script)
            try:
                self.in_node(lambda: nft.run(script))
            except SockgateError as exc:
                raise BenchError(f"variant {variant.name!r}: nft refused its commands: {exc}") from None
            self.current = f"variant {variant.name}"

    def profile(self, test: Test) -> dict[str, Any]:
        """perf samples the sending CPU for PROFILE_S while the test's traffic runs
        under B (see runtime/bench/profile.py)."""
        self.switch(SOCKGATE)
        return self.profile_as_is(test)

    def profile_as_is(self, test: Test) -> dict[str, Any]:
        """profile(), under whatever configuration is in force; with what the measured
        container sent meanwhile (its veth's counters), because a share compares only
        at like rates: a TCP connection of the same configuration ran at 15 or at 38
        Gbit/s, a regime per connection, with the hooks at 1.6-1.9 % or 6.0-6.6 % of the
        CPU (docs/measurements.md)."""
        cpus = self.args.tcp_cpus if test.proto == "tcp" else self.args.udp_cpus
        proc = self.lab.popen(self.measured_ns, self.client_argv(test, seconds=int(WARMUP_S + PROFILE_S + 2)))
        try:
            time.sleep(WARMUP_S)
            before, t0 = self.in_node(self._sent), time.monotonic()
            got = perf_profile.record(cpus[0], PROFILE_S, self.lab.run_dir / f"perf-{test.key}.data")
            after, seconds = self.in_node(self._sent), time.monotonic() - t0
        finally:
            proc.kill()
            proc.wait()
        return {"cpu": cpus[0], "seconds": PROFILE_S, "samples": got.samples, "in_hooks": got.in_hook,
                "in_prerouting_chain": got.in_prerouting, "in_meter": got.in_meter,
                "hook_share": got.share, "cpu_busy": got.busy, "expected_ratio": 1 - got.share,
                "sent_pps": (after[0] - before[0]) / seconds, "sent_bps": 8 * (after[1] - before[1]) / seconds}

    def _sent(self) -> tuple[int, int]:
        """Packets and bytes the node has taken in from the measured container's veth
        (a super-packet counts once). In the node netns."""
        with IPRoute() as ipr:
            stats = ipr.get_links(ifname=self.measured.host_ifname)[0].get_attr("IFLA_STATS64")
        return int(stats["rx_packets"]), int(stats["rx_bytes"])

    def _label(self, test: Test, d: dict, windows: list[Window]) -> list[Sample]:
        if test.proto == "tcp":
            intervals = [(iv["sum"]["start"], iv["sum"]["end"], iv["sum"]["bits_per_second"])
                         for iv in d["intervals"]]
        else:
            server = d.get("server_output_json") or {}
            if not server.get("intervals"):
                raise BenchError("iperf3 gave no server-side intervals (is the server running with -J?)")
            intervals = [(iv["sum"]["start"], iv["sum"]["end"],
                          (iv["sum"]["packets"] - iv["sum"].get("lost_packets", 0)) / iv["sum"]["seconds"])
                         for iv in server["intervals"] if iv["sum"]["seconds"] > 0]
        samples = []
        for start, end, value in intervals:
            if start < WARMUP_S:
                continue
            # The test starts a few ms after the client does; MARGIN_S covers that.
            for w in windows:
                if w.start + SETTLE_S <= start - MARGIN_S and end + MARGIN_S <= w.end:
                    samples.append(Sample(test.key, w.config, start, float(value)))
                    break
        return samples

    @staticmethod
    def _totals(test: Test, d: dict) -> dict[str, Any]:
        sent = d["end"]["sum_sent"]
        if test.proto == "tcp":
            return {"retransmits": sent.get("retransmits")}
        return {"lost_percent": d["end"]["sum_received"].get("lost_percent")}


# --- report ----------------------------------------------------------------------------

def _fmt(test: Test, v: float) -> str:
    return f"{v / 1e9:.3f}" if test.proto == "tcp" else f"{v / 1e3:.1f}"


def _unit(test: Test) -> str:
    return "Gbit/s" if test.proto == "tcp" else "kpps received"


def paired_ratios(samples: list[Sample]) -> list[float]:
    """Each sockgate window's median against the median of the baseline windows
    right before and after it: neighbours in time share the machine's slow drift."""
    windows: list[tuple[str, list[float]]] = []
    for smp in sorted(samples, key=lambda x: x.start):
        if not windows or windows[-1][0] != smp.config:
            windows.append((smp.config, []))
        windows[-1][1].append(smp.value)
    out = []
    for i, (config, values) in enumerate(windows):
        if config != SOCKGATE:
            continue
        near = [v for j in (i - 1, i + 1) if 0 <= j < len(windows) for v in windows[j][1]]
        if near:
            out.append(statistics.median(values) / statistics.median(near))
    return out


def summarize(tests: list[Test], samples: list[Sample]) -> dict[str, Any]:
    """The verdict is median(B intervals) / median(A intervals). Also, as a noise
    gauge, the ratios of each sockgate window to its baseline neighbours: when their
    middle half straddles the target, this run's verdict is not firm."""
    out: dict[str, Any] = {"medians": {}, "ratios": {}}
    for t in tests:
        vals = {c: [x.value for x in samples if x.test == t.key and x.config == c] for c in (BASELINE, SOCKGATE)}
        if not all(vals.values()):
            raise BenchError(f"{t.label}: no interval lay wholly inside a window of each configuration "
                             "(longer --duration or --segment)")
        med = {c: statistics.median(v) for c, v in vals.items()}
        out["medians"][t.key] = med | {"n": {c: len(v) for c, v in vals.items()}}
        ratio = med[SOCKGATE] / med[BASELINE]
        paired = paired_ratios([x for x in samples if x.test == t.key])
        q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) >= 2 else (paired[0],) * 3
        out["ratios"][t.key] = {
            "metric": t.label, "ratio": ratio, "target": TARGET, "met": ratio >= TARGET,
            "paired": paired, "paired_median": statistics.median(paired), "paired_iqr": [q1, q3],
            "uncertain": q1 < TARGET <= q3}
    return out


def print_report(rep: dict[str, Any], tests: list[Test], samples: list[Sample]) -> None:
    c, a = rep["containers"], rep["args"]
    print(f"sockgate data-plane benchmark: lab {rep['lab']}, {rep['cpus']} CPUs, kernel {rep['kernel']}, "
          f"{rep['iperf3']}")
    print(f"containers: {c['count']} attached to one network; {c['how']} ({c['seconds']:.1f} s)")
    print(f"  measured: container 'measured' ({c['measured']['ipv4']}, {c['measured']['ipv6']}, "
          f"host veth {c['measured']['host_ifname']})")
    print(f"config A {BASELINE}: same namespaces, veths, routes; `{FAMILY} {TABLE}` on no hook (its hook "
          f"chains deleted; sets stay loaded); `{FAMILY} {BASE_TABLE}` masquerades (one rule)")
    tb = rep["table"]
    print(f"config B {SOCKGATE}: {rep['policy']}")
    if a.get("forward_rules") is not None:
        print(f"  EXPERIMENT: forward chain replaced by --forward-rules: {a['forward_rules']}")
    print(f"  table {FAMILY} {TABLE}: {tb['rules']} rules, {tb['elements']} set elements "
          f"({', '.join(f'{k} {v}' for k, v in tb['sets'].items() if v)})")
    for cfg in (BASELINE, SOCKGATE):
        print(f"  path check {cfg}: " + "; ".join(f"{k}: {v}" for k, v in rep["checks"].get(cfg, {}).items()))
    print(f"iperf3: server in the internet netns, client in the measured container; one run per metric of "
          f"{a['duration']} s, reports every {INTERVAL_S} s; the configuration alternates every "
          f"{a['segment']} s during the run (a switch takes {rep['timings'].get('switch_mean_ms', 0):.0f} ms "
          f"on average); intervals overlapping a switch or the {SETTLE_S} s after it, and the first "
          f"{WARMUP_S:.0f} s, are dropped")
    print(f"  TCP `-C cubic`, CPUs (client,server) {report.pinning(a['tcp_cpus'])}; "
          f"UDP `-u -b 0 -l {UDP_LEN}`, CPUs {report.pinning(a['udp_cpus'])}")
    print()
    head = ["config", "metric", "unit", "intervals", "median", "p25", "p75"]
    rows = []
    for t in tests:
        for cfg in (BASELINE, SOCKGATE):
            vals = [x.value for x in samples if x.test == t.key and x.config == cfg]
            q1, _, q3 = statistics.quantiles(vals, n=4) if len(vals) >= 2 else (vals[0],) * 3
            rows.append([f"{CONFIG_NOTE[cfg]} {cfg}", t.label, _unit(t), str(len(vals)),
                         _fmt(t, statistics.median(vals)), _fmt(t, q1), _fmt(t, q3)])
        extra = rep["totals"][t.key]
        rows.append(["", "  whole run: " + ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in extra.items()),
                     "", "", "", "", ""])
    print(textable.render(head, rows, left=(0, 1, 2)))
    print()
    print(f"ratio {SOCKGATE}/{BASELINE} = median B / median A of the intervals   "
          f"(paired: each B window against its A neighbours)")
    for t in tests:
        r = rep["ratios"][t.key]
        print(f"  {t.label:<24} {r['ratio']:.3f}   target >= {TARGET}: {'met' if r['met'] else 'not met':<8}"
              f"  (paired: median {r['paired_median']:.3f}, middle half {r['paired_iqr'][0]:.3f}-"
              f"{r['paired_iqr'][1]:.3f}, {len(r['paired'])} windows)")
    for t in tests:
        pr = rep["profiles"].get(t.key)
        if pr:
            n = pr["samples"] or 1
            pre, meter = pr["in_prerouting_chain"] / n, pr.get("in_meter", 0) / n
            print(f"  {t.label:<24} profile: sockgate's hooks took {100 * pr['hook_share']:.2f} % of CPU "
                  f"{pr['cpu']}'s samples ({pr['samples']}, CPU busy {100 * pr['cpu_busy']:.0f} %; the "
                  f"prerouting chain {100 * pre:.2f} %, the segment meter {100 * meter:.2f} %) under {SOCKGATE}, "
                  f"sending {bench_variants.rate(t, pr)}: expected ratio {pr['expected_ratio']:.3f}")
    unsure = [rep["ratios"][t.key]["metric"] for t in tests if rep["ratios"][t.key]["uncertain"]]
    if unsure:
        print(f"  note: the middle half of the paired ratios of {', '.join(unsure)} straddles the target, so "
              "that verdict is not firm: a longer --duration or a quieter machine")
    print(f"took {rep['seconds']:.0f} s (containers {c['seconds']:.0f} s, lab teardown "
          f"{rep['timings'].get('teardown_s', 0):.1f} s)")


def _iperf_version() -> str:
    try:
        return subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout.split("\n")[0].strip()
    except OSError:
        return "iperf3 missing"


@contextlib.contextmanager
def _ready_bench(args: argparse.Namespace) -> Iterator[Bench]:
    """A lab with the containers attached, both configurations loaded and checked once,
    and the iperf3 servers up; torn down on leaving, also on errors."""
    with tempfile.TemporaryDirectory(prefix="sockgate-bench-") as tmp:
        lab = Lab(wire=False)  # veths end to end, as docs/benchmarks.md says
        with lab:
            _progress(f"lab {lab.prefix} up")
            bench = Bench(lab, Path(tmp), args)
            bench.check_isolation()
            bench.setup_containers()
            bench.switch(SOCKGATE, verify=True)  # also adds the fillers' elements in --fill elements
            bench.switch(BASELINE, verify=True)
            bench.start_servers()
            yield bench


def _tests(args: argparse.Namespace) -> list[Test]:
    return [Test(f"{p}{f}", p, f) for f in ((4, 6) if args.ipv6 else (4,)) for p in ("tcp", "udp")]


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[Test], list[Sample]]:
    t_start = time.monotonic()
    tests = _tests(args)
    samples: list[Sample] = []
    windows: dict[str, list[Window]] = {}
    totals: dict[str, dict[str, Any]] = {}
    with _ready_bench(args) as bench:
        switches_before = bench.timings["switch_s"]
        for i, t in enumerate(tests):
            first = (BASELINE, SOCKGATE)[i % 2]
            _progress(f"{t.label}: {args.duration} s, alternating every {args.segment} s ...")
            got, windows[t.key], totals[t.key] = bench.measure(t, first)
            samples += got
            time.sleep(0.5)
        profiles = {}
        if args.profile:
            for t in tests:
                _progress(f"{t.label}: perf on the sending CPU for {PROFILE_S:.0f} s under {SOCKGATE} ...")
                profiles[t.key] = bench.profile(t)
        n_switches = sum(len(w) - 1 for w in windows.values()) + len(tests)
        bench.timings["switch_mean_ms"] = 1000 * (bench.timings["switch_s"] - switches_before) / max(1, n_switches)
        t_down = time.monotonic()
    bench.timings["teardown_s"] = time.monotonic() - t_down
    rep: dict[str, Any] = {
        **report.header("dataplane", bench.lab.prefix),
        "iperf3": _iperf_version(),
        "args": {"duration": args.duration, "segment": args.segment, "containers": args.containers,
                 "fill": args.fill, "ipv6": args.ipv6, "profile": args.profile,
                 "forward_rules": args.forward_rules, "tcp_cpus": args.tcp_cpus, "udp_cpus": args.udp_cpus},
        "containers": {
            "count": args.containers, "fill": args.fill, "seconds": bench.timings["containers_s"],
            "how": ("all attached through runtime.core.attach.attach (each with its own netns, veth pair, "
                    "routes and set elements)" if args.fill == "attach" else
                    f"1 attached through runtime.core.attach.attach, {args.containers - 1} more as set "
                    "elements only (no netns/veth)"),
            "measured": dataclasses.asdict(bench.measured),
        },
        "policy": bench.policy_desc,
        "table": bench.table,
        "checks": bench.checks,
        "commands": {t.key: " ".join(bench.client_argv(t)) for t in tests},
        "windows": {k: [dataclasses.asdict(w) for w in v] for k, v in windows.items()},
        "samples": [dataclasses.asdict(x) for x in samples],
        "totals": totals,
        "profiles": profiles,
        "timings": bench.timings,
    }
    rep |= summarize(tests, samples)
    rep["seconds"] = time.monotonic() - t_start
    return rep, tests, samples


def run_variants(args: argparse.Namespace) -> tuple[dict[str, Any], list[Test]]:
    """--variants: profiles of B as it is and of each variant, interleaved in rounds
    (runtime/bench/variants.py); no iperf3 ratios."""
    t_start = time.monotonic()
    tests = _tests(args)
    # B as it is is a variant without commands: it takes the same steps as the others
    # (its hook chains deleted and re-rendered), so that what a switch leaves behind
    # weighs on all alike.
    as_is = bench_variants.Variant(bench_variants.AS_IS, ())
    variants = {v.name: v for v in (as_is, *args.variants)}

    with _ready_bench(args) as bench:
        def profile(test: Test, name: str) -> dict[str, Any]:
            _progress(f"{test.label}: {name} ...")
            bench.use_variant(variants[name])
            return bench.profile_as_is(test)

        for v in args.variants:  # a variant nft refuses fails now, not rounds later
            bench.use_variant(v)
        shares = bench_variants.run_rounds(tests, list(variants), args.rounds, profile)
        bench.switch(BASELINE)
    rep: dict[str, Any] = {
        **report.header("dataplane-variants", bench.lab.prefix),
        "args": {"rounds": args.rounds, "containers": args.containers, "fill": args.fill, "ipv6": args.ipv6,
                 "tcp_cpus": args.tcp_cpus, "udp_cpus": args.udp_cpus, "profile_s": PROFILE_S},
        "policy": bench.policy_desc,
        "variants": {v.name: list(v.commands) for v in args.variants},
        "commands": {t.key: " ".join(bench.client_argv(t)) for t in tests},
        "summary": bench_variants.summarize(shares),
    }
    rep["seconds"] = time.monotonic() - t_start
    return rep, tests


def _variants_file(path: str) -> list[bench_variants.Variant]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return bench_variants.parse_variants(text, path)
    except bench_variants.VariantsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cpu_pair(text: str) -> tuple[int, int]:
    try:
        client, server = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CLIENT,SERVER CPU numbers such as 0,1, not {text!r}") from None
    if not all(0 <= c < (os.cpu_count() or 1) for c in (client, server)):
        raise argparse.ArgumentTypeError(f"CPU out of range 0-{(os.cpu_count() or 1) - 1}: {text!r}")
    return client, server


def _rules_file(path: str) -> list[str]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench-dataplane",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Measure what sockgate's nftables table costs a container's traffic: iperf3 TCP
throughput and UDP packet rate (64-byte datagrams) from one container to the lab
internet, in two configurations of the same namespaces, veths, routes and NAT:

  A baseline  sockgate's table on no hook (its hook chains deleted, so no packet
              runs any of its rules); a one-rule table `inet {BASE_TABLE}` masquerades
  B sockgate  the sockgate table with the full policy and --containers attached

One iperf3 run per metric; the configuration alternates every --segment seconds
while it runs (a switch adds or deletes the hook chains in one transaction),
and every {INTERVAL_S} s report counts for the configuration in force all along it.
Prints the medians and the ratios B/A (target >= {TARGET}). Everything runs in
throwaway lab network namespaces: nothing leaves the machine, the host's netns is
never touched, and the lab (iperf3 included) is torn down at the end, also on
errors. Needs root.""",
        epilog="""\
PINNING: TCP runs keep client and server on one CPU. With them on two CPUs the
sender transmits both from its own CPU and from the softirq that takes in the ACKs
on the receiver's CPU, veth queues per CPU, and segments overtake each other
(nstat: TCPSACKReorder, DSACKs): throughput then swings by 15 % between identical
runs. UDP runs put the receiver on the other CPU, so the sender's packet rate is
measured and not how the scheduler splits one CPU between sender and receiver.

CONGESTION CONTROL: TCP runs use CUBIC (Linux's default). With BBR (some hosts'
default, this development machine's among them) and no fq qdisc, the sender paces
itself with timers, and on a path whose RTT is tens of microseconds its rate
follows its RTT estimate rather than what forwarding costs: it measured half of
CUBIC's throughput and swung with microsecond changes of the path.

VARIANTS: --variants FILE tells apart costs that the A/B run can't (a change of a
point is within its noise): it profiles B as it is ("sockgate") and B with each
variant's nft commands applied on top, every variant once per round, --rounds
rounds, and prints each one's median share of the sending CPU inside sockgate's
hooks and its difference from B. A variant is a [name] line and the nft commands
under it, one transaction; before each variant B's hook chains are re-rendered.
Example, what the before_routing chain costs and what a one-rule forward chain would:

  [without-before-routing]
  delete chain inet sockgate before_routing
  [one-lookup]
  flush chain inet sockgate forward
  add rule inet sockgate forward meta iif . ip saddr @tx4 accept

A variant with no commands is B again: its difference gauges the noise. The
commands may name the measured container through the nft variables $measured_iif
(its host veth), $measured_ipv4 and $measured_ipv6. Ready-made files are in
scripts/variants/.

Exit status: 0 once measured, whatever the ratios (it is a benchmark); 1 when it
could not measure; 2 on bad usage. Progress goes to stderr, the report (or --json)
to stdout. Takes about 4 minutes with the defaults on 2 CPUs (--profile: 20 s more).""")
    p.add_argument("--duration", type=int, default=60, help="seconds of each iperf3 run (default %(default)s)")
    p.add_argument("--segment", type=float, default=2.0,
                   help="seconds each configuration stays in force before the other is loaded (default %(default)s)")
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
    p.add_argument("--profile", action="store_true",
                   help="also sample the sending CPU with perf under B (linux-perf; needs pinning): the share "
                        "of its time in sockgate's forward hook, and 1 - share as the expected ratio")
    p.add_argument("--forward-rules", type=_rules_file, metavar="FILE",
                   help="an experiment: B's forward chain holds the rules in FILE (one per line, nft syntax, "
                        "# comments) instead of sockgate's, the rest of the table unchanged; with --profile "
                        "it shows what a rule costs (e.g. an empty file: the hook alone)")
    p.add_argument("--variants", type=_variants_file, metavar="FILE",
                   help="an experiment, instead of the A/B run: profile B as it is and B with each variant "
                        "of FILE applied (see VARIANTS below), interleaved; needs perf and pinning")
    p.add_argument("--rounds", type=int, default=5,
                   help="with --variants: profiles of each variant per metric (default %(default)s)")
    report.add_json_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = report.parse_args(parser, argv, {"duration": 5, "segment": 1, "containers": 1},
                             "--duration must be >= 5, --segment >= 1 and --containers >= 1")
    if args.duration < 4 * args.segment:
        parser.error("--duration must hold at least 4 segments")
    if args.no_pin:
        if args.profile:
            parser.error("--profile samples the sending CPU, so it needs pinning (drop --no-pin)")
        args.tcp_cpus = args.udp_cpus = None
    if args.variants is not None:
        if args.no_pin:
            parser.error("--variants profiles the sending CPU, so it needs pinning (drop --no-pin)")
        if args.forward_rules is not None:
            parser.error("--variants and --forward-rules: write the forward rules as a variant instead")
        if args.rounds < 1:
            parser.error("--rounds must be >= 1")
    if (args.profile or args.variants is not None) and not perf_profile.available():
        print("bench-dataplane: --profile and --variants need perf (Debian: apt-get install linux-perf)",
              file=sys.stderr)
        return 2
    if report.not_root("bench-dataplane"):
        return 2
    for f in ("goog.json", "cloud.json"):
        if not (Path(args.google_ranges) / f).is_file():
            print(f"bench-dataplane: {Path(args.google_ranges) / f} missing (see --google-ranges)", file=sys.stderr)
            return 2
    if args.variants is not None:
        got, status = report.measure("bench-dataplane", lambda: run_variants(args))
        if got is None:
            return status
        if args.json:
            print(json.dumps(got[0], indent=1))
        else:
            bench_variants.print_report(*got)
        return 0
    measured, status = report.measure("bench-dataplane", lambda: run(args))
    if measured is None:
        return status
    rep, tests, samples = measured
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_report(rep, tests, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
