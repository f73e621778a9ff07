"""`scripts/bench-cni`: its command line, dispatching to the fixed-size benchmark
(runtime/bench/cni.py) or the one against N attached containers (cni_scale.py)."""
from __future__ import annotations

import argparse
import json
import sys

from runtime.bench import cni_scale, report
from runtime.bench.cni import LABELS, REFERENCE, SG_AGENT, SG_INPROC, SG_PY_AGENT, TARGETS, print_report, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench-cni",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""\
Measure the latency of CNI ADD and DEL as a runtime sees it (p50, p90), for

  {LABELS[SG_AGENT]:<36} the compiled sockgate CNI executable with `sockgate agent` running
  {LABELS[SG_PY_AGENT]:<36} the Python launcher (install-cni --shim python), the same agent
  {LABELS[SG_INPROC]:<36} the compiled executable and config, no agent (it execs the
  {"":<36} Python launcher beside it: in-process)
  {LABELS[REFERENCE]:<36} Debian's containernetworking-plugins chain (/usr/lib/cni)

each over --containers containers, one at a time and with --parallel workers, all in
the same run (scenarios interleaved). Prints the ratios sockgate/reference of ADD
p50 and DEL p50 (target for the compiled executable with the agent: ADD <= {TARGETS["ADD"]},
DEL <= {TARGETS["DEL"]}). Plugins are exec'd like a runtime does (CNI_* env, config on
stdin, libcni-style chaining) inside a throwaway lab's node netns: the host's netns,
iptables/nftables, /etc/cni, /opt/cni and /var/lib/cni are never touched, and
everything is torn down at the end, also on
errors. Needs root.""",
        epilog="""\
Exit status: 0 once measured, whatever the ratios (it is a benchmark); 1 when it
could not measure; 2 on bad usage. Progress goes to stderr, the report (or --json)
to stdout. Takes about 2 minutes with the defaults on 2 CPUs.""")
    p.add_argument("--containers", type=int, default=50, help="containers per scenario (default %(default)s)")
    p.add_argument("--parallel", type=int, default=8, help="workers in the parallel scenarios (default %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat all eight scenarios, rotating the plugin order; samples are pooled "
                        "(default %(default)s)")
    report.add_json_flag(p)
    p.add_argument("--attached", type=int, default=0, metavar="N",
                   help="instead of the scenarios above: sockgate+agent ADD and DEL latency with 10 and with N "
                        "containers attached to the node (each with its netns, attached through the same agent), "
                        "blocks of the two alternating (--rounds 2: 10, N, N, 10); prints the ratios at N / at 10 "
                        "(target <= 1.2). With --containers 30 --parallel 4 --rounds 2 and N=1000 about 5 minutes")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = report.parse_args(parser, argv, {"containers": 1, "parallel": 1, "rounds": 1},
                             "--containers, --parallel and --rounds must be >= 1")
    if args.containers > 9999:
        parser.error("--containers must be <= 9999")
    if args.attached and not 10 < args.attached <= 20000:
        parser.error("--attached must be more than 10 (the baseline) and at most 20000")
    if report.not_root("bench-cni"):
        return 2
    if args.attached:  # cni_scale prints its own report
        return report.measure("bench-cni", lambda: cni_scale.main(args))[1]
    rep, status = report.measure("bench-cni", lambda: run(args))
    if rep is None:
        return status
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_report(rep)
    return 0



if __name__ == "__main__":
    sys.exit(main())
