"""`sockgate billing …`: sum the billing ledger, and flush the counters into it (run
`flush` in the node's netns: it reads the nft counters there)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from dataclasses import asdict

from runtime import defaults
from runtime.cli.commands import command, group
from runtime.errors import INVALID_CONFIG, SockgateError

DEFAULT_BILLING_DIR = f"{defaults.STATE_DIR}/billing"


def _time(text: str):
    from runtime.billing.schema import parse_time
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from runtime.billing.ledger import Ledger
    from runtime.billing.report import format_report, report
    if not Path(args.dir).is_dir():
        raise SockgateError(INVALID_CONFIG, f"no billing directory {args.dir}")
    rows, dups = report(Ledger(args.dir).records(), by=args.by, since=args.since, until=args.until)
    if args.json:
        print(json.dumps({"by": args.by, "rows": [asdict(r) for r in rows], "duplicates_ignored": dups}))
    else:
        print(format_report(rows, args.by))
        if dups:
            print(f"warning: {dups} duplicate record(s) ignored")
    return 0


def _flush(args: argparse.Namespace) -> int:
    from runtime.billing.flush import BillingFlusher
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flusher = BillingFlusher(args.state_dir, args.dir, args.every or 60.0, max_bytes=args.max_bytes)
    if not args.every:
        written = flusher.flush()
        print(f"{len(written)} billing record(s) written to {flusher.ledger.dir}")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    flusher.run(stop)
    return 1 if flusher.errors else 0


def add_billing_commands(sub: argparse._SubParsersAction) -> None:
    from runtime.billing.ledger import DEFAULT_MAX_BYTES
    from runtime.billing.report import GROUPINGS
    billing = group(sub, "billing", help="the billing ledger (JSON Lines): report and flush")

    r = command(billing, "report", _report,
                help="sum billed bytes and packets per pod, container or attachment",
                description="Read every billing file in DIR (rotated ones included) and print "
                            "the sums of tx/rx bytes and packets per group. --since/--until select "
                            "records by the end of their interval (ISO 8601; no zone means UTC).")
    r.add_argument("--dir", default=DEFAULT_BILLING_DIR, help="billing directory (default: %(default)s)")
    r.add_argument("--since", type=_time, help="only records whose interval ends after this time")
    r.add_argument("--until", type=_time, help="only records whose interval ends at or before this time")
    r.add_argument("--by", choices=GROUPINGS, default="pod",
                   help="pod: namespace/name (else the Docker container name, else the container id); "
                        "container: container id; attachment: one line per attachment (default: %(default)s)")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")

    f = command(billing, "flush", _flush,
                help="append a record for every attachment whose counters moved",
                description="Read the accounting counters (run it in the node's netns) and append "
                            "one record per attachment of STATE_DIR whose counters moved since its "
                            "last record. With --every, keep doing so every N seconds until "
                            "SIGTERM, and once more at exit (what the node agent does).")
    f.add_argument("--state-dir", default=defaults.STATE_DIR, help="sockgate state dir (default: %(default)s)")
    f.add_argument("--dir", default=None, help="billing directory (default: STATE_DIR/billing)")
    f.add_argument("--every", type=float, default=0, metavar="SECONDS", help="flush periodically")
    f.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help="rotate billing.jsonl before it grows past this size (default: %(default)s)")
