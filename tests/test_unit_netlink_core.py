"""runtime.kernel.netlink.core: attributes, messages, acks and computed layouts (pure)."""
import errno
import socket
import struct

import pytest

from runtime.kernel.netlink import core
from runtime.kernel.netlink.core import (
    NLA_F_NESTED,
    NLMSG_DONE,
    NLMSG_ERROR,
    Layout,
    attr,
    attr_map,
    attributes,
    error_code,
    message,
    messages,
)


def test_attribute_round_trip_with_padding():
    for payload in (b"", b"a", b"ab", b"abc", b"abcd", b"abcde"):
        raw = attr(7, payload)
        assert len(raw) % 4 == 0
        assert struct.unpack_from("=HH", raw) == (4 + len(payload), 7)   # length excludes the padding
        assert list(attributes(raw)) == [(7, payload)]


def test_several_attributes_and_the_last_of_a_type_wins():
    body = attr(1, b"x") + attr(2, core.u32(5)) + attr(1, b"yy")
    assert list(attributes(body)) == [(1, b"x"), (2, core.u32(5)), (1, b"yy")]
    assert attr_map(body) == {1: b"yy", 2: core.u32(5)}


def test_nested_attributes_carry_the_flag_and_come_back_without_it():
    inner = attr(1, core.cstr("sockgate")) + attr(2, core.be32(7))
    raw = attr(3, inner, nested=True)
    assert struct.unpack_from("=H", raw, 2)[0] == 3 | NLA_F_NESTED
    (kind, payload), = attributes(raw)
    assert kind == 3
    assert attr_map(payload) == {1: b"sockgate\0", 2: b"\0\0\0\7"}


def test_truncated_input_stops_quietly():
    raw = attr(1, b"abcdefgh")
    assert list(attributes(raw[:3])) == []
    assert list(attributes(struct.pack("=HH", 2, 1) + b"rest")) == []   # a length below the header
    assert list(messages(b"\0" * 15)) == []
    assert list(messages(struct.pack("=IHHII", 4, 1, 0, 0, 0))) == []


def test_messages_of_a_datagram_with_padding():
    data = message(16, 0, 1, b"abc") + message(NLMSG_DONE, 0, 2, b"")
    assert list(messages(data)) == [(16, 1, b"abc"), (NLMSG_DONE, 2, b"")]


def test_error_and_ack_parsing():
    request = struct.pack("=IHHII", 20, 16, 5, 9, 0)
    nack = message(NLMSG_ERROR, 0, 9, struct.pack("=i", -errno.EEXIST) + request)
    ack = message(NLMSG_ERROR, 0, 9, struct.pack("=i", 0) + request)
    (kind, seq, payload), = messages(nack)
    assert (kind, seq, error_code(payload)) == (NLMSG_ERROR, 9, errno.EEXIST)
    assert error_code(next(messages(ack))[2]) == 0


def test_layout_offsets_are_computed_from_the_fields():
    lay = Layout(("a", "B"), ("_pad", "3x"), ("b", "I"), ("c", "16s"))
    assert (lay.offset("a"), lay.offset("b"), lay.offset("c"), lay.size) == (0, 4, 8, 24)
    assert lay.pack(1, 2, b"z") == b"\1\0\0\0" + struct.pack("=I", 2) + b"z" + b"\0" * 15
    outer = Layout(("x", "H"), ("inner", lay), ("y", "H"))
    assert (outer.offset("inner"), outer.offset("y"), outer.size) == (2, 26, 28)


def test_kernel_header_sizes():
    # sizeof(struct nlmsghdr), nlattr, nlmsgerr, nfgenmsg in the uapi headers.
    assert (core.NLMSGHDR.size, core.NLATTR.size, core.NLMSGERR.size, core.NFGENMSG.size) == (16, 4, 20, 4)
    assert core.nfgen(1, 10) == b"\1\0\0\x0a"         # res_id big endian


@pytest.mark.skipif(not hasattr(socket, "AF_NETLINK"), reason="Linux only")
def test_socket_sequence_numbers_and_batch_datagram():
    sent: list[bytes] = []

    class Fake:
        def sendall(self, data):
            sent.append(bytes(data))

    sock = core.NetlinkSocket.__new__(core.NetlinkSocket)
    sock.sock, sock._seq = Fake(), iter(range(100, 200))
    assert sock.send_batch([(16, 1, b"ab"), (17, 5, b"")]) == [100, 101]
    assert list(messages(sent[0])) == [(16, 100, b"ab"), (17, 101, b"")]
    assert sock.request(18, 1, b"") == 102
