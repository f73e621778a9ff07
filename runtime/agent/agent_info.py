"""RUN_DIR/agent.json: who the running agent is (pid, version, start time, its
options), written once it serves requests and removed when it stops, for `sockgate
status`. A file and not a request on the socket: status reads it whether or not the
agent answers, and says "down" with what the file left by a killed agent names.
Whether the agent is up is decided by its socket answering, never by this file."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from runtime.fsutil import atomic_write_json, read_json, remove
from runtime.version import version

INFO_FILE = "agent.json"


def info_path(run_dir: str) -> Path:
    return Path(run_dir) / INFO_FILE


def write(run_dir: str, **options: Any) -> dict[str, Any]:
    """The running agent's record: pid (in the agent's pid namespace), version, start
    time (UTC), and `options` (paths and settings an operator asks about)."""
    info = {"pid": os.getpid(), "version": version(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **options}
    # Not durable: /run does not outlive the node, nor does the agent.
    atomic_write_json(info_path(run_dir), info, durable=False)
    return info


def read(run_dir: str) -> dict[str, Any] | None:
    """The record, or None when there is none (or it is not one)."""
    try:
        data = read_json(info_path(run_dir))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def clear(run_dir: str) -> None:
    remove(info_path(run_dir))
