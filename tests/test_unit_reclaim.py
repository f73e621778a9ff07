"""Pure logic of runtime/agent/reclaim.py: which UDP sockets a sweep aborts or watches, and
when the loop sweeps after lost events (the netlink parsing behind both:
test_unit_netlink_conntrack.py). The lab tests in test_reclaim.py check the same
against the kernel."""
from __future__ import annotations

import socket

import pytest
from pyroute2.netlink.nfnetlink.nfctsocket import IPS_ASSURED, IPS_CONFIRMED, IPS_SEEN_REPLY

from runtime.agent.reclaim import SweepSchedule, sweep_covers_udp, sweep_udp
from runtime.kernel.netlink.conntrack import CtEntry, Flow

UDP = socket.IPPROTO_UDP
A = Flow(UDP, "10.77.0.5", 40001, "93.184.215.14", 9000)
B = Flow(UDP, "fd77::5", 40002, "2606:2800:21f:cb07::14", 9000)
C = Flow(UDP, "10.77.0.5", 40003, "93.184.215.14", 53)
ASSURED = CtEntry(IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED)
SHORT = CtEntry(IPS_CONFIRMED | IPS_SEEN_REPLY)       # one query, one answer


def lookups(table: dict[Flow, CtEntry | None | OSError]):
    def lookup(flow: Flow) -> CtEntry | None:
        answer = table[flow]
        if isinstance(answer, OSError):
            raise answer
        return answer
    return lookup


# --- sweep_udp -------------------------------------------------------------------------

def test_first_sweep_watches_assured_flows_only_and_aborts_nothing():
    abort, watch = sweep_udp({}, [(A, b"a"), (B, b"b"), (C, b"c")], lookups({A: ASSURED, B: None, C: SHORT}))
    assert abort == []
    assert watch == {A: b"a"}


def test_watched_flow_whose_entry_is_gone_is_aborted():
    abort, watch = sweep_udp({A: b"a", B: b"b"}, [(A, b"a"), (B, b"b")], lookups({A: None, B: ASSURED}))
    assert abort == [(A, b"a")]
    assert watch == {B: b"b"}


def test_never_sent_socket_is_never_aborted_however_many_sweeps():
    watched: dict[Flow, bytes] = {}
    for _ in range(5):
        abort, watched = sweep_udp(watched, [(C, b"c")], lookups({C: None}))
        assert abort == []
    assert watched == {}


def test_short_exchange_that_ends_is_not_aborted():
    _, watched = sweep_udp({}, [(C, b"c")], lookups({C: SHORT}))
    abort, watched = sweep_udp(watched, [(C, b"c")], lookups({C: None}))
    assert (abort, watched) == ([], {})


def test_another_socket_on_the_same_ports_is_not_the_watched_one():
    # The watched socket was closed and a new one connected on the same ports: the new
    # one hasn't been seen assured, its missing entry may mean it hasn't sent yet.
    abort, watch = sweep_udp({A: b"old"}, [(A, b"new")], lookups({A: None}))
    assert (abort, watch) == ([], {})


def test_flow_that_sent_again_after_expiry_is_not_aborted_and_watched_only_once_assured():
    # Expired and the app sent again before this sweep: a new, young (unassured) entry.
    abort, watch = sweep_udp({A: b"a"}, [(A, b"a")], lookups({A: SHORT}))
    assert (abort, watch) == ([], {})


def test_no_answer_keeps_watching_and_decides_later():
    abort, watch = sweep_udp({A: b"a"}, [(A, b"a"), (C, b"c")],
                             lookups({A: OSError(5, "EIO"), C: OSError(5, "EIO")}))
    assert (abort, watch) == ([], {A: b"a"})
    abort, watch = sweep_udp(watch, [(A, b"a")], lookups({A: None}))
    assert abort == [(A, b"a")]


def test_watched_socket_gone_is_forgotten():
    abort, watch = sweep_udp({A: b"a", B: b"b"}, [], lookups({}))
    assert (abort, watch) == ([], {})


# --- SweepSchedule ----------------------------------------------------------------------

def test_periodic_sweeps_follow_the_end_of_the_previous_sweep():
    s = SweepSchedule(interval=5.0)
    s.swept(0.0, 0.5, "start")
    assert s.due(5.4) is None and s.due(5.5) == "periodic"
    assert s.wait(2.0) == pytest.approx(3.5)


def test_no_periodic_sweeps_with_interval_zero():
    s = SweepSchedule(interval=0)
    s.swept(0.0, 0.1, "start")
    assert s.due(1e9) is None and s.wait(0.0) == float("inf")


@pytest.mark.parametrize("previous", ["start", "periodic"])
def test_lost_events_are_swept_at_once(previous):
    s = SweepSchedule(interval=300.0, min_gap=1.0)
    s.swept(0.0, 0.2, previous)
    s.lost(0.3)                      # even right after another kind of sweep
    assert s.due(0.3) == "lost events" and s.wait(0.3) == 0


def test_repeated_overruns_are_rate_limited_but_never_dropped():
    s = SweepSchedule(interval=300.0, min_gap=1.0, duty=4.0)
    s.lost(0.0)
    assert s.due(0.0) == "lost events"
    s.swept(0.0, 0.2, "lost events")
    s.lost(0.5)                      # within the gap: waits for it
    assert s.due(0.5) is None
    assert s.wait(0.5) == pytest.approx(0.7)
    s.lost(0.9)                      # shares the pending sweep
    assert s.due(1.19) is None and s.due(1.2) == "lost events"
    s.swept(1.2, 1.3, "lost events")
    assert s.due(100.0) is None       # both overruns were covered by that one sweep


def test_a_flood_gets_about_one_sweep_per_gap_not_a_busy_loop():
    s = SweepSchedule(interval=0, min_gap=1.0, duty=4.0)
    sweeps, now = 0, 0.0
    while now < 10.0:                # an overrun noticed every millisecond for 10 s
        s.lost(now)
        why = s.due(now)
        if why:
            s.swept(now, now + 0.01, why)
            sweeps += 1
        now += 0.001
    assert 9 <= sweeps <= 11


def test_slow_sweeps_take_at_most_a_fifth_of_the_time():
    s = SweepSchedule(interval=0, min_gap=1.0, duty=4.0)
    s.swept(0.0, 2.0, "lost events")   # a 2 s sweep: the next one for lost events 8 s later
    s.lost(2.1)
    assert s.due(9.9) is None and s.due(10.0) == "lost events"


def test_any_sweep_restarts_the_periodic_clock():
    s = SweepSchedule(interval=5.0, min_gap=1.0)
    s.swept(0.0, 0.1, "start")
    s.lost(3.0)
    assert s.due(3.0) == "lost events"
    s.swept(3.0, 3.1, "lost events")
    assert s.due(5.1) is None and s.due(8.1) == "periodic"


@pytest.mark.parametrize("interval,duration,idle,ok", [
    (300, 0.5, 600, True),     # the defaults
    (300, 0.5, 300, False),    # a flow can become assured and expire between two sweeps
    (2.9, 0.2, 3, False),      # the sweep's own duration counts
    (1, 0.2, 3, True),
    (0, 0.1, 600, False),      # no periodic sweeps at all
    (300, 0.1, None, True),    # no idle timeout known (no table): nothing to say
])
def test_sweep_covers_udp(interval, duration, idle, ok):
    assert sweep_covers_udp(interval, duration, idle) is ok
