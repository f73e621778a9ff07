"""The compiled CNI executable on a node without Python: the runtime's side runs it
chrooted into a root filesystem that holds nothing but that static file (no
interpreter, no libc, no loader, no `sockgate-python` beside it), in its own mount
namespace with the agent's run dir bound in at the config's runDir. The agent runs
outside, as the DaemonSet's container would. With the agent, ADD and DEL work; with
it stopped, both give CNI error 11 naming the socket, and the runtime's retried DEL
succeeds once the agent is back."""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from runtime.cli.install import COMPILED_SHIM, PYTHON_LAUNCHER
from runtime.lab import LAB
from runtime.state.store import host_ifname
from tests.conftest import AgentProcess
from tests.support.plugin import Plugin, nft_set, node_links

pytestmark = pytest.mark.lab
EXE_IN_ROOT = "/opt/cni/bin/sockgate"
NFT_SETS = ("ifaces", "tx4", "tx6", "rx")


def make_root(root: Path, run_dir: str) -> None:
    """The root filesystem: the compiled executable, an empty /proc to mount on (it
    reads /proc/self/exe to look for the launcher) and the mount point of the run dir."""
    (root / "proc").mkdir(parents=True)
    (root / run_dir.lstrip("/")).mkdir(parents=True)
    exe = root / EXE_IN_ROOT.lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_bytes(COMPILED_SHIM.read_bytes())
    exe.chmod(0o755)


def runtime_side(tmp: Path, root: Path, run_dir: str) -> Path:
    """What the runtime execs: a private mount namespace (gone with the process, so
    nothing to unmount) with /proc and the agent's run dir mounted into `root`, then
    the executable chrooted there; env and stdin pass through."""
    script = tmp / "runtime-side.sh"
    inner = (f"mount -t proc proc {shlex.quote(str(root / 'proc'))} && "
             f"mount --bind {shlex.quote(run_dir)} {shlex.quote(str(root) + run_dir)} && "
             f"exec chroot {shlex.quote(str(root))} {EXE_IN_ROOT}")
    script.write_text(f"#!/bin/sh\nexec unshare --mount --propagation private sh -c {shlex.quote(inner)}\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def rootless_plugin(plugin: Plugin, tmp_path: Path) -> Iterator[Plugin]:
    """The `plugin` fixture's network, its CNI executable run in the Python-less root.
    (The fixture's own executable, with Python, does the teardown GC.)"""
    run_dir = plugin.conf["runDir"]
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    root = tmp_path / "root"
    make_root(root, run_dir)
    yield Plugin(str(runtime_side(tmp_path, root, run_dir)), plugin.node_netns, plugin.conf)


def test_the_root_has_no_python(rootless_plugin, tmp_path):
    root = tmp_path / "root"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    assert files == [EXE_IN_ROOT.lstrip("/")]
    # Inside, the runtime's side sees no python at all (its chroot + the mounts).
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "chroot", str(root), "/usr/bin/python3",
                            "-c", "1"], capture_output=True, text=True)
    assert probe.returncode == 127 and "No such file" in probe.stderr, probe
    # It runs there (static: no loader, no libc) and answers VERSION alone.
    version = rootless_plugin("VERSION", conf={"cniVersion": "1.0.0"})
    assert version.rc == 0 and "1.1.0" in version.json["supportedVersions"], version


def _attached(plugin: Plugin, cid: str) -> dict:
    host = host_ifname(plugin.conf["name"], cid, "eth0")
    return {"link": host in node_links(plugin.node_netns),
            "elements": [e for s in NFT_SETS for e in nft_set(plugin.node_netns, s) if host in e],
            "leases": plugin.leases(), "records": plugin.records()}


def _nothing_left(plugin: Plugin, cid: str) -> None:
    assert _attached(plugin, cid) == {"link": False, "elements": [], "leases": [], "records": []}


def test_add_and_del_through_the_agent(rootless_plugin, agent, app, lab):
    p = rootless_plugin
    ns = app()
    res = p.add("np", ns)
    v4 = res["ips"][0]["address"].split("/")[0]
    addrs = subprocess.run(["nsenter", f"--net={ns}", "ip", "-j", "addr", "show", "dev", "eth0"],
                           capture_output=True, text=True, check=True).stdout
    assert v4 in addrs
    routes = subprocess.run(["nsenter", f"--net={ns}", "ip", "route", "show", "default"],
                            capture_output=True, text=True, check=True).stdout
    assert routes.startswith("default via"), routes
    r = lab.probe(ns, "tcp", LAB.public_v4, 9000)
    assert r.ok and r.echo_ok and r.peer_seen == LAB.node_uplink_v4, r
    # The agent did the work (the executable has nothing to fall back to here).
    assert [e["msg"].split()[0] for e in agent.served()] == ["ADD"]
    p.delete("np", ns)
    _nothing_left(p, "np")
    assert [e["msg"].split()[0] for e in agent.served()] == ["ADD", "DEL"]


def test_agent_down_gives_code_11_and_the_retried_del_succeeds(rootless_plugin, plugin, lab, app, tmp_path):
    p = rootless_plugin
    sock = os.path.join(p.conf["runDir"], "agent.sock")
    agent = AgentProcess(lab, plugin, tmp_path).start()
    try:
        ns = app()
        p.add("kept", ns)
        assert agent.stop() == 0
        assert not Path(sock).exists()
        attached = _attached(p, "kept")
        assert attached["link"] and attached["elements"], attached

        for command, cid, netns in (("ADD", "new", app()), ("DEL", "kept", ns)):
            call = p(command, cid, netns)
            assert call.rc != 0 and call.code == 11, call
            assert sock in call.json["details"] and PYTHON_LAUNCHER in call.json["details"], call.json
            assert "Traceback" not in call.stdout + call.stderr
        # Neither touched anything: the ADD attached nothing, the DEL left the container.
        assert _attached(p, "kept") == attached
        assert host_ifname(p.conf["name"], "new", "eth0") not in node_links(p.node_netns)

        agent = AgentProcess(lab, plugin, tmp_path).start()
        p.delete("kept", ns)  # the runtime's retry
        p.delete("new")       # and the DEL a runtime sends after a failed ADD
        _nothing_left(p, "kept")
        _nothing_left(p, "new")
    finally:
        agent.stop()
