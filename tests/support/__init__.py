"""Test support: local images, a private containerd, and a libcni-like CNI runner.

Nothing here touches the host's /etc/cni/net.d, /opt/cni/bin, /var/lib/cni or
/run/containerd: real clients run in private mount namespaces (see ``private_mounts``
in ``containerd.py``) and inside the network namespace they are given.
"""
from __future__ import annotations

import contextlib
import secrets
import subprocess
from typing import Iterator


@contextlib.contextmanager
def temp_netns(prefix: str = "sgt") -> Iterator[str]:
    """A throwaway named netns ``<prefix>-<hex>`` with lo up; yields its path
    (/run/netns/...) and deletes it afterwards, also on failure."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True)
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
