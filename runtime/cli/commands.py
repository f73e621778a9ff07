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


def count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text!r}")
    return value
