"""The segment meter: what a container's TCP segmentation offload hides from billing,
counted by a netfilter BPF program, so the offload can stay on.

Why: with TCP segmentation offload on, a container's kernel hands its veth one
super-packet of up to 64 KiB, and the node's hooks (and sockgate's tx counters) see
one packet where the wire carries many, each with its own headers: an app that asks
for small segments (TCP_MAXSEG 88) was billed for half of what left. With the offload
off the container cuts its packets itself and billing is exact, but every hook then
runs per segment: 6-8 points of TCP's forwarding rate (docs/measurements.md). The
meter keeps billing exact with the offload on: for every super-packet a container's
veth hands the node and the node forwards, it adds to that veth's count the packets
and header bytes the super-packet will become on the wire, (segments - 1) and
(segments - 1) x header length. Billing adds them to the nft tx counters
(runtime/billing).

And it guards what the offload would open again: a packet socket with a virtio
header can hand the node a super-packet whose segments are bigger than the MTU, from
a forged source; ip_forward answers "frag needed" to that source before any
netfilter hook sockgate's table has there (README "Threat model"); and it can ask
for one-byte segments, one frame through the table and thousands of packets on the
wire. At prerouting, after the table's before_routing chain (so IPv4 options and IPv6
extension headers are gone) and before conntrack, the program refuses a container's
super-packet whose segments would exceed its veth's MTU, or that holds more than
MAX_SEGMENTS of them, and counts it.

One program, two hooks per family (prerouting -420, forward 1: after sockgate's
forward chain, so only what it accepted counts), loaded once per node netns, not per
ADD. The links and the map are pinned in a bpffs (pin_root(), one directory per
netns), so they outlive the process that loaded them; a pinned link also keeps its
netns alive, so `remove` must run before a node netns is deleted. The table records
the id of the map its counters go along (runtime/kernel/nft.py, load_table): a meter
whose pins were removed is not read as zero counts, and the next load replaces it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from netpolicy.ruleset import CONTAINER_IFGROUP
from runtime.defaults import RUN_DIR
from runtime.kernel import bpf, btf
from runtime.kernel.bpf import (
    EXIT,
    Insn,
    add,
    addr,
    atomic_add,
    call,
    divr,
    ja,
    jeq,
    jgt_reg,
    jle,
    jle_reg,
    jne,
    kfunc,
    ld_map,
    ldx,
    lsh,
    mov,
    movr,
    mulr,
    rsh,
    stx,
    subr,
)

log = logging.getLogger(__name__)

NAME = b"sg_segments"
SYSTEM_BPFFS = Path("/sys/fs/bpf")
OWN_BPFFS = Path(RUN_DIR) / "bpf"
MAP_ENTRIES = 65536            # veths with a count; more than a node's containers
LINK_BUSY_WAIT_S = 2.0         # how long an attach waits for an unpinned link to let go
VETH_SLACK = 4                 # runtime.kernel.netns: the node end is this much below the container's MTU
PREROUTING_PRIORITY = -420     # after before_routing (-450), before defrag (-400) and conntrack (-200)
FORWARD_PRIORITY = 1           # after sockgate's forward chain (filter, 0)
# The counts of super-packets refused at prerouting, under keys no container veth has
# (0 is no interface's index, 1 is every netns's loopback), by their drop reason
# (metrics, `nft.drop_counters`).
OVERSIZED_KEY, TOO_MANY_KEY = 0, 1
REFUSED = {OVERSIZED_KEY: "oversized-segments", TOO_MANY_KEY: "segment-count"}
# A container's veth end lets its TCP stack build super-packets of at most this many
# segments (its gso_max_segs, set at creation: runtime.kernel.netns); the meter refuses
# one with more, which only a packet socket's virtio header can ask for (1 byte each:
# one frame of the table's work, 20,000 packets on the wire). 64 x 1448 bytes is above
# the 64 KiB a super-packet holds anyway: only small segments are held back.
MAX_SEGMENTS = 64

_NF_PRE_ROUTING, _NF_FORWARD = 0, 2
_NFPROTO_IPV4, _NFPROTO_IPV6 = 2, 10
_NF_DROP, _NF_ACCEPT = 0, 1
_HELPER_MAP_LOOKUP, _HELPER_MAP_UPDATE = 1, 2
_KEY = struct.Struct("=I")
_VALUE = struct.Struct("=QQ")  # packets, bytes
_SO_NETNS_COOKIE = 71


class MeterError(OSError):
    """The meter could not be loaded, attached or read."""


@dataclass(frozen=True)
class Extra:
    """What a veth's super-packets add to its tx counters."""
    packets: int = 0
    bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.packets or self.bytes)


@dataclass(frozen=True)
class Offsets:
    """The kernel structs' fields the program reads, and the BTF ids it casts to
    (runtime/kernel/btf.py)."""
    skb_dev: int
    skb_len: int
    skb_head: int
    skb_end: int
    skb_network_header: int
    dev_mtu: int
    dev_group: int
    dev_ifindex: int
    state_hook: int
    shinfo_gso_size: int
    rdonly_cast: int = 0       # the kfunc
    shinfo_id: int = 0
    iphdr_id: int = 0
    ipv6hdr_id: int = 0
    tcphdr_id: int = 0

    @classmethod
    def of(cls, types: btf.Btf) -> Offsets:
        want = {"skb_dev": ("sk_buff", "dev", 8), "skb_len": ("sk_buff", "len", 4),
                "skb_head": ("sk_buff", "head", 8), "skb_end": ("sk_buff", "end", 4),
                "skb_network_header": ("sk_buff", "network_header", 2),
                "dev_mtu": ("net_device", "mtu", 4), "dev_group": ("net_device", "group", 4),
                "dev_ifindex": ("net_device", "ifindex", 4), "state_hook": ("nf_hook_state", "hook", 1),
                "shinfo_gso_size": ("skb_shared_info", "gso_size", 2)}
        found = {}
        for name, (struct_name, field_name, size) in want.items():
            f = types.field(struct_name, field_name)
            if f.size != size:
                # `end` is an offset from `head` only where sk_buff_data_t is 32 bits
                # (64-bit kernels); a pointer there would make head + end wrong.
                raise btf.BtfError(f"{struct_name}.{field_name} is {f.size} bytes, not {size}")
            found[name] = f.offset
        return cls(**found, rdonly_cast=types.func_id("bpf_rdonly_cast"),
                   shinfo_id=types.struct_id("skb_shared_info"), iphdr_id=types.struct_id("iphdr"),
                   ipv6hdr_id=types.struct_id("ipv6hdr"), tcphdr_id=types.struct_id("tcphdr"))


def _cast(o: Offsets, type_id: int) -> list[Insn | str]:
    """r0 = (type *)r1, through the kfunc bpf_rdonly_cast: the verifier turns the call
    into a move, and loads through r0 into plain loads that return 0 where they fault.
    What the helper bpf_probe_read_kernel does with a call and a copy per read, which
    cost 0.7 % of a 64-byte UDP packet's forwarding (docs/measurements.md). Clobbers
    r1-r5, as any call."""
    return [mov(2, type_id), kfunc(o.rdonly_cast)]


def program(map_fd: int, o: Offsets) -> bytes:
    """The program. r6 skb, r7 hook state then gso_size, r8 input device, r9 the hook;
    r1-r5 are the calls' (clobbered by each), the stack keeps what must outlive one."""
    p: list[Insn | str] = [
        ldx("dw", 6, 1, 8), ldx("dw", 7, 1, 0),
        ldx("dw", 8, 6, o.skb_dev),
        ldx("w", 2, 8, o.dev_group), jne(2, CONTAINER_IFGROUP, "accept"),   # not from a container
        ldx("b", 9, 7, o.state_hook),
        # gso_size, in skb_shinfo(skb) = head + end
        ldx("dw", 1, 6, o.skb_head), ldx("w", 2, 6, o.skb_end), addr(1, 2),
        *_cast(o, o.shinfo_id),
        ldx("h", 7, 0, o.shinfo_gso_size), jeq(7, 0, "accept"),          # 0: one packet
        # The network header: IPv4 without options, IPv6 without extension headers
        # (before_routing dropped those), then TCP's data offset.
        ldx("dw", 1, 6, o.skb_head), ldx("h", 2, 6, o.skb_network_header), addr(1, 2),
        stx("dw", 10, 1, -16),
        *_cast(o, o.iphdr_id),
        ldx("b", 2, 0, 0), rsh(2, 4),
        jeq(2, 4, "v4"), jne(2, 6, "accept"),
        ldx("dw", 1, 10, -16), *_cast(o, o.ipv6hdr_id),
        ldx("b", 3, 0, 6), mov(4, 40), ja("l4"),
        "v4",
        ldx("b", 3, 0, 9), mov(4, 20),
        "l4",
        # r4 = header bytes of each segment: IP + TCP (data offset) or + UDP (8)
        jne(3, 6, "udp"),
        stx("dw", 10, 4, -24), ldx("dw", 1, 10, -16), addr(1, 4), *_cast(o, o.tcphdr_id),
        ldx("b", 5, 0, 12), rsh(5, 4), lsh(5, 2), ldx("dw", 4, 10, -24), addr(4, 5), ja("hdr"),
        "udp",
        jne(3, 17, "accept"), add(4, 8),
        "hdr",
        # r2 = segments - 1 = (len - headers - 1) / gso_size
        ldx("w", 2, 6, o.skb_len), jle_reg(2, 4, "accept"), subr(2, 4), add(2, -1), divr(2, 7),
        jne(9, _NF_PRE_ROUTING, "count"),
        # Prerouting: refused when its segments would be bigger than the veth's MTU, or
        # more than MAX_SEGMENTS; counted under their keys.
        movr(3, 7), addr(3, 4), ldx("w", 5, 8, o.dev_mtu), add(5, VETH_SLACK),
        jgt_reg(3, 5, "oversized"),
        jle(2, MAX_SEGMENTS - 1, "accept"),
        mov(2, TOO_MANY_KEY), ja("refuse"),
        "oversized",
        mov(2, OVERSIZED_KEY),
        "refuse",
        mov(7, 1), mov(9, 0), mov(6, _NF_DROP), ja("update"),
        "count",
        # Forward: r7 = segments - 1, r9 = r7 x headers, added to the veth's count.
        jeq(2, 0, "accept"),
        movr(7, 2), movr(9, 2), mulr(9, 4),
        ldx("w", 2, 8, o.dev_ifindex), mov(6, _NF_ACCEPT),
        "update",
        # r2 = key, r7/r9 = what to add, r6 = verdict
        stx("w", 10, 2, -4),
        ld_map(1, map_fd), movr(2, 10), add(2, -4), call(_HELPER_MAP_LOOKUP),
        jne(0, 0, "add"),
        mov(3, 0), stx("dw", 10, 3, -40), stx("dw", 10, 3, -32),
        ld_map(1, map_fd), movr(2, 10), add(2, -4), movr(3, 10), add(3, -40), mov(4, bpf.NOEXIST),
        call(_HELPER_MAP_UPDATE),
        ld_map(1, map_fd), movr(2, 10), add(2, -4), call(_HELPER_MAP_LOOKUP),
        jeq(0, 0, "verdict"),
        "add",
        atomic_add(0, 7, 0), atomic_add(0, 9, 8),
        "verdict",
        movr(0, 6), EXIT,
        "accept",
        mov(0, _NF_ACCEPT), EXIT,
    ]
    return bpf.assemble(p)


# --- in a node netns -------------------------------------------------------------

def netns_cookie() -> int:
    """The calling thread's netns' cookie: unique until reboot, unlike its inode."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int(struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8))[0])


@functools.lru_cache(maxsize=1)
def pin_root() -> Path:
    """Where meters are pinned: in the host's bpffs at /sys/fs/bpf when it has one
    (systemd mounts it at boot): that outlives any process, pod or mount namespace;
    else in a bpffs of sockgate's own at /run/sockgate/bpf, which lives as long as its
    mount (in a pod without /sys/fs/bpf: as long as the pod)."""
    return SYSTEM_BPFFS / "sockgate" if _is_bpffs(SYSTEM_BPFFS) else OWN_BPFFS


def pin_dir(cookie: int | None = None) -> Path:
    return pin_root() / f"net-{netns_cookie() if cookie is None else cookie}"


_LINKS = {"pre4": (_NFPROTO_IPV4, _NF_PRE_ROUTING, PREROUTING_PRIORITY),
          "pre6": (_NFPROTO_IPV6, _NF_PRE_ROUTING, PREROUTING_PRIORITY),
          "fwd4": (_NFPROTO_IPV4, _NF_FORWARD, FORWARD_PRIORITY),
          "fwd6": (_NFPROTO_IPV6, _NF_FORWARD, FORWARD_PRIORITY)}
_libc = ctypes.CDLL(None, use_errno=True)  # as runtime/kernel/netns.py: no ldconfig run


_BPF_FS_MAGIC = 0xCAFE4A11
_STATFS_SIZE = 256  # struct statfs is 120 bytes on x86_64 and arm64; its first field is f_type


def _is_bpffs(path: Path) -> bool:
    """Whether what this process sees at `path` is a bpffs. Asked of statfs, not of
    /proc/self/mountinfo, whose line stays for a bpffs that a later mount over its
    parent hides (a tmpfs over /run/sockgate): taken for mounted, it was never mounted
    again, and every install failed to pin in a directory that wasn't there (review 10)."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.statfs(str(path).encode(), buf) != 0:
        return False  # not there (or not ours to see)
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF == _BPF_FS_MAGIC


def _mount_bpffs() -> None:
    """pin_root() exists: a directory in the host's bpffs, or a bpffs of sockgate's own
    (a new instance: nothing else pinned anywhere is seen or touched)."""
    root = pin_root()
    if root != OWN_BPFFS:
        root.mkdir(exist_ok=True)
        return
    if _is_bpffs(root):
        return
    root.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"bpf", str(root).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise MeterError(err, f"cannot mount a bpffs at {root}: {os.strerror(err)}")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One process at a time installs, removes or unmounts: another's unfinished work
    directory would look stale, and an unmount could take the bpffs from under a
    pin. An flock on the run directory (not in the bpffs, which may come and go); the
    kernel drops it when the process dies."""
    run = Path(RUN_DIR)
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def installed(cookie: int | None = None) -> bool:
    return not _missing(pin_dir(cookie), ("map", *_LINKS))


def _missing(d: Path, names: Iterable[str]) -> list[str]:
    """Which of a meter's pins `d` lacks."""
    return [name for name in names if not (d / name).exists()]


def install() -> bool:
    """The meter in the calling thread's netns (the node's): loaded, attached and pinned,
    unless it is already. True when it had to be. The pins are made in a directory of
    their own and renamed into place, so a process killed halfway leaves nothing that
    counts twice: a leftover directory is removed (its links with it) by the next call."""
    if installed():
        return False
    try:
        with _locked():
            return _install()
    except MeterError:
        raise
    except OSError as exc:  # the run directory, the bpffs: what the node lacks is named
        raise MeterError(exc.errno or errno.EIO, f"segment meter: {exc}") from None


def _link_when_free(prog_fd: int, pf: int, hook: int, priority: int) -> int:
    """bpf.link_netfilter, waiting up to LINK_BUSY_WAIT_S while the hook's priority is
    taken. The kernel gives a priority to one BPF program only (EBUSY), and a link
    unpinned a moment ago (a killed install's, just removed by _install) keeps it
    until the kernel has released it, which happens after the unpin returns (CI saw
    the next attach fail). Another meter that stays is still refused, after the wait."""
    deadline = time.monotonic() + LINK_BUSY_WAIT_S
    while True:
        try:
            return bpf.link_netfilter(prog_fd, pf, hook, priority)
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _install() -> bool:
    if installed():
        return False  # another process did, while this one waited
    _mount_bpffs()
    final = pin_dir()
    for stale in pin_root().glob(f"{final.name}-*"):
        _unpin(stale)
    if final.exists():
        _unpin(final)  # a part of one: links without their map, or the reverse
    work = final.with_name(f"{final.name}-{os.getpid()}")  # bpffs refuses dots in names
    work.mkdir()
    fds: list[int] = []
    try:
        offsets = Offsets.of(btf.kernel())
        map_fd = bpf.create_hash(b"sg_segments", _KEY.size, _VALUE.size, MAP_ENTRIES)
        fds.append(map_fd)
        prog_fd = bpf.load_netfilter(NAME, program(map_fd, offsets))
        fds.append(prog_fd)
        bpf.pin(map_fd, str(work / "map"))
        for name, (pf, hook, priority) in _LINKS.items():
            link = _link_when_free(prog_fd, pf, hook, priority)
            fds.append(link)
            bpf.pin(link, str(work / name))
        work.rename(final)
    except (OSError, btf.BtfError) as exc:
        _unpin(work)
        if isinstance(exc, MeterError):
            raise
        raise MeterError(getattr(exc, "errno", 0) or errno.EOPNOTSUPP, f"segment meter: {exc}") from None
    finally:
        for fd in fds:
            os.close(fd)
    return True


def _unpin(d: Path) -> None:
    """The map's pin first: a removal cut short then leaves no map, which every reader
    takes for no meter (the links alone count into a map nobody reads)."""
    if d.is_dir():
        for f in sorted(d.iterdir(), key=lambda f: f.name != "map"):
            f.unlink()
    if d.exists():
        d.rmdir()


def remove(cookie: int | None = None) -> bool:
    """Detach and free the meter of a netns (the calling thread's by default), under
    every pin root in view, a killed install's leftovers included. Must run before a
    node netns that has one is deleted: its pinned links keep the netns alive. True
    when a whole meter was there."""
    c = netns_cookie() if cookie is None else cookie
    if not pinned_anywhere(c):
        return False  # nothing to take: no lock, so no run directory made for it
    with _locked():
        found = pinned_anywhere(c)
        for d in found:
            _unpin(d)
    return any(d.name == f"net-{c}" for d in found)


def _roots_in_view() -> list[Path]:
    """Every pin root this process sees: a meter may have been pinned under the other
    one by a process with other mounts (the agent's pod, a shell without /sys/fs/bpf)."""
    return [root for root, fs in ((SYSTEM_BPFFS / "sockgate", SYSTEM_BPFFS), (OWN_BPFFS, OWN_BPFFS))
            if _is_bpffs(fs) and root.is_dir()]


def pinned_anywhere(cookie: int | None = None) -> list[Path]:
    """The meter directories of a netns (the calling thread's) under every pin root in
    view, a killed install's unfinished one included."""
    c = netns_cookie() if cookie is None else cookie
    return sorted(d for root in _roots_in_view() for d in (root / f"net-{c}", *root.glob(f"net-{c}-*"))
                  if d.exists())


def map_ids(dirs: Iterable[Path]) -> set[int]:
    """The ids of the maps of the meters in these directories: the map's pin, and the
    map each pinned link's program counts into. A removal killed after the map's pin
    (_unpin takes it first) leaves links whose program still holds the map: it is in
    view, and removing those pins frees it (review 10: teardown took it for a meter out
    of view and refused for good)."""
    ids = set()
    for d in dirs:
        for name in ("map", *_LINKS):
            with contextlib.suppress(OSError):
                fd = bpf.pinned(str(d / name))
                try:
                    ids.update([bpf.object_id(fd)] if name == "map" else bpf.prog_map_ids(bpf.link_prog_id(fd)))
                finally:
                    os.close(fd)
    return ids


def unmount_if_unused() -> bool:
    """The pin roots gone that no netns has a meter in any more: sockgate's own bpffs
    unmounted, its directory in the host's removed (the run directory stays: it is
    what the lock is taken on). True when one went."""
    roots = _roots_in_view()
    if not roots:
        return False
    gone = False
    with _locked():
        for root in roots:
            if any(root.glob("net-*")):
                continue
            if root != OWN_BPFFS:
                with contextlib.suppress(OSError):
                    root.rmdir()  # under the lock: an install between its mkdir and its pins waits
                    gone = True
            elif _unmount_own():
                gone = True
    return gone


def _unmount_own() -> bool:
    if _libc.umount2(str(OWN_BPFFS).encode(), 0) != 0:
        return False
    try:
        OWN_BPFFS.rmdir()
    except OSError:
        return False  # another mount under it (not sockgate's): it stays
    return True


class Counts:
    """The meter's map in the calling thread's netns, opened once."""

    def __init__(self, cookie: int | None = None) -> None:
        d = pin_dir(cookie)
        try:
            self.fd = bpf.pinned(str(d / "map"))
        except bpf.BpfError as exc:
            raise MeterError(exc.errno, f"cannot open the segment meter's map: {exc.strerror}") from None
        # A link whose pin is gone is detached (nothing else holds it): its hook neither
        # counts nor refuses, so a meter short of one is no meter (review 7: a remove()
        # killed halfway left the map and some links, and counts that fell short).
        missing = _missing(d, _LINKS)
        if missing:
            os.close(self.fd)
            raise MeterError(errno.ENOENT, f"the segment meter in {d} is incomplete: no {', '.join(missing)}")
        try:
            self.id = bpf.object_id(self.fd)  # what the table records (netpolicy.ruleset.METER_SET)
        except bpf.BpfError as exc:
            os.close(self.fd)
            raise MeterError(exc.errno, f"cannot identify the segment meter's map: {exc.strerror}") from None

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Counts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def of(self, ifindex: int) -> Extra:
        raw = bpf.lookup(self.fd, _KEY.pack(ifindex), _VALUE.size)
        return Extra(*_VALUE.unpack(raw)) if raw else Extra()

    def all(self) -> dict[int, Extra]:
        """{ifindex: Extra} of every veth with a count."""
        out = {}
        for key in bpf.keys(self.fd, _KEY.size):
            (ifindex,) = _KEY.unpack(key)
            if ifindex not in REFUSED:
                out[ifindex] = self.of(ifindex)
        return out

    def forget(self, ifindex: int) -> None:
        bpf.delete(self.fd, _KEY.pack(ifindex))

    def clear(self, ifindexes: list[int] | None = None) -> None:
        """The counts of `ifindexes`, or of every veth, gone (the refusals stay)."""
        if ifindexes is None:
            ifindexes = [i for (i,) in (_KEY.unpack(k) for k in bpf.keys(self.fd, _KEY.size)) if i not in REFUSED]
        for ifindex in ifindexes:
            self.forget(ifindex)


# --- what the table's users call (runtime/kernel/nft.py, netns.py) ---------------

def opened() -> Counts | None:
    """The map of the calling thread's netns' meter, opened; None without a meter
    (nothing pinned)."""
    try:
        return Counts()
    except MeterError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def current_id() -> int:
    """The id of the map of the calling thread's netns' meter; 0 without one."""
    c = opened()
    if c is None:
        return 0
    with c:
        return c.id


def count(ifindex: int) -> Extra:
    """What the meter of the calling thread's netns counted for one veth so far
    (nothing without a meter)."""
    c = opened()
    if c is None:
        return Extra()
    with c:
        return c.of(ifindex)


def refused() -> dict[str, int]:
    """Super-packets the meter in the calling thread's netns refused, by drop reason;
    {} without one."""
    c = opened()
    if c is None:
        return {}
    with c:
        counted = {reason: c.of(key).packets for key, reason in REFUSED.items()}
    return {reason: n for reason, n in counted.items() if n}


def forget(ifindex: int) -> int:
    """A veth's count gone: one made before it with the same index (ADD), or its own
    once billed for the last time (DEL). Returns the id of the meter's map (0: no
    meter), which ADD's transaction asserts the table records."""
    c = opened()
    if c is None:
        return 0
    with c:
        if ifindex:
            c.forget(ifindex)
        return c.id


def ensure() -> int:
    """The meter in place in the calling thread's netns (the node's), installed unless
    it is: its map's id. Raises MeterError where it can't be: a kernel before 6.4 (no
    netfilter BPF programs), without BTF or bpf_rdonly_cast, or no bpffs to pin in.
    Containers then keep their TCP segmentation offload off, as before the meter."""
    install()
    return current_id()
