"""The agent's sweep of attachments whose container vanished without a DEL (the
runtime was down, the node rebooted, someone deleted the netns or the veth): at start
and every interval, runtime.core.attach.sweep over every network under the state dir,
the same core `sockgate gc` runs once. The Docker door's attachments are left to its
own sweep (runtime/docker/driver.py), which also removes Docker's endpoint records.

Why the node-side veth is the sign, and why an attachment being added is never
touched: runtime/core/attach.py, "Attachments whose container vanished"."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from runtime.core import attach
from runtime.core.netconf import NetConf, parse_netconf
from runtime.core.node import Node
from runtime.errors import SockgateError
from runtime.state.store import Attachment, network_names

log = logging.getLogger(__name__)
DEFAULT_INTERVAL = 60.0


def network_conf(name: str, state_dir: str, run_dir: str, policy_file: str) -> NetConf:
    """What the core needs to tear an attachment of network `name` down: where its
    state, its policy and its billing live. The pools don't matter there (the record
    names the addresses), and the billing dir is the node's default, the agent's own
    (README: one billingDir per node)."""
    return parse_netconf({"name": name, "type": "sockgate", "stateDir": state_dir, "runDir": run_dir,
                          "policyFile": policy_file})


def docker_owned(att: Attachment) -> bool:
    """Made by the Docker door (runtime.docker.driver labels every one it makes)."""
    return "docker_endpoint_id" in att.labels


def sweep_all(node: Node, state_dir: str, run_dir: str, policy_file: str, *,
              network: str | None = None, skip_docker: bool = True) -> dict[str, attach.Swept]:
    """attach.sweep over each network (or the one named), by name."""
    skip = docker_owned if skip_docker else (lambda att: False)
    if network is not None:  # named by the operator: a bad name is an error
        return {network: attach.sweep(node, network_conf(network, state_dir, run_dir, policy_file), skip)}
    done = {}
    for name in network_names(state_dir):
        try:
            conf = network_conf(name, state_dir, run_dir, policy_file)
        except SockgateError as exc:  # not a directory sockgate made
            log.warning("sweep: skipping %s: %s", Path(state_dir) / "networks" / name, exc)
            continue
        done[name] = attach.sweep(node, conf, skip)
    return done


class AttachmentSweep:
    """Agent component: sweeps at start, then every `interval` seconds."""

    def __init__(self, node: Node, state_dir: str, run_dir: str, policy_file: str,
                 interval: float = DEFAULT_INTERVAL) -> None:
        if interval <= 0:
            raise ValueError(f"sweep interval must be positive, got {interval}")
        self.node, self.state_dir, self.run_dir, self.policy_file = node, state_dir, run_dir, policy_file
        self.interval = interval
        self.removed = 0  # attachments removed since start

    def sweep(self) -> int:
        done = sweep_all(self.node, self.state_dir, self.run_dir, self.policy_file)
        n = sum(len(s.removed) for s in done.values())
        self.removed += n
        leases = sum(len(s.leftovers.leases) for s in done.values())
        if n or leases:
            log.info("sweep: removed %d attachment(s) whose container vanished, %d lease(s) without a record",
                     n, leases)
        return n

    def run(self, stop: threading.Event) -> None:
        while True:
            try:
                self.sweep()
            except (OSError, SockgateError) as exc:
                # Retried next interval; a DEL or `sockgate gc` does the same meanwhile.
                log.warning("sweep of vanished attachments failed: %s", exc)
            if stop.wait(self.interval):
                return
