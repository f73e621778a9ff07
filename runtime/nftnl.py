"""One attachment's set elements, over nf_tables' own netlink (NETLINK_NETFILTER).

Why not libnftables for these (it does everything else: loading the table, pools,
listings): its cost grows with the node. It resolves every `meta iif`/`meta oif`
value it parses or prints through an interface cache that it fills with a dump of
every link in the netns, and drops after each command; and `get element` first
fetches every element of every set whenever the ruleset changed since its last
command. With 1,000 veths on the node that made an ADD's element transaction ~20 ms
and the three `get element` of a DEL ~70 ms (scripts/bench-cni --attached). Here an
ADD, a DEL and a DEL's counter read are one netlink round trip each, the same cost
whatever the size of the node.

Requests are built by hand after <linux/netfilter/nf_tables.h>, like runtime.rtnl
(and for the same reason: pyroute2's NFTSocket runs each request through an asyncio
loop); answers are decoded with pyroute2's message classes. Keys come from
netpolicy.ruleset (endpoint_keys, revision_key), next to the set types they encode.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Iterator

from pyroute2.netlink import NETLINK_NETFILTER
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import (NFT_MSG_DELSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_NEWSETELEM,
                                                  nft_set_elem_list_msg)

from runtime.rtnl import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, messages

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_USERDATA = 1, 6
NFTA_DATA_VALUE = 1
NLA_F_NESTED = 0x8000
NFTNL_UDATA_SET_ELEM_COMMENT = 0

_HDR = struct.Struct("=IHHII")  # nlmsghdr
_seq = itertools.count(int.from_bytes(os.urandom(2), "little") << 8)


class NftnlError(OSError):
    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")


@dataclass(frozen=True)
class ElementOp:
    """One element to add or delete ("add"/"delete"), with its comment (adds only)."""

    op: str
    set_name: str
    key: bytes
    comment: str = ""


@dataclass(frozen=True)
class Element:
    """One element as read back: its counter (0, 0 if the set has none) and comment."""

    packets: int
    bytes: int
    comment: str


def _attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind | (NLA_F_NESTED if nested else 0)) + payload + b"\0" * (-length % 4)


def _nfgen(res_id: int = 0) -> bytes:
    """struct nfgenmsg: family, version, resource id (big endian)."""
    return struct.pack("!BBH", NFPROTO_INET, 0, res_id)


def _message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body


def _element_list(table: str, set_name: str, key: bytes, comment: str = "") -> bytes:
    element = _attr(NFTA_SET_ELEM_KEY, _attr(NFTA_DATA_VALUE, key), nested=True)
    if comment:
        text = comment.encode() + b"\0"
        element += _attr(NFTA_SET_ELEM_USERDATA, bytes([NFTNL_UDATA_SET_ELEM_COMMENT, len(text)]) + text)
    return (_nfgen() + _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
            + _attr(NFTA_SET_ELEM_LIST_SET, set_name.encode() + b"\0")
            + _attr(NFTA_SET_ELEM_LIST_ELEMENTS, _attr(NFTA_LIST_ELEM, element, nested=True), nested=True))


def _error_code(payload: bytes) -> int:
    return -struct.unpack_from("=i", payload)[0]


class Socket:
    """A NETLINK_NETFILTER socket of the calling thread's netns."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self.sock.bind((0, 0))

    def close(self) -> None:
        self.sock.close()

    def _answers(self) -> Iterator[tuple[int, int, bytes]]:
        while True:
            yield from messages(self.sock.recv(1 << 16))

    def batch(self, table: str, ops: list[ElementOp]) -> None:
        """All of `ops` in one transaction: all or nothing. Raises NftnlError naming
        the first op the kernel refused."""
        begin = next(_seq)
        data = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin, _nfgen(NFNL_SUBSYS_NFTABLES))]
        pending: dict[int, str] = {}
        for op in ops:
            seq = next(_seq)
            kind = NFT_MSG_NEWSETELEM if op.op == "add" else NFT_MSG_DELSETELEM
            flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op.op == "add" else 0)
            data.append(_message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq,
                                 _element_list(table, op.set_name, op.key, op.comment)))
            pending[seq] = f"{op.op} element {op.set_name} {op.key.hex()}"
        data.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, next(_seq), _nfgen(NFNL_SUBSYS_NFTABLES)))
        self.sock.sendall(b"".join(data))
        # The kernel acks every message of an aborted batch too (the first with the
        # cause), so waiting for all acks also drains the socket for the next request.
        first: NftnlError | None = None
        for kind, seq, payload in self._answers():
            if kind != NLMSG_ERROR:
                continue
            code = _error_code(payload)
            if seq == begin and code:
                raise NftnlError(code, "begin nf_tables batch")
            if seq in pending:
                what = pending.pop(seq)
                if code and first is None:
                    first = NftnlError(code, what)
            if not pending:
                break
        if first is not None:
            raise first

    def get(self, table: str, set_name: str, key: bytes) -> Element | None:
        """One element by key; None when it (or its set, or the table) is missing."""
        seq = next(_seq)
        self.sock.sendall(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_ACK,
                                   seq, _element_list(table, set_name, key)))
        found: Element | None = None
        for kind, rseq, payload in self._answers():
            if rseq != seq:
                continue
            if kind == NLMSG_ERROR:
                code = _error_code(payload)
                if code == errno.ENOENT:
                    return None
                if code:
                    raise NftnlError(code, f"get element {set_name} {key.hex()}")
                return found
            if kind == NLMSG_DONE:
                return found
            if kind & 0xFF == NFT_MSG_NEWSETELEM:
                found = _decode_element(payload)


def _decode_element(payload: bytes) -> Element | None:
    header = struct.pack("=IHHII", _HDR.size + len(payload), 0, 0, 0, 0)
    msg = nft_set_elem_list_msg(header + payload)
    msg.decode()
    for element in msg.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS") or []:
        comment = ""
        for name, value in element.get_attr("NFTA_SET_ELEM_USERDATA") or []:
            if name == "NFTNL_UDATA_SET_ELEM_COMMENT":
                comment = value.decode()
        packets = nbytes = 0
        expressions = [element.get_attr("NFTA_SET_ELEM_EXPR")] + list(element.get_attr("NFTA_SET_ELEM_EXPRESSIONS")
                                                                      or [])
        for expr in expressions:
            if expr is not None and expr.get_attr("NFTA_EXPR_NAME") == "counter":
                data = expr.get_attr("NFTA_EXPR_DATA")
                packets, nbytes = data.get_attr("NFTA_COUNTER_PACKETS"), data.get_attr("NFTA_COUNTER_BYTES")
        return Element(packets, nbytes, comment)
    return None


# One socket per netns, kept open for the life of the process: closing a
# NETLINK_NETFILTER socket that ran a batch takes ~15 ms (the release waits for an
# RCU grace period), more than the whole transaction. A process may work in several
# netns (the lab, tests), so they are keyed by the netns' inode.
_sockets: dict[int, tuple[Socket, threading.Lock]] = {}
_sockets_lock = threading.Lock()


@contextlib.contextmanager
def current() -> Iterator[Socket]:
    """The calling thread's netns' socket, for this thread alone while in the block."""
    netns = os.stat("/proc/thread-self/ns/net").st_ino
    with _sockets_lock:
        if netns not in _sockets:
            _sockets[netns] = (Socket(), threading.Lock())
        sock, lock = _sockets[netns]
    with lock:
        yield sock
