"""kill -9 at the worst moment, for the two doors review 10 did not play (review 11):

1. the Docker door: the agent serving Docker's network driver protocol killed at an
   exact point of CreateNetwork, CreateEndpoint, Join, Leave, DeleteEndpoint and
   DeleteNetwork (tests/support/kill_at.py wraps the function), then what Docker and
   the operator do next: Docker's own retry of the call (dockerd's plugin client
   retries a call whose connection failed for about 30 s), the plugin restarted as
   systemd's Restart=on-failure would, `docker rm -f`, `docker network rm`,
   `sockgate gc`. Then: nothing left (veths, nft elements, leases, records, endpoint
   and network records, locks, temp files), and what the container sent billed once
   (records vs the far end's own counter, as tests/test_kill.py compares).
2. `scripts/install-node.sh --uninstall` killed at each of its steps, then run again.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import docker
import pytest

from runtime.billing.ledger import Ledger
from tests.support import attacks as atk
from tests.support.dockerd import IMAGE, PLUGIN_DIR, DockerEnv, docker_env
from tests.support.plugin import nft_set, wait_until_ready
from tests.test_hostile import BILLED, EXTRA, FarSide, _far_table

pytestmark = [pytest.mark.lab, pytest.mark.clients]

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = ROOT / "tests" / "support" / "kill_at.py"
CORE_NET = "docker"


# --- the Docker host, and the agent killed at a moment ---------------------------------

@pytest.fixture(scope="module")
def denv(tmp_path_factory) -> Iterator[DockerEnv]:
    with docker_env(tmp_path_factory.mktemp("docker-kill"), tmp_path_factory.mktemp("images"), "nft") as env:
        yield env


@pytest.fixture
def dfar(denv) -> Iterator[FarSide]:
    """The far end's own counters in this Docker host's lab (tests/test_hostile.py's `far`)."""
    lab = denv.lab
    added: list[str] = []
    try:
        for addr in EXTRA:
            v6 = ":" in addr
            lab.run(lab.internet, ["ip", "addr", "add", f"{addr}/{128 if v6 else 32}", "dev", "lo"]
                    + (["nodad"] if v6 else []))
            added.append(addr)
        lab.run(lab.internet, ["nft", "-f", "-"], input=_far_table())
        yield FarSide(lab)
    finally:
        lab.run(lab.internet, ["nft", "delete", "table", "inet", "sgtest_hostile"], check=False)
        for addr in added:
            v6 = ":" in addr
            lab.run(lab.internet, ["ip", "addr", "del", f"{addr}/{128 if v6 else 32}", "dev", "lo"], check=False)


class KilledAgent:
    """The agent of a DockerEnv run through kill_at.py: it SIGKILLs itself at the
    moment named. `restart()` is the plugin restarted (systemd's Restart=on-failure)."""

    def __init__(self, env: DockerEnv, log: Path) -> None:
        self.env, self.log = env, log
        self.ready = log.with_suffix(".ready")
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        a = self.env.agent
        return ["agent", "--state-dir", str(a.state_dir), "--run-dir", str(a.run_dir), "--policy", a.policy_file,
                "--ready-file", str(self.ready), "--metrics-address", "",
                "--docker-socket", f"{PLUGIN_DIR}/sockgate.sock", "--docker-host", self.env.host.base_url]

    def start(self, patches: list[dict], prelude: str = "") -> None:
        assert self.env.agent.stop() == 0
        self.ready.unlink(missing_ok=True)
        spec = {"patches": patches, "prelude": prelude, "run": {"kind": "cli", "argv": self.argv()}}
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = self.env.host.popen([sys.executable, str(KILL_AT), json.dumps(spec)], log=self.log,
                                        cwd=str(ROOT), env=env)
        wait_until_ready(self.proc, self.ready, self.log, 30)

    def killed(self, timeout: float = 60) -> str:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        text = self.log.read_text(errors="replace")
        assert rc == -signal.SIGKILL, (rc, text[-3000:])
        return next((line for line in text.splitlines() if "KILLED" in line), "")

    def restart(self) -> None:
        """As systemd would: the usual agent again, at once."""
        self.env.agent.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def killed_agent(denv, tmp_path) -> Iterator[KilledAgent]:
    k = KilledAgent(denv, tmp_path / "killed-agent.log")
    try:
        yield k
    finally:
        k.stop()
        if denv.agent.proc is None or denv.agent.proc.poll() is not None:
            denv.agent.start()


class Background:
    """A Docker call in a thread (it waits for its driver calls, retries included)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def wait(self, timeout: float = 120) -> "Background":
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the Docker call never returned"
        return self


# --- what is left ------------------------------------------------------------------------

def leftovers(env: DockerEnv) -> dict[str, list[str]]:
    links = json.loads(subprocess.run(["nsenter", f"--net={env.node}", "ip", "-j", "link", "show"],
                                      capture_output=True, text=True, check=True).stdout)
    state = env.state
    core = state / "networks" / CORE_NET

    def names(d: Path, pattern: str = "*") -> list[str]:
        return sorted(p.name for p in d.glob(pattern)) if d.is_dir() else []

    out = {
        "links": sorted(f"{link['ifname']}{' (down)' if 'UP' not in link['flags'] else ''}" for link in links
                        if link["ifname"].startswith(("sg", "dk"))),
        "leases": [n for n in names(core / "leases") if not n.startswith(".")],
        "records": names(core / "attachments", "*.json"),
        "adding locks": names(core / "adding"),
        "endpoints": names(state / "docker" / "endpoints", "*.json"),
        "temps": [str(p.relative_to(state)) for p in state.rglob(".*.tmp")],
        "retired marks": names(env.agent.run_dir / "retired"),
    }
    for set_name in ("ifaces", "tx4", "tx6", "rx"):
        out[f"nft {set_name}"] = nft_set(env.node, set_name)
    return {k: v for k, v in out.items() if v}


def networks_known(env: DockerEnv) -> dict[str, list[str]]:
    """sockgate's network records vs the sockgate networks Docker has."""
    recs = sorted(p.stem for p in (env.state / "docker" / "networks").glob("*.json"))
    docker_ids = sorted(n.id for n in env.client.networks.list() if n.attrs.get("Driver") == "sockgate")
    return {"sockgate": recs, "docker": docker_ids}


def wait_for(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def gc(env: DockerEnv) -> dict:
    a = env.agent
    r = env.host.run([sys.executable, "-m", "runtime.cli.main", "gc", "--state-dir", str(a.state_dir),
                      "--run-dir", str(a.run_dir), "--policy", a.policy_file, "--json"], check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def settle(env: DockerEnv, before: dict) -> dict:
    """The Docker door's sweep (every 5 s) and `sockgate gc`, then what is left beyond
    `before`."""
    wait_for(lambda: leftovers(env) == before, timeout=12)
    gc(env)
    wait_for(lambda: leftovers(env) == before, timeout=8)
    now = leftovers(env)
    return {k: v for k, v in now.items() if v != before.get(k)}


def billed(env: DockerEnv, eid: str) -> tuple[list[dict], tuple[int, int]]:
    recs = [r for r in Ledger(env.state / "billing").records() if r["container_id"] == eid]
    return recs, (sum(r["tx_packets"] for r in recs), sum(r["tx_bytes"] for r in recs))


def summary(recs: list[dict]) -> list[dict]:
    return [{k: r.get(k) for k in ("seq", "tx_packets", "tx_bytes", "final", "counters_missing")} for r in recs]


def sent(env: DockerEnv, far: FarSide, pid: int, nbytes: int) -> tuple[int, int]:
    """(packets, bytes) that reached the far end: TCP in 88-byte segments from the
    container's netns."""
    before = far.counters()["billed"]
    cp = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *atk.argv("small-mss", BILLED["v4"], 9000, 88,
                                                                          nbytes)],
                        capture_output=True, text=True, timeout=60)
    assert json.loads(cp.stdout.strip().splitlines()[-1])["echoed"] >= nbytes, cp.stdout + cp.stderr
    after = far.counters()["billed"]
    return after[0] - before[0], after[1] - before[1]


def endpoint_of(ct) -> str:
    ct.reload()
    return next(iter(ct.attrs["NetworkSettings"]["Networks"].values()))["EndpointID"]


def run(env: DockerEnv, network, name: str):
    return env.client.containers.run(IMAGE, ["sleep", "3600"], name=name, network=network.name, detach=True,
                                     stop_signal="SIGKILL")


@pytest.fixture
def net(denv, request) -> Iterator[Any]:
    name = "sgk-" + format(abs(hash(request.node.nodeid)) % 16 ** 8, "08x")
    client = denv.client
    network = client.networks.create(name, driver="sockgate", ipam=docker.types.IPAMConfig(driver="null"))
    yield network
    for c in client.containers.list(all=True, filters={"network": network.id}):
        with contextlib.suppress(Exception):
            c.remove(force=True)
    with contextlib.suppress(Exception):
        network.remove()


def docker_log_since(env: DockerEnv, mark: int) -> str:
    return env.host.log_path.read_bytes()[mark:].decode(errors="replace")


# --- DeleteEndpoint (docker rm -f) killed at each of its steps ----------------------------

DELETE_STEPS = {
    "after-veth-retired": ("runtime.kernel.netns:NetlinkLinks.retire_link", "after"),
    "after-final-record": ("runtime.core.attach:final_record", "after"),
    "after-elements-removed": ("runtime.kernel.nft:_remove_elements", "after"),
    "after-leases-released": ("runtime.state.ipam:LeaseStore.release_owner", "after"),
    "after-record-deleted": ("runtime.state.store:AttachmentStore.delete", "after"),
    "after-handler-before-answer": ("runtime.docker.driver:DockerDriver.delete_endpoint", "after"),
}


_REAPER_SLOW = ("import time, runtime.kernel.netns as n\n"
                "_real = n.delete_link\n"
                "def delete_link(ifname):\n"
                "    time.sleep(5)\n"
                "    return _real(ifname)\n"
                "n.delete_link = delete_link\n")


@pytest.mark.parametrize("step", list(DELETE_STEPS))
def test_docker_delete_endpoint_killed_bills_once_and_leaves_nothing(denv, net, dfar, killed_agent, step):
    """`docker rm -f` whose DeleteEndpoint kills the agent at `step`; the plugin comes
    back at once (systemd), Docker retries or gives up as it does, then the door's sweep
    and `sockgate gc`. Nothing may be left and the bytes billed once."""
    before = leftovers(denv)
    ct = run(denv, net, f"{net.name}-del")
    eid = endpoint_of(ct)
    ct.reload()
    pid = ct.attrs["State"]["Pid"]
    wire = sent(denv, dfar, pid, 200_000)
    target, when = DELETE_STEPS[step]
    # The agent's reaper deletes a retired veth in the background within ~50 ms: the
    # worst moment is before it did (a busy node), so it is slowed down here.
    killed_agent.start([{"target": target, "when": when}], prelude=_REAPER_SLOW)
    mark = denv.host.log_path.stat().st_size
    rm = Background(lambda: ct.remove(force=True))
    killed_agent.killed()
    killed_agent.restart()
    rm.wait()
    left = settle(denv, before)
    assert denv.agent.stop() == 0  # its shutdown flush
    denv.agent.start()
    recs, total = billed(denv, eid)
    report = {"rm": repr(rm.error), "left": left, "records": summary(recs), "wire": wire,
              "dockerd": [line[:300] for line in docker_log_since(denv, mark).splitlines()
                          if "plugin" in line.lower() or "endpoint" in line.lower()][-6:]}
    print(json.dumps(report, indent=1))
    assert left == {}, report
    assert total == wire and [r["final"] for r in recs].count(True) == 1, report


# --- CreateEndpoint, Join, Leave (docker run, docker rm -f) killed --------------------------

START_STEPS = {
    "create-after-record-written": ("runtime.core.attach:_reserve", "after"),
    "create-after-veth-created": ("runtime.kernel.netns:NetlinkLinks.create_veth", "after"),
    "create-after-attached": ("runtime.core.attach:attach_unplaced", "after"),
    "create-after-handler-before-answer": ("runtime.docker.driver:DockerDriver.create_endpoint", "after"),
    "join-after-netns-recorded": ("runtime.core.attach:set_netns", "after"),
    "join-after-handler-before-answer": ("runtime.docker.driver:DockerDriver.join", "after"),
}


@pytest.mark.parametrize("step", list(START_STEPS))
def test_docker_start_killed_leaves_nothing_after_rm(denv, net, killed_agent, step):
    """`docker run` whose CreateEndpoint or Join kills the agent; the plugin comes back
    at once; whatever `docker run` then says, `docker rm -f`, the door's sweep and
    `sockgate gc` leave nothing."""
    before = leftovers(denv)
    target, when = START_STEPS[step]
    killed_agent.start([{"target": target, "when": when}])
    mark = denv.host.log_path.stat().st_size
    name = f"{net.name}-start"
    started = Background(lambda: run(denv, net, name))
    killed_agent.killed()
    killed_agent.restart()
    started.wait()
    err = repr(started.error)
    during = leftovers(denv)
    for c in denv.client.containers.list(all=True, filters={"name": name}):
        c.remove(force=True)
    left = settle(denv, before)
    report = {"docker run": err, "during": during, "left": left,
              "dockerd": [line[:300] for line in docker_log_since(denv, mark).splitlines()
                          if "plugin" in line.lower() or "endpoint" in line.lower()][-6:]}
    print(json.dumps(report, indent=1))
    assert left == {}, report


def test_docker_leave_killed_leaves_nothing(denv, net, killed_agent):
    before = leftovers(denv)
    ct = run(denv, net, f"{net.name}-leave")
    killed_agent.start([{"target": "runtime.docker.driver:DockerDriver.leave", "when": "after"}])
    rm = Background(lambda: ct.remove(force=True))
    killed_agent.killed()
    killed_agent.restart()
    rm.wait()
    left = settle(denv, before)
    print(json.dumps({"rm": repr(rm.error), "left": left}, indent=1))
    assert rm.error is None and left == {}, (rm.error, left)


# --- CreateNetwork, DeleteNetwork killed ------------------------------------------------------

def test_docker_create_network_killed_leaves_no_network_docker_does_not_have(denv, killed_agent):
    """Killed after the network record was written, before Docker had the answer."""
    killed_agent.start([{"target": "runtime.docker.driver:DockerDriver.create_network", "when": "after"}])
    made = Background(lambda: denv.client.networks.create("sgk-ghost", driver="sockgate",
                                                          options={"ipv4Pool": "10.98.0.0/16"},
                                                          ipam=docker.types.IPAMConfig(driver="null")))
    killed_agent.killed()
    killed_agent.restart()
    made.wait()
    known = networks_known(denv)
    try:
        # The operator's next network, with the default pools: only the ghost (whose
        # IPv6 pool is the default one) stands in its way.
        again = Background(lambda: denv.client.networks.create("sgk-ghost2", driver="sockgate",
                                                               ipam=docker.types.IPAMConfig(driver="null"))).wait()
        report = {"create": repr(made.error), "known": known, "retry": repr(again.error)}
        print(json.dumps(report, indent=1))
        assert set(known["sockgate"]) <= set(known["docker"]), report
        assert again.error is None, report
    finally:
        for n in denv.client.networks.list(names=["sgk-ghost", "sgk-ghost2"]):
            n.remove()
        # The ghost (a network Docker never had) would refuse the next tests' networks.
        for rec in (denv.state / "docker" / "networks").glob("*.json"):
            if rec.stem not in networks_known(denv)["docker"]:
                rec.unlink()


def test_docker_delete_network_killed_is_forgotten(denv, killed_agent):
    network = denv.client.networks.create("sgk-gone", driver="sockgate", ipam=docker.types.IPAMConfig(driver="null"))
    killed_agent.start([{"target": "runtime.docker.driver:DockerDriver.delete_network", "when": "after"}])
    gone = Background(network.remove)
    killed_agent.killed()
    killed_agent.restart()
    gone.wait()
    if denv.client.networks.list(names=["sgk-gone"]):
        network.remove()
    known = networks_known(denv)
    print(json.dumps({"rm": repr(gone.error), "known": known}, indent=1))
    assert network.id not in known["sockgate"] and network.id not in known["docker"], known


# --- scripts/install-node.sh --uninstall killed at each step, then run again -------------------

INSTALL_NODE = ROOT / "scripts" / "install-node.sh"
VENV = Path(sys.executable).parent.parent

# `rm` first on the script's PATH: the real rm, then, at the call named by SG_KILL_RM
# ("before:N" or "after:N"), kill -9 of the script (its parent) and of itself.
_FAKE_RM = """#!/bin/bash
n=$(( $(cat "$SG_RM_COUNT" 2>/dev/null || echo 0) + 1 )); echo $n > "$SG_RM_COUNT"
if [ "${SG_KILL_RM:-}" = "before:$n" ]; then echo "KILLED before rm #$n $*" >&2; kill -9 $PPID; kill -9 $$; fi
/bin/rm "$@"; rc=$?
if [ "${SG_KILL_RM:-}" = "after:$n" ]; then echo "KILLED after rm #$n $*" >&2; kill -9 $PPID; kill -9 $$; fi
exit $rc
"""

# The venv's `sockgate` for --venv: `teardown` (not --check) runs through kill_at.py
# with the patches in SG_KILL_TEARDOWN; SG_KILL_SCRIPT=1 kills the script with it.
_FAKE_SOCKGATE = """#!{python}
import json, os, sys
args = sys.argv[1:]
spec = os.environ.get("SG_KILL_TEARDOWN")
if spec and args[:1] == ["teardown"] and "--check" not in args:
    prelude = ""
    if os.environ.get("SG_KILL_SCRIPT"):  # the script (our parent) dies first, then we
        prelude = ("import __main__, os\\n"
                   "_die = __main__.die\\n"
                   "def die(label, _pid=%d):\\n"
                   "    os.kill(_pid, 9)\\n"
                   "    _die(label)\\n"
                   "__main__.die = die\\n") % os.getppid()
    full = {{"patches": json.loads(spec), "prelude": prelude, "run": {{"kind": "cli", "argv": args}}}}
    os.execv("{python}", ["{python}", "{kill_at}", json.dumps(full)])
os.execv("{sockgate}", ["{sockgate}", *args])
"""


@pytest.fixture
def node_dirs(lab, plugin, tmp_path) -> Iterator[dict]:
    """The node paths --uninstall touches, bound to scratch dirs (tests/test_deploy.py's
    way), holding an install's files and, beside them, files sockgate did not make."""
    from tests.test_deploy import install_node
    root = tmp_path / "root"
    root.mkdir()
    r = install_node(root)
    assert r.returncode == 0, r.stderr
    foreign = {"etc/cni/net.d/87-podman-bridge.conflist": '{"cniVersion": "0.4.0", "name": "podman", "plugins": []}',
               "opt/cni/bin/bridge": "#!/bin/sh\nexit 0\n", "etc/systemd/system/other.service": "[Unit]\n"}
    for rel, text in foreign.items():
        (root / rel).write_text(text)
    run_systemd = tmp_path / "run_systemd"
    run_systemd.mkdir()
    Path(plugin.conf["runDir"]).mkdir(parents=True, exist_ok=True)
    binds = {"/etc/cni/net.d": root / "etc/cni/net.d", "/opt/cni/bin": root / "opt/cni/bin",
             "/etc/systemd/system": root / "etc/systemd/system", "/run/systemd": run_systemd,
             "/var/lib/sgtest-state": plugin.state_dir, "/run/sgtest-run": Path(plugin.conf["runDir"])}
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "rm").write_text(_FAKE_RM)
    (fake / "rm").chmod(0o755)
    fakevenv = tmp_path / "fakevenv" / "bin"
    fakevenv.mkdir(parents=True)
    (fakevenv / "python").symlink_to(VENV / "bin" / "python")
    (fakevenv / "sockgate").write_text(_FAKE_SOCKGATE.format(python=VENV / "bin" / "python", kill_at=KILL_AT,
                                                             sockgate=VENV / "bin" / "sockgate"))
    (fakevenv / "sockgate").chmod(0o755)
    yield {"root": root, "binds": binds, "foreign": set(foreign), "fakebin": fake, "fakevenv": fakevenv.parent,
           "tmp": tmp_path}
    from runtime.kernel import segment_meter
    if segment_meter.unmount_if_unused():
        with contextlib.suppress(OSError):
            Path("/run/sockgate").rmdir()


def uninstall(lab, d: dict, env: dict | None = None, venv: Path | None = None) -> subprocess.CompletedProcess[str]:
    from tests.support.containerd import private_mounts
    argv = ["bash", str(INSTALL_NODE), "--uninstall", "--state-dir", "/var/lib/sgtest-state",
            "--run-dir", "/run/sgtest-run", *(["--venv", str(venv)] if venv else [])]
    work = d["tmp"] / f"privmount{len(list(d['tmp'].glob('privmount*')))}"
    work.mkdir()
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run(["nsenter", f"--net={lab.ns_path(lab.node)}", *private_mounts(d["binds"], work, argv)],
                          capture_output=True, text=True, timeout=120, env=e)


def node_files(d: dict) -> set[str]:
    root = d["root"]
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "etc/sockgate" not in str(p)}


def kernel_state(lab) -> dict:
    from runtime.kernel import segment_meter
    from runtime.kernel.netns import in_netns
    table = lab.run(lab.node, ["nft", "list", "table", "inet", "sockgate"], check=False).returncode == 0
    return {"table": table, "meter": in_netns(lab.ns_path(lab.node), segment_meter.installed)}


UNINSTALL_KILLS = {
    "after-conflist": {"SG_KILL_RM": "after:1"},
    "after-teardown-before-units": {"SG_KILL_RM": "before:2"},
    "after-first-unit": {"SG_KILL_RM": "after:2"},
    "after-units-before-executables": {"SG_KILL_RM": "before:5"},
    "after-first-executable": {"SG_KILL_RM": "after:5"},
    "teardown-killed-with-the-script-after-meter": {
        "SG_KILL_TEARDOWN": json.dumps([{"target": "runtime.kernel.segment_meter:remove", "when": "after"}]),
        "SG_KILL_SCRIPT": "1"},
    "teardown-killed-alone-after-table": {
        "SG_KILL_TEARDOWN": json.dumps([{"target": "runtime.kernel.nft:delete_table", "when": "after"}])},
}


@pytest.mark.parametrize("moment", list(UNINSTALL_KILLS))
def test_uninstall_killed_then_run_again_completes_and_leaves_nothing(lab, plugin, app, node_dirs, moment):
    d = node_dirs
    ns = app()
    plugin.add("passing", ns)
    plugin.delete("passing", ns)  # the table and the meter stay, no container attached
    assert kernel_state(lab) == {"table": True, "meter": True}
    kill = dict(UNINSTALL_KILLS[moment], SG_RM_COUNT=str(d["tmp"] / "rm.count"),
                PATH=f"{d['fakebin']}:/usr/sbin:/usr/bin:/sbin:/bin")
    venv = d["fakevenv"] if "SG_KILL_TEARDOWN" in kill else None
    first = uninstall(lab, d, kill, venv)
    report = {"first rc": first.returncode, "first out": first.stdout[-1500:], "first err": first.stderr[-1500:],
              "files after kill": sorted(node_files(d)), "kernel after kill": kernel_state(lab)}
    assert first.returncode != 0, report
    again = uninstall(lab, d)
    report.update({"again rc": again.returncode, "again out": again.stdout[-1500:], "again err": again.stderr[-1500:],
                   "files": sorted(node_files(d)), "kernel": kernel_state(lab)})
    print(json.dumps(report, indent=1))
    assert again.returncode == 0, report
    assert node_files(d) == d["foreign"], report  # ours gone, the rest kept
    assert report["kernel"] == {"table": False, "meter": False}, report


def test_uninstall_whose_teardown_was_killed_says_so(lab, plugin, app, node_dirs):
    """The teardown killed under the script (OOM killer, an operator's kill -9 of the
    wrong pid): the script said "sockgate teardown refused (see above): a container was
    attached meanwhile ... DEL it", and nothing above said so; no container was
    attached. It must say the teardown was killed, and that a rerun finishes."""
    d = node_dirs
    ns = app()
    plugin.add("passing", ns)
    plugin.delete("passing", ns)
    kill = {"SG_KILL_TEARDOWN": json.dumps([{"target": "runtime.kernel.nft:delete_table", "when": "after"}])}
    first = uninstall(lab, d, kill, d["fakevenv"])
    assert first.returncode == 1, first.stdout + first.stderr
    assert "a container was attached" not in first.stderr, first.stderr
    assert "killed" in first.stderr.split("install-node.sh: error:", 1)[1], first.stderr
    assert uninstall(lab, d).returncode == 0


@pytest.mark.parametrize("call", ["CreateEndpoint", "Join"])
def test_docker_call_cut_short_by_a_kill_gets_a_clear_error(denv, net, killed_agent, call):
    """dockerd retries a call whose connection broke with its body already sent, i.e.
    an empty body, and the restarted agent answered `malformed NetworkID: None`, which
    `docker run` printed: nothing an operator can act on. It must say what happened."""
    target = {"CreateEndpoint": "runtime.core.attach:_reserve", "Join": "runtime.core.attach:set_netns"}[call]
    killed_agent.start([{"target": target, "when": "after"}])
    name = f"{net.name}-clear"
    started = Background(lambda: run(denv, net, name))
    killed_agent.killed()
    killed_agent.restart()
    started.wait()
    for c in denv.client.containers.list(all=True, filters={"name": name}):
        c.remove(force=True)
    err = str(started.error)
    assert "malformed" not in err and "restarted" in err, err


# --- an endpoint the sweep can't remove ------------------------------------------------------

def test_an_endpoint_the_sweep_cannot_remove_holds_up_neither_the_others_nor_the_agent(denv, net):
    """A disk or kernel error that keeps the door's sweep from removing one endpoint
    (here its attachment record is made immutable: deleting it fails with EPERM) must
    not keep the sweep from the endpoints after it, nor the agent from starting: before,
    the first failure ended the sweep, and at startup it failed the agent's start. The
    failure is logged once, and the endpoint goes at the first sweep after the error
    is gone, never billed twice."""
    before = leftovers(denv)
    cts = [run(denv, net, f"{net.name}-{k}") for k in ("a", "b")]
    eids = [endpoint_of(c) for c in cts]
    records = denv.state / "networks" / CORE_NET / "attachments"
    record = {e: next(records.glob(f"{e}--*.json")) for e in eids}
    host_end = {e: json.loads(record[e].read_text())["host_ifname"] for e in eids}
    stuck, other = sorted(eids)   # the sweep goes in this order: the stuck one first
    subprocess.run(["chattr", "+i", str(record[stuck])], check=True)
    try:
        for e in eids:   # their interfaces go, as when a container's netns is deleted behind Docker's back
            denv.lab.run(denv.lab.node, ["ip", "link", "del", host_end[e]])
        assert wait_for(lambda: not record[other].exists(), timeout=15), "the sweep stopped at the stuck endpoint"
        assert record[stuck].exists()
        assert denv.agent.stop() == 0
        denv.agent.start()           # its startup sweep meets the stuck endpoint again
        assert wait_for(lambda: record[stuck].exists() and not record[other].exists(), timeout=2)
        failures = [e for e in denv.agent.entries() if f"endpoint {stuck[:12]} could not be removed" in e["msg"]]
        # One for each agent (the log file is the same): not one per sweep, every 5 s.
        assert len(failures) == 2, failures
    finally:
        subprocess.run(["chattr", "-i", str(record[stuck])], check=True)
    assert settle(denv, before) == {}
    assert denv.agent.stop() == 0  # its shutdown flush
    denv.agent.start()
    for e in eids:   # no traffic: a final record only where the elements went before it (the stuck one)
        recs, total = billed(denv, e)
        assert [r["final"] for r in recs].count(True) <= 1 and total == (0, 0), (e == stuck, summary(recs))
