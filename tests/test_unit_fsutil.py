"""Atomic writes and their temp files (runtime.fsutil), in a temporary dir: a writer
killed mid-write leaves a temp file that the next sweep or write removes; a live
writer's temp file is never removed, however long it has been stopped."""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from runtime import fsutil
from runtime.fsutil import atomic_write, atomic_write_json, remove_stale_temps, remove_temp, temp_path
from runtime.state.ipam import LeaseStore, Owner
from runtime.state.store import Attachment, AttachmentStore
from tests.support.stop_at_replace import wait_stopped

PROJECT = Path(__file__).resolve().parent.parent

# A writer that stops itself between writing its temp file and renaming it.
WRITER = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.support.stop_at_replace import install
from runtime.fsutil import atomic_write
target = Path(sys.argv[2])
install(target.name)
atomic_write(target, sys.argv[3].encode(), durable=False)
"""


@contextmanager
def stopped_writer(target: Path, content: str) -> Iterator[subprocess.Popen]:
    """A child process stopped in the middle of atomic_write(target, content)."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(PROJECT), str(target), content],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(proc.pid, timeout=20)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)


def killed_writer(target: Path, content: str = "half") -> None:
    """What `kill -9` of a writer in the middle of a write leaves."""
    with stopped_writer(target, content) as proc:
        proc.kill()
    assert temp_path(target).exists()


def test_atomic_write_replaces_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"b": 1, "a": [2]})
    atomic_write_json(target, {"z": 1, "a": 2}, durable=False)
    # The same bytes json.dump gave before (sorted keys, default separators).
    assert target.read_bytes() == json.dumps({"z": 1, "a": 2}, sort_keys=True).encode()
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_write_mode_is_open_s_default_or_exactly_the_given_one(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "plain", b"x")
        atomic_write(tmp_path / "secret", b"x", mode=0o600)
        atomic_write(tmp_path / "exe", b"x", mode=0o755)  # the CNI launcher's: not the umask's
    finally:
        os.umask(old)
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "exe").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("sweep", ["remove_temp", "remove_stale_temps"])
def test_a_stopped_writer_s_temp_stays_and_a_killed_one_s_goes(tmp_path: Path, sweep: str) -> None:
    target = tmp_path / "c--eth0.json"
    tmp = temp_path(target)

    def clean() -> bool:
        return remove_temp(target) if sweep == "remove_temp" else bool(remove_stale_temps(tmp_path))

    with stopped_writer(target, "live") as proc:
        assert tmp.read_text() == "live"
        # Stopped for long by any clock's measure: still alive, still its file.
        os.utime(tmp, (time.time() - 3600, time.time() - 3600))
        assert not clean()
        assert tmp.read_text() == "live"
        proc.kill()
        proc.wait()
    assert clean()
    assert os.listdir(tmp_path) == []


def test_a_writer_resumed_after_a_sweep_finishes_its_write(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    with stopped_writer(target, "new") as proc:
        assert remove_stale_temps(tmp_path) == []
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["r.json"]


def test_the_next_write_of_a_target_removes_a_dead_writer_s_temp(tmp_path: Path) -> None:
    target = tmp_path / "n.json"
    killed_writer(target)
    atomic_write(target, b"next", durable=False)
    assert target.read_bytes() == b"next" and os.listdir(tmp_path) == ["n.json"]


def test_the_next_write_waits_for_a_live_writer_of_the_same_target(tmp_path: Path) -> None:
    target = tmp_path / "w.json"
    with stopped_writer(target, "first") as proc:
        second = threading.Thread(target=atomic_write, args=(target, b"second", False))
        second.start()
        second.join(0.3)
        assert second.is_alive(), "the second writer must not take the first one's temp file"
        assert temp_path(target).read_text() == "first"
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=20) == 0
        second.join(20)
    assert not second.is_alive()
    assert target.read_bytes() == b"second" and os.listdir(tmp_path) == ["w.json"]


def test_a_remover_between_a_writer_s_create_and_its_flock_makes_it_start_over(tmp_path: Path,
                                                                                monkeypatch) -> None:
    """The one window where a remover can take a live writer's lock: the writer must
    notice its file is gone and write through a fresh one."""
    target = tmp_path / "race.json"
    removed: list[bool] = []

    class Fcntl:
        def __getattr__(self, name: str) -> Any:
            return getattr(fcntl, name)

        @staticmethod
        def flock(fd: int, op: int) -> None:
            if op == fcntl.LOCK_EX and not removed:  # the writer's (the remover's has LOCK_NB)
                removed.append(remove_temp(target))
            fcntl.flock(fd, op)

    monkeypatch.setattr(fsutil, "fcntl", Fcntl())
    atomic_write(target, b"ok", durable=False)
    assert removed == [True]
    assert target.read_bytes() == b"ok" and os.listdir(tmp_path) == ["race.json"]


def test_sweep_touches_only_temp_files_and_earlier_names_only_when_old(tmp_path: Path) -> None:
    keep = ["x.json", ".hidden", "plain.tmp", ".fresh.json.123.456.tmp"]
    for name in keep:
        (tmp_path / name).write_text("")
    old = tmp_path / ".old.json.123.456.tmp"     # an earlier version's name: no lock to ask
    old.write_text("")
    os.utime(old, (time.time() - 120, time.time() - 120))
    new = temp_path(tmp_path / "y.json")         # no lock held: its writer is dead
    new.write_text("")
    os.symlink("10.0.0.1", tmp_path / ".link.tmp")  # not a regular file
    os.mkfifo(tmp_path / ".fifo.tmp")               # must not hang the sweep
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == [".old.json.123.456.tmp", ".y.json.tmp"]
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [".link.tmp", ".fifo.tmp"])
    assert remove_stale_temps(tmp_path / "missing") == []


def test_a_record_s_temp_is_removed_by_name_others_are_left(tmp_path: Path) -> None:
    store = AttachmentStore(tmp_path)
    att = Attachment(network="n", container_id="a", ifname="eth0", netns="", host_ifname="sg0")
    store.save(att)
    killed_writer(tmp_path / "a--eth0.json")
    killed_writer(tmp_path / "b--eth0.json")
    assert store.remove_temp("a", "eth0") and not store.remove_temp("a", "eth0")
    assert sorted(os.listdir(tmp_path)) == [".b--eth0.json.tmp", "a--eth0.json"]
    assert store.remove_stale_temps() == [tmp_path / ".b--eth0.json.tmp"]
    assert store.load("a", "eth0") == att


def test_cursor_temp_left_by_a_killed_allocator(tmp_path: Path) -> None:
    store = LeaseStore(tmp_path)
    pool = ipaddress.ip_network("192.0.2.0/29")
    os.symlink("192.0.2.1", tmp_path / "..last-v4.tmp")      # killed between symlink and rename
    os.symlink("192.0.2.1", tmp_path / ".last-v4.77.88.tmp")  # the same, by an earlier version
    # The next allocation replaces it and the cursor still moves on.
    assert str(store.allocate(pool, Owner("c1", "eth0"))) == "192.0.2.1"
    assert str(store.allocate(pool, Owner("c2", "eth0"))) == "192.0.2.2"
    assert os.readlink(tmp_path / ".last-v4") == "192.0.2.2"
    os.symlink("192.0.2.2", tmp_path / "..last-v6.tmp")
    assert store.remove_temps() == [tmp_path / "..last-v6.tmp"]
    assert store.remove_temps(every=True) == [tmp_path / ".last-v4.77.88.tmp"]
    assert sorted(os.listdir(tmp_path)) == [".last-v4", "192.0.2.1", "192.0.2.2"]


_HOLD_AND_DIE = r"""
import os, signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from runtime.fsutil import held_while
with held_while(Path(sys.argv[1])):
    print("held", flush=True)
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.read()
"""


@pytest.mark.parametrize("holder", ["killed", "alive", "finished"])
def test_a_block_its_holder_died_in_is_told_from_one_under_way_or_done(tmp_path: Path, holder: str) -> None:
    # What tells a killed ADD's record from one whose ADD is under way (runtime.core.attach).
    path = tmp_path / "adding" / "c1--eth0.lock"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_AND_DIE, str(path), str(PROJECT),
                             "kill" if holder == "killed" else "wait"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if holder != "killed":
            assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        if holder == "finished":
            proc.communicate("", timeout=10)
        else:
            assert proc.wait(10) == -signal.SIGKILL if holder == "killed" else proc.poll() is None
        with fsutil.abandoned(path) as dead:
            assert dead == (holder == "killed")
        assert path.exists() == (holder == "alive")  # the caller of a dead one's block removes it
    finally:
        proc.kill()
        proc.wait()
