"""A `sockgate agent` run inside the lab's node netns: what the tests (tests/conftest.py
AgentProcess) and `sockgate demo` start so that the CNI executable forwards to it and
the background work (exception hostnames, idle reclaim, billing, events) runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Sequence

from runtime.lab.builder import Lab


def wait_until_ready(proc: subprocess.Popen, ready: Path, log: Path, timeout: float) -> None:
    """Until an agent wrote its ready file; its log's tail in the error if it died or
    took longer than timeout seconds."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            raise RuntimeError(f"agent did not get ready: {tail}")
        time.sleep(0.05)


def log_entries(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The agent's JSON log entries among `lines` (stderr also carries what isn't JSON:
    a traceback, a line cut short by a kill)."""
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            yield entry


class LabAgent:
    """`sockgate agent` for one state dir, run dir and policy file, in the node netns.
    The lab kills it at teardown like anything it started, so an error between start()
    and stop() leaves no agent behind."""

    def __init__(self, lab: Lab, state_dir: str, run_dir: str, policy_file: str, tmp: Path,
                 extra_args: Sequence[str] = (), *, die_with_parent: bool = False) -> None:
        self.lab = lab
        self.die_with_parent = die_with_parent
        self.state_dir, self.run_dir, self.policy_file = state_dir, run_dir, policy_file
        self.extra_args = tuple(extra_args)
        self.log = tmp / "agent.log"
        self.ready = tmp / "agent.ready"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> LabAgent:
        self.ready.unlink(missing_ok=True)
        self.proc = self.lab.popen(self.lab.node, [sys.executable, "-m", "runtime.cli.main", "agent",
                                                   "--state-dir", self.state_dir, "--run-dir", self.run_dir,
                                                   "--policy", self.policy_file, "--ready-file", str(self.ready),
                                                   *self.extra_args],
                                   log=self.log, die_with_parent=self.die_with_parent)
        wait_until_ready(self.proc, self.ready, self.log, timeout)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal it and wait; its exit status (negative: killed by that signal)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.kill(self.proc.pid, sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL if still running (the error path: nothing left to wait for)."""
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""
