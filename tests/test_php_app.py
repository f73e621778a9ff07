"""A real app in a sandboxed container: a PHP script (Debian's php-cli) that uses
fsockopen, run by containerd's ``ctr run --cni`` attached through sockgate in the lab's
node netns.

The image is the busybox one with the host's /usr, /lib and /lib64 bind-mounted
read-only (php and its libraries; ``php -n`` reads no php.ini, so no /etc is needed)
and tests/apps read-only at /app. The script (tests/apps/fsock.php) reports, per
destination, what fsockopen did: what the contract says must show in the app, a
refused destination fails at once with ECONNREFUSED instead of hanging.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from runtime.lab import LAB
from tests.support import images
from tests.support.containerd import Containerd, ctr_run_cni, sockgate_conflist_dir
from tests.support.plugin import node_links, state_leftovers

pytestmark = [pytest.mark.lab, pytest.mark.clients]
APPS = Path(__file__).resolve().parent / "apps"
NET = "phpnet"
ECONNREFUSED = 111
SMTP_GMAIL_V4 = LAB.gmail["smtp.gmail.com"][0]

CHECKS = [
    {"name": "public4", "mode": "echo", "url": f"tcp://{LAB.public_v4}", "port": 9000},
    {"name": "public6", "mode": "echo", "url": f"tcp://[{LAB.public_v6}]", "port": 9000},
    {"name": "cloud4", "mode": "echo", "url": f"tcp://{LAB.cloud_v4}", "port": 443},
    {"name": "google4", "mode": "connect", "url": f"tcp://{LAB.google_v4}", "port": 443},
    {"name": "google6", "mode": "connect", "url": f"tcp://[{LAB.google_v6}]", "port": 443},
    {"name": "smtp25", "mode": "connect", "url": f"tcp://{LAB.public_v4}", "port": 25},
    {"name": "ftp21", "mode": "connect", "url": f"tcp://{LAB.public_v4}", "port": 21},
    {"name": "private", "mode": "connect", "url": "tcp://192.168.1.1", "port": 80},
    {"name": "dns_tcp", "mode": "dns", "url": f"tcp://{LAB.dns_v4[0]}", "port": 53},
    {"name": "dns_udp", "mode": "dns", "url": f"udp://{LAB.dns_v4[0]}", "port": 53},
    {"name": "dns_other_port", "mode": "connect", "url": f"tcp://{LAB.dns_v4[0]}", "port": 443},
    {"name": "gmail_submission", "mode": "connect", "url": f"tcp://{SMTP_GMAIL_V4}", "port": 587},
    {"name": "gmail_smtp25", "mode": "connect", "url": f"tcp://{SMTP_GMAIL_V4}", "port": 25},
]
ALLOWED = {"public4", "public6", "cloud4", "dns_tcp", "dns_udp", "gmail_submission"}


def php_mounts() -> list[str]:
    mounts = []
    for src, dst in (("/usr", "/usr"), ("/lib", "/lib"), ("/lib64", "/lib64"), (str(APPS), "/app")):
        if Path(src).exists():
            mounts += ["--mount", f"type=bind,src={src},dst={dst},options=rbind:ro"]
    return mounts


def leftovers(tmp: Path) -> dict[str, list[str]]:
    return state_leftovers(tmp / "state", NET)


@pytest.fixture(scope="module")
def php() -> str:
    """The real php binary: /usr/bin/php is a symlink through /etc/alternatives, which
    the container doesn't have."""
    exe = shutil.which("php")
    assert exe, "php-cli is not installed (scripts/setup installs it)"
    real = os.path.realpath(exe)
    assert real.startswith("/usr/"), real
    return real


def test_php_fsockopen_follows_the_contract(lab, cni_exe, php, tmp_path):
    conf_dir, plugin = sockgate_conflist_dir(tmp_path, NET)
    archive = images.busybox_oci_archive(tmp_path / "images")
    node = lab.ns_path(lab.node)
    before = node_links(node)
    bin_dir = Path(cni_exe).parent
    with Containerd(node, tmp_path / "ctd") as ctd:
        ctd.import_image(archive)
        # First run: php works in the container, and ADD has loaded the table that the
        # node's `sockgate policy refresh` (a service on a real node) puts the Gmail
        # hostnames' addresses into.
        v = ctr_run_cni(ctd, images.BUSYBOX_REF, "php-version", [php, "-n", "-v"], conf_dir,
                        bin_dir, extra_args=php_mounts())
        assert v.rc == 0 and v.stdout.startswith("PHP "), (v.stdout, v.stderr)
        lab.run(lab.node, [sys.executable, "-m", "runtime.cli.main", "policy", "refresh", "--once",
                           "--policy", plugin["policyFile"], "--state-dir", plugin["stateDir"]])

        cmd = [php, "-n", "/app/fsock.php", json.dumps(CHECKS)]
        r = ctr_run_cni(ctd, images.BUSYBOX_REF, "php", cmd, conf_dir, bin_dir, extra_args=php_mounts())
        assert r.rc == 0, (r.stdout, r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(out, indent=1))
    assert set(out) == {c["name"] for c in CHECKS}, out

    def fmt(name: str) -> str:
        return f"{name}: {out[name]}"

    for name in ALLOWED:
        assert out[name]["ok"] and out[name]["errno"] == 0, fmt(name)
    # The echo server's first line names the source it saw: the node's address.
    assert out["public4"]["line"]["peer"] == LAB.node_uplink_v4, fmt("public4")
    assert out["public6"]["line"]["peer"] == LAB.node_uplink_v6, fmt("public6")
    assert out["cloud4"]["line"]["peer"] == LAB.node_uplink_v4, fmt("cloud4")
    assert out["public4"]["echo"] == "hello from php", fmt("public4")
    # Google Public DNS answers over TCP and UDP (the lab's server on 8.8.8.8).
    assert out["dns_tcp"]["answers"] == [SMTP_GMAIL_V4], fmt("dns_tcp")
    assert out["dns_udp"]["answers"] == [SMTP_GMAIL_V4], fmt("dns_udp")

    for name in set(out) - ALLOWED:
        # Refused: the connect fails at once with ECONNREFUSED (a reset from the
        # node), well before fsockopen's 3 s timeout.
        assert not out[name]["ok"], fmt(name)
        assert out[name]["errno"] == ECONNREFUSED and out[name]["errstr"] == "Connection refused", fmt(name)
        assert out[name]["ms"] < 500, fmt(name)

    # ctr run --rm sent DEL: nothing left.
    assert leftovers(tmp_path) == {"leases": [], "records": []}
    assert node_links(node) == before
