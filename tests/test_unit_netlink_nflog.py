"""runtime.kernel.netlink.nflog: the config requests as the kernel reads them, reported
packets parsed from datagrams laid out as nfnetlink_log sends them, and lost packets
counted from sequence gaps (pure)."""
from __future__ import annotations

import socket
import struct

from runtime.kernel.netlink import nflog
from runtime.kernel.netlink.core import attr, attr_map, message, messages

GROUP = 0x5347


def nfgenmsg(family: int, res_id: int = 0) -> bytes:
    return struct.pack("!BBH", family, 0, res_id)


def packet(family: int = socket.AF_INET, prefix: bytes | None = b"drop:blocked-range\0", indev: int | None = 7,
           outdev: int | None = 3, payload: bytes = b"\x45" + b"\0" * 27, seq: int | None = 1,
           stamp: tuple[int, int] | None = None, hook: int = 2) -> bytes:
    """One NFULNL_MSG_PACKET message as __build_packet_message lays it out."""
    body = nfgenmsg(family, GROUP) + attr(1, struct.pack("!HBx", 0x0800, hook))
    if prefix is not None:
        body += attr(10, prefix)
    if indev is not None:
        body += attr(4, struct.pack("!I", indev))
    if outdev is not None:
        body += attr(5, struct.pack("!I", outdev))
    if stamp is not None:
        body += attr(3, struct.pack("!QQ", *stamp))
    if seq is not None:
        body += attr(12, struct.pack("!I", seq))
    body += attr(9, payload)
    return message(nflog.PACKET_TYPE, 0, 0, body)


def test_bind_and_settings_requests_as_the_kernel_reads_them():
    bind = nflog.bind_request(GROUP)
    assert bind[:4] == nfgenmsg(socket.AF_UNSPEC, GROUP)  # the group is the big-endian resource id
    assert attr_map(bind[4:]) == {nflog.NFULA_CFG_CMD: bytes([nflog.NFULNL_CFG_CMD_BIND])}
    assert attr_map(nflog.unbind_request(GROUP)[4:]) == {nflog.NFULA_CFG_CMD: bytes([nflog.NFULNL_CFG_CMD_UNBIND])}
    settings = attr_map(nflog.settings_request(GROUP, 128, 10, 16, 16384)[4:])
    # struct nfulnl_msg_config_mode is packed: be32 range, u8 mode, u8 pad.
    assert settings[nflog.NFULA_CFG_MODE] == struct.pack("!IBx", 128, nflog.NFULNL_COPY_PACKET)
    assert nflog.CFG_MODE.size == 6
    assert settings[nflog.NFULA_CFG_TIMEOUT] == struct.pack("!I", 10)
    assert settings[nflog.NFULA_CFG_QTHRESH] == struct.pack("!I", 16)
    assert settings[nflog.NFULA_CFG_NLBUFSIZ] == struct.pack("!I", 16384)
    assert settings[nflog.NFULA_CFG_FLAGS] == struct.pack("!H", nflog.NFULNL_CFG_F_SEQ)
    assert nflog.CONFIG_TYPE == (4 << 8) | 1 and nflog.PACKET_TYPE == 4 << 8


def test_a_reported_packet_is_parsed():
    (kind, _, body), = messages(packet(stamp=(1_796_547_600, 123456), seq=41))
    got = nflog.parse_packet(body)
    assert got == nflog.Logged(family=socket.AF_INET, prefix="drop:blocked-range", indev=7, outdev=3,
                               payload=b"\x45" + b"\0" * 27, hook=2, timestamp=1_796_547_600.123456, seq=41)


def test_missing_attributes_have_their_defaults():
    (_, _, body), = messages(packet(family=socket.AF_INET6, prefix=None, indev=None, seq=None))
    got = nflog.parse_packet(body)
    assert got is not None
    assert (got.family, got.prefix, got.indev, got.outdev, got.timestamp, got.seq) == (socket.AF_INET6, "", 0, 3,
                                                                                         None, None)


def test_a_datagram_of_a_batch_and_other_messages():
    data = packet(seq=1) + message(2, 0, 9, struct.pack("=i", 0) + b"\0" * 16) + packet(seq=2, indev=8)
    got = nflog.parse_datagram(data)
    assert [(g.seq, g.indev) for g in got] == [(1, 7), (2, 8)]
    assert nflog.parse_datagram(data[:7]) == []          # truncated: nothing, no exception
    assert nflog.parse_packet(b"\x02") is None


def test_lost_packets_are_counted_from_sequence_gaps():
    lost = nflog.Lost()
    assert [lost.saw(s) for s in (5, 6, 9, 10, None, 11)] == [0, 0, 2, 0, 0, 0]
    assert lost.total == 2
    # The group's counter wraps around; a number from the past is not 4 billion losses.
    lost = nflog.Lost()
    assert [lost.saw(s) for s in (0xFFFFFFFE, 0xFFFFFFFF, 1, 0)] == [0, 0, 1, 0]
    assert lost.total == 1
