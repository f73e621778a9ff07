"""`sockgate demo`: the whole contract on a throwaway lab.

Starts the node agent in the lab's node netns, attaches two app containers through
the CNI executable (which forwards to the agent, as on a node), tries what an app would
try, and shows what happened: the core (egress, nothing inbound), the egress policy
with the refused-flow event of each refusal, idle reclaim, and the billing report of
the two apps. Nothing leaves the lab's namespaces; the agent, the apps and the lab are
gone at the end, also after an error or Ctrl-C.

The checks are in demo_rows.py and demo_reclaim.py, the matching of refusals to their
refused-flow events in demo_events.py, the tables and JSON in demo_output.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from runtime import defaults
from runtime.billing.ledger import Ledger
from runtime.billing.report import ReportRow, report
from runtime.cli.demo_events import attach_events, load_events
from runtime.cli.demo_output import Progress, billing_lines, document, section_lines
from runtime.cli.demo_reclaim import IDLE_TIMEOUT_S, reclaim_rows
from runtime.cli.demo_rows import APP_PORT, BAITS, Prober, Row, Target, core_rows, policy_rows
from runtime.cli.install import install_cni
from runtime.lab import LAB, Lab
from runtime.lab.agent import LabAgent
from runtime.lab.policy import write_lab_policy

APPS = ("app-a", "app-b")
POD_NAMESPACE = "demo"  # the apps are attached as pods demo/app-a, demo/app-b
STEPS = 9  # progress lines: see the p.step() calls
# A short billing interval and a conntrack nudge so that billing and reclaim show within
# seconds (production: 60 s, and 0: the kernel's GC, up to 60 s late); no metrics
# endpoint (nothing to scrape here).
AGENT_ARGS = ("--billing-interval", "1", "--reclaim-nudge", "1", "--reclaim-sweep-interval", "2",
              "--metrics-address", "")
RESOLVE_TIMEOUT_S = 10.0   # the agent resolving the Gmail names through the lab's DNS
# app-b's traffic for the billing report (all else it tries is refused, and refused
# packets are not billed): its tx_bytes must be at least this payload.
UPLOAD_BYTES = 100_000
# app-a's 13 refused attempts of the policy section come within about a second: with
# the default burst (10, refilled at 5 a second) the last of them could go unreported.
EVENTS_BURST = 40
EVENTS_WAIT_S = 3.0        # for the agent to write a section's refused-flow events


class DemoError(Exception):
    """A step could not be done (not a check that failed: those are rows)."""


# What ends the demo early, with a message instead of a traceback (AppError, the lab's
# TimeoutError and LabCommandError among them); the lab is torn down in any case.
FAILURES = (DemoError, OSError, RuntimeError, subprocess.SubprocessError)


class Demo:
    def __init__(self, lab: Lab, tmp: Path, progress: Progress, out: Callable[[str], None]) -> None:
        self.lab, self.tmp, self.progress, self.out = lab, tmp, progress, out
        self.state_dir = str(tmp / "state")
        policy = write_lab_policy(tmp / "policy.json", idleTimeout=IDLE_TIMEOUT_S,
                                  limits={"eventsBurst": EVENTS_BURST})
        self.conf = {"cniVersion": defaults.CNI_VERSION, "name": "demo", "type": "sockgate",
                     "stateDir": self.state_dir, "runDir": str(tmp / "run"), "logFile": str(tmp / "cni.log"),
                     "policyFile": str(policy)}
        self.exe = install_cni(str(tmp / "bin"))
        # die_with_parent: a kill -9 of the demo takes the agent along (lab-cleanup does the rest).
        self.agent = LabAgent(lab, self.state_dir, self.conf["runDir"], str(policy), tmp, AGENT_ARGS,
                              die_with_parent=True)
        self.apps: dict[str, Target] = {}
        self.rows: list[Row] = []
        self.billing: list[ReportRow] = []
        self.failures: list[str] = []

    # --- the CNI executable, as a runtime calls it ---
    def cni(self, command: str, name: str, ns: str) -> dict[str, Any]:
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
               "CNI_CONTAINERID": name, "CNI_NETNS": ns, "CNI_IFNAME": "eth0",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={name}",
               "CNI_PATH": str(self.exe.parent)}
        proc = subprocess.run(["nsenter", f"--net={self.lab.ns_path(self.lab.node)}", str(self.exe)],
                              input=json.dumps(self.conf), text=True, capture_output=True, env=env, timeout=60)
        if proc.returncode != 0:
            raise DemoError(f"CNI {command} of {name} failed: {(proc.stdout or proc.stderr).strip()}")
        return json.loads(proc.stdout) if proc.stdout.strip() else {}

    def attach(self, name: str) -> Target:
        ns = self.lab.ns_path(self.lab.add_app(name))
        res = self.cni("ADD", name, ns)
        self.apps[name] = app = Target(name, ns, res["ips"][0]["address"].split("/")[0],
                                       res["ips"][1]["address"].split("/")[0])
        self.lab.start_echo(ns, [APP_PORT])
        return app

    def detach(self, name: str) -> None:
        self.cni("DEL", name, self.apps[name].ns)
        del self.apps[name]  # only now: after a failed DEL, cleanup() tries again

    # --- steps ---
    def wait_resolved(self) -> None:
        """Until the agent has opened the Gmail names' addresses (it resolves them
        through the lab's DNS at start): else the first Gmail rows would race it."""
        record = Path(self.state_dir) / "policy" / "resolved.json"
        deadline = time.monotonic() + RESOLVE_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                resolved = json.loads(record.read_text())
            except (OSError, ValueError):
                resolved = {}
            if all({":" in a for a in resolved.get(host, [])} == {True, False} for host in LAB.gmail):
                return  # both families of every name
            time.sleep(0.1)
        self.progress.note(f"the agent had not resolved {', '.join(LAB.gmail)} within {RESOLVE_TIMEOUT_S:.0f} s")

    def collect_events(self, rows: list[Row]) -> None:
        """Each refusal's event, as the agent writes them (within a few ms, NFLOG
        batches up to 0.1 s); a refusal still without one after EVENTS_WAIT_S shows
        NO EVENT."""
        deadline = time.monotonic() + EVENTS_WAIT_S
        while attach_events(rows, load_events(self.state_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)

    def section(self, name: str, rows: list[Row], prober: Prober | None = None) -> None:
        self.collect_events(rows)
        if prober is not None:
            prober.check_reached(rows)
        self.rows += rows
        self.out("\n".join(section_lines(name, rows)) + "\n")

    def run(self) -> None:
        p = self.progress
        self.out(f"lab {self.lab.prefix}: node uplink {LAB.node_uplink_v4} / {LAB.node_uplink_v6}; internet hosts "
                 f"{LAB.public_v4} / {LAB.public_v6} (no link out of the lab)\n")
        for addr in BAITS.values():
            self.lab.add_internet_address(addr)
        p.step("starting the node agent in the lab's node netns (billing every 1 s, idle timeout "
               f"{IDLE_TIMEOUT_S} s)")
        self.agent.start()
        p.step("attaching app-a and app-b through the CNI executable (served by the agent)")
        for name in APPS:
            app = self.attach(name)
            p.note(f"  {POD_NAMESPACE}/{name}: {app.v4}  {app.v6}  (listening on port {APP_PORT})")
        self.wait_resolved()
        a, b = self.apps["app-a"], self.apps["app-b"]
        prober = Prober(self.lab)
        p.step("the core: outbound, inbound, container to container, container to node")
        self.section("core", core_rows(prober, a, b))
        p.step("the egress policy: ranges, ports, DNS and Gmail exceptions, ICMP")
        self.section("policy", policy_rows(prober, a), prober)
        p.step(f"idle reclaim: one socket idle for {IDLE_TIMEOUT_S} s, one busy (takes ~{IDLE_TIMEOUT_S + 2} s)")
        self.section("reclaim", reclaim_rows(self.lab, a, self.agent.log_text))
        p.step(f"app-b uploads {UPLOAD_BYTES} bytes; detaching the apps (each DEL writes its final billing "
               "record), stopping the agent")
        up = self.lab.probe(b.ns, "tcp", LAB.public_v4, 9000, payload=b"x" * UPLOAD_BYTES, timeout=10)
        if not up.ok:
            self.failures.append(f"billing: app-b's upload failed: {up.error}")
        for name in APPS:
            self.detach(name)
        rc = self.agent.stop(signal.SIGTERM)
        if rc != 0:
            self.failures.append(f"the agent exited {rc}: {self.agent.log_text()[-2000:]}")
        p.step("the billing report of the two apps")
        rows, _ = report(Ledger(Path(self.state_dir) / "billing").records(), by="pod")
        self.billing = [r for r in rows if r.group.startswith(f"{POD_NAMESPACE}/")]
        self.out("\n".join(billing_lines(self.billing, UPLOAD_BYTES)) + "\n")
        self._verdict()

    def _verdict(self) -> None:
        for row in self.rows:
            verdict = row.verdict()
            if verdict != "ok":
                self.failures.append(f"{row.section}: {row.what} ({row.dst}): {verdict}: expected {row.expected}, "
                                     f"got {row.got} ({row.detail})")
        billed = {r.group: r for r in self.billing}
        for name, least in (("app-a", 1), ("app-b", UPLOAD_BYTES)):
            bill = billed.get(f"{POD_NAMESPACE}/{name}")
            if bill is None or bill.tx_bytes < least:
                self.failures.append(f"billing: {POD_NAMESPACE}/{name} billed {bill.tx_bytes if bill else 0} bytes "
                                     f"sent, expected at least {least}")

    def cleanup(self) -> None:
        """After an error too: DEL what is still attached, stop the agent. (The lab's
        teardown kills whatever still runs in its namespaces anyway.)"""
        for name in list(self.apps):
            try:
                self.detach(name)
            except (DemoError, OSError, subprocess.SubprocessError) as exc:
                self.failures.append(f"cleanup: {exc}")
        try:
            self.agent.stop(signal.SIGTERM, timeout=15)
        except subprocess.TimeoutExpired:
            self.agent.kill()


def run_demo(json_output: bool = False) -> int:
    if os.geteuid() != 0:
        print("sockgate demo needs root: it builds network namespaces", file=sys.stderr)
        return 2
    progress = Progress(STEPS)
    out: Callable[[str], None] = (lambda text: None) if json_output else (lambda text: print(text, flush=True))
    progress.step("building the lab: node and internet network namespaces, echo and DNS servers")
    error, prefix, demo = "", "", None
    try:
        with Lab() as lab, tempfile.TemporaryDirectory(prefix="sockgate-demo-") as tmp:
            prefix = lab.prefix
            demo = Demo(lab, Path(tmp), progress, out)
            try:
                demo.run()
            except FAILURES as exc:
                error = f"step {progress.n}/{STEPS} failed: {exc}"
                if demo.agent.proc is not None and not demo.agent.running() and str(demo.agent.log) not in error:
                    # (read now: the log goes with the temp dir)
                    error += (f"\nthe agent exited {demo.agent.proc.returncode}; the end of its log:\n"
                              f"{demo.agent.log_text()[-3000:]}")
            finally:
                demo.cleanup()
                progress.step("tearing the lab down", last=True)
    except FAILURES as exc:  # building the lab, or tearing it down
        error = error or f"the lab: {exc}"
    rows = demo.rows if demo else []
    failures = ([error] if error else []) + (demo.failures if demo else [])
    pid = demo.agent.pid if demo else None
    if pid is not None and Path(f"/proc/{pid}").exists():
        failures.append(f"the agent (pid {pid}) is still running")
    seconds = progress.elapsed
    if json_output:
        print(json.dumps(document(prefix, rows, demo.billing if demo else [], agent_pid=pid, seconds=seconds,
                                  failures=failures), indent=1))
    elif failures:
        print(f"{len(failures)} problem(s):\n" + "\n".join(f"- {f}" for f in failures))
    else:
        refusals = sum(r.expected == "refused" for r in rows)
        print(f"all {len(rows)} checks as expected, each of the {refusals} refusals with its event; agent "
              f"stopped, lab torn down ({seconds:.0f} s)")
    progress.note("done" if not failures else f"{len(failures)} problem(s)")
    return 1 if failures else 0
