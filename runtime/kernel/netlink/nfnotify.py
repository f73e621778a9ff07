"""Notice at once when someone changes sockgate's nft table.

nf_tables announces every committed change on the multicast group NFNLGRP_NFTABLES
(what `nft monitor` prints). TableEvents.wait wakes on changes to `table`'s rules,
chains, sets or the table itself; set elements (every ADD and DEL adds or removes
some) don't wake it. A notification lost to a full receive buffer (ENOBUFS) counts as
a change, since it may have been one.
"""
from __future__ import annotations

import errno
import select
import threading
import time

from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELCHAIN,
    NFT_MSG_DELRULE,
    NFT_MSG_DELSET,
    NFT_MSG_DELTABLE,
    NFT_MSG_NEWRULE,
)

from netpolicy.ruleset import FAMILY, TABLE
from runtime.kernel.netlink.core import NETLINK_NETFILTER, NFGENMSG, NetlinkSocket, attributes, messages

NFPROTO = {"inet": 1, "ip": 2, "ip6": 10}
# nf_tables message types whose object belongs to a table named by attribute 1
# (NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE).
WATCHED = {NFT_MSG_DELTABLE, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE, NFT_MSG_DELSET}
_TABLE_ATTR = 1
_SLICE_S = 0.2  # how often a wait looks at its stop event
# A reload of the table announces every rule and set: room for a burst.
_RCVBUF = 1 << 20


def concerns(datagram: bytes, family: int = NFPROTO[FAMILY], table: str = TABLE) -> bool:
    """Whether a datagram from the group holds a change to `table`'s rules, chains,
    sets or the table itself."""
    for kind, _, body in messages(datagram):
        if kind >> 8 != NFNL_SUBSYS_NFTABLES or kind & 0xFF not in WATCHED or len(body) < NFGENMSG.size:
            continue
        if body[NFGENMSG.offset("family")] != family:
            continue
        named = next((value for nla, value in attributes(body[NFGENMSG.size:]) if nla == _TABLE_ATTR), b"")
        if named.split(b"\0", 1)[0] == table.encode():
            return True
    return False


class TableEvents(NetlinkSocket):
    """A subscription in the calling thread's netns."""

    PROTOCOL = NETLINK_NETFILTER

    def __init__(self) -> None:
        super().__init__(groups=1 << (NFNLGRP_NFTABLES - 1), rcvbuf=_RCVBUF, blocking=False)

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
