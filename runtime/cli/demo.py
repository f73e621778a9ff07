"""`sockgate demo`: the sandbox on a throwaway lab, as a table.

Attaches two app containers through the CNI plugin (the same executable a runtime
calls), tries what an app would try, and prints what happened. Nothing leaves the
lab's namespaces; everything is torn down at the end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime import defaults, textable
from runtime.lab import LAB, Lab
from runtime.lab.policy import write_lab_policy

APP_PORT = 8080


@dataclass(frozen=True)
class Check:
    what: str
    src: str
    dst: str
    expect_open: bool
    got_open: bool
    note: str

    @property
    def passed(self) -> bool:
        return self.expect_open == self.got_open


def _cni(lab: Lab, command: str, conf: dict, cid: str, netns: str) -> dict:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
           "CNI_ARGS": "IgnoreUnknown=1"}
    proc = subprocess.run(["nsenter", f"--net={lab.ns_path(lab.node)}", sys.executable, "-I", "-m",
                           "cni_plugin"], input=json.dumps(conf), text=True, capture_output=True,
                          env=env, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"CNI {command} failed: {proc.stdout or proc.stderr}")
    return json.loads(proc.stdout) if proc.stdout.strip() else {}


def _probe(lab: Lab, what: str, src: str, src_label: str, proto: str, host: str, port: int,
           expect_open: bool) -> Check:
    r = lab.probe(src, proto, host, port, timeout=1.0)
    if r.ok:
        note = f"server saw source {r.peer_seen}" if r.peer_seen else "connected"
    else:
        note = f"{r.error} after {r.elapsed * 1000:.0f} ms"
    dst = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Check(what, src_label, dst, expect_open, r.ok, note)


def _checks(lab: Lab, apps: dict[str, dict]) -> list[Check]:
    a, b = apps["app-a"], apps["app-b"]
    out = []
    for proto in ("tcp", "udp"):
        for fam, dst in (("v4", LAB.public_v4), ("v6", LAB.public_v6)):
            out.append(_probe(lab, f"outbound {proto.upper()} {fam}", a["ns"], "app-a", proto, dst, 9000, True))
    for fam in ("v4", "v6"):
        target = a[fam]
        out.append(_probe(lab, f"inbound TCP {fam} from the internet", lab.internet, "internet",
                          "tcp", target, APP_PORT, False))
        out.append(_probe(lab, f"inbound TCP {fam} from the node", lab.node, "node", "tcp",
                          target, APP_PORT, False))
        out.append(_probe(lab, f"container to container TCP {fam}", b["ns"], "app-b", "tcp",
                          target, APP_PORT, False))
        node_addr = LAB.node_uplink_v4 if fam == "v4" else LAB.node_uplink_v6
        out.append(_probe(lab, f"container to node TCP {fam}", a["ns"], "app-a", "tcp",
                          node_addr, 22, False))
    return out


def _print_table(checks: list[Check]) -> None:
    head = ("what", "from", "to", "expected", "got", "detail", "")
    rows = [(c.what, c.src, c.dst, "open" if c.expect_open else "refused",
             "open" if c.got_open else "refused", c.note, "ok" if c.passed else "MISMATCH")
            for c in checks]
    print(textable.render(head, rows))


def run_demo() -> int:
    if os.geteuid() != 0:
        print("sockgate demo needs root: it builds network namespaces", file=sys.stderr)
        return 2
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="sockgate-demo-") as tmp:
        policy = write_lab_policy(Path(tmp) / "policy.json")
        conf = {"cniVersion": defaults.CNI_VERSION, "name": "demo", "type": "sockgate", "stateDir": f"{tmp}/state",
                "runDir": f"{tmp}/run", "logFile": f"{tmp}/cni.log", "policyFile": str(policy)}
        print(f"lab {lab.prefix}: node uplink {LAB.node_uplink_v4} / {LAB.node_uplink_v6}; "
              f"internet hosts {LAB.public_v4} / {LAB.public_v6}")
        apps: dict[str, dict] = {}
        try:
            for name in ("app-a", "app-b"):
                ns = lab.ns_path(lab.add_app(name))
                res = _cni(lab, "ADD", conf, name, ns)
                lab.start_echo(ns, [APP_PORT])  # something to (fail to) connect to
                apps[name] = {"ns": ns, "v4": res["ips"][0]["address"].split("/")[0],
                              "v6": res["ips"][1]["address"].split("/")[0]}
                print(f"attached {name}: {apps[name]['v4']}  {apps[name]['v6']}  "
                      f"(listening on port {APP_PORT})")
            print()
            checks = _checks(lab, apps)
            _print_table(checks)
        finally:
            for name in apps:
                _cni(lab, "DEL", conf, name, apps[name]["ns"])
    bad = [c for c in checks if not c.passed]
    print()
    print("all checks as expected; lab torn down" if not bad else f"{len(bad)} check(s) did not match")
    return 1 if bad else 0
