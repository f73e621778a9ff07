"""open_netns, the check every CNI_NETNS goes through before the kernel is touched: a
network namespace opens; anything else is CNI code 3 naming the path (no root needed:
the process's own namespaces are readable)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.errors import UNKNOWN_CONTAINER, SockgateError
from runtime.kernel.netns import check_netns, open_netns


def test_a_network_namespace_opens() -> None:
    fd = open_netns("/proc/self/ns/net")
    try:
        assert os.fstat(fd).st_ino == os.stat("/proc/self/ns/net").st_ino
    finally:
        os.close(fd)
    check_netns("/proc/thread-self/ns/net")  # the Docker door's path


def _refused(path: str) -> SockgateError:
    with pytest.raises(SockgateError) as info:
        check_netns(path)
    assert info.value.code == UNKNOWN_CONTAINER
    assert path in info.value.details
    return info.value


def test_what_is_not_a_network_namespace_is_code_3(tmp_path: Path) -> None:
    plain = tmp_path / "cni-1234"
    plain.write_text("")
    err = _refused(str(plain))
    # The pin whose mount the agent doesn't see: say which dir to mount, and how.
    assert "plain file" in err.details and f"mount {tmp_path} " in err.details
    assert "HostToContainer" in err.details
    assert "directory" in _refused(str(tmp_path)).msg
    assert "does not exist" in _refused(str(tmp_path / "gone")).msg
    assert "another type" in _refused("/proc/self/ns/mnt").details
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not an nsfs file" in _refused(str(fifo)).details  # and didn't block
    assert "not a network namespace" in _refused("/dev/null").msg
