"""Crash-safe file primitives: whole-file atomic writes (through one flocked temp file
per target, `.<name>.tmp`) and advisory locks. A temp file nobody holds the lock on
was left by a dead writer and may be removed. Details: docs/architecture.md,
"Crash-safe files"."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any, Iterator

TEMP_SUFFIX = ".tmp"
# What versions before the locked temp names wrote: `.<name>.<pid>.<thread id>.tmp`
# (runtime/fsutil, billing), `.<name>.<pid>.tmp` (install) and the lease cursor's
# `.last-v4.<pid>.<thread id>.tmp`.
_LEGACY_TEMP = re.compile(r"\.\d+(\.\d+)?\.tmp\Z")
LEGACY_TEMP_AGE = 60.0


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temp file of an atomic write of `path` (see the module docstring)."""
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    """A name `temp_path` gives (or an earlier version gave) a temp file."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _names(path: Path, fd: int) -> bool:
    """Whether `path` (not following a symlink) is the file open as `fd`."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _remove_unheld(tmp: Path, wait: bool) -> bool:
    """Unlink the regular file `tmp` if no writer holds its lock (wait: until the one
    holding it is done). False when it is held, gone, or was renamed meanwhile."""
    try:
        # O_NONBLOCK: a fifo planted under a temp name must not hang us.
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:  # ELOOP: a symlink; not a temp file of this protocol
        raise FileExistsError(exc.errno, f"{tmp} is not a regular file") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileExistsError(f"{tmp} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer's
        # Holding the lock, the name can't move under us: writers rename only while
        # holding it. If it names another file now, ours was renamed (done) already.
        if not _names(tmp, fd):
            return False
        os.unlink(tmp)
        return True
    finally:
        os.close(fd)


def _claim(tmp: Path, mode: int | None) -> int:
    """A new, empty `tmp`, exclusively locked, open for writing."""
    while True:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666 if mode is None else mode)
        except FileExistsError:
            # A writer of the same target (wait until it renamed), or the leftover of
            # a dead one (remove it).
            _remove_unheld(tmp, wait=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(tmp, fd):
                if mode is not None:
                    os.fchmod(fd, mode)  # whatever the umask
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # removed between our create and our flock: take a fresh one


def atomic_write(path: Path, data: bytes, durable: bool = True, mode: int | None = None) -> None:
    """Write-to-temp, rename: readers see the old or the new content, never a torn
    one. durable: also fsync the file and the directory, so that this holds after a
    crash of the node too (billing needs that; records of kernel state, which a node
    crash takes with it, don't). mode: the file's; default 0o666 less the umask, as
    open() gives."""
    tmp = temp_path(path)
    fd = _claim(tmp, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        # Still ours (we hold its lock): don't leave it for a sweep.
        with contextlib.suppress(OSError):
            if _names(tmp, fd):
                os.unlink(tmp)
        raise
    finally:
        os.close(fd)  # drops the lock, after the rename
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, data: Any, durable: bool = True) -> None:
    """atomic_write of `data` as JSON (sorted keys)."""
    # json.dumps, not json.dump to a file: the latter takes the pure-Python encoder.
    atomic_write(path, json.dumps(data, sort_keys=True).encode(), durable)


def remove_temp(path: Path) -> bool:
    """Remove the temp file of `path` that a dead writer left; never a live writer's.
    True when there was one."""
    try:
        return _remove_unheld(temp_path(path), wait=False)
    except OSError:
        return False


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove every temp file in `directory` that no live writer holds (see the module
    docstring; earlier versions' once LEGACY_TEMP_AGE old). Returns those removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        if not is_temp_name(entry.name):
            continue
        path = Path(entry.path)
        try:
            if _LEGACY_TEMP.search(entry.name) and now - entry.stat(follow_symlinks=False).st_mtime < LEGACY_TEMP_AGE:
                continue
            if _remove_unheld(path, wait=False):
                removed.append(path)
        except OSError:
            continue  # gone meanwhile, or not a regular file: not ours to judge
    return removed


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size): changes whenever the file is replaced or rewritten."""
    try:
        st = path.stat()
        return (st.st_ino, st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        return None


def read_json(path: Path) -> Any | None:
    """The parsed file; None when it is missing. Raises ValueError when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def remove(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def locked(path: Path, shared: bool = False) -> Iterator[None]:
    """An flock on `path`, exclusive unless `shared`. The kernel drops it when the
    process dies, so a crashed plugin never leaves the network locked. (Each call opens
    the file anew: threads of one process exclude each other too.)"""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_while(path: Path) -> Iterator[None]:
    """An flock on `path` for the block, the file removed at its end (before the lock
    goes): whoever finds the file and gets its lock knows the holder died in the block
    (see abandoned)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        remove(path)
        os.close(fd)


@contextlib.contextmanager
def abandoned(path: Path) -> Iterator[bool]:
    """Whether a held_while() block that made `path` died in it: the file is there and
    nobody holds its lock. True: the lock is held for the caller's block, and the file
    removed at its end."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False  # its holder lives
            return
        yield True
        remove(path)
    finally:
        os.close(fd)
