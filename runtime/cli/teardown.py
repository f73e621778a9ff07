"""`sockgate teardown`: take sockgate's kernel state out of a node's netns once nothing
needs it: the nft table `inet sockgate` (its prerouting hook sees every packet of the
node, a container's or not) and the segment meter (BPF programs at four netfilter
hooks, kept by their pins: no process holds them, so they outlive every uninstall that
only removes files). What `scripts/install-node.sh --uninstall` runs after it stopped
the agent.

It refuses while the agent answers (its table check would load both again within
seconds) and while a container is attached (a record in the state dir, or a veth in
sockgate's interface group, of this state dir or another): without the table that
container's packets would leave unfiltered and unmasqueraded. The state dir (leases,
billing), the policy and the node's sysctls stay as they are."""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runtime import defaults


@dataclass(frozen=True)
class Blocker:
    kind: str  # agent | attachment | record | veth | meter
    detail: str


@dataclass
class Teardown:
    blockers: list[Blocker] = field(default_factory=list)  # why it did not (or would not) remove
    present: list[str] = field(default_factory=list)        # what it found to remove
    removed: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def _container_veths() -> set[str]:
    """Node-side veths in sockgate's interface group: every door's, whatever its state
    dir."""
    from pyroute2 import IPRoute

    from netpolicy.ruleset import CONTAINER_IFGROUP
    with IPRoute() as ipr:
        return {link.get("IFLA_IFNAME") for link in ipr.get_links() if link.get("IFLA_GROUP") == CONTAINER_IFGROUP}


def blockers(state_dir: str, run_dir: str) -> list[Blocker]:
    from runtime.cli.status import agent_state
    from runtime.state.store import attachments
    found = []
    agent = agent_state(run_dir)
    if agent.up:
        found.append(Blocker("agent", f"the agent answers on {agent.socket}: it would load the table again "
                                      f"within seconds (stop it first: systemctl stop sockgate-agent)"))
    listing = attachments(state_dir)
    found += [Blocker("attachment", f"container {att.container_id} is attached ({att.network}/{att.ifname}, "
                                    f"veth {att.host_ifname}): DEL it through its runtime, or `sockgate gc` if "
                                    f"it is gone") for att in listing.records]
    found += [Blocker("record", f"unreadable attachment record {path}: `sockgate gc` removes it")
              for path in listing.unreadable]
    recorded = {att.host_ifname for att in listing.records}
    found += [Blocker("veth", f"veth {name} is a container's (sockgate's interface group) and not in "
                              f"{state_dir}: another state dir's container is attached, or a veth a DEL "
                              f"retired and a killed agent never deleted (`sockgate gc` deletes those)")
              for name in sorted(_container_veths() - recorded)]
    return found


def _meter_out_of_view(dirs: list[Path]) -> list[Blocker]:
    """A meter the table counts along, alive, whose pins are under no pin root this
    process sees (review 9: a shell with another bpffs at /sys/fs/bpf took the table
    and left the meter attached): removing the table alone would leave it."""
    from runtime.kernel import bpf, nft, segment_meter
    seen = segment_meter.map_ids(dirs)
    out = []
    for map_id in [m for m in nft.recorded_meter() or [] if m and m not in seen]:
        try:
            alive = bpf.map_alive(map_id)
        except OSError:
            alive = True  # can't tell: assume the worst
        if alive:
            out.append(Blocker("meter", f"the table counts along segment meter map {map_id}, whose pins are "
                                        f"under no pin root in view here (/sys/fs/bpf/sockgate, /run/sockgate/bpf): "
                                        f"run it with the agent's mounts"))
    return out


def teardown(state_dir: str, run_dir: str, check_only: bool = False) -> Teardown:
    """Remove the table and the meter of the calling thread's netns, unless something
    still needs them (then change nothing). Idempotent."""
    from runtime.state.store import table_lock
    if check_only or not Path(state_dir).is_dir():
        return _teardown(state_dir, run_dir, check_only)
    # As a reload does: an ADD that wrote its record before this look blocks it, and
    # one after it waits, then finds no table and loads it again.
    with table_lock(state_dir, exclusive=True):
        return _teardown(state_dir, run_dir, check_only)


def _teardown(state_dir: str, run_dir: str, check_only: bool) -> Teardown:
    from runtime.kernel import nft, segment_meter
    dirs = segment_meter.pinned_anywhere()
    result = Teardown(blockers=blockers(state_dir, run_dir) + _meter_out_of_view(dirs),
                      present=(["nft table inet sockgate"] if nft.table_exists() else [])
                      + [f"segment meter (pins in {d})" for d in dirs])
    if result.blockers or check_only:
        return result
    if not result.present:
        # A teardown killed after the table went leaves sockgate's empty bpffs mounted
        # (review 10): the rerun takes it, or nothing.
        if _unmount_run_dir():
            result.present.append("the segment meter's empty pin root (a teardown cut short left it)")
            result.removed = True
        return result
    # The meter first: with the table gone and the meter still there, a container
    # attached meanwhile would be refused super-packets by a meter no table records.
    segment_meter.remove()
    nft.delete_table()
    _unmount_run_dir()
    result.removed = True
    return result


def _unmount_run_dir() -> bool:
    """The meter's emptied pin roots gone, and the run directory made for its lock, if
    nothing else is there. True when a pin root went."""
    from runtime.kernel import segment_meter
    if not segment_meter.unmount_if_unused():
        return False
    with contextlib.suppress(OSError):
        Path(defaults.RUN_DIR).rmdir()
    return True


def render(result: Teardown, check_only: bool) -> str:
    if result.blockers:
        head = ("cannot tear down" if not check_only else "could not tear down") + \
               f": {len(result.blockers)} thing(s) still need sockgate's table and meter here"
        return "\n".join([head, *(f"  - {b.detail}" for b in result.blockers)])
    if not result.present:
        return "nothing to remove: no sockgate table and no segment meter in this network namespace"
    verb = "would remove" if check_only else "removed"
    return "\n".join([f"{verb}:", *(f"  - {p}" for p in result.present)])
