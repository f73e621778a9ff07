"""`sockgate status`, `sockgate doctor`, `sockgate gc`, `sockgate teardown`: the
operator's commands for a node (README "Operating a node"). Declared here, run from
runtime/cli/status.py, doctor.py, gc.py and teardown.py, imported when the command
runs. Run them in the node's netns."""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Callable

from runtime import defaults
from runtime.cli.commands import command, count, days

Command = Callable[[argparse.Namespace], int]


def _operator(func: Command) -> Command:
    """Says when not run as root: the socket, the table and the state dir are root's,
    and what can't be read would look absent. (Errors: runtime.cli.main.run_guarded.)"""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        if os.geteuid() != 0:
            print(f"sockgate {args.command}: warning: not running as root; the agent's socket, the nft table "
                  f"and the state dir may not be readable, and would then look absent", file=sys.stderr)
        return func(args)
    return run


def _paths(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=defaults.STATE_DIR, help="the agent's state dir (default: %(default)s)")
    p.add_argument("--run-dir", default=defaults.RUN_DIR, help="the agent's run dir (default: %(default)s)")
    p.add_argument("--policy", default=defaults.POLICY_FILE, help="the policy file (default: %(default)s)")


@_operator
def _status(args: argparse.Namespace) -> int:
    from runtime.cli import status
    st = status.gather(args.state_dir, args.run_dir, args.policy, args.cni_conf_dir, args.events)
    print(json.dumps(st.to_json()) if args.json else status.render(st))
    return 0


@_operator
def _doctor(args: argparse.Namespace) -> int:
    from runtime.cli import doctor
    cfg = doctor.DoctorConfig(state_dir=args.state_dir, run_dir=args.run_dir, policy_file=args.policy,
                              netns_dirs=tuple(args.netns_dir or doctor.PIN_DIRS),
                              expected_containers=args.expected_containers,
                              ranges_max_age=args.ranges_max_age * doctor.DAY)
    results = doctor.run_checks(cfg)
    print(json.dumps(doctor.to_json(results)) if args.json else doctor.render(results))
    return 0 if all(c.ok for c in results) else 1


@_operator
def _gc(args: argparse.Namespace) -> int:
    from runtime.cli import gc
    report = gc.run_gc(args.state_dir, args.run_dir, args.policy, network=args.network, force=args.force)
    print(json.dumps(report.to_json()) if args.json else gc.render(report))
    return 0


@_operator
def _teardown(args: argparse.Namespace) -> int:
    from runtime.cli import teardown
    result = teardown.teardown(args.state_dir, args.run_dir, check_only=args.check)
    print(json.dumps(result.to_json()) if args.json else teardown.render(result, args.check))
    return 1 if result.blockers else 0


def add_ops_commands(sub: argparse._SubParsersAction) -> None:
    p = command(sub, "status", _status, help="what sockgate is doing on this node",
                description="Print the agent (up or down; pid, version, uptime from RUN_DIR/agent.json), "
                            "the nft table's revision against the one the policy renders, the policy file "
                            "and the Google ranges cache with their ages, each network's pools and how "
                            "many addresses are leased, every attachment with its pod or container, "
                            "addresses, veth and counters (the ones billing reads), and the latest "
                            "refused flows from STATE_DIR/events. Reads only; works with the agent down. "
                            "Run it in the node's netns, as root.")
    _paths(p)
    p.add_argument("--cni-conf-dir", default="/etc/cni/net.d",
                   help="where the CNI configs naming the pools are; the Docker door's networks are read "
                        "from the state dir (default: %(default)s)")
    p.add_argument("--events", type=count, default=10, metavar="N",
                   help="how many recent refusals to show; 0: none (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")

    p = command(sub, "doctor", _doctor, help="check this node and say what to fix",
                description="Check what sockgate needs of this node: the agent answering, the nft "
                            "table loaded and current, every container veth recorded in STATE_DIR, "
                            "IPv4/IPv6 forwarding, conntrack events, nf_conntrack_max against the "
                            "containers' flow bounds, Docker's iptables "
                            "FORWARD policy and DOCKER-USER rules, iptables-legacy tables, the Google "
                            "ranges cache, the runtime's netns pins, stale lab namespaces. For each "
                            "failed check it says what is wrong and what to do. Reads only: changes "
                            "nothing. Exit status 0 when every check passes, 1 otherwise. Run it in the "
                            "node's netns (`nsenter --net=PATH sockgate doctor` for another one), as root.")
    _paths(p)
    p.add_argument("--netns-dir", action="append", metavar="DIR",
                   help="a directory where the runtime pins network namespaces, reported when no "
                        "attachment can be checked; repeat for several (default: " + ", ".join(
                            ("/run/netns", "/var/run/netns", "/run/containerd/io.containerd.grpc.v1.cri/netns"))
                        + ")")
    p.add_argument("--expected-containers", type=count, default=0, metavar="N",
                   help="check nf_conntrack_max for N containers at their flow bounds (say, kubelet's "
                        "--max-pods, 110 by default) instead of those attached now (default: attached now)")
    p.add_argument("--ranges-max-age", type=days, default=7.0, metavar="DAYS",
                   help="a ranges cache fetched from URLs longer ago than this is stale (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON document: {"ok": bool, "checks": [{name, ok, detail, fix}]}')

    p = command(sub, "gc", _gc, help="remove attachments whose container vanished, now",
                description="Remove the attachments whose container vanished without a DEL (their "
                            "node-side veth is gone: netns deleted, node rebooted, runtime down), with "
                            "their addresses, set elements and a final billing record, and what crashes "
                            "left: leases without a record, torn records, temp files of killed writers. "
                            "What the agent's sweep does every --sweep-interval; an attachment whose ADD "
                            "is under way is never touched. Prints what it removed. Run it in the node's "
                            "netns, as root.")
    _paths(p)
    p.add_argument("--network", metavar="NAME", help="only this network (default: every network)")
    p.add_argument("--force", action="store_true",
                   help="run even when no ready attachment's veth and no sockgate table exist here (after "
                        "a reboot); without it gc refuses, taking this for a netns other than the node's")
    p.add_argument("--json", action="store_true", help="print one JSON document")

    p = command(sub, "teardown", _teardown, help="remove sockgate's nft table and segment meter from this node",
                description="Remove what sockgate keeps in this network namespace's kernel once nothing "
                            "needs it: the nft table inet sockgate (its hooks see every packet of the node) "
                            "and the segment meter (BPF programs at netfilter hooks, kept by their pins "
                            "under /sys/fs/bpf/sockgate or /run/sockgate/bpf: they outlive any process "
                            "and any uninstall that only removes files). Refuses, changing nothing, while "
                            "the agent answers on RUN_DIR (it would load them again: stop it first) or "
                            "while a container is attached (a record in STATE_DIR, or a veth in "
                            "sockgate's interface group of any state dir): its packets would leave "
                            "unfiltered and unmasqueraded. Keeps the state dir (leases, billing), the "
                            "policy and the node's sysctls. What scripts/install-node.sh --uninstall runs "
                            "after stopping the agent. Exit status 0 when removed (or nothing was there), "
                            "1 when refused. Run it in the node's netns, as root.")
    p.add_argument("--state-dir", default=defaults.STATE_DIR, help="the agent's state dir (default: %(default)s)")
    p.add_argument("--run-dir", default=defaults.RUN_DIR, help="the agent's run dir (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="only say whether it could and what it would remove; change nothing (exit status 1 "
                        "when it couldn't)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON document: {"blockers": [{kind, detail}], "present": [...], "removed": bool} '
                        '(kind: agent, attachment, record or veth)')
