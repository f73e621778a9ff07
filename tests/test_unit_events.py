"""Refused-flow events without a kernel: the headers of reported packets, the words
of the rule that refused them (the same as `policy explain`'s), one event line per
report with the container as billing names it, the metrics, the agent's bounded
queue and writer, and `sockgate events` on a state dir."""
from __future__ import annotations

import ipaddress
import json
import socket
import struct
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from netpolicy.compile import compile_policy, explain
from netpolicy.policy import Policy, parse_policy
from netpolicy.ranges import IPNetwork
from netpolicy.refusals import POLICY_RULES, REASON_WORDS, Packet, Refusals, rule_words, tcp_flags
from netpolicy.ruleset import EVENT_REASONS, FlowBounds
from runtime.agent.event_log import EventLog, read_events
from runtime.agent.events import EventsWatch, fmt_time, parse_headers
from runtime.agent.metrics import event_families
from runtime.cli.main import main as cli_main
from runtime.kernel.netlink.nflog import Logged
from runtime.state.store import READY, Attachment, AttachmentStore, host_ifname

GOOGLE: list[IPNetwork] = [ipaddress.ip_network("8.8.8.0/24"), ipaddress.ip_network("142.250.0.0/15")]
COMPILED = compile_policy(Policy(), GOOGLE)


# --- packets -----------------------------------------------------------------------

def ipv4(src: str, dst: str, proto: int, l4: bytes, frag: int = 0) -> bytes:
    total = 20 + len(l4)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, frag, 64, proto, 0, socket.inet_aton(src),
                       socket.inet_aton(dst)) + l4


def ipv6(src: str, dst: str, nh: int, l4: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), nh, 64, socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + l4


def tcp(sport: int, dport: int, flags: int = 0x02) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 64240, 0, 0)


def udp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8, 0)


def test_headers_of_tcp_udp_icmp_v4_and_v6():
    assert parse_headers(ipv4("10.77.0.2", "10.0.0.1", 6, tcp(40000, 80))) == \
        ("ipv4", Packet("tcp", "10.77.0.2", "10.0.0.1", 40000, 80, tcp_flags=0x02))
    assert parse_headers(ipv6("fd77::2", "fc00::1", 17, udp(5353, 53))) == \
        ("ipv6", Packet("udp", "fd77::2", "fc00::1", 5353, 53))
    assert parse_headers(ipv4("10.77.0.2", "8.8.8.8", 1, bytes([8, 0, 0, 0]))) == \
        ("ipv4", Packet("icmp", "10.77.0.2", "8.8.8.8", icmp_type=8, icmp_code=0))
    assert parse_headers(ipv6("fd77::2", "2001:db8::1", 58, bytes([128, 0]))) == \
        ("ipv6", Packet("ipv6-icmp", "fd77::2", "2001:db8::1", icmp_type=128, icmp_code=0))
    # Other protocols by number; a later fragment has no ports; truncated: what is there.
    assert parse_headers(ipv4("10.77.0.2", "1.1.1.1", 132, b"\0" * 12))[1].protocol == "132"
    assert parse_headers(ipv4("10.77.0.2", "1.1.1.1", 17, udp(1, 2), frag=100))[1].port is None
    assert parse_headers(ipv4("10.77.0.2", "1.1.1.1", 6, tcp(1, 2))[:22])[1].port is None
    assert parse_headers(b"\x45" * 10) is None and parse_headers(b"\x75" + b"\0" * 40) is None


def test_times_are_utc_with_microseconds():
    assert fmt_time(1_796_547_600.123456) == "2026-12-06T09:00:00.123456Z"


# --- the rule and element ------------------------------------------------------------------

@pytest.mark.parametrize("dst, port, proto, reason", [
    ("10.1.2.3", 80, "tcp", "blocked-range"),
    ("169.254.169.254", 80, "tcp", "blocked-range"),
    ("142.250.10.1", 443, "tcp", "blocked-range"),
    ("fd00::1", 443, "udp", "blocked-range"),
    ("8.8.8.8", 443, "tcp", "blocked-range"),   # an exception only on its ports
    ("93.184.215.14", 25, "tcp", "blocked-port"),
    ("93.184.215.14", 21, "tcp", "blocked-port"),
    ("93.184.215.14", 25, "udp", "blocked-port"),
    ("44.77.0.9", 80, "tcp", "container-pool"),
])
def test_policy_refusals_in_the_words_explain_prints(dst, port, proto, reason):
    pools = (ipaddress.ip_network("44.77.0.0/16"),)
    v = explain(COMPILED, dst, port, proto, pools=pools)
    assert v.verdict == "refuse" and POLICY_RULES[reason] == v.rule
    decided = Refusals(COMPILED).decide(reason, Packet(proto, "10.77.0.2", dst, 40000, port), pools)
    assert (decided.rule, decided.element) == (f"{v.rule}: {v.why}", v.detail)
    assert f"rule {decided.rule} — {decided.element}" in str(v)


def test_protocol_and_node_refusals_in_explains_words():
    v = explain(COMPILED, "93.184.215.14", 0, "icmp")
    d = Refusals(COMPILED).decide("protocol", Packet("icmp", "10.77.0.2", "93.184.215.14", icmp_type=8))
    assert (d.rule, d.element) == (f"{v.rule}: {v.why}", v.detail)
    v = explain(COMPILED, "198.18.0.2", 80, "tcp", node_addresses=("198.18.0.2",))
    d = Refusals(COMPILED).decide("container-to-node", Packet("tcp", "10.77.0.2", "198.18.0.2", 1, 80))
    assert (d.rule, d.element) == (f"{v.rule}: {v.why}", v.detail)


def test_every_reported_reason_has_words_and_the_policy_supplies_the_element():
    assert set(POLICY_RULES) | set(REASON_WORDS) | {"container-to-node"} == set(EVENT_REASONS)
    pkt = Packet("tcp", "10.77.0.9", "10.77.0.3", 1, 80, tcp_flags=0x10)
    r = Refusals(compile_policy(parse_policy({"limits": {"maxFlows": 300, "newFlowsPerSecond": 7}}), GOOGLE))
    assert r.decide("flow-limit", pkt).element == "300 live flows"
    assert r.decide("flow-rate", pkt).element == "7/second, burst 200"
    assert r.decide("tcp-without-flow", pkt).element == "tcp flags ack without a SYN"
    assert r.decide("spoofed-source", pkt).element == "10.77.0.9 is not this container's address"
    assert r.decide("container-to-container", pkt).rule == "container-to-container: " \
        "containers can't reach each other (C1)"
    assert r.decide("inbound", pkt).element is None
    # Without a policy at hand (an invalid file): the words, no element from it.
    none = Refusals(None)
    assert none.decide("blocked-range", Packet("tcp", "10.77.0.2", "10.1.2.3", 1, 80)).element is None
    assert none.decide("flow-limit", pkt).element == f"{FlowBounds().max_flows} live flows"
    # A range no longer blocked (the policy changed since): no element.
    assert Refusals(COMPILED).blocked_range("93.184.215.14") is None
    assert rule_words("blocked-port") == "blocked-port: blocked port (C4, C6)"
    assert tcp_flags(0x12) == "syn|ack" and tcp_flags(0) == "none"


# --- events from reports -----------------------------------------------------------

def attach(state, cid: str, index: int, network: str = "net", **labels: str) -> Attachment:
    att = Attachment(network=network, container_id=cid, ifname="eth0", netns=f"/run/netns/{cid}",
                     host_ifname=host_ifname(network, cid, "eth0"), ipv4="10.77.0.2", ipv6="fd77::2",
                     host_ifindex=index, labels=labels, state=READY, created="2026-12-06T08:00:00+00:00")
    AttachmentStore(state / "networks" / network / "attachments").save(att)
    return att


def report(reason: str, payload: bytes, indev: int = 0, outdev: int = 0, ts: float | None = None) -> Logged:
    return Logged(family=2, prefix=f"drop:{reason}", indev=indev, outdev=outdev, payload=payload, timestamp=ts)


@pytest.fixture
def watch(tmp_path):
    attach(tmp_path, "web0c0ffee", 41, pod_namespace="shop", pod_name="web-0")
    attach(tmp_path, "d0cker1234", 42, container_name="worker")
    return EventsWatch(str(tmp_path), policy=lambda: COMPILED, pools=lambda: ["44.77.0.0/16"])


def test_a_refused_connect_becomes_one_line_naming_pod_destination_port_and_rule(watch, tmp_path):
    ev = watch.event(report("blocked-range", ipv4("10.77.0.2", "10.1.2.3", 6, tcp(40000, 80)), indev=41,
                            ts=1_796_547_600.5), received=0)
    assert ev == {"time": "2026-12-06T09:00:00.500000Z", "network": "net", "container_id": "web0c0ffee",
                  "pod": "shop/web-0", "container_name": None, "ifname": host_ifname("net", "web0c0ffee", "eth0"),
                  "family": "ipv4", "protocol": "tcp", "source": "10.77.0.2", "source_port": 40000,
                  "destination": "10.1.2.3", "port": 80, "reason": "blocked-range",
                  "rule": "blocked-range: blocked destination range (C7)",
                  "element": "10.0.0.0/8: private use (RFC 1918)"}
    assert list(ev) == ["time", "network", "container_id", "pod", "container_name", "ifname", "family",
                        "protocol", "source", "source_port", "destination", "port", "reason", "rule", "element"]


def test_inbound_reports_name_the_container_they_were_going_to(watch):
    ev = watch.event(report("inbound", ipv6("2606:2800::1", "fd77::2", 6, tcp(5000, 8080)), indev=2, outdev=42),
                     received=1_796_547_600.0)
    assert (ev["container_name"], ev["pod"], ev["container_id"], ev["family"]) == ("worker", None, "d0cker1234",
                                                                                   "ipv6")
    assert ev["time"] == "2026-12-06T09:00:00.000000Z"  # no kernel stamp: when it was read
    assert ev["rule"].startswith("inbound: ") and ev["element"] is None


def test_pools_come_from_the_table_and_unknown_interfaces_are_still_reported(watch):
    ev = watch.event(report("container-pool", ipv4("10.77.0.2", "44.77.3.4", 17, udp(1, 53)), indev=41), 0)
    assert ev["element"] == "44.77.0.0/16"
    ev = watch.event(report("spoofed-source", ipv4("10.9.9.9", "1.1.1.1", 17, udp(1, 53)), indev=999), 0)
    assert (ev["container_id"], ev["network"], ev["pod"], ev["ifname"]) == (None, None, None, "999")
    assert watch.event(Logged(2, "someone else's", 41, 0, ipv4("1.1.1.1", "1.1.1.2", 6, tcp(1, 2))), 0) is None
    assert watch.event(report("inbound", b"junk"), 0) is None


def test_metrics_count_per_attachment_and_reason(watch, tmp_path):
    for _ in range(3):
        watch.event(report("blocked-port", ipv4("10.77.0.2", "93.184.215.14", 6, tcp(1, 25)), indev=41), 0)
    watch.event(report("blocked-range", ipv4("10.77.0.2", "10.1.2.3", 6, tcp(1, 80)), indev=41), 0)
    registry = CollectorRegistry()

    class Collector:
        def collect(self):
            return event_families(watch)
    registry.register(Collector())
    text = generate_latest(registry).decode()
    assert ('sockgate_refused_flows_total{container_id="web0c0ffee",container_name="",ifname="eth0",network="net",'
            'pod_name="web-0",pod_namespace="shop",reason="blocked-port"} 3.0') in text
    assert 'reason="blocked-range"} 1.0' in text
    assert "sockgate_events_dropped_total 0.0" in text
    # A detached container's series end.
    AttachmentStore(tmp_path / "networks" / "net" / "attachments").delete("web0c0ffee", "eth0")
    watch.prune()
    assert watch.counts() == {}


def test_the_queue_is_bounded_and_what_it_drops_is_counted(tmp_path):
    w = EventsWatch(str(tmp_path), queue_size=3)
    pkt = report("inbound", ipv4("1.1.1.1", "10.77.0.2", 6, tcp(1, 2)), outdev=5)
    assert [w.enqueue(pkt, 0) for _ in range(5)] == [True, True, True, False, False]
    assert w.dropped() == 2


def test_the_writer_writes_every_queued_event_at_its_rate_then_stops(watch, tmp_path):
    watch.max_per_second = 50  # 10 per 0.2 s slice
    for i in range(25):
        watch.enqueue(report("blocked-range", ipv4("10.77.0.2", "10.1.2.3", 6, tcp(40000 + i, 80)), indev=41), 0)
    stop = threading.Event()
    stop.set()  # drains what is queued, then returns
    started = time.monotonic()
    watch._write_loop(stop)
    took = time.monotonic() - started
    watch.log.close()
    ports = [e["source_port"] for e in read_events(tmp_path)]
    assert ports == [40000 + i for i in range(25)]
    assert took >= 0.35, f"25 events at 50/s took {took:.2f} s"  # three slices at least


def test_a_write_that_fails_counts_its_lines_as_dropped(watch, tmp_path):
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "events.jsonl").mkdir()  # can't be opened for writing
    watch._write([type("I", (), {"logged": report("inbound", ipv4("1.1.1.1", "10.77.0.2", 6, tcp(1, 2)),
                                                   outdev=41), "received": 0.0})()])
    assert watch.dropped() == 1


# --- sockgate events ---------------------------------------------------------------

def _fill(tmp_path, watch) -> None:
    lines = [watch.event(report("blocked-range", ipv4("10.77.0.2", "10.1.2.3", 6, tcp(40000, 80)), indev=41), 0),
             watch.event(report("blocked-port", ipv4("10.77.0.3", "93.184.215.14", 6, tcp(40001, 25)), indev=42), 0)]
    log = EventLog(tmp_path)
    log.append(json.dumps(e) for e in lines)
    log.close()


def test_the_command_prints_a_table_json_and_filters(watch, tmp_path, capsys):
    _fill(tmp_path, watch)
    assert cli_main(["events", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["time", "pod/container", "proto", "source", "destination", "port", "reason", "rule",
                              "—", "element"]
    assert "shop/web-0" in out[2] and "10.1.2.3" in out[2] and " 80 " in out[2] and "blocked-range:" in out[2]
    assert "worker" in out[3] and "blocked-port: blocked port (C4, C6) — tcp 25: SMTP port 25 (C6)" in out[3]
    assert cli_main(["events", "--state-dir", str(tmp_path), "--json", "--pod", "shop/web-0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [e["destination"] for e in got] == ["10.1.2.3"]
    assert cli_main(["events", "--state-dir", str(tmp_path), "--json", "--container", "d0ck"]) == 0
    assert [e["container_name"] for e in json.loads(capsys.readouterr().out)] == ["worker"]
    assert cli_main(["events", "--state-dir", str(tmp_path), "--json", "--last", "1"]) == 0
    assert [e["reason"] for e in json.loads(capsys.readouterr().out)] == ["blocked-port"]
    assert cli_main(["events", "--state-dir", str(tmp_path), "--pod", "shop/none"]) == 0
    assert capsys.readouterr().out.startswith("no matching refused-flow events in ")
    assert cli_main(["events", "--state-dir", str(tmp_path / "empty"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize("argv", [["--pod", "web-0"], ["--pod", "a/b/c"], ["--pod", "a/b", "--container", "x"],
                                  ["--last", "-1"]])
def test_bad_filters_are_usage_errors(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["events", "--state-dir", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


class FakeNflog:
    """Stands in for runtime.kernel.netlink.nflog.NflogSocket: hands out `batches`,
    then nothing; raises `fail` once they are out, if given."""

    def __init__(self, batches: list[list[Logged]], fail: Exception | None = None) -> None:
        self.batches, self.fail = list(batches), fail
        self.lost = type("Lost", (), {"total": 2})()
        self.closed = False

    def __call__(self, group: int, **kw) -> FakeNflog:
        return self

    def read(self, timeout: float) -> list[Logged]:
        if self.batches:
            return self.batches.pop(0)
        if self.fail is not None:
            raise self.fail
        time.sleep(min(timeout, 0.01))
        return []

    def close(self) -> None:
        self.closed = True


def test_the_component_reads_writes_and_stops(watch, tmp_path, monkeypatch):
    import runtime.agent.events as events
    pkt = report("blocked-range", ipv4("10.77.0.2", "10.1.2.3", 6, tcp(40000, 80)), indev=41)
    fake = FakeNflog([[pkt, pkt], [pkt]])
    monkeypatch.setattr(events, "NflogSocket", fake)
    stop = threading.Event()
    t = threading.Thread(target=watch.run, args=(stop,))
    t.start()
    deadline = time.monotonic() + 5
    while len(list(read_events(tmp_path))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    t.join(5)
    assert not t.is_alive() and fake.closed
    assert len(list(read_events(tmp_path))) == 3
    assert watch.dropped() == 2  # the socket's sequence gaps, kept after it closed


def test_a_reader_that_fails_stops_its_writer_too(watch, monkeypatch):
    """The agent restarts a failed component: run() must return (raise), not wait for
    a writer that waits for the agent's stop."""
    import runtime.agent.events as events
    monkeypatch.setattr(events, "NflogSocket", FakeNflog([], fail=OSError(5, "EIO")))
    with pytest.raises(OSError):
        watch.run(threading.Event())


def test_a_line_written_right_after_a_policy_change_names_the_new_limits(tmp_path):
    attach(tmp_path, "web0c0ffee", 41, pod_namespace="shop", pod_name="web-0")
    policies = [COMPILED]
    w = EventsWatch(str(tmp_path), policy=lambda: policies[0])
    pkt = report("flow-rate", ipv4("10.77.0.2", "93.184.215.14", 6, tcp(1, 9000)), indev=41)
    assert w.event(pkt, 0)["element"] == "100/second, burst 200"
    policies[0] = compile_policy(parse_policy({"limits": {"newFlowsPerSecond": 1, "newFlowsBurst": 1}}), GOOGLE)
    assert w.event(pkt, 0)["element"] == "1/second, burst 1"
