"""The agent's stderr is JSON Lines whoever writes to it (README "The node agent"):
log records, uncaught exceptions in any thread, warnings, text a library prints there
itself (socketserver's handle_error does), a log call with bad arguments, and the
message of a SystemExit. Run in a child process: setup_logging replaces the process's
hooks and sys.stderr."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import logging, sys, threading, traceback, warnings
from runtime.agent.service import setup_logging
setup_logging()
logging.getLogger("t").info("plain record")
def boom():
    raise RuntimeError("thread went down")
t = threading.Thread(target=boom, name="worker"); t.start(); t.join()
warnings.warn("deprecated thing")
try:
    raise BrokenPipeError(32, "Broken pipe")
except OSError:
    traceback.print_exc()          # what socketserver's handle_error does
sys.stderr.write("half a line, ")
sys.stderr.write("then the rest\n")
logging.getLogger("t").info("%d items", "not a number")
raise SystemExit("agent refuses to start")
"""


def _child_stderr(code: str) -> tuple[int, list[dict]]:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout == ""
    entries = []
    for line in proc.stderr.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}\n{proc.stderr}") from None
    return proc.returncode, entries


def test_every_line_on_the_agents_stderr_is_json():
    rc, entries = _child_stderr(CHILD)
    assert rc == 1
    msgs = [e["msg"] for e in entries]
    assert "plain record" in msgs
    crash = next(e for e in entries if "uncaught exception in thread worker" in e["msg"])
    assert crash["level"] == "critical" and "RuntimeError: thread went down" in crash["exc"]
    assert any("deprecated thing" in m for m in msgs)
    # Text printed straight to stderr: one log line per line of it, none lost.
    stray = [e["msg"] for e in entries if e["logger"] == "sockgate.stderr"]
    assert "Traceback (most recent call last):" in stray and "BrokenPipeError: [Errno 32] Broken pipe" in stray
    assert "half a line, then the rest" in stray
    assert any("'%d items'" in m and "cannot format" in m for m in msgs)
    assert stray[-1] == "agent refuses to start"


def test_a_last_line_without_newline_is_not_lost():
    rc, entries = _child_stderr("import sys\nfrom runtime.agent.service import setup_logging\nsetup_logging()\n"
                                "sys.stderr.write('no newline at exit')\n")
    assert rc == 0 and [e["msg"] for e in entries] == ["no newline at exit"]
