"""Notice at once when someone changes sockgate's nft table.

nf_tables announces every committed change on the netlink multicast group
NFNLGRP_NFTABLES (what `nft monitor` prints). The agent listens there so that a
`nft flush ruleset`, a firewall reload or a deleted chain is repaired within
milliseconds rather than at its next periodic check: until the table is back,
containers' traffic is neither filtered nor masqueraded. Only changes to rules,
chains, sets or the table itself wake it; set elements (every ADD and DEL adds or
removes some) don't. A notification lost to a full receive buffer (ENOBUFS) counts
as a change, since it may have been one.
"""
from __future__ import annotations

import errno
import select
import socket
import struct
import threading
import time

from pyroute2.netlink import NETLINK_NETFILTER
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import (NFT_MSG_DELCHAIN, NFT_MSG_DELRULE, NFT_MSG_DELSET,
                                                  NFT_MSG_DELTABLE, NFT_MSG_NEWRULE)

from netpolicy.ruleset import FAMILY, TABLE
from runtime.rtnl import attributes, messages

NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
# nf_tables message types whose object belongs to a table named by attribute 1
# (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE).
WATCHED = {NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_DELSET}
_NFGENMSG = struct.Struct("=BBH")
_SLICE_S = 0.2  # how often a wait looks at its stop event


def concerns(datagram: bytes, family: int = NFPROTO[FAMILY], table: str = TABLE) -> bool:
    """Whether a datagram from the group holds a change to `table`'s rules, chains,
    sets or the table itself."""
    for kind, _, body in messages(datagram):
        if kind >> 8 != NFNL_SUBSYS_NFTABLES or kind & 0xFF not in WATCHED or len(body) < _NFGENMSG.size:
            continue
        if _NFGENMSG.unpack_from(body)[0] != family:
            continue
        named = next((value for attr, value in attributes(body[_NFGENMSG.size:]) if attr == 1), b"")
        if named.split(b"\0", 1)[0] == table.encode():
            return True
    return False


class TableEvents:
    """A subscription in the calling thread's netns."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            # A reload of the table announces every rule and set: room for a burst.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def _drain(self) -> bool:
        touched = False
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return touched
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                touched = True
                continue
            touched = touched or concerns(data)

    def wait(self, timeout: float, stop: threading.Event) -> bool:
        """Up to `timeout` seconds, until the table changed (True) or `stop` is set."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.sock], [], [], min(left, _SLICE_S))
            if ready and self._drain():
                return True
        return False
