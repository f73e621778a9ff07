"""The refused-flow events file: `<state_dir>/events/events.jsonl`, JSON Lines, rotated
by size into events.jsonl.1 (the newest rotated) .. events.jsonl.<keep>. One writer
(the agent's events component, runtime.agent.events), any number of readers.

Schema of a line (README "Refused-flow events"): time, network, container_id, pod,
container_name, ifname, family, protocol, source, source_port, destination, port,
reason, rule, element.

Events are diagnostics, not billing: lines are appended with one write() each batch
and not fsynced. A line torn by a kill is skipped by readers, and the next agent
starts on a fresh line.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

EVENTS_DIR = "events"
EVENTS_FILE = "events.jsonl"
# Taken exclusively by the writer while it renames, shared by readers while they open
# the files: a reader never sees a rotation half done (a line in two files or none).
LOCK_FILE = ".lock"
# 16 MiB a file, the current one and 4 rotated: 80 MiB at most per node.
DEFAULT_MAX_BYTES = 16 << 20
DEFAULT_KEEP = 4
FOLLOW_POLL_S = 0.2

Event = dict[str, Any]


def events_dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / EVENTS_DIR


def events_path(state_dir: str | os.PathLike[str]) -> Path:
    """The file being written; rotated files are this name plus ".1", ".2", ..."""
    return events_dir(state_dir) / EVENTS_FILE


def rotated_path(current: Path, n: int) -> Path:
    return current.with_name(f"{current.name}.{n}")


@contextlib.contextmanager
def _lock(directory: Path, shared: bool) -> Iterator[None]:
    """The directory's rotation lock. A reader that can't take it (a read-only copy of
    the directory) reads without it."""
    try:
        fd = os.open(directory / LOCK_FILE, (os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC,
                     0o600)
    except OSError:
        if not shared:
            raise
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class EventLog:
    """Appends event lines to the current file and rotates it by size: a batch that
    would take the file past `max_bytes` goes to a fresh one, the old file becoming
    ".1" (".1" becomes ".2", ...; the oldest beyond `keep` is deleted). Lines are never
    split across files. Not thread-safe: one writer thread."""

    def __init__(self, state_dir: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 keep: int = DEFAULT_KEEP) -> None:
        if max_bytes < 1 or keep < 1:
            raise ValueError(f"max_bytes ({max_bytes}) and keep ({keep}) must be at least 1")
        self.dir = events_dir(state_dir)
        self.current = self.dir / EVENTS_FILE
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: int | None = None
        self._size = 0
        self.rotations = 0

    def _open(self) -> int:
        if self._fd is None:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.current, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fd, self._size = fd, os.fstat(fd).st_size
            self._finish_torn_line(fd)
        return self._fd

    def _finish_torn_line(self, fd: int) -> None:
        """A writer killed mid-line left the file without its last newline: end that
        line, so that it stays one unreadable line and the next one is whole."""
        if not self._size:
            return
        with open(self.current, "rb") as fh:
            fh.seek(self._size - 1)
            last = fh.read(1)
        if last != b"\n":
            self._size += os.write(fd, b"\n")

    def append(self, lines: Iterable[str]) -> int:
        """Write `lines` (each a JSON object, without its newline) in one write;
        returns the bytes written."""
        data = "".join(f"{line}\n" for line in lines).encode()
        if not data:
            return 0
        fd = self._open()
        if self._size and self._size + len(data) > self.max_bytes:
            self.rotate()
            fd = self._open()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        self._size += len(data)
        return len(data)

    def rotate(self) -> None:
        """The current file becomes ".1"; the next append starts a new one."""
        self.close()
        with _lock(self.dir, shared=False):
            with contextlib.suppress(FileNotFoundError):
                rotated_path(self.current, self.keep).unlink()
            for n in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(rotated_path(self.current, n), rotated_path(self.current, n + 1))
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.current, rotated_path(self.current, 1))
        self.rotations += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- reading ---------------------------------------------------------------------

def matches(event: Event, pod: str | None = None, container: str | None = None) -> bool:
    """`pod`: "namespace/name", exactly; `container`: a container id or a prefix of one
    (Docker shows 12 characters), or a Docker container's name."""
    if pod is not None and event.get("pod") != pod:
        return False
    if container is not None and not (str(event.get("container_id") or "").startswith(container)
                                      or event.get("container_name") == container):
        return False
    return True


def parse_line(line: bytes) -> Event | None:
    """One event, or None for a line that isn't one (torn by a kill, or garbage)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _open_all(current: Path) -> list[int]:
    """Descriptors of every events file, oldest first, opened under the rotation lock
    (a rotation can't slip between the names and the opens). Renames don't move an
    open descriptor, so they can be read afterwards at leisure."""
    fds: list[int] = []
    if not current.parent.is_dir():
        return fds
    with _lock(current.parent, shared=True):
        for path in [p for _, p in reversed(_rotated(current))] + [current]:
            try:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except FileNotFoundError:
                continue
    return fds


def _complete_lines(fd: int, offset: int = 0) -> tuple[list[bytes], int]:
    """The complete lines of `fd` from `offset`, and the offset after the last one: an
    unterminated last line (an append in progress) is left for later."""
    chunks = []
    pos = offset
    while True:
        chunk = os.pread(fd, 1 << 20, pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    data = b"".join(chunks)
    end = data.rfind(b"\n") + 1
    return data[:end].splitlines(), offset + end


def read_events(state_dir: str | os.PathLike[str], pod: str | None = None,
                container: str | None = None) -> Iterator[Event]:
    """Every event in the events files of `state_dir`, oldest first, rotated files
    included, as dicts (schema: README "Refused-flow events"). `pod`: only those of
    pod "namespace/name"; `container`: only those whose container_id starts with it,
    or whose container_name (a Docker container's) is it.
    Lines that aren't events (a line torn by a kill) are skipped. A state dir without
    events yields nothing. The files are opened at the first next(); lines appended
    after that are not read (follow_events reads on)."""
    fds = _open_all(events_path(state_dir))
    try:
        for fd in fds:
            lines, _ = _complete_lines(fd)
            for line in lines:
                event = parse_line(line)
                if event is not None and matches(event, pod, container):
                    yield event
    finally:
        for fd in fds:
            os.close(fd)


def last_events(state_dir: str | os.PathLike[str], n: int, pod: str | None = None,
                container: str | None = None) -> list[Event]:
    """The last `n` events that match (as read_events), oldest first. Reads the files
    from their ends, newest file first, and stops once it has `n`: what `sockgate
    status` shows costs the same on a node whose files are full."""
    if n <= 0:
        return []
    found: list[Event] = []
    fds = _open_all(events_path(state_dir))
    try:
        for fd in reversed(fds):
            for line in _lines_backwards(fd):
                event = parse_line(line)
                if event is not None and matches(event, pod, container):
                    found.append(event)
                    if len(found) == n:
                        return found[::-1]
    finally:
        for fd in fds:
            os.close(fd)
    return found[::-1]


def _lines_backwards(fd: int, block: int = 1 << 16) -> Iterator[bytes]:
    """The complete lines of `fd`, last first (an unterminated last line is left out,
    as by the forward readers)."""
    pos = os.fstat(fd).st_size
    carry = b""  # the start of a line whose beginning is in an earlier block
    in_tail = True  # still after the file's last newline
    while pos > 0:
        start = max(0, pos - block)
        parts = (os.pread(fd, pos - start, start) + carry).split(b"\n")
        pos = start
        if in_tail:
            if len(parts) == 1:  # no newline yet: all of it is the unterminated tail
                carry = b""
                continue
            parts.pop()
            in_tail = False
        carry = parts.pop(0) if pos > 0 else b""
        for line in reversed(parts):
            if line:
                yield line


def follow_events(state_dir: str | os.PathLike[str], pod: str | None = None, container: str | None = None,
                  *, existing: bool = True, stop: threading.Event | None = None,
                  poll: float = FOLLOW_POLL_S, sleep: Callable[[float], object] | None = None) -> Iterator[Event]:
    """The events of read_events (when `existing`), then every event appended from
    then on, across rotations, until `stop` is set (checked every `poll` seconds while
    nothing comes). A file that doesn't exist yet is waited for."""
    current = events_path(state_dir)
    wait = sleep or (stop.wait if stop is not None else time.sleep)
    fds = _open_all(current)
    fd, offset = -1, 0
    try:
        # The current file (the last one opened, if it exists) is followed; rotated
        # files are read once.
        if fds and _same_file(current, fds[-1]):
            fd = fds.pop()
        for old in fds:
            if existing:
                yield from _matching(_complete_lines(old)[0], pod, container)
            os.close(old)
        fds = []
        if fd >= 0 and not existing:
            offset = os.fstat(fd).st_size
            # Start after the last complete line: a half-written one is read whole later.
            offset = _complete_lines(fd, 0)[1] if offset else 0
        while stop is None or not stop.is_set():
            if fd < 0:
                try:
                    fd = os.open(current, os.O_RDONLY | os.O_CLOEXEC)
                    offset = 0
                except FileNotFoundError:
                    wait(poll)
                    continue
            lines, offset = _complete_lines(fd, offset)
            yield from _matching(lines, pod, container)
            if lines:
                continue
            if not _same_file(current, fd):
                # Rotated: read what was appended before the rename, then go on with
                # the file that came after this one (the writer may have rotated more
                # than once meanwhile).
                lines, offset = _complete_lines(fd, offset)
                yield from _matching(lines, pod, container)
                nxt = _successor(current, fd)
                os.close(fd)
                fd, offset = nxt, 0
                continue
            wait(poll)
    finally:
        for old in fds:
            os.close(old)
        if fd >= 0:
            os.close(fd)


def _rotated(current: Path) -> list[tuple[int, Path]]:
    """(n, path) of the rotated files, newest (".1") first."""
    found = []
    for p in current.parent.glob(f"{current.name}.*"):
        suffix = p.name.rsplit(".", 1)[1]
        if suffix.isdigit():
            found.append((int(suffix), p))
    return sorted(found)


def _successor(current: Path, fd: int) -> int:
    """A descriptor of the file written after the one open as `fd`, which was rotated
    away: the rotated file one number lower, or the current file; when `fd`'s file was
    rotated out of existence, the oldest file left. -1 when that is the current file
    and it isn't created yet."""
    fst = os.fstat(fd)
    with _lock(current.parent, shared=True):
        rotated = _rotated(current)
        mine = next((n for n, p in rotated if _inode(p) == (fst.st_dev, fst.st_ino)), None)
        if mine is None:
            path = rotated[-1][1] if rotated else current
        else:
            path = next((p for n, p in rotated if n == mine - 1), current) if mine > 1 else current
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return -1


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _matching(lines: list[bytes], pod: str | None, container: str | None) -> Iterator[Event]:
    for line in lines:
        event = parse_line(line)
        if event is not None and matches(event, pod, container):
            yield event


def _same_file(path: Path, fd: int) -> bool:
    fst = os.fstat(fd)
    return _inode(path) == (fst.st_dev, fst.st_ino)
