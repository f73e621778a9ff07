"""What the test daemons (dockerd, containerd, podman) share: a context manager."""
from __future__ import annotations

from typing import TypeVar

S = TypeVar("S", bound="Service")


class Service:
    """`with X(...) as x:` starts it and stops it; a start that fails halfway is
    stopped too, so whatever it had set up (processes, mounts, dirs) is undone."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self: S) -> S:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
