"""One CNI invocation in this process: environment + stdin in, (exit code, stdout) out.

The agent serves forwarded requests with `execute`; the CNI executable calls it when
no agent answers, and asks this module for its error replies. Importing it loads only
the stdlib and the request model: the handlers (pyroute2) are imported on the first
command that needs them, so VERSION stays cheap.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Mapping

from runtime.cni.request import error_version, parse_request, version_reply
from runtime.errors import INTERNAL, TRY_AGAIN_LATER, SockgateError

if TYPE_CHECKING:
    from runtime.core.node import Node


def error_reply(config: object, err: SockgateError) -> tuple[int, str]:
    return 1, json.dumps(err.to_cni(error_version(config)))


def execute(env: Mapping[str, str], stdin: bytes, node: Node | None = None) -> tuple[int, str]:
    """Handle one CNI request: never raises, never a traceback on stdout. `node`: the
    agent's runtime.core.node.Node; in-process, the handler opens one."""
    import logging  # here: the shim's error replies need none of it
    log = logging.getLogger("sockgate.cni")
    config: object = None
    try:
        try:
            config = json.loads(stdin or b"{}")
        except ValueError:
            pass
        req = parse_request(env, stdin)
        if req.command == "VERSION":  # podman asks at every start: answer it cheaply
            return 0, json.dumps(version_reply(req))
        from runtime.cni.handlers import handle  # deferred: pulls in pyroute2
        out = handle(req, node)
        return 0, json.dumps(out) if out is not None else ""
    except SockgateError as exc:
        log.warning("%s failed: %s", env.get("CNI_COMMAND", "?"), exc)
        return error_reply(config, exc)
    except Exception as exc:  # never a traceback on stdout
        log.exception("internal error")
        return error_reply(config, SockgateError(INTERNAL, "internal error in sockgate",
                                                 f"{type(exc).__name__}: {exc}"))


def agent_did_not_answer(config: object, exc: Exception) -> tuple[int, str]:
    """The request was sent to the agent but its reply broke: the runtime must retry."""
    return error_reply(config, SockgateError(TRY_AGAIN_LATER, "the sockgate agent did not answer",
                                             f"{type(exc).__name__}: {exc}"))


def unexpected(exc: BaseException) -> tuple[int, str]:
    """A failure nothing else caught, as a CNI error: the runtime reads stdout as a
    result or an error, never a traceback."""
    if isinstance(exc, KeyboardInterrupt):
        err = SockgateError(TRY_AGAIN_LATER, "the sockgate plugin was interrupted", "SIGINT")
    else:
        err = SockgateError(INTERNAL, "internal error in sockgate", f"{type(exc).__name__}: {exc}")
    return error_reply(None, err)
