"""The `sockgate` CNI executable: environment + stdin in, result or error JSON out.

With a node agent listening on <runDir>/agent.sock the request is forwarded there
(the agent has pyroute2 loaded, the policy compiled and the table checked); without
one, the same handler (runtime.cni.entry, this package's one import of the runtime
beyond runtime.wire) runs in this process. The forwarding path imports only os, sys,
runtime.wire and runtime.defaults (no typing, no json, which pulls in re, no
__future__): the launcher starts Python with -S, and every millisecond of start-up
is a millisecond of every container's start. Nothing but the result or error JSON is
ever written to stdout; logs go to the configured logFile, else stderr.
"""
import os
import sys

from runtime import defaults, wire

if False:  # for type checkers only: importing typing costs ~5 ms of every container start
    from types import ModuleType
    from typing import Mapping


def _runtime() -> "ModuleType":
    """The in-process side (runtime.cni.entry): imported only when no agent answered,
    or for an error reply."""
    from runtime.cni import entry
    return entry


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
    return wire.agent_socket(run_dir if isinstance(run_dir, str) and run_dir else defaults.RUN_DIR)


def forward(path: str, env: "Mapping[str, str]", stdin: bytes) -> "tuple[int, str] | None":
    """Ask the agent. None when no agent listens (then the caller runs in-process).
    Once the request was sent, a broken reply is an error, never a silent retry: the
    agent may have done half an ADD, and the runtime must retry (code 11)."""
    sock = wire.connect(path)
    if sock is None:
        return None
    try:
        return wire.exchange(sock, env, stdin)
    except (OSError, ValueError) as exc:
        return _runtime().agent_did_not_answer(_config(stdin), exc)
    finally:
        sock.close()


def run(env: "Mapping[str, str]", stdin: bytes) -> tuple[int, str]:
    if env.get("CNI_COMMAND") != "VERSION":
        reply = forward(_agent_path(stdin), env, stdin)
        if reply is not None:
            return reply
    config = _config(stdin)
    _full_environment()
    _setup_logging(config if isinstance(config, dict) else {})
    return _runtime().execute(env, stdin)


def main() -> int:
    try:
        code, out = run(os.environ, sys.stdin.buffer.read())
    except (Exception, KeyboardInterrupt) as exc:
        code, out = _runtime().unexpected(exc)
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
