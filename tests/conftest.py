"""Shared fixtures. Everything that touches the kernel happens inside the lab's
namespaces; each test gets its own network name, state dir and app namespaces, and
its attachments are garbage-collected at teardown, pass or fail."""
from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from runtime.cli.install import install_cni
from runtime.kernel import segment_meter
from runtime.kernel.netns import in_netns
from runtime.lab import Lab
from runtime.lab.agent import LabAgent
from runtime.lab.policy import write_lab_policy
from tests.support.plugin import Plugin

_app_counter = itertools.count()


# The CNI executables install_cni can put in place: the compiled forwarder (with the
# Python launcher beside it for when no agent answers) and the Python launcher alone.
SHIMS = ("compiled", "python")


def pytest_configure(config):
    config.addinivalue_line("markers", "shims(*names): run the test once with each of these CNI executables "
                                       "(the `shim` fixture: compiled, python); closest marker wins")


def pytest_generate_tests(metafunc):
    # A module (or test) marked shims(...) gets one test per shim, its id naming it;
    # everything else installs the default (compiled when built).
    marker = metafunc.definition.get_closest_marker("shims")
    if marker is None or "shim" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(SHIMS)
    if unknown or not marker.args:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: shims() takes some of {SHIMS}, not {marker.args}")
    metafunc.parametrize("shim", marker.args, indirect=True, scope="session")


def pytest_collection_modifyitems(config, items):
    # Every test here needs root for namespaces, except the pure unit tests.
    if os.geteuid() != 0 and any("unit" not in item.nodeid for item in items):
        raise pytest.UsageError("the sockgate suite runs as root (it builds network namespaces)")


@pytest.fixture(scope="session")
def shim(request) -> str:
    """Which CNI executable the test's bin dir holds: its parameter under shims(...),
    else install_cni's default ("auto": compiled when built)."""
    return getattr(request, "param", "auto")


@pytest.fixture(scope="session")
def cni_exe(tmp_path_factory, shim: str) -> str:
    return str(install_cni(str(tmp_path_factory.mktemp(f"cni-bin-{shim}")), shim=shim))


def _orphan_meters() -> set[str]:
    """Meters pinned for a netns that no longer has a name (`ip netns del` ran): their
    links keep it alive. Another process's live lab is not counted."""
    root = segment_meter.pin_root()
    if not root.is_dir():
        return set()
    netns_dir = Path("/run/netns")
    live = {segment_meter.netns_cookie()}
    for name in os.listdir(netns_dir) if netns_dir.is_dir() else []:
        try:
            live.add(in_netns(str(netns_dir / name), segment_meter.netns_cookie))
        except OSError:
            pass  # deleted meanwhile
    return {p.name for p in root.glob("net-*")} - {f"net-{c}" for c in live}


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    Lab.cleanup_stale()
    with Lab() as the_lab:
        yield the_lab
    left = _orphan_meters()
    assert not left, f"segment meters left pinned in {segment_meter.pin_root()} for deleted netns: {sorted(left)}"


@pytest.fixture(scope="session")
def policy_file(tmp_path_factory) -> str:
    return str(write_lab_policy(tmp_path_factory.mktemp("policy") / "policy.json"))


def network_conf(name: str, tmp: Path, policy: str, **extra) -> dict:
    return {"cniVersion": "1.1.0", "name": name, "type": "sockgate",
            "stateDir": str(tmp / "state"), "runDir": str(tmp / "run"),
            "logFile": str(tmp / "cni.log"), "policyFile": policy, **extra}


@pytest.fixture
def plugin(lab: Lab, cni_exe: str, policy_file: str, tmp_path: Path, request) -> Iterator[Plugin]:
    name = "t" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:10]
    p = Plugin(cni_exe, lab.ns_path(lab.node), network_conf(name, tmp_path, policy_file))
    yield p
    gc = p("GC", conf=dict(p.conf, **{"cni.dev/valid-attachments": []}))
    assert gc.rc == 0, f"teardown GC failed: {gc.stdout} {gc.stderr}"


@pytest.fixture
def app(lab: Lab) -> Iterator[Callable[[], str]]:
    """Factory of fresh app namespaces; returns the netns path."""
    made: list[str] = []

    def make() -> str:
        name = f"app{next(_app_counter)}"
        netns_name = lab.add_app(name)
        made.append(name)
        return lab.ns_path(netns_name)

    yield make
    for name in made:
        lab.remove_app(name)


class AgentProcess(LabAgent):
    """A `sockgate agent` running in the lab's node netns for a plugin's network."""

    def __init__(self, lab: Lab, plugin: Plugin, tmp: Path, extra_args: tuple[str, ...] = ()) -> None:
        c = plugin.conf
        super().__init__(lab, c["stateDir"], c["runDir"], c["policyFile"], tmp, extra_args)
        self.plugin = plugin

    def start(self, timeout: float = 20.0) -> "AgentProcess":
        super().start(timeout)
        return self

    def served(self) -> list[dict]:
        import json
        lines = [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]
        return [e for e in lines if e.get("logger") == "sockgate.agent" and " rc=" in e.get("msg", "")]


@pytest.fixture
def agent(lab: Lab, plugin: Plugin, tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(lab, plugin, tmp_path).start()
    yield proc
    proc.stop()
