"""runtime.agent.resolver's Refresher never makes its driver wait for DNS (issue #11: SIGTERM
waited for a round of lookups against a resolver that was down): lookups run in
daemon threads, answers are applied when they come, and a stop leaves a hung lookup
behind. DNS, the node's view and nft are fakes here; tests/test_agent.py has the real
thing (an agent stopping within a second while its resolver drops every query)."""
from __future__ import annotations

import threading
import time
from typing import Iterator

import pytest

from netpolicy.answers import NodeView
from netpolicy.policy import parse_policy
from runtime.agent import resolver
from runtime.agent.resolver import POLL_S, Lookup, Refresher

SMTP, POP, IMAP = "smtp.gmail.com", "pop.gmail.com", "imap.gmail.com"
NODE = NodeView(addresses=(("198.18.0.2", "uplink"),), peers=(), on_link=(("198.18.0.0/24", "uplink"),),
                gateways=(("198.18.0.1", "uplink"),), pools=("10.77.0.0/16",))


class HeldDNS:
    """Lookups that hang until released, per hostname; others answer at once."""

    def __init__(self) -> None:
        self.held: dict[str, threading.Event] = {}
        self.started: list[str] = []

    def hold(self, host: str) -> threading.Event:
        return self.held.setdefault(host, threading.Event())

    def __call__(self, host, settings, rdtypes=resolver.FAMILIES):
        self.started.append(host)
        gate = self.held.get(host)
        if gate is not None:
            gate.wait(30)
        if host == "boom":
            raise OSError(101, "Network is unreachable")
        return tuple(Lookup(t, ("142.250.10.108",) if t == "A" else (), 60) for t in rdtypes)

    def release(self) -> None:
        for gate in self.held.values():
            gate.set()


@pytest.fixture
def rig(monkeypatch, tmp_path) -> Iterator[tuple[HeldDNS, list[str], Refresher]]:
    dns = HeldDNS()
    scripts: list[str] = []
    monkeypatch.setattr(resolver, "resolve", dns)
    monkeypatch.setattr(resolver.nft, "run", scripts.append)
    ref = Refresher(parse_policy({"resolver": {"minTtl": 5, "maxTtl": 600}}), tmp_path / "resolved.json",
                    view=lambda: NODE)
    yield dns, scripts, ref
    dns.release()  # no fake lookup outlives the test


def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_hung_lookup_holds_neither_the_caller_nor_the_other_hostnames(rig):
    dns, scripts, ref = rig
    dns.hold(SMTP)
    began = time.monotonic()
    ref.start_due(now=100.0)
    assert time.monotonic() - began < 0.5  # returned without waiting for any answer
    _until(lambda: len(ref.pending) == 3 and all(ref.pending[h].done.is_set() for h in (POP, IMAP)))
    done = ref.collect()
    assert [r.host for r in done] == [IMAP, POP] and list(ref.pending) == [SMTP]
    assert scripts and "142.250.10.108" in scripts[0]
    # Answers schedule from when their lookup started, as a TTL counts.
    assert ref.due[(POP, "A")] == 160.0
    # While SMTP hangs it is not asked again, although it is due (and nothing else is).
    ref.start_due(now=101.0)
    assert dns.started.count(SMTP) == 1 and list(ref.pending) == [SMTP] and ref.wake_in() == POLL_S
    dns.hold(SMTP).set()
    _until(lambda: ref.pending[SMTP].done.is_set())
    (res,) = ref.collect()
    assert res.host == SMTP and res.addresses == ("142.250.10.108",) and not ref.pending
    assert ref.due[(SMTP, "A")] == 160.0


def test_run_stops_within_a_poll_while_a_lookup_hangs(rig):
    dns, _, ref = rig
    for host in (SMTP, POP, IMAP):
        dns.hold(host)
    stop = threading.Event()
    runner = threading.Thread(target=ref.run, args=(stop,), daemon=True)
    runner.start()
    _until(lambda: len(dns.started) == 3)
    signalled = time.monotonic()
    stop.set()
    runner.join(5)
    assert not runner.is_alive() and time.monotonic() - signalled < POLL_S + 0.3
    assert set(ref.pending) == {SMTP, POP, IMAP}  # abandoned, never applied


def test_a_lookup_that_raises_is_a_failure_retried_with_backoff(rig):
    _, scripts, ref = rig
    ref.due = {("boom", "A"): 0.0}
    ref.failures = {("boom", "A"): 0}
    (res,) = ref.refresh_due(now=10.0)
    assert "OSError" in res.error and "Network is unreachable" in res.error and not scripts
    assert ref.failures[("boom", "A")] == 1 and ref.due[("boom", "A")] == 11.0
