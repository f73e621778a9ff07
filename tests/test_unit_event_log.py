"""The refused-flow events file (runtime.agent.event_log) on temporary dirs: appends,
size rotation that keeps every line, torn lines, the reader's filters and --follow
across rotations."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runtime.agent.event_log import EventLog, events_path, follow_events, read_events, rotated_path


def event(n: int, pod: str | None = "shop/web-0", container: str = "c0ffee" * 4) -> dict:
    return {"time": f"2026-12-06T09:00:{n % 60:02d}.000000Z", "network": "net", "container_id": container,
            "pod": pod, "container_name": None, "ifname": "sg0123456789ab", "family": "ipv4",
            "protocol": "tcp", "source": "10.77.0.2", "source_port": 40000 + n, "destination": "10.0.0.1",
            "port": 80, "reason": "blocked-range", "rule": "blocked-range: blocked destination range (C7)",
            "element": "10.0.0.0/8: private use (RFC 1918)", "n": n}


def line(n: int, **kw) -> str:
    return json.dumps(event(n, **kw))


def test_lines_are_appended_and_read_back_in_order(tmp_path):
    log = EventLog(tmp_path)
    log.append([line(0), line(1)])
    log.append([line(2)])
    log.close()
    assert [e["n"] for e in read_events(tmp_path)] == [0, 1, 2]
    assert events_path(tmp_path).stat().st_mode & 0o777 == 0o600
    assert events_path(tmp_path).parent.stat().st_mode & 0o777 == 0o700


def test_no_events_file_reads_as_nothing(tmp_path):
    assert list(read_events(tmp_path)) == []
    assert list(read_events(tmp_path / "missing")) == []


def test_rotation_by_size_keeps_every_line_within_keep_files(tmp_path):
    one = len(line(0)) + 1
    log = EventLog(tmp_path, max_bytes=3 * one, keep=3)
    for n in range(10):
        log.append([line(n)])
    log.close()
    current = events_path(tmp_path)
    # 3 lines a file; current + .1 + .2 + .3 hold the last 10: nothing is lost yet.
    sizes = [rotated_path(current, i).stat().st_size for i in (3, 2, 1)] + [current.stat().st_size]
    assert all(s <= 3 * one for s in sizes), sizes
    assert [e["n"] for e in read_events(tmp_path)] == list(range(10))
    assert [json.loads(x)["n"] for x in rotated_path(current, 1).read_text().splitlines()] == [6, 7, 8]
    # One more rotation: the oldest file (lines 0-2) goes, beyond `keep`.
    log = EventLog(tmp_path, max_bytes=3 * one, keep=3)
    for n in range(10, 13):
        log.append([line(n)])
    log.close()
    assert [e["n"] for e in read_events(tmp_path)] == list(range(3, 13))
    assert not rotated_path(current, 4).exists()


def test_a_batch_never_straddles_two_files(tmp_path):
    one = len(line(0)) + 1
    log = EventLog(tmp_path, max_bytes=4 * one, keep=2)
    log.append([line(0), line(1), line(2)])
    log.append([line(3), line(4)])  # would make 5 lines: starts a new file
    log.close()
    current = events_path(tmp_path)
    assert len(rotated_path(current, 1).read_text().splitlines()) == 3
    assert len(current.read_text().splitlines()) == 2


def test_a_line_torn_by_a_kill_is_skipped_and_the_next_writer_starts_a_fresh_line(tmp_path):
    log = EventLog(tmp_path)
    log.append([line(0)])
    log.close()
    with open(events_path(tmp_path), "a") as fh:
        fh.write(line(1)[:25])  # killed mid-write
    assert [e["n"] for e in read_events(tmp_path)] == [0]  # the unterminated tail is not an event
    log = EventLog(tmp_path)
    log.append([line(2)])
    log.close()
    assert [e["n"] for e in read_events(tmp_path)] == [0, 2]


def test_filters_by_pod_and_by_container_id_or_prefix(tmp_path):
    log = EventLog(tmp_path)
    log.append([line(0), line(1, pod="shop/web-1", container="beef" * 16), line(2, pod=None, container="cafe" * 16)])
    log.close()
    assert [e["n"] for e in read_events(tmp_path, pod="shop/web-1")] == [1]
    assert [e["n"] for e in read_events(tmp_path, pod="shop/web")] == []  # a pod is named exactly
    assert [e["n"] for e in read_events(tmp_path, container="cafe" * 16)] == [2]
    assert [e["n"] for e in read_events(tmp_path, container="beefbeefbeef")] == [1]
    assert [e["n"] for e in read_events(tmp_path, pod="shop/web-0", container="beef")] == []
    # A Docker container by its name (its container_id is the endpoint's).
    log = EventLog(tmp_path)
    log.append([json.dumps(dict(event(3, pod=None, container="e" * 64), container_name="worker"))])
    log.close()
    assert [e["n"] for e in read_events(tmp_path, container="worker")] == [3]
    assert [e["n"] for e in read_events(tmp_path, container="work")] == []


def test_follow_reads_what_is_there_then_new_lines_across_a_rotation(tmp_path):
    one = len(line(0)) + 1
    log = EventLog(tmp_path, max_bytes=2 * one, keep=5)
    log.append([line(0), line(1)])
    stop = threading.Event()
    seen: list[int] = []
    got_two = threading.Event()

    def reader() -> None:
        for e in follow_events(tmp_path, stop=stop, poll=0.01):
            seen.append(e["n"])
            if len(seen) == 2:
                got_two.set()
            if len(seen) == 7:
                stop.set()

    t = threading.Thread(target=reader)
    t.start()
    assert got_two.wait(5)
    for n in range(2, 7):  # rotates after every second line
        log.append([line(n)])
    t.join(5)
    log.close()
    assert not t.is_alive()
    assert seen == list(range(7))
    assert log.rotations >= 2


def test_follow_without_existing_starts_at_the_end_and_waits_for_a_missing_file(tmp_path):
    stop, idle = threading.Event(), threading.Event()
    seen: list[int] = []

    def sleep(seconds: float) -> None:
        idle.set()  # the follower looked and found nothing new
        stop.wait(seconds)

    def reader() -> None:
        for e in follow_events(tmp_path, existing=False, pod="shop/web-0", stop=stop, poll=0.01, sleep=sleep):
            seen.append(e["n"])
            stop.set()

    t = threading.Thread(target=reader)
    t.start()
    assert idle.wait(5)
    log = EventLog(tmp_path)
    log.append([line(0, pod="other/x"), line(1)])
    t.join(5)
    log.close()
    assert not t.is_alive() and seen == [1]

    # With a file already there: what it held before is not repeated.
    stop.clear()
    idle.clear()
    seen.clear()
    t = threading.Thread(target=reader)
    t.start()
    assert idle.wait(5)
    log.append([line(2)])
    t.join(5)
    log.close()
    assert seen == [2]


def test_follow_reads_a_line_written_in_two_pieces_once_whole(tmp_path):
    path = events_path(tmp_path)
    path.parent.mkdir(parents=True)
    text = line(5) + "\n"
    path.write_text(text[:20])
    stop = threading.Event()
    pieces = iter([lambda: path.open("a").write(text[20:]), stop.set])

    def sleep(_: float) -> None:
        next(pieces)()

    assert [e["n"] for e in follow_events(tmp_path, stop=stop, sleep=sleep)] == [5]


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        EventLog(tmp_path, max_bytes=0)
    with pytest.raises(ValueError, match="keep"):
        EventLog(tmp_path, keep=0)


def test_reading_needs_no_write_access(tmp_path):
    log = EventLog(tmp_path)
    log.append([line(0)])
    log.close()
    os.chmod(events_path(tmp_path).parent, 0o500)
    try:
        assert [e["n"] for e in read_events(Path(tmp_path))] == [0]
    finally:
        os.chmod(events_path(tmp_path).parent, 0o700)


@pytest.mark.parametrize("block", [7, 64, 1 << 16])
def test_last_events_reads_from_the_end_across_files(tmp_path, block, monkeypatch):
    import runtime.agent.event_log as event_log
    original = event_log._lines_backwards
    monkeypatch.setattr(event_log, "_lines_backwards", lambda fd: original(fd, block))
    one = len(line(0)) + 1
    log = EventLog(tmp_path, max_bytes=3 * one, keep=10)
    for n in range(10):
        log.append([line(n, pod="a/b" if n % 2 else "c/d")])
    log.close()
    with open(events_path(tmp_path), "a") as fh:
        fh.write(line(99)[:30])  # a line still being written: not an event yet
    assert [e["n"] for e in event_log.last_events(tmp_path, 4)] == [6, 7, 8, 9]
    assert [e["n"] for e in event_log.last_events(tmp_path, 3, pod="a/b")] == [5, 7, 9]
    assert [e["n"] for e in event_log.last_events(tmp_path, 100)] == list(range(10))
    assert event_log.last_events(tmp_path, 0) == [] and event_log.last_events(tmp_path / "none", 5) == []


def test_a_writer_killed_at_any_moment_loses_and_repeats_nothing_before_its_last_line(tmp_path):
    """A real writer process, SIGKILLed at random moments while it appends batches and
    rotates every few of them (small max_bytes; keep large enough that rotation drops
    nothing): after each kill a new writer appends a marker, as a restarted agent
    would. Read back, each life's lines are whole, in order, without a gap or a repeat,
    and every marker is there."""
    code = (
        "import json, sys, time\n"
        "from runtime.agent.event_log import EventLog\n"
        "life, log, n = int(sys.argv[1]), EventLog(sys.argv[2], max_bytes=65536, keep=500), 0\n"
        "while True:\n"
        "    log.append([json.dumps({'life': life, 'n': n + i, 'pad': 'x' * 200}) for i in range(7)])\n"
        "    n += 7\n"
        "    time.sleep(0.001)  # far from `keep` rotations in a life, so none drops lines\n"
        "    if n == 7:\n"
        "        print('writing', flush=True)\n")
    root = Path(__file__).resolve().parents[1]
    rng = random.Random(1206)
    rotated = events_path(tmp_path).parent.glob
    for life in range(12):
        before = len(list(rotated("events.jsonl.*")))
        proc = subprocess.Popen([sys.executable, "-c", code, str(life), str(tmp_path)], cwd=root,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
        # A rotation in every life, whatever the machine's load (a busy CI runner wrote
        # too slowly for a fixed sleep), then a random moment after it.
        deadline = time.monotonic() + 60
        while len(list(rotated("events.jsonl.*"))) == before:
            assert time.monotonic() < deadline, f"life {life}: no rotation in 60 s"
            time.sleep(0.005)
        time.sleep(rng.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        log = EventLog(tmp_path, max_bytes=65536, keep=500)
        log.append([json.dumps({"life": life, "marker": True})])
        log.close()
    got = list(read_events(tmp_path))
    for life in range(12):
        mine = [e for e in got if e["life"] == life]
        assert mine[-1] == {"life": life, "marker": True}, mine[-3:]
        numbers = [e["n"] for e in mine[:-1]]
        assert numbers and numbers == list(range(len(numbers))), (life, numbers[:5], numbers[-5:])
    # Rotations all along (about five a life here), so kills came near some of them.
    assert len(list(events_path(tmp_path).parent.glob("events.jsonl.*"))) >= 12
