"""The `sockgate` CNI executable: environment + stdin in, result or error JSON out.

With a node agent listening on <runDir>/agent.sock the request is forwarded there
(the agent has pyroute2 loaded, the policy compiled and the table checked); without
one, the same handler runs in this process. The forwarding path imports only os,
sys and _socket (not even typing, nor json, which pulls in re): the launcher starts
Python with -S, and every millisecond of start-up is a millisecond of every
container's start. Nothing but the result or error JSON is
ever written to stdout; logs go to the configured logFile, else stderr.
"""
from __future__ import annotations

import os
import sys
import time

# The C module under `socket`: socket.py itself imports enum and selectors and builds
# IntEnums at import, ~14 ms of every container start on the development machine.
import _socket

from cni_plugin import wire

if False:  # for type checkers only: importing typing costs ~5 ms of every container start
    from typing import Mapping

    from runtime.errors import SockgateError
    from runtime.node import Node

AGENT_SOCKET = "agent.sock"
DEFAULT_RUN_DIR = "/run/sockgate"
# Long enough for an ADD under load; a hung agent must not hang the runtime forever.
AGENT_TIMEOUT_S = 120.0


def _full_environment() -> None:
    """The in-process path needs the installed packages (pyroute2, …): add the
    site-packages that -S left out."""
    if not sys.flags.no_site:
        return
    import site
    site.main()


def _setup_logging(config: dict) -> None:
    import logging

    class OneLine(logging.Formatter):
        """The runtime shows (or logs) the plugin's stderr: one line per record there,
        an exception as its type and message. A traceback goes to the logFile only."""

        def format(self, record: logging.LogRecord) -> str:
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                record = logging.makeLogRecord(dict(
                    record.__dict__, msg=f"{record.getMessage()} ({type(exc).__name__}: {exc})".replace("\n", " "),
                    args=None, exc_info=None, exc_text=None))
            return super().format(record)

    path = config.get("logFile") if isinstance(config.get("logFile"), str) else ""
    fmt = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    handler: logging.Handler | None = None
    if path:
        try:
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter(fmt))
        except OSError:
            pass
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLine(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _error(config: object, err: "SockgateError") -> tuple[int, str]:
    import json

    from cni_plugin.request import error_version
    return 1, json.dumps(err.to_cni(error_version(config)))


def execute(env: Mapping[str, str], stdin: bytes, node: Node | None = None) -> tuple[int, str]:
    """Handle one CNI request in this process: (exit code, stdout text). The agent
    serves forwarded requests with this same function, passing its runtime.node.Node."""
    import json
    import logging

    from cni_plugin.request import parse_request, version_reply
    from runtime.errors import INTERNAL, SockgateError
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
        from runtime.cni import handle  # deferred: pulls in pyroute2
        out = handle(req, node)
        return 0, json.dumps(out) if out is not None else ""
    except SockgateError as exc:
        log.warning("%s failed: %s", env.get("CNI_COMMAND", "?"), exc)
        return _error(config, exc)
    except Exception as exc:  # never a traceback on stdout
        log.exception("internal error")
        return _error(config, SockgateError(INTERNAL, "internal error in sockgate",
                                            f"{type(exc).__name__}: {exc}"))


def _config(stdin: bytes) -> object:
    import json
    try:
        return json.loads(stdin or b"{}")
    except ValueError:
        return None


def _agent_path(stdin: bytes) -> str:
    """The socket of the agent serving runDir. Any agent gives the same answer (it
    runs the request's own config), so a wrong guess costs speed, never correctness."""
    run_dir = wire.top_level_string(stdin, "runDir")
    if run_dir is None and b'"runDir"' in stdin:
        config = _config(stdin)
        run_dir = config.get("runDir") if isinstance(config, dict) else None
    return os.path.join(run_dir if isinstance(run_dir, str) and run_dir else DEFAULT_RUN_DIR, AGENT_SOCKET)


def forward(path: str, env: Mapping[str, str], stdin: bytes) -> tuple[int, str] | None:
    """Ask the agent. None when no agent listens (then the caller runs in-process).
    Once the request was sent, a broken reply is an error, never a silent retry: the
    agent may have done half an ADD, and the runtime must retry (code 11)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(AGENT_TIMEOUT_S)
    deadline = time.monotonic() + AGENT_TIMEOUT_S
    while True:
        try:
            sock.connect(path)
            break
        except BlockingIOError:
            # The agent's accept backlog is full: it is busy, not gone. (A unix socket
            # with a timeout fails such a connect with EAGAIN instead of waiting.)
            if time.monotonic() > deadline:
                sock.close()
                return None
            time.sleep(0.005)
        except OSError:
            # No agent there (ENOENT, ECONNREFUSED), or none this process can reach (EACCES,
            # a path too long for a unix socket): nothing was sent, in-process is safe.
            sock.close()
            return None
    try:
        sock.sendall(wire.encode_request(env, stdin))
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return wire.decode_reply(b"".join(chunks))
    except (OSError, ValueError) as exc:
        from runtime.errors import TRY_AGAIN_LATER, SockgateError
        return _error(_config(stdin), SockgateError(TRY_AGAIN_LATER, "the sockgate agent did not answer",
                                          f"{type(exc).__name__}: {exc}"))
    finally:
        sock.close()


def run(env: Mapping[str, str], stdin: bytes) -> tuple[int, str]:
    if env.get("CNI_COMMAND") != "VERSION":
        reply = forward(_agent_path(stdin), env, stdin)
        if reply is not None:
            return reply
    config = _config(stdin)
    _full_environment()
    _setup_logging(config if isinstance(config, dict) else {})
    return execute(env, stdin)


def _unexpected(exc: BaseException) -> tuple[int, str]:
    """A failure nothing else caught, as a CNI error: the runtime reads stdout as a
    result or an error, never a traceback."""
    from runtime.errors import INTERNAL, TRY_AGAIN_LATER, SockgateError
    if isinstance(exc, KeyboardInterrupt):
        err = SockgateError(TRY_AGAIN_LATER, "the sockgate plugin was interrupted", "SIGINT")
    else:
        err = SockgateError(INTERNAL, "internal error in sockgate", f"{type(exc).__name__}: {exc}")
    return _error(None, err)


def main() -> int:
    try:
        code, out = run(os.environ, sys.stdin.buffer.read())
    except (Exception, KeyboardInterrupt) as exc:
        code, out = _unexpected(exc)
    try:
        if out:
            sys.stdout.write(out + "\n")
        sys.stdout.flush()
    except OSError:
        # The runtime closed our stdout: nobody to tell. Point it at /dev/null so that
        # the interpreter's own flush at exit doesn't print the error instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return code or 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
