"""The fragment guard (runtime/kernel/fragment_guard.py) by itself, on a veth pair of
the lab's node netns: both ways of attaching it (tcx, and the clsact bpf filter that
kernels before 6.6 get), what it drops and passes, its counters, and taking it off.
What it does for a container end to end: tests/test_hostile.py (fragments)."""
from __future__ import annotations

import os
import socket
import time
from typing import Iterator

import pytest

from runtime.kernel import bpf, fragment_guard
from runtime.kernel.netns import guard_fragments, in_netns
from tests.support import attacks as atk

pytestmark = pytest.mark.lab

MAC = "02:00:5e:00:53:01"


@pytest.fixture
def pair(lab) -> Iterator[tuple[str, int]]:
    """(node netns path, index of the guarded end): frames sent on sgt-b arrive at
    sgt-a's ingress."""
    lab.run(lab.node, ["ip", "link", "add", "sgt-a", "type", "veth", "peer", "name", "sgt-b"])
    try:
        for name in ("sgt-a", "sgt-b"):
            # No IPv6 of their own: the MLD reports a link sends when it comes up carry a
            # hop-by-hop header, which the guard would count among the test's drops.
            lab.run(lab.node, ["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"])
            lab.run(lab.node, ["ip", "link", "set", name, "up"])
        node = lab.ns_path(lab.node)
        yield node, in_netns(node, lambda: socket.if_nametoindex("sgt-a"))
    finally:
        lab.run(lab.node, ["ip", "link", "del", "sgt-a"], check=False)


def _frames() -> dict[str, list[bytes]]:
    a4, b4, a6, b6 = "192.0.2.1", "198.51.100.1", "2001:db8::1", "2001:db8::2"
    udp4, udp6 = atk.udp(a4, b4, 1000, 2000, b"x" * 2800), atk.udp(a6, b6, 1000, 2000, b"x" * 2800)
    return {
        "dropped4": atk.fragments(a4, b4, atk.IPPROTO_UDP, udp4, 1400, 7)
                    + atk.fragments(a4, b4, atk.IPPROTO_UDP, udp4, 1400, 8, df=True),
        "dropped6": atk.fragments(a6, b6, atk.IPPROTO_UDP, udp6, 1400, 9)
                    + atk.fragments(a6, b6, atk.IPPROTO_UDP, udp6, 1400, 10, chain=("hop",)),
        "passed": [atk.ipv4(a4, b4, atk.IPPROTO_UDP, atk.udp(a4, b4, 1, 2, b"ok"), df=False),
                   atk.ipv4(a4, b4, atk.IPPROTO_UDP, atk.udp(a4, b4, 1, 2, b"df"), df=True),
                   atk.ipv6(a6, b6, atk.IPPROTO_UDP, atk.udp(a6, b6, 1, 2, b"ok"))],
    }


def _send(lab, packets: list[bytes]) -> None:
    frames = [("sgt-b", atk.ether(MAC, MAC, 0x86DD if p[0] >> 4 == 6 else 0x0800, p)) for p in packets]
    assert atk.send(lab, lab.node, l2=frames) == {"sent": len(frames), "errors": {}}


@pytest.mark.parametrize("method", ["tcx", "clsact"])
def test_drops_fragments_and_extension_headers_counts_them_and_passes_the_rest(lab, pair, method):
    node, index = pair
    assert in_netns(node, lambda: fragment_guard.dropped(index)) is None
    in_netns(node, lambda: fragment_guard.attach(index, method))
    assert in_netns(node, lambda: fragment_guard.guarded(index))
    frames = _frames()
    _send(lab, frames["dropped4"] + frames["dropped6"] + frames["passed"])
    got = in_netns(node, lambda: fragment_guard.dropped(index))
    assert got == fragment_guard.Dropped(len(frames["dropped4"]), len(frames["dropped6"]))
    # Taken off: nothing left on the veth.
    in_netns(node, lambda: fragment_guard.remove(index))
    assert not in_netns(node, lambda: fragment_guard.guarded(index))
    assert in_netns(node, lambda: fragment_guard.dropped(index)) is None


def test_a_reload_adds_no_second_guard(lab, pair):
    """guard_fragments (what a table reload calls for every attached veth) attaches
    only where there is none: a veth never runs the program twice."""
    node, index = pair
    assert in_netns(node, lambda: guard_fragments([index])) == [index]
    assert in_netns(node, lambda: guard_fragments([index])) == []
    assert len(in_netns(node, lambda: fragment_guard._guard_ids(index))) == 1
    # A veth gone meanwhile is skipped, not an error.
    assert in_netns(node, lambda: guard_fragments([index + 10_000])) == []


def test_the_program_goes_with_the_veth(lab, pair):
    node, index = pair
    in_netns(node, lambda: fragment_guard.attach(index))
    prog = in_netns(node, lambda: fragment_guard._guard_ids(index))[0]
    lab.run(lab.node, ["ip", "link", "del", "sgt-a"])
    # Freed by the kernel once nothing holds it (an RCU grace period later).
    deadline = time.monotonic() + 5
    while True:
        try:
            fd = bpf.prog_fd(prog)
        except bpf.BpfError:
            break
        os.close(fd)
        assert time.monotonic() < deadline, f"program {prog} outlived its veth"
        time.sleep(0.1)
