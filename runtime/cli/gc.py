"""`sockgate gc`: the operator's way to run, once and now, the sweep the agent runs
periodically (runtime/agent/sweep.py over runtime.core.attach.sweep): remove the
attachments whose container vanished without a DEL, and what crashes left (leases
without a record, torn records, temp files of killed writers). Unlike the agent's
sweep, it also takes the Docker door's attachments (the Docker door's own sweep
then drops their endpoint records). And it deletes the conntrack entries of addresses
no container holds any more, as the agent's closing trim does."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime import textable
from runtime.core.gone_flows import describe_forgotten
from runtime.core.node import Node, link_reaper
from runtime.errors import INVALID_CONFIG, SockgateError
from runtime.state.store import READY, attachments, network_names

log = logging.getLogger(__name__)


@dataclass
class Removed:
    network: str
    container_id: str
    ifname: str
    pod: str | None
    container_name: str | None
    ipv4: str
    ipv6: str
    host_ifname: str
    netns: str
    why: str


@dataclass
class GcReport:
    removed: list[Removed] = field(default_factory=list)
    # Keys (network, container id, ifname) whose leases had no record.
    leases: list[list[str]] = field(default_factory=list)
    # Veths a DEL retired whose deletion a killed agent never did.
    retired_links: list[str] = field(default_factory=list)
    # Conntrack entries deleted per address no container holds any more (a deleted
    # container's flows: runtime.agent.closing_trim, which the agent runs every 30 s).
    forgotten_flows: dict[str, int] = field(default_factory=dict)
    torn_records: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _guard(node: Node, state_dir: str, network: str | None) -> None:
    """Refuse to run where no ready attachment's veth exists and there is no sockgate
    table: most likely not the node's netns (a shell in another one would take every
    container for vanished). After a reboot, with no agent yet, that is the truth:
    --force."""
    ready = [a for a in attachments(state_dir, network).records if a.state == READY]
    if not ready or node.links.links([a.host_ifname for a in ready]) or node.table.table_exists():
        return
    raise SockgateError(INVALID_CONFIG, "not running in the node's network namespace?",
                        f"none of the {len(ready)} ready attachments' veths exists here and there is no table "
                        f"inet sockgate: run it where the agent runs (nsenter --net=...), or with --force if the "
                        f"node rebooted and they are all gone")


def run_gc(state_dir: str, run_dir: str, policy_file: str, network: str | None = None,
           force: bool = False, node: Node | None = None) -> GcReport:
    from runtime.agent.sweep import sweep_all
    if network is not None and network not in network_names(state_dir):
        raise SockgateError(INVALID_CONFIG, f"no network {network!r} on this node",
                            f"nothing under {Path(state_dir) / 'networks'}")
    node = node if node is not None else Node.open()
    if not force:
        _guard(node, state_dir, network)
    report = GcReport()
    for name, swept in sweep_all(node, state_dir, run_dir, policy_file, network=network, skip_docker=False).items():
        for gone in swept.removed:
            a = gone.att
            report.removed.append(Removed(name, a.container_id, a.ifname, a.pod, a.labels.get("container_name"),
                                          a.ipv4, a.ipv6, a.host_ifname, a.netns, gone.why))
        report.leases += [[name, cid, ifname] for cid, ifname in swept.leftovers.leases]
        report.torn_records += [str(p) for p in swept.leftovers.torn]
        report.temp_files += [str(p) for p in swept.leftovers.temps]
    # A DEL whose agent was killed before its reaper deleted the veth: no record, no
    # lease, only the reaper's mark (review 10). (With an agent running, the first of the
    # two reapers to get there deletes it.)
    report.retired_links = link_reaper(run_dir, state_dir).reap_earlier()
    report.forgotten_flows = _forget_gone(node)
    return report


def _forget_gone(node: Node) -> dict[str, int]:
    try:
        return node.flows.forget_gone_containers()
    except (OSError, SockgateError) as exc:
        log.warning("gc: deleted containers' conntrack entries stay (can't read the pools, routes or table): %s",
                    exc)
        return {}


def render(report: GcReport) -> str:
    out = []
    if report.removed:
        out.append(f"removed {len(report.removed)} attachment(s) whose container vanished:")
        out += textable.lines(["network", "pod/container", "container id", "ifname", "ipv4", "ipv6", "why"],
                              [(r.network, r.pod or r.container_name or "-", r.container_id[:12], r.ifname,
                                r.ipv4, r.ipv6, r.why) for r in report.removed])
    else:
        out.append("no attachment whose container vanished")
    if report.leases:
        out.append(f"released the leases of {len(report.leases)} attachment(s) that had no record: "
                   + ", ".join("/".join(k) for k in report.leases))
    if report.retired_links:
        out.append(f"deleted {len(report.retired_links)} veth(s) retired by a DEL whose agent was killed before "
                   f"deleting them: {', '.join(report.retired_links)}")
    if report.forgotten_flows:
        out.append(describe_forgotten(report.forgotten_flows))
    if report.torn_records:
        out.append(f"removed {len(report.torn_records)} unreadable record(s): {', '.join(report.torn_records)}")
    if report.temp_files:
        out.append(f"removed {len(report.temp_files)} temp file(s) of killed writers: {', '.join(report.temp_files)}")
    return "\n".join(out)
