"""Closing TCP entries a container keeps alive: deleted by the agent.

Why: `ct count` leaves out TCP entries in TIME_WAIT and CLOSE, so a container's bound
(FlowBounds.entries) counts on them going CLOSING_S after they close. But every packet
of a flow refreshes its entry in conntrack, before any rule of sockgate's sees it (a
later drop doesn't undo the refresh), so a container that sends one packet every few
seconds on each connection its peer reset (review 3: an in-window ACK every 3 s kept
a CLOSE entry for as long as it went on) keeps them all, and opens new ones at its
new-flow rate: given time, any number, and the node's conntrack table is shared.
Only user space can end an entry, and no rule can tell a refreshed closing entry
from a fresh one.

What is done: every `every` seconds, one dump of the node's conntrack table; a
container holding more closing entries than its new-flow rate can leave behind
(FlowBounds.closing) is sending on them, and all its closing entries are deleted.
A deleted entry's connection is over anyway (reset or closed): a late packet on it is
a TCP packet without a flow, refused as such. So a container holds at most
FlowBounds.entries + new_flows_per_second x `every` entries. The dump walks the whole
table and each entry is parsed here: 0.35-0.52 s for 50,000 entries on the 2-core
development machine (docs/measurements.md), so a full table of 262,144 takes about
2.5 s of one CPU every `every` seconds.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict

from runtime.core import policy
from runtime.errors import SockgateError
from runtime.state.store import READY, attachments

log = logging.getLogger(__name__)
DEFAULT_EVERY_S = 30.0


class ClosingTrim:
    """Agent component: deletes the closing entries of containers over their bound."""

    def __init__(self, policy_file: str, state_dir: str, every: float = DEFAULT_EVERY_S,
                 policies: policy.CompiledPolicies | None = None) -> None:
        self.policy_file, self.state_dir, self.every = policy_file, state_dir, every
        self.policies = policies if policies is not None else policy.CompiledPolicies()
        self.deleted = 0  # entries deleted since start

    def trim(self) -> dict[str, int]:
        """One pass: {container: entries deleted} for the containers over their bound."""
        from runtime.kernel.netlink.conntrack import Conntrack
        try:
            cap = self.policies.get(self.policy_file, self.state_dir).egress.bounds.closing
        except SockgateError:
            return {}  # the policy keeper logs why
        # One count per attachment (both its addresses), named by pod or container and
        # interface (and network, which tells apart the same container on two).
        owner = {addr: f"{att.pod or att.container_id}/{att.ifname} ({att.network})"
                 for att in attachments(self.state_dir).records
                 if att.state == READY for addr in (att.ipv4, att.ipv6) if addr}
        ct = Conntrack()
        try:
            found = ct.closing_entries()
            if not found:
                return {}
            held: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
            for addr, entries in found.items():
                if addr in owner:
                    held[owner[addr]] += entries
            trimmed = {who: sum(ct.delete(*e) for e in entries)
                       for who, entries in held.items() if len(entries) > cap}
        finally:
            ct.close()
        if trimmed:
            self.deleted += sum(trimmed.values())
            log.warning("deleted the closing TCP conntrack entries of %d container(s) that held more than "
                        "their new-flow rate leaves (%d): %s; they keep them alive by sending on them",
                        len(trimmed), cap, ", ".join(f"{who} ({n})" for who, n in sorted(trimmed.items())[:5]))
        return trimmed

    def run(self, stop: threading.Event) -> None:
        if self.every <= 0:
            return
        while not stop.wait(self.every):
            self.trim()
