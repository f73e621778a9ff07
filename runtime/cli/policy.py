"""`sockgate ranges …` and `sockgate policy …`: the operator's handles on the egress
policy of this node (run them in the netns the CNI plugin runs in: the node's)."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from runtime import defaults
from runtime.cli.commands import command, group
from runtime.errors import INVALID_CONFIG, SockgateError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default=defaults.POLICY_FILE,
                   help="policy file (JSON; missing = the default contract) (default: %(default)s)")
    p.add_argument("--state-dir", default=defaults.STATE_DIR,
                   help="where the Google ranges cache lives (default: %(default)s)")


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")


def _ranges_update(args: argparse.Namespace) -> int:
    from runtime.core import policy, ranges
    cache = ranges.update_ranges(policy.load_policy(args.policy), args.state_dir)
    if args.json:
        print(json.dumps({"cache": str(ranges.ranges_cache(args.state_dir)), "ipv4": len(cache["ipv4"]),
                          "ipv6": len(cache["ipv6"]), "updated": cache["updated"], "sources": cache["sources"]}))
        return 0
    print(f"Google ranges (goog.json minus cloud.json): {len(cache['ipv4'])} IPv4 and "
          f"{len(cache['ipv6'])} IPv6 CIDRs, cached in {ranges.ranges_cache(args.state_dir)}")
    for name, src in cache["sources"].items():
        print(f"  {name}: {src['source']} (creationTime {src['creationTime']})")
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    from runtime.core import policy
    # The agent and `policy apply` take a missing file for the default contract; here
    # the file is what was asked about, and "valid" would hide a wrong path.
    if not Path(args.policy).exists():
        raise SockgateError(INVALID_CONFIG, f"no policy file {args.policy}",
                            "nothing to check (without a file, the agent and `policy apply` use the default contract)")
    p = policy.load_policy(args.policy)
    if args.json:
        print(json.dumps({"policy": args.policy, "valid": True, "blocked_ranges": len(p.blocked),
                          "blocked_ports": len(p.blocked_ports), "exceptions": len(p.allows),
                          "ingress_rules": len(p.ingress)}))
        return 0
    print(f"{args.policy}: valid; {len(p.blocked)} blocked ranges before Google's, "
          f"{len(p.blocked_ports)} blocked ports, {len(p.allows)} exceptions, {len(p.ingress)} ingress rules")
    return 0


def _policy_apply(args: argparse.Namespace) -> int:
    from netpolicy.ruleset import revision
    from runtime.core import table
    from runtime.core.node import Node
    compiled = table.apply(Node.open(), args.policy, args.state_dir)
    if args.json:
        print(json.dumps({"table": "inet sockgate", "revision": revision(compiled.egress),
                          "blocked_ranges": len(compiled.blocked)}))
        return 0
    print(f"policy applied: table inet sockgate, revision {revision(compiled.egress)}, "
          f"{len(compiled.blocked)} merged blocked ranges")
    return 0


def _node_addresses() -> tuple[str, ...]:
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return tuple(a.get("IFA_ADDRESS") for a in ipr.get_addr())


def _policy_explain(args: argparse.Namespace) -> int:
    from netpolicy.compile import explain
    from runtime.core import policy
    from runtime.fsutil import read_json
    from runtime.kernel import nft
    try:
        ipaddress.ip_address(args.destination)
    except ValueError:
        raise SockgateError(7, f"destination {args.destination!r} is not an IP address",
                            "exceptions by hostname are matched by their resolved addresses") from None
    compiled = policy.compiled(args.policy, args.state_dir)
    pools = tuple(ipaddress.ip_network(p) for p in (args.pool or nft.prefixes("pools4") + nft.prefixes("pools6")))
    record = read_json(policy.resolved_record(args.state_dir)) or {}
    resolved, notes = _resolved_for(record, args.destination, f"{args.protocol}/{args.port}")
    verdict = explain(compiled, args.destination, args.port, args.protocol, resolved=resolved,
                      pools=pools, node_addresses=_node_addresses())
    if args.json:
        print(json.dumps({"destination": args.destination, "port": args.port, "protocol": args.protocol,
                          **asdict(verdict), "notes": notes}))
    else:
        print(verdict)
        for note in notes:
            print(f"  note: {note}")
    return 0 if verdict.verdict == "accept" else 3


def _resolved_for(record: dict, destination: str, port: str) -> tuple[dict[str, list[str]], list[str]]:
    """resolved.json as explain() takes it ({hostname: [addresses]}), for one
    protocol/port: an answer that one exception of a hostname dropped may be open
    through another of its exceptions, on other ports. Plus a note for each hostname
    whose answer `destination` was and that opened nothing here."""
    from runtime.agent.resolver import DROPPED_KEY
    dropped = record.get(DROPPED_KEY) or {}
    dst = ipaddress.ip_address(destination)
    resolved: dict[str, list[str]] = {}
    notes = []
    for host, addrs in record.items():
        if host == DROPPED_KEY or not isinstance(addrs, list):
            continue
        closed = {ipaddress.ip_address(d["address"]) for d in dropped.get(host, []) if port in d.get("closed", [])}
        resolved[host] = [a for a in addrs if ipaddress.ip_address(a) not in closed]
    for host, drops in dropped.items():
        for d in drops:
            if ipaddress.ip_address(d["address"]) == dst:
                notes.append(f"{dst} was an answer for {host}, dropped (not opened on "
                             f"{', '.join(d['closed'])}): {d['why']}")
    return resolved, notes


def _policy_refresh(args: argparse.Namespace) -> int:
    from runtime.agent.resolver import Refresher
    from runtime.core import policy
    if args.json and not args.once:
        print("sockgate policy refresh: error: --json needs --once (it prints the one round's results)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    refresher = Refresher(policy.load_policy(args.policy), policy.resolved_record(args.state_dir))
    if args.once:
        results = refresher.refresh_due()
        if args.json:
            print(json.dumps({"hostnames": [
                {"host": r.host, "addresses": list(r.addresses), "ttl": r.ttl, "error": r.error or None,
                 "dropped": [asdict(d) for d in r.dropped]} for r in results]}))
            return 1 if any(r.error for r in results) else 0
        for r in results:
            print(f"{r.host}: {', '.join(r.addresses) or '-'} ttl {r.ttl}s" + (f" ERROR {r.error}" if r.error else ""))
            for d in r.dropped:
                print(f"  dropped {d.address} (not opened on {', '.join(d.closed)}): {d.why}")
        return 1 if any(r.error for r in results) else 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    refresher.run(stop)
    return 0


def add_policy_commands(sub: argparse._SubParsersAction) -> None:
    ranges = group(sub, "ranges", help="Google IP ranges (goog.json minus cloud.json)")
    u = command(ranges, "update", _ranges_update,
                    help="load goog.json and cloud.json, cache goog minus cloud",
                    description="Load goog.json and cloud.json from the URLs or paths in the "
                                "policy file (googleRanges), compute goog minus cloud and cache it "
                                "under STATE_DIR/ranges/google.json. The plugin reads only the cache. "
                                "Run `sockgate policy apply` afterwards to load the new ranges.")
    _common(u)
    _json_flag(u)

    policy = group(sub, "policy", help="check, apply, explain and refresh the egress policy")
    c = command(policy, "check", _policy_check, help="validate a policy file",
                description="Validate a policy file; errors name the offending field, and a missing "
                            "file is an error (the agent would run the default contract). Changes "
                            "nothing. Exit status 0 when valid, 1 otherwise.")
    _common(c)
    _json_flag(c)
    a = command(policy, "apply", _policy_apply, help="compile and load the policy in one nft transaction",
                description="Compile the policy and load it into table inet sockgate in one "
                            "atomic transaction. An invalid policy changes nothing; established "
                            "flows that the new policy allows keep going. A missing file applies "
                            "the default contract.")
    _common(a)
    _json_flag(a)
    e = command(policy, "explain", _policy_explain,
                help="the verdict for a destination, and the rule that decides it",
                description="Print ACCEPT or REFUSE for a new flow from a container to "
                            "DESTINATION:PORT, with the deciding rule. Exit status 0 for accept, "
                            "3 for refuse.")
    e.add_argument("destination", help="IPv4 or IPv6 address")
    e.add_argument("port", type=int)
    e.add_argument("protocol", choices=("tcp", "udp"))
    e.add_argument("--pool", action="append", help="container pool CIDR (default: the pools in the loaded table)")
    _common(e)
    _json_flag(e)
    r = command(policy, "refresh", _policy_refresh,
                help="resolve exception hostnames and keep their addresses current",
                description="Resolve the exceptions' hostnames (A and AAAA) through the "
                            "policy's resolver, and keep their addresses in the table with a "
                            "timeout of the DNS TTL (clamped to resolver.minTtl..maxTtl). An "
                            "answer in the node's internal networks (blocked ranges other than "
                            "Google's, container pools, the node's addresses, links and "
                            "gateways) opens nothing unless the exception's allowedAnswers "
                            "holds it. Runs until SIGTERM, or once with --once (exit status 1 "
                            "if a lookup failed).")
    r.add_argument("--once", action="store_true", help="resolve every hostname once and exit")
    r.add_argument("--json", action="store_true", help="with --once: print the results as one JSON document")
    _common(r)
