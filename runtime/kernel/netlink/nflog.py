"""nfnetlink_log (NFLOG): the packets an nft `log group N` statement reports, as the
agent's refused-flow events read them (runtime.agent.events).

One listener per group and netns: binding a group another socket holds fails with
EPERM. The binding lasts as long as the socket (the kernel drops a closed socket's
groups). The kernel batches up to `qthreshold` packets per datagram, or what came
within `flush_cs` hundredths of a second; with NFULNL_CFG_F_SEQ each packet carries
a sequence number of the group, so a gap says how many packets were lost when this
socket's receive buffer was full (a batch that doesn't fit is dropped whole, and
the next recv fails with ENOBUFS).
"""
from __future__ import annotations

import errno
import select
import socket
from dataclasses import dataclass

from runtime.kernel.netlink.core import (
    NETLINK_NETFILTER,
    NFGENMSG,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    Layout,
    NetlinkError,
    NetlinkSocket,
    attr,
    attr_map,
    be32,
    error_code,
    messages,
    nfgen,
)

# linux/netfilter/nfnetlink.h, nfnetlink_log.h
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
PACKET_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
CONFIG_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
# config attributes
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_NLBUFSIZ = 1, 2, 3
NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH, NFULA_CFG_FLAGS = 4, 5, 6
NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND = 1, 2
NFULNL_COPY_PACKET = 2
NFULNL_CFG_F_SEQ = 0x1
# packet attributes
NFULA_PACKET_HDR, NFULA_TIMESTAMP, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 1, 3, 4, 5
NFULA_PAYLOAD, NFULA_PREFIX, NFULA_SEQ = 9, 10, 12

# struct nfulnl_msg_config_mode is packed: 6 bytes, big endian range.
CFG_MODE = Layout(("copy_range", "I"), ("copy_mode", "B"), ("_pad", "x"), byteorder="!")
PACKET_HDR = Layout(("hw_protocol", "H"), ("hook", "B"), ("_pad", "x"), byteorder="!")
TIMESTAMP = Layout(("sec", "Q"), ("usec", "Q"), byteorder="!")
_BE32 = Layout(("value", "I"), byteorder="!")
_FLAGS = Layout(("value", "H"), byteorder="!")

# What the kernel may hold for this socket: a flood's batches while the agent is busy.
DEFAULT_RCVBUF = 4 << 20
# The kernel's batch buffer per group (it caps the value at 128 KiB).
DEFAULT_NLBUFSIZ = 16 << 10


@dataclass(frozen=True)
class Logged:
    """One reported packet. `indev`/`outdev`: interface indexes, 0 when the hook had
    none (output has no input device); `timestamp`: seconds since the epoch when the
    packet carried one (the kernel stamps only when something asked for timestamps),
    else None; `seq`: the group's sequence number when asked for (NFULNL_CFG_F_SEQ)."""

    family: int
    prefix: str
    indev: int
    outdev: int
    payload: bytes
    hook: int | None = None
    timestamp: float | None = None
    seq: int | None = None


def _be32(value: bytes) -> int:
    return _BE32.unpack_from(value)[0] if len(value) >= _BE32.size else 0


def parse_packet(body: bytes) -> Logged | None:
    """A NFULNL_MSG_PACKET message's payload (after the netlink header) -> Logged;
    None when it is too short to be one."""
    if len(body) < NFGENMSG.size:
        return None
    family = body[NFGENMSG.offset("family")]
    attrs = attr_map(body[NFGENMSG.size:])
    hdr = attrs.get(NFULA_PACKET_HDR, b"")
    stamp = attrs.get(NFULA_TIMESTAMP, b"")
    timestamp = None
    if len(stamp) >= TIMESTAMP.size:
        sec, usec = TIMESTAMP.unpack_from(stamp)
        timestamp = sec + usec / 1e6
    return Logged(family=family, prefix=attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode(errors="replace"),
                  indev=_be32(attrs.get(NFULA_IFINDEX_INDEV, b"")), outdev=_be32(attrs.get(NFULA_IFINDEX_OUTDEV, b"")),
                  payload=attrs.get(NFULA_PAYLOAD, b""),
                  hook=PACKET_HDR.unpack_from(hdr)[1] if len(hdr) >= PACKET_HDR.size else None,
                  timestamp=timestamp,
                  seq=_be32(attrs[NFULA_SEQ]) if len(attrs.get(NFULA_SEQ, b"")) >= 4 else None)


def parse_datagram(data: bytes) -> list[Logged]:
    """The reported packets of one datagram; other messages are skipped."""
    out = []
    for kind, _, body in messages(data):
        if kind == PACKET_TYPE:
            logged = parse_packet(body)
            if logged is not None:
                out.append(logged)
    return out


def bind_request(group: int) -> bytes:
    return nfgen(socket.AF_UNSPEC, group) + attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))


def unbind_request(group: int) -> bytes:
    return nfgen(socket.AF_UNSPEC, group) + attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND]))


def settings_request(group: int, copy_range: int, flush_cs: int, qthreshold: int, nlbufsiz: int) -> bytes:
    """Copy `copy_range` bytes of each packet, send a batch after `flush_cs`
    hundredths of a second or `qthreshold` packets, number the packets."""
    return (nfgen(socket.AF_UNSPEC, group)
            + attr(NFULA_CFG_MODE, CFG_MODE.pack(copy_range, NFULNL_COPY_PACKET))
            + attr(NFULA_CFG_NLBUFSIZ, be32(nlbufsiz))
            + attr(NFULA_CFG_TIMEOUT, be32(flush_cs))
            + attr(NFULA_CFG_QTHRESH, be32(qthreshold))
            + attr(NFULA_CFG_FLAGS, _FLAGS.pack(NFULNL_CFG_F_SEQ)))


class Lost:
    """Counts the packets of a group that never reached the reader, from the gaps in
    their sequence numbers (the kernel numbers each packet it reports, also those
    whose batch was then dropped for want of room)."""

    def __init__(self) -> None:
        self.expected: int | None = None
        self.total = 0

    def saw(self, seq: int | None) -> int:
        """Count `seq` in; returns how many were lost just before it."""
        if seq is None:
            return 0
        gap = 0
        if self.expected is not None:
            gap = (seq - self.expected) & 0xFFFFFFFF
            # A number from before the last one: reordered or a re-bound group,
            # not 4 billion losses.
            if gap >= 1 << 31:
                gap = 0
        self.expected = (seq + 1) & 0xFFFFFFFF
        self.total += gap
        return gap


class NflogSocket(NetlinkSocket):
    """A listener of one NFLOG group in the calling thread's netns (needs
    CAP_NET_ADMIN). NetlinkError EPERM: another socket listens to the group."""

    PROTOCOL = NETLINK_NETFILTER

    def __init__(self, group: int, *, copy_range: int = 128, flush_cs: int = 10, qthreshold: int = 16,
                 nlbufsiz: int = DEFAULT_NLBUFSIZ, rcvbuf: int = DEFAULT_RCVBUF) -> None:
        super().__init__(rcvbuf=rcvbuf, force_rcvbuf=True)
        self.group = group
        self.overruns = 0  # ENOBUFS seen: the kernel dropped batches for want of room
        self.lost = Lost()
        try:
            self._configure(bind_request(group), f"binding NFLOG group {group}")
            self._configure(settings_request(group, copy_range, flush_cs, qthreshold, nlbufsiz),
                            f"configuring NFLOG group {group}")
        except BaseException:
            self.sock.close()
            raise

    def _configure(self, body: bytes, what: str) -> None:
        seq = self.request(CONFIG_TYPE, NLM_F_REQUEST | NLM_F_ACK, body)
        # Packets reported between the bind and this ack are skipped (replies()).
        for kind, payload in self.replies(seq):
            if kind == NLMSG_ERROR:
                code = error_code(payload)
                if code:
                    raise NetlinkError(code, what)
                return

    def read(self, timeout: float) -> list[Logged]:
        """The packets reported within `timeout` seconds (what is there now, or the
        next datagram); [] when none came. Counts overruns and lost packets."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return []
        out: list[Logged] = []
        while True:
            try:
                data = self.sock.recv(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                continue
            for logged in parse_datagram(data):
                self.lost.saw(logged.seq)
                out.append(logged)
            if len(out) >= 1024:  # the caller's turn: bounded work per call
                return out

    def close(self) -> None:
        try:
            self.request(CONFIG_TYPE, NLM_F_REQUEST, unbind_request(self.group))
        except OSError:
            pass  # closing drops the binding anyway
        super().close()
