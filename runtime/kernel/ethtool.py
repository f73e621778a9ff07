"""Segmentation offload off on a container's end of its veth, over the ethtool ioctl.

Why: a veth hands its peer a GSO super-packet whole (up to 64 KiB, or 128 UDP
segments of one byte each), so the node's forward hook, and with it billing, sees one
packet where the wire will carry many, each with its own headers. A container that
asks for tiny segments (UDP_SEGMENT, TCP_MAXSEG, a packet socket's virtio header) was
billed for a fraction of what left: 1/24 of the bytes for UDP, half for TCP. And a
GSO packet is exempt from the veth's MTU check, so a packet socket could hand the node
segments bigger than its uplink's MTU, from a forged source: the node answered "frag
needed" to that source before any netfilter hook (README, "Threat model").

With every `tx-*-segmentation` feature (and `tx-gso-list`) off, the container's kernel
segments in software as a packet leaves it (generic segmentation offload stays on, so
its stack still builds large packets and splits them at the last moment): the node
sees each packet as the wire will, and a segment over the MTU is dropped by the veth.
Only CAP_NET_ADMIN in the container can turn them back on.

The ioctl, not ethtool's generic netlink: the netlink family's id costs a lookup
of its own, and the ioctl takes the kernel's feature names the same way. The names'
bit positions come from the kernel (ETHTOOL_GSTRINGS), once per process.
"""
from __future__ import annotations

import ctypes
import fcntl
import socket
import struct

_SIOCETHTOOL = 0x8946
_ETHTOOL_GSTRINGS = 0x1B
_ETHTOOL_GSSET_INFO = 0x37
_ETHTOOL_GFEATURES = 0x3A
_ETHTOOL_SFEATURES = 0x3B
_ETH_SS_FEATURES = 4
_ETH_GSTRING_LEN = 32
_IFNAMSIZ = 16
_IFREQ_SIZE = 40


def _is_segmentation(name: str) -> bool:
    # tx-generic-segmentation is the software GSO that splits packets as they leave
    # the container: it stays on.
    return name == "tx-gso-list" or (name.startswith("tx-") and name.endswith("-segmentation")
                                     and name != "tx-generic-segmentation")


def _ioctl(sock: socket.socket, ifname: str, buf: ctypes.Array) -> None:
    """One SIOCETHTOOL call: the ifreq names the device and points at `buf`, which
    the kernel reads and writes in place."""
    ifreq = struct.pack(f"{_IFNAMSIZ}sP", ifname.encode(), ctypes.addressof(buf))
    fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, ifreq.ljust(_IFREQ_SIZE, b"\0"))


_names: tuple[str, ...] = ()


def _feature_names(ifname: str) -> tuple[str, ...]:
    """The kernel's feature names by bit position: the same for every device (the
    device only answers the call), read once per process."""
    global _names
    if _names:
        return _names
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        info = ctypes.create_string_buffer(struct.pack("IIQI", _ETHTOOL_GSSET_INFO, 0, 1 << _ETH_SS_FEATURES, 0))
        _ioctl(sock, ifname, info)
        count = struct.unpack_from("IIQI", info.raw)[3]
        strings = ctypes.create_string_buffer(struct.pack("III", _ETHTOOL_GSTRINGS, _ETH_SS_FEATURES, count)
                                              + bytes(count * _ETH_GSTRING_LEN))
        _ioctl(sock, ifname, strings)
    raw = strings.raw[12:]
    _names = tuple(raw[i * _ETH_GSTRING_LEN:(i + 1) * _ETH_GSTRING_LEN].split(b"\0", 1)[0].decode()
                   for i in range(count))
    return _names


def _active(sock: socket.socket, ifname: str, blocks: int) -> int:
    buf = ctypes.create_string_buffer(struct.pack("II", _ETHTOOL_GFEATURES, blocks) + bytes(16 * blocks))
    _ioctl(sock, ifname, buf)
    active = 0
    for i in range(blocks):
        _available, _requested, block_active, _never = struct.unpack_from("IIII", buf.raw, 8 + 16 * i)
        active |= block_active << (32 * i)
    return active


def _segmentation_mask(ifname: str) -> tuple[tuple[str, ...], int, int]:
    """(feature names, the segmentation features' bits, the number of 32-bit blocks)."""
    names = _feature_names(ifname)
    return names, sum(1 << bit for bit, name in enumerate(names) if _is_segmentation(name)), (len(names) + 31) // 32


def _named(names: tuple[str, ...], bits: int) -> tuple[str, ...]:
    return tuple(name for bit, name in enumerate(names) if bits >> bit & 1)


def is_tcp(name: str) -> bool:
    """One of TCP's segmentation offloads (tx-tcp-segmentation, tx-tcp6-…, tx-tcp-ecn-…,
    and what newer kernels add), which the segment meter counts
    (runtime/kernel/segment_meter.py): with it, they stay on."""
    return name.startswith("tx-tcp") and name.endswith("-segmentation")


def segmentation_off(ifname: str, keep_tcp: bool = False) -> None:
    """Turn off `ifname`'s segmentation offloads (in this thread's netns), TCP's too
    unless keep_tcp (then left as they are). Raises OSError when the device is missing
    or one of them is still on afterwards."""
    names, mask, blocks = _segmentation_mask(ifname)
    if keep_tcp:
        mask &= ~sum(1 << bit for bit, name in enumerate(names) if is_tcp(name))
    body = b"".join(struct.pack("II", (mask >> (32 * i)) & 0xFFFFFFFF, 0) for i in range(blocks))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _ioctl(sock, ifname, ctypes.create_string_buffer(struct.pack("II", _ETHTOOL_SFEATURES, blocks) + body))
        # SFEATURES succeeds with a warning flag when the driver kept some on: check.
        left = _active(sock, ifname, blocks) & mask
    if left:
        raise OSError(f"{ifname}: segmentation offload still on: {', '.join(_named(names, left))}")


def segmentation_on(ifname: str) -> tuple[str, ...]:
    """The names of `ifname`'s segmentation offloads that are on (in this thread's
    netns): none on a container end sockgate configured, unless the container (with
    CAP_NET_ADMIN) turned them back on. Raises OSError when the device is missing."""
    names, mask, blocks = _segmentation_mask(ifname)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return _named(names, _active(sock, ifname, blocks) & mask)
