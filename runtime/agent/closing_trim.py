"""Conntrack entries a container holds beyond its bounds: deleted by the agent.

Why: the kernel-side bounds (`ct count` over maxFlows, the new-flow rate) act when a
flow's first packet is seen, and `ct count` leaves out TCP entries in TIME_WAIT and
CLOSE, counting on them going CLOSING_S after they close. conntrack handles every
packet at prerouting -200, before any rule of sockgate's, and a drop later undoes
none of it, so a container can walk entries where the bounds don't look:
- keep closing entries alive by sending on them (review 3: an in-window ACK every 3 s
  kept a CLOSE entry for as long as it went on), and open new ones at its new-flow
  rate: given time, any number;
- bring a CLOSE entry (a connection the peer reset) back to ESTABLISHED: conntrack
  records the container's SYN on it even when `forward` refuses it (`tcp-reopen`),
  and takes a SYN-ACK from a peer in league with the container as the old flow coming
  back in sync (review 4): a live connection `ct count` never counted, beyond maxFlows.
Only user space can end an entry, and no rule can tell these entries from others.

What is done: every `every` seconds, one dump of the node's conntrack table, counted
per attachment (both its addresses). A container holding more closing entries than its
new-flow rate can leave behind (FlowBounds.closing) has all of them deleted; one
holding more live entries than maxFlows (plus SLACK, for adds racing on two CPUs) has
the excess deleted. A legitimate container can't exceed either. A deleted entry's next
packet is a TCP packet without a flow, refused as such. So a container holds at most
FlowBounds.entries + new_flows_per_second x `every` entries. The dump walks the whole
table and each entry is parsed here: 0.35-0.52 s for 50,000 entries on the 2-core
development machine (docs/measurements.md), so a full table of 262,144 takes about
2.5 s of one CPU every `every` seconds.

The same dump ends the flows of containers that are gone. A DEL leaves its
container's entries (deleting them there would walk the whole conntrack hash, 14-16
ms per address family here, on every DEL), and a peer that goes on sending to the
container's public port keeps its entry alive for as long as it sends. Given the
address, the next container would receive those packets: the old one's replies,
de-masqueraded to the address it now holds. So the entries from an address in a
container pool that no container veth is routed to are deleted. IPAM hands a freed
address out again only after the rest of its pool (runtime.state.ipam), so that is
done long before, unless the pool wraps around within `every` seconds.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import TYPE_CHECKING

from runtime.core import policy
from runtime.core.gone_flows import describe_forgotten, forget_gone_containers
from runtime.errors import SockgateError
from runtime.state.store import READY, attachments

if TYPE_CHECKING:
    from netpolicy.ruleset import FlowBounds
    from runtime.kernel.netlink.conntrack import Conntrack, DumpedEntry

log = logging.getLogger(__name__)
DEFAULT_EVERY_S = 30.0
SLACK = 4


def over_bounds(entries: list[DumpedEntry], bounds: FlowBounds) -> list[DumpedEntry]:
    """The entries of one attachment to delete: every closing one when there are more
    than its rate leaves behind; the live ones beyond maxFlows + SLACK."""
    closing = [e for e in entries if e.closing]
    live = [e for e in entries if not e.closing]
    doomed = closing if len(closing) > bounds.closing else []
    return doomed + live[bounds.max_flows + SLACK:]


class ClosingTrim:
    """Agent component: deletes the conntrack entries of containers over their bounds."""

    def __init__(self, policy_file: str, state_dir: str, every: float = DEFAULT_EVERY_S,
                 policies: policy.CompiledPolicies | None = None) -> None:
        self.policy_file, self.state_dir, self.every = policy_file, state_dir, every
        self.policies = policies if policies is not None else policy.CompiledPolicies()
        self.deleted = 0  # entries deleted since start
        self.forgotten = 0  # entries of containers that were gone, deleted since start

    def trim(self) -> dict[str, int]:
        """One pass: {attachment: entries deleted} for those over their bounds."""
        from runtime.kernel.netlink.conntrack import Conntrack
        try:
            bounds = self.policies.get(self.policy_file, self.state_dir).egress.bounds
        except SockgateError:
            return {}  # the policy keeper logs why
        # One count per attachment (both its addresses), named by pod or container and
        # interface (and network, which tells apart the same container on two).
        owner = {addr: f"{att.pod or att.container_id}/{att.ifname} ({att.network})"
                 for att in attachments(self.state_dir).records
                 if att.state == READY for addr in (att.ipv4, att.ipv6) if addr}
        ct = Conntrack()
        try:
            found = ct.entries_by_source()
            if not found:
                return {}
            self._forget_gone(ct, found)
            held: dict[str, list[DumpedEntry]] = defaultdict(list)
            for addr, entries in found.items():
                if addr in owner:
                    held[owner[addr]] += entries
            trimmed = {}
            for who, entries in held.items():
                doomed = over_bounds(entries, bounds)
                if doomed:
                    trimmed[who] = sum(ct.delete(e.family, e.delete) for e in doomed)
        finally:
            ct.close()
        if trimmed:
            self.deleted += sum(trimmed.values())
            log.warning("deleted conntrack entries of %d container(s) over their bounds (closing: at most %d, "
                        "live: maxFlows %d): %s; they keep closing entries alive or revive them by sending on "
                        "them", len(trimmed), bounds.closing, bounds.max_flows,
                        ", ".join(f"{who} ({n})" for who, n in sorted(trimmed.items())[:5]))
        return trimmed

    def _forget_gone(self, ct: Conntrack, found: dict[str, list[DumpedEntry]]) -> None:
        try:
            deleted = forget_gone_containers(ct, found)
        except (OSError, SockgateError) as exc:
            log.warning("can't tell which containers are gone (their conntrack entries stay): %s", exc)
            return
        if deleted:
            self.forgotten += sum(deleted.values())
            log.info("%s", describe_forgotten(deleted))

    def run(self, stop: threading.Event) -> None:
        if self.every <= 0:
            return
        while not stop.wait(self.every):
            self.trim()
