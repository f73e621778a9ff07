"""containerd's ``ctr run --cni`` with sockgate's conflist: inside the container the
outbound contract holds, checked with the same busybox script as the podman tests
(tests/test_cni_clients.py::test_ctr_run_cni covers the allowed v4/v6 traffic only).

``ctr run -d``: the contract holds for a process started later with ``ctr tasks exec``.
ctr never sends DEL for a detached container; removing it as ``ctr run --rm`` would
(the harness's ``remove()``: DEL with an empty CNI_NETNS, prevResult from ctr's libcni
cache) leaves nothing behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import images
from tests.support.containerd import Containerd, ctr_run_cni, sockgate_conflist_dir
from tests.support.plugin import node_links, state_leftovers
from tests.support.podman import CONTRACT_SCRIPT, assert_contract

pytestmark = [pytest.mark.lab, pytest.mark.clients, pytest.mark.shims("compiled", "python")]
NET = "ctrcontract"


def leftovers(tmp: Path) -> dict[str, list[str]]:
    return state_leftovers(tmp / "state", NET)


def test_ctr_run_cni_outbound_contract(lab, cni_exe, tmp_path):
    conf_dir, plugin = sockgate_conflist_dir(tmp_path, NET)
    archive = images.busybox_oci_archive(tmp_path / "images")
    node = lab.ns_path(lab.node)
    bin_dir = Path(cni_exe).parent
    before = node_links(node)
    with Containerd(node, tmp_path / "ctd") as ctd:
        ctd.import_image(archive)
        r = ctr_run_cni(ctd, images.BUSYBOX_REF, "contract", ["sh", "-c", CONTRACT_SCRIPT], conf_dir, bin_dir)
        assert r.rc == 0, r.stderr
        assert_contract(r.stdout)
        assert leftovers(tmp_path) == {"leases": [], "records": []}
        assert node_links(node) == before

        d = ctr_run_cni(ctd, images.BUSYBOX_REF, "bg", ["sleep", "300"], conf_dir, bin_dir, detach=True)
        assert d.rc == 0, d.stderr
        assert leftovers(tmp_path)["records"] == [f"{ctd.namespace}-bg--eth0.json"]
        assert len(node_links(node) - before) == 1
        ex = ctd.ctr("tasks", "exec", "--exec-id", "contract", "bg", "sh", "-c", CONTRACT_SCRIPT, check=False)
        assert ex.returncode == 0, ex.stderr
        assert_contract(ex.stdout)
        ctd.remove("bg")
        assert leftovers(tmp_path) == {"leases": [], "records": []}
        assert node_links(node) == before
