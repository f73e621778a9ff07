"""What every benchmark's command line and report share: the --json flag, the checks
and exit statuses around the measurement (2 not root, 130 Ctrl-C, another status when
it could not measure: one line on stderr, no traceback), and the report's first keys
(which benchmark, which lab, the machine it ran on)."""
from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")

JSON_HELP = "print the results as one JSON object instead of tables"


def add_json_flag(p: argparse.ArgumentParser, help: str = JSON_HELP) -> None:
    p.add_argument("--json", action="store_true", help=help)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, at_least: dict[str, int],
               message: str) -> argparse.Namespace:
    """The arguments, with argparse's error (exit 2) saying `message` when an option of
    `at_least` is below its minimum."""
    args = parser.parse_args(argv)
    if any(getattr(args, name) < least for name, least in at_least.items()):
        parser.error(message)
    return args


def not_root(name: str) -> bool:
    """True, said on stderr, when the benchmark cannot build its network namespaces."""
    if os.geteuid() == 0:
        return False
    print(f"{name}: needs root (it builds network namespaces)", file=sys.stderr)
    return True


def measure(name: str, run: Callable[[], R], could_not: int = 1) -> tuple[R | None, int]:
    """(what `run` returned, 0); or (None, the exit status) when it was interrupted (the
    lab is torn down by then) or failed."""
    try:
        return run(), 0
    except KeyboardInterrupt:
        print(f"{name}: interrupted; lab torn down", file=sys.stderr)
        return None, 130
    except Exception as exc:  # noqa: BLE001 -- a benchmark that could not measure
        print(f"{name}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None, could_not


def header(benchmark: str, lab: str) -> dict[str, Any]:
    """The report's first keys; the caller adds its own after them."""
    return {"benchmark": benchmark, "lab": lab, "cpus": os.cpu_count(), "kernel": platform.release()}


def pinning(cpus: tuple[int, int] | None) -> str:
    """CPUs (client, server) as the reports print them."""
    return "unpinned" if cpus is None else f"{cpus[0]},{cpus[1]}"
