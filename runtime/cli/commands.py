"""How `sockgate`'s subcommands are declared: a command runs one function (argparse's
`func` default, which runtime.cli.main calls), a group holds subcommands and requires
one of them (`sockgate policy check`)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def command(sub: argparse._SubParsersAction, name: str, func: Callable[[argparse.Namespace], int],
            **parser_args: Any) -> argparse.ArgumentParser:
    """The subcommand `name` of `sub`, running `func`; `parser_args` (help, description,
    ...) go to add_parser. The caller adds its arguments."""
    p = sub.add_parser(name, **parser_args)
    p.set_defaults(func=func)
    return p


def group(sub: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """The command `name` of `sub`, whose subcommands go to the returned object."""
    p = sub.add_parser(name, help=help)
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")


def bounded(convert: Callable[[str], Any], what: str, ok: Callable[[Any], bool],
            bound: str) -> Callable[[str], Any]:
    """An argparse type: `convert`ed text (else "expected WHAT"), for which `ok` holds
    (else "must be BOUND"), each error naming what was given."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None
        if not ok(value):  # written so that NaN fails too
            raise argparse.ArgumentTypeError(f"must be {bound}, not {text!r}")
        return value
    return parse


count = bounded(int, "a whole number", lambda v: v >= 0, "0 or more")
at_least_one = bounded(int, "a whole number", lambda v: v >= 1, "at least 1")
seconds = bounded(float, "a number of seconds", lambda v: v > 0, "more than 0")
seconds_or_never = bounded(float, "a number of seconds", lambda v: v >= 0, "0 (never) or more")
days = bounded(float, "a number of days", lambda v: v > 0, "more than 0")
