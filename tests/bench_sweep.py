"""What an idle-reclaim sweep costs per socket (scripts/bench-sweep; not collected by
the suite: its name doesn't start with test_). One container holds N connected UDP
sockets that never send (three processes: a container's runtime limits open files),
half IPv4, half IPv6; the reclaimer's sweep runs three times over the node. Such
sockets hold no conntrack entry, so no bound of sockgate's limits them (README "Threat
model"). Printed: the sweep's CPU and wall time with none and with N, and the CPU per
socket."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from runtime.agent.reclaim import Reclaimer
from runtime.kernel.netlink.conntrack import Conntrack
from runtime.kernel.netns import in_netns
from runtime.lab import LAB
from tests.support import attacks as atk

pytestmark = pytest.mark.lab
PROCESSES, PER_FAMILY = 3, 9000   # 54,000 sockets; the ephemeral ports of one address are 28,232
_HOLD = ("import resource, socket, sys\n"
         "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
         "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n"
         "kept = []\n"
         "for me, peer in ((sys.argv[1], sys.argv[3]), (sys.argv[2], sys.argv[4])):\n"
         "    family = socket.AF_INET6 if ':' in me else socket.AF_INET\n"
         "    for i in range(int(sys.argv[5])):\n"
         "        s = socket.socket(family, socket.SOCK_DGRAM)\n"
         "        s.bind((me, 0)); s.connect((peer, 9000 + i % 1000)); kept.append(s)\n"
         "print('READY', len(kept), flush=True); sys.stdin.read()\n")


def _sweeps(lab, state_dir: str, rounds: int = 3) -> list[tuple[float, float]]:
    def body() -> list[tuple[float, float]]:
        reclaimer, ct = Reclaimer(state_dir), Conntrack()
        out = []
        try:
            for _ in range(rounds):
                cpu, wall = time.process_time(), time.perf_counter()
                reclaimer.sweep(ct, "bench")
                out.append((time.process_time() - cpu, time.perf_counter() - wall))
        finally:
            ct.close()
        return out
    return in_netns(lab.ns_path(lab.node), body)


def test_sweep_cost_per_socket(lab, plugin, app, tmp_path):
    ns = app()
    res = plugin.add("many", ns)
    v4, v6 = (ip["address"].split("/")[0] for ip in res["ips"])
    procs = []
    try:
        empty = _sweeps(lab, str(plugin.state_dir))
        for k in range(PROCESSES):
            log = tmp_path / f"hold{k}.log"
            procs.append(lab.popen(ns, [sys.executable, "-I", "-S", "-c", _HOLD, v4, v6, LAB.public_v4, LAB.public_v6,
                                        str(PER_FAMILY)], stdin=subprocess.PIPE, log=log))
            atk.wait_ready(log, procs[-1], timeout=180)
        full = _sweeps(lab, str(plugin.state_dir))
    finally:
        for proc in procs:
            proc.kill()
        plugin.delete("many", ns)
    n = PROCESSES * PER_FAMILY * 2
    show = lambda runs: ", ".join(f"{c:.3f}/{w:.3f}" for c, w in runs)  # noqa: E731
    print(f"\nsweep CPU/wall s, no sockets: {show(empty)}"
          f"\nsweep CPU/wall s, {n} connected UDP sockets: {show(full)}"
          f"\nCPU per socket: {', '.join(f'{1e6 * (c - empty[0][0]) / n:.1f}' for c, _ in full)} us")
    assert all(c > e for (c, _), (e, _) in zip(full, empty))   # the sockets were there to sweep
