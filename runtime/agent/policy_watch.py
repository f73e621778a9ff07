"""The agent's policy component: load the table at start, re-apply when the policy file
changes (an invalid file is logged and the policy in force stays), keep exception
hostnames resolved, and check that the loaded table still is the one in force
(reloading it if someone flushed or replaced it): at once when nf_tables announces a
change to it (runtime.kernel.netlink.nfnotify), and every CHECK_EVERY_S in any case. That check
is what lets an ADD served by the agent skip its own (see runtime.core.node.Node.watched).
The same check keeps the node's own addresses in the table current (what `"source":
"node"` ingress rules match): an address added or removed is in force within
CHECK_EVERY_S."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from netpolicy.ruleset import EgressPolicy
from runtime.agent.resolver import Refresher
from runtime.core import policy, table
from runtime.core.node import Node
from runtime.errors import SockgateError
from runtime.fsutil import file_stamp
from runtime.kernel.netlink.nfnotify import TableEvents

log = logging.getLogger(__name__)
CHECK_EVERY_S = 2.0


class PolicyKeeper:
    def __init__(self, node: Node, policy_file: str, state_dir: str, check_every: float = CHECK_EVERY_S) -> None:
        self.node = node
        self.policy_file = policy_file
        self.state_dir = state_dir
        self.check_every = check_every
        self.refresher: Refresher | None = None
        self.applied: tuple[int, int, int] | None | bool = False  # False: never applied
        self.in_force: EgressPolicy | None = None

    def _apply(self) -> None:
        stamp = file_stamp(Path(self.policy_file))
        try:
            compiled = table.apply(self.node, self.policy_file, self.state_dir)
        except SockgateError as exc:
            log.error("policy not applied, the policy in force stays: %s", exc)
        else:
            self.refresher = Refresher(compiled.policy, policy.resolved_record(self.state_dir))
            self.in_force = compiled.egress
            log.info("policy applied from %s", self.policy_file)
        self.applied = stamp

    def _check_table(self) -> None:
        if self.in_force is None:
            return
        try:
            table.check(self.node, self.in_force, self.state_dir)
        except SockgateError as exc:
            log.error("cannot reload the nft table: %s", exc)

    def run(self, stop: threading.Event) -> None:
        try:
            events: TableEvents | None = TableEvents()
        except OSError as exc:
            log.warning("no nftables notifications (%s): the table is checked every %.0f s only",
                        exc, self.check_every)
            events = None
        self.node.watched = True
        try:
            self._watch(stop, events)
        finally:
            self.node.watched = False
            if events is not None:
                events.close()

    def _watch(self, stop: threading.Event, events: TableEvents | None) -> None:
        # DNS never holds this loop: lookups run in the Refresher's own threads and
        # their answers are collected here as they come, so a table check or a stop is
        # never late by a lookup's timeout.
        next_check = 0.0
        while not stop.is_set():
            if self.applied is False or file_stamp(Path(self.policy_file)) != self.applied:
                self._apply()
                next_check = time.monotonic() + self.check_every
            elif time.monotonic() >= next_check:
                self._check_table()
                next_check = time.monotonic() + self.check_every
            wait = next_check - time.monotonic()
            if self.refresher is not None:
                self.refresher.collect()
                self.refresher.start_due()
                wait = min(wait, self.refresher.wake_in())
            wait = max(wait, 0.0)
            if events is None:
                stop.wait(wait)
            elif events.wait(wait, stop):
                log.debug("nf_tables announced a change to the table: checking it")
                next_check = 0.0
