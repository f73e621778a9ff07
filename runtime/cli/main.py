"""The `sockgate` command."""
from __future__ import annotations

import argparse
import json
import os
import sys

from runtime import defaults
from runtime.cli.billing import add_billing_commands
from runtime.cli.commands import at_least_one, command, seconds, seconds_or_never
from runtime.cli.events import add_events_commands
from runtime.cli.install import install_cni
from runtime.cli.ops import add_ops_commands
from runtime.cli.policy import add_policy_commands
from runtime.cli.seccomp import add_seccomp_commands
from runtime.errors import SockgateError
from runtime.version import version


def _install_cni(args: argparse.Namespace) -> int:
    from runtime.cli.install import PYTHON_LAUNCHER, NotBuilt, compiled_available
    try:
        path = install_cni(args.bin_dir, shim=args.shim)
    except NotBuilt as exc:
        print(f"sockgate install-cni: error: {exc}", file=sys.stderr)
        return 1
    if args.shim == "python" or not compiled_available():
        if args.shim == "auto":
            print("sockgate install-cni: the compiled CNI executable is not built (run scripts/build-shim, "
                  "which needs musl-tools); installing the Python launcher instead, which runs this "
                  "installation's Python for every CNI call", file=sys.stderr)
        print(f"installed CNI plugin at {path} (Python launcher)")
    else:
        print(f"installed CNI plugin at {path} (compiled), with {PYTHON_LAUNCHER} beside it for when no "
              f"agent runs")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from runtime.cli.demo import run_demo
    return run_demo(json_output=args.json)


def _agent(args: argparse.Namespace) -> int:
    from runtime.agent.closing_trim import ClosingTrim
    from runtime.agent.conntrack_budget import BudgetWatch
    from runtime.agent.policy_watch import PolicyKeeper
    from runtime.agent.reclaim import Reclaimer
    from runtime.agent.service import AgentConfig, run_agent, setup_logging
    from runtime.agent.sweep import AttachmentSweep
    from runtime.billing.flush import BillingFlusher
    from runtime.core.node import Node, link_reaper
    setup_logging()
    reaper = link_reaper(args.run_dir, args.state_dir)
    cfg = AgentConfig(state_dir=args.state_dir, run_dir=args.run_dir, policy_file=args.policy,
                      ready_file=args.ready_file, metrics_address=args.metrics_address,
                      docker_socket=args.docker_socket, docker_host=args.docker_host, node=Node.open(reaper))
    cfg.components.append(("policy", lambda c: PolicyKeeper(c.node, c.policy_file, c.state_dir,
                                                            check_every=args.table_check_interval)))
    cfg.components.append(("reaper", lambda c: reaper))
    cfg.components.append(("conntrack", lambda c: BudgetWatch(c.policy_file, c.state_dir,
                                                              policies=c.node.policies)))
    cfg.components.append(("closing", lambda c: ClosingTrim(c.policy_file, c.state_dir,
                                                            every=args.closing_trim_interval,
                                                            policies=c.node.policies)))
    cfg.components.append(("billing", lambda c: BillingFlusher(c.state_dir, interval=args.billing_interval)))
    reclaimer = Reclaimer(args.state_dir, nudge_interval=args.reclaim_nudge,
                          sweep_interval=args.reclaim_sweep_interval, rcvbuf=args.reclaim_rcvbuf)
    cfg.components.append(("reclaim", lambda c: reclaimer))
    cfg.components.append(("sweep", lambda c: AttachmentSweep(c.node, c.state_dir, c.run_dir, c.policy_file,
                                                              interval=args.sweep_interval)))
    events = _events_watch(cfg, args)
    cfg.components.append(("events", lambda c: events))
    return run_agent(cfg, reclaims=reclaimer.counts, events=events)


def _events_watch(cfg, args: argparse.Namespace):
    from runtime.agent.events import EventsWatch
    from runtime.kernel import nft
    return EventsWatch(cfg.state_dir, policy=lambda: cfg.node.policies.get(cfg.policy_file, cfg.state_dir),
                       pools=lambda: nft.prefixes("pools4") + nft.prefixes("pools6"),
                       max_bytes=args.events_max_bytes, keep=args.events_keep)


def _lab_cleanup(args: argparse.Namespace) -> int:
    from runtime.lab import Lab
    removed = Lab.cleanup_stale()
    if args.json:
        print(json.dumps({"removed": removed}))
        return 0
    print(f"removed {len(removed)} stale lab namespace(s)" + (": " + ", ".join(removed) if removed else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sockgate",
        description="Outbound-only socket sandbox for containers: egress-only NAT, an "
                    "nftables egress policy, idle-socket reclaim and outgoing-byte billing, "
                    "through a CNI plugin and a Docker network driver served by one node agent. "
                    "`sockgate COMMAND --help` explains each command.")
    parser.add_argument("--version", action="version", version=f"sockgate {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = command(sub, "install-cni", _install_cni, help="install the CNI executable into a CNI bin dir",
                description="Write the `sockgate` CNI executable into BIN_DIR, atomically: the "
                            "compiled forwarder (static, needs no Python on the node while the agent "
                            "runs) with `sockgate-python` beside it, this installation's launcher, "
                            "which handles requests when no agent answers; or, with --shim python or "
                            "when the compiled one isn't built, the launcher alone.")
    p.add_argument("--bin-dir", default="/opt/cni/bin",
                   help="CNI plugin directory (default: %(default)s)")
    p.add_argument("--shim", choices=("auto", "compiled", "python"), default="auto",
                   help="auto: compiled when built (scripts/build-shim), else python (default: %(default)s)")

    p = command(sub, "agent", _agent, help="run the node agent (foreground)",
                description="Serve CNI requests forwarded by the `sockgate` CNI executable on "
                            "RUN_DIR/agent.sock (root only), load and keep the egress policy "
                            "(re-applied when the policy file changes), keep exception hostnames "
                            "resolved. Logs JSON lines on stderr; signals readiness with sd_notify "
                            "and --ready-file; SIGTERM finishes requests in flight and exits 0. "
                            "Networks whose CNI config names another runDir are not served.")
    p.add_argument("--state-dir", default=defaults.STATE_DIR, help="state dir (default: %(default)s)")
    p.add_argument("--run-dir", default=defaults.RUN_DIR,
                   help="runtime dir; must match the CNI config's runDir (default: %(default)s)")
    p.add_argument("--policy", default=defaults.POLICY_FILE, help="policy file (default: %(default)s)")
    p.add_argument("--ready-file", default="", help="write the agent's pid here once it serves requests")
    p.add_argument("--billing-interval", type=float, default=60.0,
                   help="seconds between billing records; one more at shutdown (default: %(default)s)")
    p.add_argument("--reclaim-nudge", type=float, default=0.0,
                   help="seconds between conntrack walks that make the kernel evict expired flows "
                        "promptly; 0 leaves it to the kernel's GC, which may take up to 60 s longer "
                        "(default: %(default)s)")
    p.add_argument("--reclaim-sweep-interval", type=seconds, default=300.0, metavar="SECONDS",
                   help="seconds between sweeps for idle flows whose conntrack event was lost (a sweep "
                        "also runs at start and right after lost events); keep it well below the "
                        "policy's idleTimeout (the agent warns otherwise), or an expired UDP flow whose "
                        "event was lost can escape reclaim (default: %(default)s)")
    p.add_argument("--closing-trim-interval", type=seconds_or_never, default=30.0, metavar="SECONDS",
                   help="seconds between looks at the containers' closing TCP conntrack entries (TIME_WAIT, "
                        "CLOSE): a container holding more than its new-flow rate leaves behind keeps them "
                        "alive by sending on them, and they are deleted; so are the entries of addresses no "
                        "container holds any more (a deleted container's flows); 0: never (README \"Threat "
                        "model\"; default: %(default)s)")
    p.add_argument("--reclaim-rcvbuf", type=int, default=8 << 20, metavar="BYTES",
                   help="receive buffer for conntrack DESTROY events (default: %(default)s)")
    p.add_argument("--table-check-interval", type=seconds, default=2.0, metavar="SECONDS",
                   help="seconds between checks that the nft table is the one in force (reloaded if "
                        "not); a change announced by nf_tables (say, `nft flush ruleset`) is checked "
                        "at once anyway (default: %(default)s)")
    p.add_argument("--sweep-interval", type=seconds, default=60.0, metavar="SECONDS",
                   help="seconds between sweeps for attachments whose container vanished without a DEL "
                        "(its node-side veth is gone: netns deleted, node rebooted, runtime down); one "
                        "also runs at start. The Docker door sweeps its own every 5 s (default: %(default)s)")
    p.add_argument("--events-max-bytes", type=at_least_one, default=16 << 20, metavar="BYTES",
                   help="refused-flow events: size at which STATE_DIR/events/events.jsonl is rotated "
                        "(default: %(default)s)")
    p.add_argument("--events-keep", type=at_least_one, default=4, metavar="N",
                   help="refused-flow events: rotated files kept, events.jsonl.1 (newest) to .N "
                        "(default: %(default)s)")
    p.add_argument("--metrics-address", default=defaults.METRICS_ADDRESS,
                   help="Prometheus endpoint host:port, loopback by default; empty to disable "
                        "(default: %(default)s)")
    p.add_argument("--docker-socket", default="", metavar="PATH",
                   help="also serve Docker's remote network driver protocol on PATH (driver name: the "
                        "file name without .sock); production: /run/docker/plugins/sockgate.sock "
                        "(default: off)")
    p.add_argument("--docker-host", default=defaults.DOCKER_HOST, metavar="URL",
                   help="dockerd's API, asked in the background which container owns an endpoint "
                        "(default: %(default)s)")

    p = command(sub, "demo", _demo, help="show the whole contract on a throwaway lab (needs root)",
                description="Build the lab (node, internet and app network namespaces; nothing leaves "
                            "them), start the node agent in it, attach two containers through the CNI "
                            "executable, and show what they can and cannot reach: the core (egress only), "
                            "the egress policy with the refused-flow event of each refusal, idle reclaim "
                            "and the billing report; then tear everything down. Progress goes to stderr, "
                            "the tables to stdout. Exit code 0 when every check is as expected, 1 if not.")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (every row with its event, the billing report) instead of tables")
    p = command(sub, "lab-cleanup", _lab_cleanup, help="remove lab namespaces left by crashed runs",
                description="Delete lab network namespaces whose creating process is dead. "
                            "Touches only namespaces carrying the lab's name prefix.")
    p.add_argument("--json", action="store_true", help="print the removed namespaces as JSON")
    add_policy_commands(sub)
    add_seccomp_commands(sub)
    add_billing_commands(sub)
    add_ops_commands(sub)
    add_events_commands(sub)
    return parser


def _os_error(exc: OSError) -> str:
    """An OSError as one line: what failed on which file, without Python's "[Errno N]"."""
    what = exc.strerror or str(exc)
    if exc.filename is None:
        return what
    return f"{what}: {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")


def run_guarded(args: argparse.Namespace) -> int:
    """Runs the command; the errors a user can act on are one line on stderr and exit
    status 1, never a traceback: ours (SockgateError) and the system's (OSError: a
    missing file, a permission, a full disk). Both name the command, as argparse's
    usage errors do."""
    name = " ".join(n for n in (args.command, getattr(args, f"{args.command}_command", None)) if n)
    try:
        rc = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader gone is then caught below
        return rc
    except SockgateError as exc:
        print(f"sockgate {name}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`sockgate ... | head`): nothing to say to it. stdout is
        # pointed at /dev/null so that the interpreter's flush at exit can't fail again
        # (what Python's documentation of SIGPIPE advises).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        print(f"sockgate {name}: error: {_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    return run_guarded(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
