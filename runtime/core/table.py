"""The node's nft table in force: loaded from the compiled policy with the elements of
every ready attachment in one transaction, under the table lock that keeps ADD and DEL
apart from a reload."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from netpolicy.compile import Compiled
from netpolicy.ruleset import EgressPolicy
from runtime.core import restore
from runtime.state.store import table_lock

if TYPE_CHECKING:
    from runtime.core.node import Node

log = logging.getLogger(__name__)


def apply(node: Node, policy_file: str, state_dir: str) -> Compiled:
    """Compile, then load in one transaction. Any error before the load leaves the
    policy in force untouched. A table that had to be loaded gets the elements of
    every recorded attachment back (see runtime.core.restore)."""
    result = node.policies.get(policy_file, state_dir)
    if not ensure_loaded(node, result.egress, state_dir):
        node.table.sync_node_addresses()  # a load fills them; else they may be stale
    return result


def check(node: Node, egress: EgressPolicy, state_dir: str) -> None:
    """The agent's periodic check: the table loaded from `egress`, and the node's
    addresses in it current (an address added to or removed from the node since)."""
    if not ensure_loaded(node, egress, state_dir):
        node.table.sync_node_addresses()


def ensure_loaded(node: Node, egress: EgressPolicy, state_dir: str) -> bool:
    """The table rendered from `egress` is loaded; if it had to be (re)loaded, with the
    elements of every ready attachment recorded under state_dir in the same
    transaction. True if it was. A failed load changes nothing and is retried by the
    next call (the agent's check, the next ADD)."""
    if node.table.table_current(egress):
        return False
    started = time.monotonic()
    with table_lock(state_dir, exclusive=True):
        if node.table.table_current(egress):
            return False  # another process loaded it while we waited
        endpoints = restore.ready_endpoints(node.links, state_dir)
        node.table.load_table(egress, endpoints)
        if endpoints and not node.links.tcp_offload_metered():
            # Loaded without a meter (none can be had, or one this process can't see,
            # reviews 7: F3, F5): containers attached along one keep TCP's offload, and
            # their super-packets would be billed once each. Off with it, in each.
            restore.stop_tcp_offload(node.links, state_dir, endpoints)
    log.warning("nft table was loaded with the elements of %d attachment(s) in %.0f ms",
                len(endpoints), (time.monotonic() - started) * 1000)
    if endpoints:
        restore.end_escaped_flows(node.flows, endpoints)
    return True
