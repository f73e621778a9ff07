"""Bounded operations: Docker waits for a driver call with a timeout of its own and
retries, so a handler must answer within the driver's op_timeout whatever the kernel
or dockerd do. Each operation runs in its own thread; the handler waits at most the
timeout, and an operation that overruns goes on, told that nobody waits for its
answer (Op.abandoned)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Op:
    """One bounded operation: `fn(op)` runs in its own thread."""

    def __init__(self, fn: Callable[[Op], dict], name: str) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.abandoned = False
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._body, name=f"docker-{name}", daemon=True)

    def _body(self) -> None:
        try:
            self.result = self.fn(self)
        except BaseException as exc:  # handed to the waiting handler
            self.error = exc
        finally:
            self.done.set()


class BoundedOps:
    """The operations started here and still running (for wait_idle at shutdown)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._running: set[Op] = set()
        self._guard = threading.Lock()

    def run(self, fn: Callable[[Op], dict], name: str) -> tuple[Op, bool]:
        """The operation, and whether it finished within the timeout (if not, it is
        abandoned and goes on)."""
        op = Op(fn, name)
        with self._guard:
            self._running.add(op)
        op.thread.start()
        finished = op.done.wait(self.timeout)
        with self._guard:
            if finished:
                self._running.discard(op)
            else:
                op.abandoned = True
        if not finished:
            threading.Thread(target=self._reap, args=(op,), daemon=True).start()
        return op, finished

    def _reap(self, op: Op) -> None:
        op.done.wait()
        with self._guard:
            self._running.discard(op)

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._guard:
                ops = list(self._running)
            if not ops:
                return
            ops[0].done.wait(max(0.0, deadline - time.monotonic()))
