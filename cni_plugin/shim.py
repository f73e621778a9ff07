"""The `sockgate` CNI executable: environment + stdin in, result or error JSON out.

Stdlib only until the request is known to be valid: a malformed call is answered
without importing pyroute2. Nothing but the result or error JSON is ever written to
stdout; logs go to the configured logFile, else stderr.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Mapping

from cni_plugin.request import CNIRequest, error_version, parse_request
from runtime.errors import INTERNAL, SockgateError

log = logging.getLogger("sockgate.cni")


def _setup_logging(config: dict) -> None:
    path = config.get("logFile") if isinstance(config.get("logFile"), str) else ""
    handler: logging.Handler
    try:
        handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    except OSError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def dispatch(req: CNIRequest) -> dict | None:
    """Run the request in this process. (The agent's fast path plugs in here.)"""
    from runtime.cni import handle  # deferred: pulls in pyroute2
    return handle(req)


def run(env: Mapping[str, str], stdin: bytes) -> tuple[int, str]:
    """Returns (exit code, stdout text)."""
    config: object = None
    try:
        try:
            config = json.loads(stdin or b"{}")
        except ValueError:
            pass
        _setup_logging(config if isinstance(config, dict) else {})
        req = parse_request(env, stdin)
        log.debug("%s %s/%s netns=%s", req.command, req.container_id, req.ifname, req.netns)
        out = dispatch(req)
        return 0, json.dumps(out) if out is not None else ""
    except SockgateError as exc:
        log.warning("%s failed: %s", env.get("CNI_COMMAND", "?"), exc)
        return 1, json.dumps(exc.to_cni(error_version(config)))
    except Exception as exc:  # never a traceback on stdout
        log.exception("internal error")
        err = SockgateError(INTERNAL, "internal error in sockgate", f"{type(exc).__name__}: {exc}")
        return 1, json.dumps(err.to_cni(error_version(config)))


def main() -> int:
    code, out = run(os.environ, sys.stdin.buffer.read())
    if out:
        sys.stdout.write(out + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
