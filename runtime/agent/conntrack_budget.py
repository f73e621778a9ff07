"""Does the node's conntrack table hold every container at its bound? The agent says so
at start and whenever the number of attachments crosses the line; it never changes
nf_conntrack_max itself.

Design notes: docs/dataplane.md; README "Threat model".
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

from netpolicy.ruleset import CLOSING_S, FlowBounds
from runtime.core import policy
from runtime.errors import SockgateError
from runtime.state.store import record_paths

log = logging.getLogger(__name__)
CONNTRACK_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")
# Containers may fill this share of the table; the rest is the node's own (kubelet,
# the runtime, DNS, the other tenants' replies in flight).
CONTAINER_SHARE = 0.75
# How soon to look again while nf_conntrack_max isn't there yet (see run).
FIRST_LOOK_S = 0.5
CHECK_EVERY_S = 5.0


@dataclass(frozen=True)
class Budget:
    table_max: int
    bounds: FlowBounds
    attachments: int

    @property
    def room(self) -> int:
        """Containers that fit at their bound, within CONTAINER_SHARE of the table."""
        return int(self.table_max * CONTAINER_SHARE) // self.bounds.entries

    @property
    def fits(self) -> bool:
        return self.attachments <= self.room

    @property
    def needed_max(self) -> int:
        """The nf_conntrack_max at which the current attachments fit."""
        return math.ceil(self.attachments * self.bounds.entries / CONTAINER_SHARE)

    def describe(self) -> str:
        b = self.bounds
        return (f"nf_conntrack_max is {self.table_max}; a container holds at most {b.entries} entries "
                f"(limits.maxFlows {b.max_flows} + newFlowsBurst {b.new_flows_burst} + newFlowsPerSecond "
                f"{b.new_flows_per_second} x {CLOSING_S} s of closing flows); "
                f"{int(CONTAINER_SHARE * 100)} % of the table holds {self.room} containers at their bound; "
                f"{self.attachments} attached")


def count_attachments(state_dir: str) -> int:
    """Attachment records under the state dir, counted without reading them (cheap
    enough to run every few seconds on a node with a thousand containers)."""
    return len(record_paths(state_dir))


def read_table_max(path: Path = CONNTRACK_MAX) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None  # nf_conntrack not loaded yet: the first ADD's table loads it


class BudgetWatch:
    """Agent component: logs the budget at start, warns when attachments outgrow it."""

    def __init__(self, policy_file: str, state_dir: str, every: float = CHECK_EVERY_S,
                 policies: policy.CompiledPolicies | None = None) -> None:
        self.policy_file, self.state_dir, self.every = policy_file, state_dir, every
        # The agent's (its Node's): the policy is compiled once for ADD and this check.
        self.policies = policies if policies is not None else policy.CompiledPolicies()
        self.last: Budget | None = None

    def check(self) -> Budget | None:
        table_max = read_table_max()
        try:
            bounds = self.policies.get(self.policy_file, self.state_dir).egress.bounds
        except SockgateError:
            return None  # the policy keeper logs why
        if table_max is None:
            return None
        budget = Budget(table_max, bounds, count_attachments(self.state_dir))
        before, self.last = self.last, budget
        if before is None or before.fits != budget.fits or before.bounds != budget.bounds \
                or before.table_max != budget.table_max:
            if budget.fits:
                log.info("conntrack: %s", budget.describe())
            else:
                log.warning("conntrack table too small: %s. One hostile container can't fill it, but "
                            "together they can: set net.netfilter.nf_conntrack_max to at least %d "
                            "(in the node's initial network namespace), or lower the policy's limits",
                            budget.describe(), budget.needed_max)
        return budget

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.check()
            # Until conntrack is loaded in this netns (the policy keeper's first table
            # load does it, in another thread) there is no budget to tell: look again
            # soon, so that the start line comes before the first containers do.
            stop.wait(self.every if self.last is not None else FIRST_LOOK_S)
