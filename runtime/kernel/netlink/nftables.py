"""One attachment's set elements, over nf_tables' own netlink (NETLINK_NETFILTER).

An ADD's or a DEL's elements are one transaction (a batch: all or nothing) and one
round trip; a counter read is one GET. The cost does not grow with the node (why not
libnftables here: docs/netlink.md). Requests are built here; answers are decoded with
pyroute2's message classes. Keys come from netpolicy.ruleset (endpoint_keys,
revision_key). One socket per netns stays open for the life of the process (current()).
"""
from __future__ import annotations

import contextlib
import errno
import os
import threading
from dataclasses import dataclass
from typing import Iterator

from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELSETELEM,
    NFT_MSG_GETSETELEM,
    NFT_MSG_NEWSETELEM,
    nft_set_elem_list_msg,
)

from runtime.kernel.netlink.core import (
    NETLINK_NETFILTER,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    NetlinkError,
    NetlinkSocket,
    attr,
    cstr,
    error_code,
    nfgen,
)

NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_USERDATA = 1, 6
NFTA_DATA_VALUE = 1
NFTNL_UDATA_SET_ELEM_COMMENT = 0



class NftnlError(NetlinkError):
    """An element operation the kernel refused; `what` names it."""


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


def _element_list(table: str, set_name: str, key: bytes, comment: str = "") -> bytes:
    element = attr(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, key), nested=True)
    if comment:
        text = cstr(comment)
        element += attr(NFTA_SET_ELEM_USERDATA, bytes([NFTNL_UDATA_SET_ELEM_COMMENT, len(text)]) + text)
    return (nfgen(NFPROTO_INET) + attr(NFTA_SET_ELEM_LIST_TABLE, cstr(table))
            + attr(NFTA_SET_ELEM_LIST_SET, cstr(set_name))
            + attr(NFTA_SET_ELEM_LIST_ELEMENTS, attr(NFTA_LIST_ELEM, element, nested=True), nested=True))


class Socket(NetlinkSocket):
    """A NETLINK_NETFILTER socket of the calling thread's netns."""

    PROTOCOL = NETLINK_NETFILTER

    def __init__(self) -> None:
        # Random start: requests of different processes are told apart in a trace.
        super().__init__(seq_start=int.from_bytes(os.urandom(2), "little") << 8)

    def batch(self, table: str, ops: list[ElementOp]) -> None:
        """All of `ops` in one transaction: all or nothing. Raises NftnlError naming
        the first op the kernel refused."""
        messages = [(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, nfgen(NFPROTO_INET, NFNL_SUBSYS_NFTABLES))]
        for op in ops:
            kind = NFT_MSG_NEWSETELEM if op.op == "add" else NFT_MSG_DELSETELEM
            flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if op.op == "add" else 0)
            messages.append(((NFNL_SUBSYS_NFTABLES << 8) | kind, flags,
                             _element_list(table, op.set_name, op.key, op.comment)))
        messages.append((NFNL_MSG_BATCH_END, NLM_F_REQUEST, nfgen(NFPROTO_INET, NFNL_SUBSYS_NFTABLES)))
        seqs = self.send_batch(messages)
        begin = seqs[0]
        pending = {seq: f"{op.op} element {op.set_name} {op.key.hex()}" for seq, op in zip(seqs[1:], ops)}
        # The kernel acks every message of an aborted batch too (the first with the
        # cause), so waiting for all acks also drains the socket for the next request.
        first: NftnlError | None = None
        for kind, seq, payload in self.answers():
            if kind != NLMSG_ERROR:
                continue
            code = error_code(payload)
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
        seq = self.request((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_ACK,
                           _element_list(table, set_name, key))
        found: Element | None = None
        for kind, payload in self.replies(seq):
            if kind == NLMSG_ERROR:
                code = error_code(payload)
                if code == errno.ENOENT:
                    return None
                if code:
                    raise NftnlError(code, f"get element {set_name} {key.hex()}")
                return found
            if kind == NLMSG_DONE:
                return found
            if kind & 0xFF == NFT_MSG_NEWSETELEM:
                found = _decode_element(payload)
        return found


def _decode_element(payload: bytes) -> Element | None:
    header = NLMSGHDR.pack(NLMSGHDR.size + len(payload), 0, 0, 0, 0)
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


# One socket per netns, kept open for the life of the process (closing one that ran a
# batch is slow: docs/netlink.md), keyed by the netns' inode: a process may work in
# several netns (the lab, tests).
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
