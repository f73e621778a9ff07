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
from runtime.errors import SockgateError
from runtime.state.store import READY, attachments, table_lock

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


def put_back(node: Node, policy_file: str, state_dir: str) -> None:
    """A DEL's repair where no agent checks the table: while other containers are
    attached, a table that is missing, or along a meter that is gone, is loaded again
    (with their elements, a new meter). Else they would go unfiltered or unbilled until
    the next ADD, however many DELs came first. (Not a policy that changed: that takes
    compiling it on every DEL, and waits for the next ADD.) Never fails: a
    DEL succeeds whatever the table's state, and the next ADD or DEL tries again."""
    try:
        if node.table.counts_along_meter():  # false without a table too
            return
        if not any(att.state == READY for att in attachments(state_dir).records):
            return  # nothing to protect: the next ADD loads it
        apply(node, policy_file, state_dir)
    except (SockgateError, OSError) as e:
        log.warning("the nft table is not in force and could not be loaded again (the next ADD or DEL "
                    "tries again): %s", e)


def check(node: Node, egress: EgressPolicy, state_dir: str) -> None:
    """The agent's periodic check: the table loaded from `egress`, and the node's
    addresses in it current (an address added to or removed from the node since)."""
    if not ensure_loaded(node, egress, state_dir):
        node.table.sync_node_addresses()


def ensure_loaded(node: Node, egress: EgressPolicy, state_dir: str) -> bool:
    """The table rendered from `egress` is loaded; if it had to be (re)loaded, with the
    elements of every ready attachment recorded under state_dir in the same
    transaction. True if it was. A failed load changes nothing and is retried by the
    next call (the agent's check, the next ADD, without an agent the next DEL)."""
    if node.table.table_current(egress):
        return False
    started = time.monotonic()
    with table_lock(state_dir, exclusive=True):
        if node.table.table_current(egress):
            return False  # another process loaded it while we waited
        endpoints = restore.ready_endpoints(node.links, state_dir)
        # With containers to restore, the load has more to do, and the table counts as
        # loaded (current) only once that is done: a process killed in between leaves
        # a table that the next caller loads again, doing it all (review 10: F2, F5).
        node.table.load_table(egress, endpoints, pending=bool(endpoints))
        if endpoints:
            if not node.links.tcp_offload_metered():
                # Loaded without a meter (none can be had, or one this process can't
                # see, reviews 7: F3, F5): containers attached along one keep TCP's
                # offload, and their super-packets would be billed once each. Off with
                # it, in each.
                restore.stop_tcp_offload(node.links, state_dir, endpoints)
            restore.end_escaped_flows(node.flows, endpoints)
            node.table.mark_loaded(egress)
    log.warning("nft table was loaded with the elements of %d attachment(s) in %.0f ms",
                len(endpoints), (time.monotonic() - started) * 1000)
    return True
