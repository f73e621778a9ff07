"""podman (Debian's 4.3, CNI backend) attaches containers through sockgate, in the
lab's node netns, with all of podman's files private (see tests/support/podman.py).

The containers get the outbound contract: the lab internet is reachable with the
node's address as source, a Google address and port 25 are refused at once, Google
Public DNS answers; nothing opens a connection into them. Removing a container (by
``--rm``, ``rm -f`` or after it exited) leaves no lease, record, veth or netns behind.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.lab import LAB
from runtime.lab.policy import write_lab_policy
from tests.support import images
from tests.support.plugin import node_links, state_leftovers
from tests.support.podman import CONTRACT_SCRIPT, Podman, assert_contract, peers

pytestmark = [pytest.mark.lab, pytest.mark.clients, pytest.mark.shims("compiled", "python")]
NET = "sgpodman"


def conflist(tmp: Path, cni_version: str = "1.0.0") -> dict:
    # podman 4.3's libcni parses results up to 1.0.0 ("unsupported CNI result version
    # 1.1.0" otherwise), and keeps a network only if its cniVersion is in VERSION's list.
    return {"cniVersion": cni_version, "name": NET, "plugins": [{
        "type": "sockgate", "stateDir": str(tmp / "state"), "runDir": str(tmp / "run"),
        "logFile": str(tmp / "cni.log"), "policyFile": str(write_lab_policy(tmp / "policy.json"))}]}


def leftovers(tmp: Path) -> dict[str, list[str]]:
    return state_leftovers(tmp / "state", NET)


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("images")


@pytest.fixture
def podman(lab, cni_exe, tmp_path, image_cache) -> Iterator[Podman]:
    net_dir = tmp_path / "net.d"
    net_dir.mkdir()
    (net_dir / f"{NET}.conflist").write_text(json.dumps(conflist(tmp_path)))
    with Podman(lab.ns_path(lab.node), tmp_path / "pm", network_dir=net_dir,
                plugin_dir=Path(cni_exe).parent) as pm:
        pm.import_image(images.busybox_rootfs_tar(image_cache), images.BUSYBOX_REF)
        yield pm
    assert pm.cgroups() == [], "podman's cgroups left behind"
    assert pm.processes() == [], "conmon or podman processes left behind"


def test_podman_loads_sockgate_network(podman):
    nets = {n["name"]: n for n in podman.networks()}
    assert nets[NET]["driver"] == "sockgate", nets


def test_podman_run_rm_outbound_contract(lab, podman, tmp_path):
    """``podman run --rm``: the contract holds inside; when it exits, nothing is left."""
    node = lab.ns_path(lab.node)
    before = node_links(node)
    r = podman.run(images.BUSYBOX_REF, ["sh", "-c", CONTRACT_SCRIPT], network=NET)
    assert r.rc == 0, r.stderr
    assert_contract(r.stdout)
    assert leftovers(tmp_path) == {"leases": [], "records": []}
    assert node_links(node) == before
    assert podman.netns_files() == []
    assert podman.podman("ps", "-aq", check=True).stdout.strip() == ""


def test_podman_detached_rm_force(lab, podman, tmp_path):
    """``podman run -d``: attached while it runs (record, veth, node routes), reachable
    only outbound; ``podman rm -f`` removes every trace."""
    node = lab.ns_path(lab.node)
    before = node_links(node)
    r = podman.run(images.BUSYBOX_REF, ["sh", "-c", "nc -ll -p 8080 -e echo inside & sleep 300"],
                   network=NET, name="web", detach=True)
    assert r.rc == 0, r.stderr
    cid = r.stdout.strip().splitlines()[-1]
    inspect = json.loads(podman.podman("inspect", "web", check=True).stdout)[0]
    ip4 = inspect["NetworkSettings"]["Networks"][NET]["IPAddress"]
    assert ip4.startswith("10.77."), inspect["NetworkSettings"]

    assert leftovers(tmp_path)["records"] == [f"{cid}--eth0.json"]
    assert len(leftovers(tmp_path)["leases"]) == 2
    new = node_links(node) - before
    assert len(new) == 1, new
    assert len(podman.netns_files()) == 1

    ex = podman.podman("exec", "web", "sh", "-c", CONTRACT_SCRIPT)
    assert ex.rc == 0, ex.stderr
    assert_contract(ex.stdout)
    # The container listens on 8080, but nothing from outside may open a connection.
    own = podman.podman("exec", "web", "sh", "-c", "nc -w 2 127.0.0.1 8080 </dev/null")
    assert "inside" in own.stdout, own
    from_internet = lab.probe("internet", "tcp", ip4, 8080, timeout=1.0)
    assert not from_internet.ok, from_internet
    from_node = lab.probe("node", "tcp", ip4, 8080, timeout=1.0)
    assert not from_node.ok, from_node

    rm = podman.podman("rm", "-f", "-t", "0", "web")
    assert rm.rc == 0, rm.stderr
    assert leftovers(tmp_path) == {"leases": [], "records": []}
    assert node_links(node) == before
    assert podman.netns_files() == []
    assert podman.podman("ps", "-aq", check=True).stdout.strip() == ""


def test_podman_exited_container_detached_by_cleanup(lab, podman, tmp_path):
    """A detached container that exits by itself is detached by podman's own cleanup
    (conmon runs ``podman container cleanup``), before anyone removes it."""
    node = lab.ns_path(lab.node)
    before = node_links(node)
    r = podman.run(images.BUSYBOX_REF, ["sh", "-c", f"echo hi | nc -w 3 {LAB.public_v4} 9000"],
                   network=NET, name="short", detach=True)
    assert r.rc == 0, r.stderr
    w = podman.podman("wait", "short", timeout=60)
    assert w.rc == 0 and w.stdout.strip() == "0", w
    logs = podman.podman("logs", "short", check=True).stdout
    assert peers(logs) == [LAB.node_uplink_v4], logs
    # cleanup runs right after the exit; give it a moment.
    deadline = time.monotonic() + 10
    while leftovers(tmp_path) != {"leases": [], "records": []} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(tmp_path) == {"leases": [], "records": []}
    assert node_links(node) == before
    assert podman.podman("rm", "short").rc == 0
    assert podman.netns_files() == []
