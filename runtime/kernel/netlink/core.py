"""Netlink messages, attributes and sockets: the layer every client in runtime.kernel.netlink uses.

Invariants: a struct's layout is declared field by field (Layout) and its size and
offsets are computed from that declaration, never written down; parsing a truncated
datagram stops quietly instead of raising; a socket belongs to the netns of the thread
that opened it, whatever the thread does later.
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import Iterable, Iterator

# linux/netlink.h
NETLINK_ROUTE, NETLINK_SOCK_DIAG, NETLINK_NETFILTER = 0, 4, 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33  # not in Python's socket module
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_ROOT, NLM_F_MATCH = 0x100, 0x200  # GET requests
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400  # NEW requests
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NLA_TYPE_MASK = 0xFFFF & ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)

Field = tuple[str, "str | Layout"]


class Layout(struct.Struct):
    """A C struct declared as (name, format) fields: a struct format code, or another
    Layout embedded as raw bytes. Names starting with "_" are padding ("x" codes take
    no value when packing). Packing is plain struct.Struct; `offset` and `size` are
    computed from the declaration (no alignment is implied: spell padding out)."""

    def __init__(self, *fields: Field, byteorder: str = "=") -> None:
        codes = [f"{code.size}s" if isinstance(code, Layout) else code for _, code in fields]
        super().__init__(byteorder + "".join(codes))
        self.fields = fields
        self.offsets = {name: struct.calcsize(byteorder + "".join(codes[:i]))
                        for i, (name, _) in enumerate(fields)}

    def offset(self, name: str) -> int:
        return self.offsets[name]


NLMSGHDR = Layout(("len", "I"), ("type", "H"), ("flags", "H"), ("seq", "I"), ("pid", "I"))
NLMSGERR = Layout(("error", "i"), ("msg", NLMSGHDR))  # the request's header follows the errno
NLATTR = Layout(("len", "H"), ("type", "H"))
# struct nfgenmsg (linux/netfilter/nfnetlink.h), first in every NETLINK_NETFILTER
# message's payload: the resource id is big endian.
NFGENMSG = Layout(("family", "B"), ("version", "B"), ("res_id", "H"), byteorder="!")
_ERRNO = Layout(("error", "i"))
_U32, _BE16, _BE32 = struct.Struct("=I"), struct.Struct("!H"), struct.Struct("!I")


class NetlinkError(OSError):
    """A request the kernel refused; `what` names it."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}")
        self.what = what


# --- attributes ------------------------------------------------------------------

def attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    """One attribute, padded to 4 bytes; `nested` sets NLA_F_NESTED (nf_tables wants it)."""
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, kind | NLA_F_NESTED if nested else kind) + payload + b"\0" * (-length % 4)


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def u32(value: int) -> bytes:
    return _U32.pack(value)


def be16(value: int) -> bytes:
    return _BE16.pack(value)


def be32(value: int) -> bytes:
    return _BE32.pack(value)


def attributes(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without flag bits, payload) of each attribute in `body`; for a nested
    attribute, call it again on its payload."""
    offset, size = 0, NLATTR.size
    while offset + size <= len(body):
        length, kind = NLATTR.unpack_from(body, offset)
        if length < size:
            return
        yield kind & NLA_TYPE_MASK, body[offset + size:offset + length]
        offset += length + (-length % 4)


def attr_map(body: bytes) -> dict[int, bytes]:
    """The attributes of `body` by type (the last one wins)."""
    return dict(attributes(body))


# --- messages --------------------------------------------------------------------

def nfgen(family: int, res_id: int = 0) -> bytes:
    return NFGENMSG.pack(family, 0, res_id)


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """One message, padded to 4 bytes so that another can follow it in a datagram."""
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body + b"\0" * (-len(body) % 4)


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, payload) of each message in a datagram."""
    offset, size = 0, NLMSGHDR.size
    while offset + size <= len(data):
        length, kind, _, seq, _ = NLMSGHDR.unpack_from(data, offset)
        if length < size:
            return
        yield kind, seq, data[offset + size:offset + length]
        offset += length + (-length % 4)


def error_code(payload: bytes) -> int:
    """The errno of an NLMSG_ERROR message's payload; 0 for an ack."""
    return -_ERRNO.unpack_from(payload, NLMSGERR.offset("error"))[0]


# --- sockets ---------------------------------------------------------------------

class NetlinkSocket:
    """A netlink socket of the calling thread's netns, with its own sequence numbers.
    Not thread-safe: one thread at a time (callers that share one hold a lock).
    Subclasses name their netlink family in PROTOCOL."""

    PROTOCOL: int = NETLINK_ROUTE

    def __init__(self, *, groups: int = 0, rcvbuf: int = 0, force_rcvbuf: bool = False,
                 timeout: float | None = None, blocking: bool = True, seq_start: int = 1) -> None:
        self.sock = sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, self.PROTOCOL)
        try:
            if rcvbuf:
                self._set_rcvbuf(rcvbuf, force_rcvbuf)
            sock.bind((0, groups))
            if timeout is not None:
                sock.settimeout(timeout)
            if not blocking:
                sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._seq = itertools.count(seq_start)

    def _set_rcvbuf(self, size: int, force: bool) -> None:
        if force:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)  # root may exceed rmem_max
                return
            except OSError:
                pass
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    def join(self, group: int) -> None:
        """Subscribe to multicast group `group` (a number, not a bit mask)."""
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        return next(self._seq)

    def request(self, kind: int, flags: int, body: bytes) -> int:
        """Send one message; returns its sequence number."""
        seq = next(self._seq)
        self.sock.sendall(message(kind, flags, seq, body))
        return seq

    def send_batch(self, requests: Iterable[tuple[int, int, bytes]]) -> list[int]:
        """Send (type, flags, body) messages in one datagram (the kernel handles them in
        order, each as if sent alone); returns their sequence numbers."""
        seqs: list[int] = []
        buf = bytearray()
        for kind, flags, body in requests:
            seq = next(self._seq)
            seqs.append(seq)
            buf += NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0)
            buf += body
            buf += b"\0" * (-len(body) % 4)  # the next message starts aligned
        self.sock.sendall(buf)
        return seqs

    def receive(self, bufsize: int = 1 << 16) -> Iterator[tuple[int, int, bytes]]:
        """The messages of the next datagram."""
        return messages(self.sock.recv(bufsize))

    def answers(self, bufsize: int = 1 << 16) -> Iterator[tuple[int, int, bytes]]:
        """Every message from now on, datagram after datagram."""
        while True:
            yield from messages(self.sock.recv(bufsize))

    def replies(self, seq: int, bufsize: int = 1 << 16) -> Iterator[tuple[int, bytes]]:
        """(type, payload) of the answers to request `seq`, up to and including its
        NLMSG_DONE or NLMSG_ERROR; other messages are skipped."""
        for kind, mseq, payload in self.answers(bufsize):
            if mseq != seq:
                continue
            yield kind, payload
            if kind == NLMSG_DONE or kind == NLMSG_ERROR:
                return
