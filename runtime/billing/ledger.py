"""The billing ledger: append-only JSON Lines files in one directory (format in
runtime.billing.schema). The ledger is its own checkpoint: every record carries the
cumulative counters it was computed from; appends are flocked and fsynced, a torn
tail is cut off, checkpoint.json is only a cache. Why that is exact: docs/billing.md."""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from runtime.billing.schema import (
    CHECKPOINT,
    CURRENT,
    LOCK,
    MARK_KEYS,
    ROTATED_PREFIX,
    SCHEMA_VERSION,
    encode,
    parse_line,
    parse_time,
    utcnow,
)
from runtime.billing.session import Session
from runtime.fsutil import atomic_write, fsync_dir, locked, read_json

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 << 20
_TAIL = 64  # bytes hashed in the cache to recognise the ledger offset it reflects


@dataclass
class _Snapshot:
    name: str
    fd: int
    size: int


class Ledger:
    """The billing files in one directory. See the module docstring."""

    def __init__(self, directory: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], dt.datetime] = utcnow, node: str | None = None) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.clock = clock
        self.node = node or socket.gethostname()
        self.current = self.dir / CURRENT
        self.cache_path = self.dir / CHECKPOINT

    # --- files ---
    def rotated(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"{ROTATED_PREFIX}*.jsonl") if p.is_file())

    def files(self) -> list[Path]:
        """Every ledger file, rotated ones first (oldest name first), then the current."""
        return self.rotated() + ([self.current] if self.current.exists() else [])

    @contextlib.contextmanager
    def session(self, cache_lag: int = 0) -> Iterator[Session]:
        """Lock, load the checkpoint (repairing a torn tail, catching up or rebuilding
        the cache), yield; on a clean exit append the queued records in one write,
        fsync, then refresh the cache if it is more than `cache_lag` bytes of ledger
        behind (DEL passes 1 MiB: the next session catches up from the cached offset,
        and the periodic flush refreshes it). On an exception nothing is appended."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with locked(self.dir / LOCK):
            marks, behind = self._load()
            s = Session(self.node, marks, self.clock())
            yield s
            if s.pending:
                behind += self._append(s.pending)
            if s.dirty or behind > cache_lag:
                self._save_cache(s.marks)

    # --- reading ---
    @staticmethod
    def _read_lines(path: Path, offset: int = 0, size: int | None = None, fd: int | None = None) -> Iterator[dict]:
        """Complete, valid records of a file from `offset`; an unterminated last line
        (an append in progress, or torn) is not a record."""
        own = fd is None
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return
        try:
            end = os.fstat(fd).st_size if size is None else size
            pos, rest = offset, b""
            while pos < end:
                chunk = os.pread(fd, min(1 << 20, end - pos), pos)
                if not chunk:
                    break
                pos += len(chunk)
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    rec = parse_line(line)
                    if rec is not None:
                        yield rec
                    elif line.strip():
                        log.warning("billing: skipping an unreadable line in %s", path)
        finally:
            if own:
                os.close(fd)

    def records(self) -> Iterator[dict]:
        """Every record of every file, as of one consistent moment: the files are
        opened under the lock (a rotation can't slip between listing and reading),
        then read without it."""
        snaps: list[_Snapshot] = []
        if not self.dir.is_dir():
            return
        try:
            try:
                lock = locked(self.dir / LOCK)
                lock.__enter__()
            except OSError:  # a read-only copy of a billing dir: nobody appends there
                lock = None
            try:
                for path in self.files():
                    fd = os.open(path, os.O_RDONLY)
                    snaps.append(_Snapshot(str(path), fd, os.fstat(fd).st_size))
            finally:
                if lock is not None:
                    lock.__exit__(None, None, None)
            for snap in snaps:
                yield from self._read_lines(Path(snap.name), 0, snap.size, snap.fd)
        finally:
            for snap in snaps:
                os.close(snap.fd)

    # --- checkpoint ---
    @staticmethod
    def _apply(marks: dict[str, dict], rec: dict) -> None:
        old = marks.get(rec["attachment"])
        if old is None or rec["seq"] > old["seq"]:
            marks[rec["attachment"]] = rec

    def _tail_hash(self, fd: int, offset: int) -> str:
        start = max(0, offset - _TAIL)
        return hashlib.sha256(os.pread(fd, offset - start, start)).hexdigest()

    def _load(self) -> tuple[dict[str, dict], float]:
        """(marks, how far the cache on disk is behind them: bytes of ledger, inf when
        it must be rewritten). Caller holds the lock."""
        self._repair_tail()
        try:
            cache = read_json(self.cache_path)
        except (OSError, ValueError):
            cache = False  # unreadable: rebuilt below
        caught = self._catch_up(cache) if isinstance(cache, dict) and cache.get("version") == SCHEMA_VERSION else None
        if caught is not None:
            return caught
        files = self.files()
        if cache is None and not files:
            return {}, 0  # a new ledger
        log.warning("billing: checkpoint cache in %s missing or stale; rebuilding it from the files", self.dir)
        marks: dict[str, dict] = {}
        for path in files:
            for rec in self._read_lines(path):
                self._apply(marks, rec)
        return marks, math.inf

    def _catch_up(self, cache: dict) -> tuple[dict[str, dict], float] | None:
        """The cached marks plus every record appended after the cached offset, or
        None when the cache doesn't describe these files."""
        try:
            marks = cache["marks"]
            if not all(isinstance(v, dict) and MARK_KEYS <= v.keys() for v in marks.values()):
                return None
            ino, offset, tail = int(cache["file"]["ino"]), int(cache["file"]["offset"]), cache["file"]["tail"]
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        chain: list[Path] = []
        if self.current.exists() and self.current.stat().st_ino == ino:
            chain = [self.current]
        else:
            # Rotated after the cache was written (killed before the refresh). More than
            # one rotation may have come since (a session killed after each), and
            # neither names (same-second "-n" suffixes) nor times (coarse, and the
            # clock may step back) order the files for sure: read every other file
            # whole. Extra files cost only time: a mark keeps its highest seq.
            rotated = self.rotated()
            owner = next((p for p in rotated if p.stat().st_ino == ino), None)
            if owner is None:
                return None
            chain = [owner] + [p for p in rotated if p != owner] + ([self.current] if self.current.exists() else [])
        with open(chain[0], "rb") as fh:
            if os.fstat(fh.fileno()).st_size < offset or self._tail_hash(fh.fileno(), offset) != tail:
                return None
        # Caught up within the current file: that many bytes behind. Across a rotation:
        # rewrite the cache, so it names the current file again.
        behind: float = math.inf if chain[0] != self.current else self.current.stat().st_size - offset
        for i, path in enumerate(chain):
            for rec in self._read_lines(path, offset if i == 0 else 0):
                self._apply(marks, rec)
        return marks, behind

    def _save_cache(self, marks: dict[str, dict]) -> None:
        try:
            fd = os.open(self.current, os.O_RDONLY | os.O_CREAT, 0o600)
            try:
                st = os.fstat(fd)
                where = {"name": CURRENT, "ino": st.st_ino, "offset": st.st_size,
                         "tail": self._tail_hash(fd, st.st_size)}
            finally:
                os.close(fd)
            write_cache(self.cache_path, json.dumps({"version": SCHEMA_VERSION, "file": where, "marks": marks},
                                                    separators=(",", ":")).encode())
        except OSError:
            # Only a cache: the next session catches up from the older one, or rebuilds.
            log.exception("billing: cannot write the checkpoint cache %s", self.cache_path)

    # --- writing ---
    def _repair_tail(self) -> None:
        """Cut an unterminated or unreadable last line of the current file: the write
        that made it died (kill -9, ENOSPC, power loss), so it was never billed."""
        try:
            fd = os.open(self.current, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            end = size
            while end > 0:
                start = _line_start(fd, end)
                line = os.pread(fd, end - start, start)
                if line.endswith(b"\n") and parse_line(line) is not None:
                    break
                end = start
            if end < size:
                log.warning("billing: cutting a torn tail of %d bytes from %s (not billed; billed again next)",
                            size - end, self.current)
                os.ftruncate(fd, end)
                os.fsync(fd)
        finally:
            os.close(fd)

    def _first_record(self) -> dict | None:
        try:
            with open(self.current, "rb") as fh:
                return parse_line(fh.readline())
        except FileNotFoundError:
            return None

    def _maybe_rotate(self, incoming: int, now: dt.datetime) -> bool:
        try:
            size = self.current.stat().st_size
        except FileNotFoundError:
            return False
        if size == 0:
            return False
        first = self._first_record()
        first_end = parse_time(first["end"]) if first and isinstance(first.get("end"), str) else now
        if size + incoming <= self.max_bytes and first_end.date() == now.date():
            return False
        stem = ROTATED_PREFIX + first_end.strftime("%Y%m%dT%H%M%SZ")
        target, n = self.dir / f"{stem}.jsonl", 0
        while target.exists():  # never overwrite a rotated file
            n += 1
            target = self.dir / f"{stem}-{n}.jsonl"
        os.rename(self.current, target)
        fsync_dir(self.dir)
        log.info("billing: rotated %s to %s", self.current, target.name)
        return True

    def _append(self, recs: list[dict]) -> float:
        """Bytes appended (inf after a rotation: the cache must be re-anchored)."""
        data = b"".join(encode(r) for r in recs)
        now = self.clock()
        rotated = self._maybe_rotate(len(data), now)
        created = not self.current.exists()
        fd = os.open(self.current, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:  # one write() in practice; a short one is torn until finished
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.dir)
        return math.inf if rotated else len(data)


def write_cache(path: Path, data: bytes) -> None:
    """The checkpoint, atomically and durably (fsutil.atomic_write: temp, fsync,
    rename, fsync the dir). A temp file left by a writer killed mid-write is removed
    by the next checkpoint write. `data` is json.dumps' (json.dump to a file takes the
    pure-Python encoder, ten times slower on a cache of a thousand attachments)."""
    atomic_write(path, data, mode=0o600)


def _line_start(fd: int, end: int) -> int:
    """Offset of the first byte of the line ending at `end` (exclusive; the byte at
    end-1 may be that line's own newline)."""
    pos = end - 1
    while pos > 0:
        lo = max(0, pos - 65536)
        chunk = os.pread(fd, pos - lo, lo)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return 0
