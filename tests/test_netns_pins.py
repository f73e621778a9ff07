"""CNI_NETNS wherever the runtime pins it (issue 13, point 3): a netns pinned under any
dir the agent sees works; a path the agent can't use as a network namespace is CNI
code 3 naming the path, through the agent and in-process, and leaves nothing; DEL of
such a container succeeds."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.plugin import node_links
from tests.test_cni_errors import assert_clean_error

pytestmark = pytest.mark.lab

MODES = ["in-process", "agent"]


@pytest.fixture(params=MODES)
def mode(request) -> str:
    if request.param == "agent":
        request.getfixturevalue("agent")
    return request.param


class PrivatePin:
    """A runtime in its own mount namespace: the netns is bind-mounted on `path` there
    only; everyone else (the agent) sees the empty file under it."""

    def __init__(self, netns: str, path: Path) -> None:
        path.touch()
        self.path = path
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount --bind "$0" "$1" && echo pinned && exec sleep 600', netns, str(path)],
            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "pinned"

    @property
    def mount_ns(self) -> str:
        return f"/proc/{self.proc.pid}/ns/mnt"

    def close(self) -> None:
        # The mount dies with the namespace's last process.
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def private_pin(app, tmp_path) -> Iterator[PrivatePin]:
    (tmp_path / "runtime-state" / "netns").mkdir(parents=True)
    pin = PrivatePin(app(), tmp_path / "runtime-state" / "netns" / "cni-private")
    yield pin
    pin.close()


class VisiblePin:
    """containerd's way (netns_mounts_under_state_dir): /proc/<pid>/ns/net of a process
    in the pod's netns bind-mounted under the runtime's state dir, in our mount
    namespace (which the agent shares)."""

    def __init__(self, netns: str, path: Path) -> None:
        path.touch()
        self.path = path
        self.holder = subprocess.Popen(["nsenter", f"--net={netns}", "sleep", "600"])
        self.mounted = False
        # nsenter execs sleep: wait until the pid is in the netns.
        for _ in range(100):
            if Path(f"/proc/{self.holder.pid}/ns/net").stat().st_ino == Path(netns).stat().st_ino:
                break
            subprocess.run(["sleep", "0.02"])
        subprocess.run(["mount", "--bind", f"/proc/{self.holder.pid}/ns/net", str(path)], check=True)
        self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=True)
            self.mounted = False

    def close(self) -> None:
        self.unmount()
        self.holder.kill()
        self.holder.wait(10)


@pytest.fixture
def visible_pin(app, tmp_path) -> Iterator[VisiblePin]:
    d = tmp_path / "containerd-state" / "io.containerd.grpc.v1.cri" / "netns"
    d.mkdir(parents=True)
    pin = VisiblePin(app(), d / "cni-0f1e2d3c")
    yield pin
    pin.close()


def _served_by_agent(request, cid: str) -> bool:
    agent = request.getfixturevalue("agent")
    return any(cid in json.dumps(e) for e in agent.served())


def _assert_code3(plugin, call, path: str, before: set[str]) -> dict:
    assert_clean_error(plugin, call, 3, before)
    err = call.json
    assert path in err["details"], err
    return err


@pytest.mark.parametrize("kind", ["regular-file", "directory", "nonexistent", "mount-ns"])
def test_unusable_netns_is_code_3(plugin, mode, kind, tmp_path, request):
    path = {"regular-file": tmp_path / "plain-file", "directory": tmp_path / "a-dir",
            "nonexistent": tmp_path / "no-such-netns"}.get(kind)
    if path is None:  # a namespace, of another type
        path = Path(request.getfixturevalue("private_pin").mount_ns)
    if kind == "regular-file":
        path.write_text("")
    elif kind == "directory":
        path.mkdir()
    before = node_links(plugin.node_netns)
    call = plugin("ADD", f"bad-{kind}", str(path))
    err = _assert_code3(plugin, call, str(path), before)
    if kind == "regular-file":
        assert "plain file" in err["details"] and "HostToContainer" in err["details"]
    if kind == "mount-ns":
        assert "another type" in err["details"]
    if mode == "agent":
        assert _served_by_agent(request, f"bad-{kind}")
    # CNI: DEL must not fail for a netns that is missing or unusable.
    plugin.delete(f"bad-{kind}", str(path))
    assert plugin.leases() == [] and plugin.records() == []


def test_pin_hidden_from_the_agent_is_code_3(plugin, agent, private_pin, request):
    """The runtime (and the CNI executable it runs) sees the pin; the agent, in
    another mount namespace the mount didn't reach, sees the empty file: code 3
    naming the path and saying how to mount the pin dir, not 102."""
    before = node_links(plugin.node_netns)
    path = str(private_pin.path)
    call = plugin("ADD", "hidden", path, mount_ns=private_pin.mount_ns)
    err = _assert_code3(plugin, call, path, before)
    assert "pin dir" in err["details"] and str(private_pin.path.parent) in err["details"]
    assert _served_by_agent(request, "hidden")
    call = plugin("DEL", "hidden", path, mount_ns=private_pin.mount_ns)
    assert call.rc == 0, call.stdout
    # Unusable for the agent, not for the runtime: without an agent, the executable
    # handles the request in the runtime's mount namespace, where the pin works.
    agent.stop()
    res = plugin.add("hidden-inproc", path, mount_ns=private_pin.mount_ns)
    assert res["interfaces"][1]["sandbox"] == path
    plugin.delete("hidden-inproc", path, mount_ns=private_pin.mount_ns)
    assert plugin.leases() == [] and plugin.records() == []


def test_pin_hidden_in_process(plugin, private_pin):
    """In-process, seen from outside the runtime's mount namespace: code 3 too."""
    before = node_links(plugin.node_netns)
    call = plugin("ADD", "hidden", str(private_pin.path))
    _assert_code3(plugin, call, str(private_pin.path), before)


def test_netns_pinned_under_a_state_dir_works(plugin, mode, visible_pin, request):
    path = str(visible_pin.path)
    res = plugin.add("pinned", path)
    assert res["interfaces"][1]["sandbox"] == path
    addrs = {ip["address"].split("/")[0] for ip in res["ips"]}
    out = subprocess.run(["nsenter", f"--net={path}", "ip", "-j", "addr", "show", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    assert addrs <= {a["local"] for a in json.loads(out)[0]["addr_info"]}
    assert plugin("CHECK", "pinned", path).rc == 0
    if mode == "agent":
        assert _served_by_agent(request, "pinned")
    # The runtime removed the pin (the empty file stays): CHECK says code 3, DEL
    # still succeeds and removes the node side, leases and record.
    visible_pin.unmount()
    assert plugin("CHECK", "pinned", path).code == 3
    plugin.delete("pinned", path)
    assert plugin.leases() == [] and plugin.records() == []
    assert not [n for n in node_links(plugin.node_netns)
                if n == res["interfaces"][0]["name"]]
