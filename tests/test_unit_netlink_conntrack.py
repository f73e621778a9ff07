"""runtime.kernel.netlink.conntrack's requests and parsing (pure; the lab tests in
test_reclaim.py run them against the kernel)."""
from __future__ import annotations

import socket
import struct

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from runtime.kernel.netlink.conntrack import (
    CTA_ID,
    CTA_STATUS,
    IPS_SRC_NAT,
    CtEntry,
    Flow,
    ct_tuple_orig,
    parse_ct_status,
    parse_entry,
    parse_udp_idle_timeout,
    parse_unmasqueraded,
)
from runtime.kernel.netlink.core import attr

UDP = socket.IPPROTO_UDP


def _payload(msg) -> bytes:
    msg.encode()
    return bytes(msg.data[16:])          # after struct nlmsghdr


def test_status_of_a_ctnetlink_entry_as_pyroute2_encodes_it():
    msg = nfct_msg()
    msg["nfgen_family"] = socket.AF_INET
    msg["attrs"] = [("CTA_TIMEOUT", 3), ("CTA_STATUS", 0x19E), ("CTA_MARK", 0)]
    assert parse_ct_status(_payload(msg)) == 0x19E
    assert CtEntry(parse_ct_status(_payload(msg))).assured


def test_status_missing():
    msg = nfct_msg()
    msg["attrs"] = [("CTA_TIMEOUT", 3)]
    assert parse_ct_status(_payload(msg)) is None


def _nla(kind: int, value: bytes, nested: bool = False) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind | (0x8000 if nested else 0)) + value
    return raw + b"\0" * (-len(raw) % 4)


def _ct_timeout_obj(l4proto: int, timeouts: dict[int, int], obj_type: int = 7) -> bytes:
    """An NFT_MSG_NEWOBJ payload laid out as nft_ct_timeout_obj_dump writes it."""
    policy = b"".join(_nla(k, struct.pack("!I", v)) for k, v in timeouts.items())
    data = (_nla(2, bytes([l4proto])) + _nla(1, struct.pack("!H", 0x0001))    # L4PROTO, L3PROTO
            + _nla(3, policy, nested=True))                                  # DATA
    return (struct.pack("=BBH", 1, 0, 0) + _nla(1, b"sockgate\0") + _nla(2, b"idle_udp_3_b\0")
            + _nla(3, struct.pack("!I", obj_type)) + _nla(4, data, nested=True))


def test_udp_idle_timeout_of_a_ct_timeout_object():
    assert parse_udp_idle_timeout(_ct_timeout_obj(UDP, {1: 30, 2: 3})) == 3


@pytest.mark.parametrize("payload", [
    _ct_timeout_obj(socket.IPPROTO_TCP, {1: 120, 2: 3}),     # a TCP object: 2 is SYN_RECV there
    _ct_timeout_obj(UDP, {1: 30, 2: 3}, obj_type=1),         # a counter, not a ct timeout
    _ct_timeout_obj(UDP, {1: 30}),                           # no replied timeout
])
def test_not_a_udp_idle_timeout(payload):
    assert parse_udp_idle_timeout(payload) is None


@pytest.mark.parametrize("flow", [
    Flow(UDP, "10.77.0.5", 40001, "93.184.215.14", 9000),
    Flow(socket.IPPROTO_TCP, "fd77:5067:6174::1", 51232, "2606:2800:21f:cb07::14", 443),
])
def test_request_tuple_is_what_pyroute2_encodes(flow):
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
    msg = nfct_msg.create_from(tuple_orig=NFCTAttrTuple(family=flow.family, saddr=flow.src, daddr=flow.dst,
                                                        proto=flow.proto, sport=flow.sport, dport=flow.dport))
    assert ct_tuple_orig(flow) == _payload(msg)[4:]


def test_parse_unmasqueraded_picks_unnated_flows_of_the_given_sources():
    def entry(src: str, status: int) -> bytes:
        orig = ct_tuple_orig(Flow(17, src, 4000, "93.184.215.14", 9000))
        return b"\x02\x00\x00\x00" + orig + attr(CTA_STATUS, struct.pack("!I", status)) \
            + attr(CTA_ID, struct.pack("!I", 7))
    ours = {"10.77.0.5", "fd77::5"}
    found = parse_unmasqueraded(entry("10.77.0.5", 0x8), ours)
    # What a DELETE needs: the original tuple as dumped, and the entry's id.
    assert found == ct_tuple_orig(Flow(17, "10.77.0.5", 4000, "93.184.215.14", 9000)) \
        + attr(CTA_ID, struct.pack("!I", 7))
    assert parse_unmasqueraded(entry("10.77.0.5", 0x8 | IPS_SRC_NAT), ours) is None   # masqueraded
    assert parse_unmasqueraded(entry("10.77.0.6", 0x8), ours) is None                 # not a container's
    assert parse_unmasqueraded(b"\x02\x00\x00\x00", ours) is None


def test_parse_entry_tells_closing_tcp_entries_and_what_a_delete_needs():
    from runtime.kernel.netlink.conntrack import (
        CTA_PROTOINFO,
        CTA_PROTOINFO_TCP,
        CTA_PROTOINFO_TCP_STATE,
        TCP_CONNTRACK_CLOSE,
        TCP_CONNTRACK_ESTABLISHED,
        TCP_CONNTRACK_TIME_WAIT,
    )

    def entry(src: str, state: int | None) -> bytes:
        orig = ct_tuple_orig(Flow(6, src, 4000, "2606:2800:21f:cb07::14" if ":" in src else "93.184.215.14", 443))
        info = b"" if state is None else attr(CTA_PROTOINFO, attr(CTA_PROTOINFO_TCP,
                                                                  attr(CTA_PROTOINFO_TCP_STATE, bytes([state]))))
        return (b"\x0a" if ":" in src else b"\x02") + b"\x00\x00\x00" + orig + info \
            + attr(CTA_ID, struct.pack("!I", 9))
    closed = parse_entry(entry("10.77.0.5", TCP_CONNTRACK_CLOSE))
    # What a DELETE needs: the original tuple as dumped, and the entry's id.
    assert (closed.source, closed.family, closed.closing) == ("10.77.0.5", socket.AF_INET, True)
    assert closed.delete == ct_tuple_orig(Flow(6, "10.77.0.5", 4000, "93.184.215.14", 443)) \
        + attr(CTA_ID, struct.pack("!I", 9))
    waiting = parse_entry(entry("fd77::5", TCP_CONNTRACK_TIME_WAIT))
    assert (waiting.source, waiting.family, waiting.closing) == ("fd77::5", socket.AF_INET6, True)
    assert parse_entry(entry("10.77.0.5", TCP_CONNTRACK_ESTABLISHED)).closing is False
    assert parse_entry(entry("10.77.0.5", None)).closing is False        # UDP: no TCP state
    assert parse_entry(b"\x02\x00\x00\x00") is None
