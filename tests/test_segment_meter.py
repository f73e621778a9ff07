"""The segment meter's life on a node (runtime/kernel/segment_meter.py): what ADD does
with and without it, a reload, and an install killed halfway. What it counts and drops
is shown by tests/test_hostile.py (test_segmented_sends_are_billed_as_what_left,
test_oversized_segments_from_a_forged_source_are_not_answered)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from typing import Callable, Iterator

import pytest

from netpolicy.ruleset import METER_SET, Endpoint
from runtime.kernel import nft, segment_meter
from runtime.kernel.netns import in_netns
from runtime.lab import LAB
from tests.conftest import network_conf
from tests.support import attacks as atk
from tests.support import temp_netns
from tests.support.plugin import Plugin

pytestmark = pytest.mark.lab


def _offloads(lab, ns: str) -> list[str]:
    return atk.offloads_on(lab.run(ns, ["ethtool", "-k", "eth0"]).stdout)


def _node(lab) -> str:
    return f"/run/netns/{lab.node}"


def _extra(lab, host_if: str) -> segment_meter.Extra:
    return in_netns(_node(lab), lambda: segment_meter.count(socket.if_nametoindex(host_if)))


@pytest.fixture
def no_bpffs() -> Iterator[Callable[[], str]]:
    """Makes a mount namespace (/proc/<pid>/ns/mnt) where no bpffs can be had: the
    host's /sys/fs/bpf and sockgate's run directory are covered by read-only tmpfs, as
    in a pod without /sys/fs/bpf that may not mount one. The meter can't be installed
    or seen there. (Made once a meter is in place: its run directory exists then.)"""
    holders: list[subprocess.Popen] = []

    def make() -> str:
        holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                   f"mount -t tmpfs -o ro none {segment_meter.SYSTEM_BPFFS} && "
                                   f"mount -t tmpfs -o ro none {segment_meter.OWN_BPFFS.parent} && "
                                   "echo ready && exec sleep 600"], stdout=subprocess.PIPE, text=True)
        holders.append(holder)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        return f"/proc/{holder.pid}/ns/mnt"
    yield make
    for holder in holders:
        holder.kill()
        holder.wait()


def _recorded(lab) -> list[int]:
    out = lab.run(lab.node, ["nft", "-j", "list", "set", "inet", "sockgate", METER_SET]).stdout
    return next(item["set"].get("elem", []) for item in json.loads(out)["nftables"] if "set" in item)


def test_without_a_meter_add_turns_tcp_segmentation_offload_off_too(lab, plugin, app, no_bpffs):
    """A node that can't have the meter (a kernel before 6.4 or without BTF, no bpffs)
    must bill each TCP packet as the wire carries it: ADD leaves no offload on there.
    With the meter, TCP's stay on, and nothing else. The table records which meter its
    counters go along (0: none), and the ADD that can't see the meter loads it again:
    its counted elements anew, since the meter's counts of them are out of its reach."""
    with_meter = app()
    plugin.add("metered", with_meter)
    on = _offloads(lab, with_meter)
    assert "tx-tcp-segmentation" in on and "tx-tcp6-segmentation" in on and all("tcp" in f for f in on), on
    # Its TCP builds super-packets of at most the segments the meter lets through.
    link = json.loads(lab.run(with_meter, ["ip", "-d", "-j", "link", "show", "eth0"]).stdout)[0]
    assert link["gso_max_segs"] == segment_meter.MAX_SEGMENTS
    meter = in_netns(_node(lab), segment_meter.current_id)
    assert meter and _recorded(lab) == [meter]
    without = app()
    plugin.add("unmetered", without, mount_ns=no_bpffs())
    assert _offloads(lab, without) == []
    assert _recorded(lab) == [0]
    # The load it made recorded no meter: the first container's TCP offload went off
    # too, or its super-packets would be billed once each (review 7: 63 of 2,656
    # packets billed while the meter this ADD could not see went on counting).
    assert _offloads(lab, with_meter) == []
    # Back where the meter is: the next ADD records it again, and keeps TCP's offload.
    again = app()
    plugin.add("metered-again", again)
    assert _recorded(lab) == [meter] and "tx-tcp-segmentation" in _offloads(lab, again)


@pytest.mark.parametrize("damage", ["deleted table", "flushed chain"])
def test_a_reload_starts_the_meters_counts_from_zero_with_the_nft_counters_and_only_then(lab, plugin, app, damage):
    """A reload that creates a veth's counted elements again (a new generation, which
    billing counts from zero) must start the meter's counts for it from zero too, or
    what the old generation billed would be billed again. One that finds them there
    (the table rendered again: a flushed chain, a changed policy) keeps their counters,
    and must keep the meter's: a review found them reset there, 98 % of a small-MSS
    sender's packets unbilled, or billed twice once billing saw the counter go down."""
    ns = app()
    res = plugin.add("sender", ns)
    host_if = res["interfaces"][0]["name"]
    # Super-packets: 200 kB of TCP in segments of 88 bytes.
    assert atk.run(lab, ns, "small-mss", LAB.public_v4, 9000, 88, 200_000)["echoed"] >= 200_000
    counted = _extra(lab, host_if)
    assert counted.packets > 100
    if damage == "deleted table":
        lab.run(lab.node, ["nft", "delete", "table", "inet", "sockgate"])
    else:
        lab.run(lab.node, ["nft", "flush", "chain", "inet", "sockgate", "forward"])
    plugin.add("reloads-it", app())  # finds the table missing or outdated: loads it, with the sender's elements
    assert "jump from_container" in lab.run(lab.node, ["nft", "list", "chain", "inet", "sockgate", "forward"]).stdout
    assert _extra(lab, host_if) == (segment_meter.Extra() if damage == "deleted table" else counted)


def test_an_install_killed_before_its_pins_were_in_place_is_undone_by_the_next(tmp_path):
    """install() pins the map and the four links in a directory of its own and renames
    it into place: killed before the rename, it leaves that directory, whose links
    hold hooks (and their netns) until someone unpins them. The next install removes
    it and puts one meter in place."""
    script = tmp_path / "killed_install.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        from runtime.kernel import segment_meter
        from runtime.kernel.netns import in_netns

        def killed(self, target):
            os.kill(os.getpid(), signal.SIGKILL)  # the worst moment: everything pinned, nothing renamed
        Path.rename = killed
        in_netns(sys.argv[1], segment_meter.install)
    """))
    with temp_netns("sgm") as ns:
        cookie = in_netns(ns, segment_meter.netns_cookie)
        try:
            child = subprocess.run([sys.executable, str(script), ns], cwd=os.getcwd(), capture_output=True, text=True)
            assert child.returncode == -signal.SIGKILL, child.stderr
            work = segment_meter.pin_dir(cookie).with_name(f"net-{cookie}-{_pid_of(cookie)}")
            assert sorted(p.name for p in work.iterdir()) == ["fwd4", "fwd6", "map", "pre4", "pre6"]
            assert not in_netns(ns, segment_meter.installed)
            assert in_netns(ns, segment_meter.install) is True
            assert not work.exists() and in_netns(ns, segment_meter.installed)
            assert [p.name for p in segment_meter.pin_root().glob(f"net-{cookie}*")] == [f"net-{cookie}"]
        finally:
            segment_meter.remove(cookie)
            segment_meter.unmount_if_unused()


def _pid_of(cookie: int) -> str:
    """The pid in the name of the directory a killed install left."""
    left = [p.name for p in segment_meter.pin_root().glob(f"net-{cookie}-*")]
    assert len(left) == 1, left
    return left[0].rsplit("-", 1)[1]


def test_a_veth_gone_before_its_elements_keeps_its_counts_in_every_read(lab, plugin, app):
    """DEL deletes the veth, writes the final record and then removes the elements: a
    billing flush in between reads the elements of a veth that no longer has a name
    (nft lists its index). Its meter counts must still be added, else the counter went
    down and billing would take it for one created again, and bill it twice."""
    ns = app()
    res = plugin.add("gone", ns)
    host_if = res["interfaces"][0]["name"]
    assert atk.run(lab, ns, "small-mss", LAB.public_v4, 9000, 88, 100_000)["echoed"] >= 100_000
    ep = Endpoint(host_if, in_netns(_node(lab), lambda: socket.if_nametoindex(host_if)),
                  res["ips"][0]["address"].split("/")[0], res["ips"][1]["address"].split("/")[0])
    before = in_netns(_node(lab), lambda: nft.endpoint_counters_of(ep))
    lab.run(lab.node, ["ip", "link", "del", host_if])  # what DEL does first
    every, one = in_netns(_node(lab), lambda: (nft.endpoint_counters(), nft.endpoint_counters_of(ep)))
    assert _extra_of(lab, ep.host_ifindex).packets > 100  # the meter's counts are a part of it
    assert every[host_if] == one == before
    plugin.delete("gone", ns)


def _extra_of(lab, ifindex: int) -> segment_meter.Extra:
    return in_netns(_node(lab), lambda: segment_meter.count(ifindex))


def test_a_del_of_a_record_without_the_veths_index_forgets_its_count_too(lab, plugin, app):
    """An ADD killed after its elements and before the record's last write leaves a
    record without the veth's index; its DEL finds the elements by their comment, and
    (review 9) now the index too: the veth's count no longer stays in the meter's map,
    whose entries are few (65,536)."""
    ns = app()
    res = plugin.add("half", ns)
    host_if = res["interfaces"][0]["name"]
    ifindex = in_netns(_node(lab), lambda: socket.if_nametoindex(host_if))
    assert atk.run(lab, ns, "small-mss", LAB.public_v4, 9000, 88, 100_000)["echoed"] >= 100_000
    assert _extra_of(lab, ifindex).packets > 100
    record = next((plugin.state_dir / "networks").glob("*/attachments/half--eth0.json"))
    record.write_text(json.dumps(dict(json.loads(record.read_text()), host_ifindex=0)))
    plugin.delete("half", ns)
    assert _extra_of(lab, ifindex) == segment_meter.Extra()
    assert not in_netns(_node(lab), lambda: nft.endpoint_counters().get(host_if))


def test_a_reload_that_renews_leaves_another_state_dirs_containers_alone(lab, plugin, app, cni_exe, policy_file,
                                                                           tmp_path):
    """A reload restores the containers of its own stateDir only. Renewing the counted
    elements (the meter was gone) must not take another stateDir's away: their tx
    elements are what lets their packets through (anti-spoofing), and nothing would
    reload for them. Theirs keep their counters; billing sees the meter's part gone
    (counters_decreased) and bills nothing twice."""
    other = Plugin(cni_exe, lab.ns_path(lab.node),
                   network_conf("t-other-state", tmp_path / "other", policy_file,
                                ipv4Pool="10.79.0.0/24", ipv6Pool="fd79:5067::/64"))
    other_ns = app()
    other.add("other", other_ns)
    try:
        plugin.add("mine", app())
        assert lab.probe(other_ns, "tcp", LAB.public_v4, 9000).ok
        in_netns(_node(lab), segment_meter.remove)
        plugin.add("reloads-it", app())  # finds the meter gone: loads the table, renewing its own elements
        assert in_netns(_node(lab), nft.counts_along_meter)
        assert lab.probe(other_ns, "tcp", LAB.public_v4, 9000).ok
        assert lab.probe(other_ns, "tcp", LAB.public_v6, 9000).ok
    finally:
        other.delete("other", other_ns)
