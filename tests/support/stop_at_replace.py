"""Stop a process in the middle of an atomic write, so a test can kill it right there.

`install(name, nth)` makes the process SIGSTOP itself at the nth os.replace whose
target is called `name`: the temp file is written (and, with runtime.fsutil, locked)
but not yet renamed, the very moment a `kill -9` leaves a temp file behind. The test
then looks at the files (the stopped writer is alive: its temp file must stay), and
SIGKILLs or SIGCONTs it. No hook in the code under test: only os.replace is wrapped.

As a wrapper around a module (the agent):
    python -m tests.support.stop_at_replace NAME NTH MODULE [ARG...]
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def install(name: str, nth: int = 1) -> None:
    real = os.replace
    seen = 0

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal seen
        if os.path.basename(os.fspath(dst)) == name:
            seen += 1
            if seen == nth:
                # To this thread: it takes the signal itself on its way out of the
                # syscall, so it can't run on into the rename (a signal sent to the
                # process may be taken by another thread while this one continues).
                # Every thread of the process stops.
                signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        real(src, dst, *args, **kwargs)

    os.replace = replace


def state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("T": stopped by a signal; "" when gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat[stat.rindex(")") + 2]


def wait_stopped(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := state(pid)) != "T":
        if now in ("", "Z", "X") or time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop at the write (state {now!r})")
        time.sleep(0.02)


def main() -> None:
    name, nth, module, *args = sys.argv[1:]
    install(name, int(nth))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
