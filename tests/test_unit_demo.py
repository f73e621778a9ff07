"""The demo's pure parts: which event belongs to which row, the tables, the reclaim
log line, the ICMP probe's reading of what came back. (The demo itself runs in
tests/test_demo.py, on the lab.)"""
from __future__ import annotations

import io
import json
import socket
import struct

from runtime.cli.demo_events import attach_events, find_event, format_event
from runtime.cli.demo_output import Progress, section_lines
from runtime.cli.demo_reclaim import _reclaim_line
from runtime.cli.demo_rows import Row
from runtime.lab.probe import csum16, icmp_answer

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def iso(t: float) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def event(t: float, dst: str, port: int | None, protocol: str = "tcp", **kw) -> dict:
    return {"time": iso(t), "network": "demo", "container_id": "app-a", "pod": "demo/app-a",
            "container_name": None, "ifname": "sg0123456789ab", "family": "ipv6" if ":" in dst else "ipv4",
            "protocol": protocol, "source": "10.77.0.1", "source_port": 40000 if port else None,
            "destination": dst, "port": port, "reason": "blocked-port", "rule": "blocked-port: blocked port (C4, C6)",
            "element": "tcp 25: SMTP port 25 (C6)", **kw}


def row(what: str, host: str, port: int | None, started: float, proto: str = "tcp",
        expected: str = "refused", got: str = "refused") -> Row:
    return Row("policy", what, "app-a", proto, host, port, expected, got=got, detail="ECONNREFUSED after 0 ms",
               started=started, ended=started + 0.05)


def test_each_refusal_gets_the_event_of_its_own_attempt():
    # Two attempts at the same destination (core: from the internet, then from the
    # node): each takes the event stamped in its own window, not the other's.
    first, second = row("from the internet", "10.77.0.1", 8080, T0), row("from the node", "10.77.0.1", 8080, T0 + 1)
    other = row("port 25", "93.184.215.14", 25, T0 + 2)
    allowed = row("587", "93.184.215.14", 587, T0 + 3, expected="open", got="open")
    events = [event(T0 - 5, "10.77.0.1", 8080, reason="old"),      # before the demo's attempt
              event(T0 + 1.02, "10.77.0.1", 8080, reason="second"),
              event(T0 + 0.01, "10.77.0.1", 8080, reason="first"),
              event(T0 + 2.01, "93.184.215.14", 443, reason="wrong port"),
              event(T0 + 2.02, "93.184.215.14", 25, protocol="udp", reason="wrong protocol")]
    missing = attach_events([first, second, other, allowed], events)
    assert (first.event or {}).get("reason") == "first"
    assert (second.event or {}).get("reason") == "second"
    assert other.event is None and allowed.event is None and missing == 1
    events.append(event(T0 + 2.03, "93.184.215.14", 25))
    assert attach_events([first, second, other, allowed], events) == 0
    assert (other.event or {})["destination"] == "93.184.215.14"


def test_icmp_rows_take_either_icmp_protocol_and_addresses_compare_as_addresses():
    ping6 = row("ICMPv6 echo", "2606:2800:21f:cb07::14", None, T0, proto="icmp")
    assert find_event(ping6, [event(T0 + 0.1, "2606:2800:21f:cb07:0::14", None, protocol="ipv6-icmp")],
                      float("inf")) is not None
    assert find_event(ping6, [event(T0 + 0.1, "2606:2800:21f:cb07::14", None, protocol="tcp")], float("inf")) is None
    mapped = row("mapped", "::ffff:10.1.2.3", 80, T0)
    assert find_event(mapped, [event(T0 + 0.1, "10.1.2.3", 80)], float("inf")) is not None
    assert find_event(mapped, [event(T0 + 0.1, "10.1.2.3", 80)], T0 + 0.05) is None  # outside its window


def test_the_table_shows_the_event_line_under_each_refusal():
    refused = row("port 25 (SMTP)", "93.184.215.14", 25, T0)
    refused.event = event(T0 + 0.01, "93.184.215.14", 25)
    lost = row("port 21 (FTP)", "93.184.215.14", 21, T0 + 1)
    opened = row("port 587", "93.184.215.14", 587, T0 + 2, expected="open", got="open")
    wrong = row("Google range", "142.250.72.14", 443, T0 + 3, got="open")
    lines = section_lines("policy", [refused, lost, opened, wrong])
    text = "\n".join(lines)
    at = next(i for i, line in enumerate(lines) if line.startswith("port 25 (SMTP)"))
    assert lines[at].endswith("ok")
    assert lines[at + 1].strip() == format_event(refused.event)
    assert lines[at + 1] == "    event 08:00:00.010 demo/app-a: tcp 10.77.0.1:40000 -> 93.184.215.14:25: " \
                            "blocked-port: blocked port (C4, C6) — tcp 25: SMTP port 25 (C6)"
    other = format_event(event(T0, "198.18.0.2", 22, reason="container-to-node", element=None,
                               rule="node-address: the node is not a service for containers"))
    assert other.endswith("198.18.0.2:22: container-to-node (node-address: the node is not a service for containers)")
    assert lines[at + 2].startswith("port 21 (FTP)") and lines[at + 2].endswith("NO EVENT")
    assert "no refused-flow event found" in lines[at + 3]
    assert any(line.startswith("port 587") and line.endswith("ok") for line in lines)
    assert any(line.startswith("Google range") and line.endswith("MISMATCH") for line in lines)
    assert "expected" in text and "detail" in text


def test_json_rows_carry_the_destination_and_verdict():
    r = row("port 25 (SMTP)", "2606:2800:21f:cb07::14", 25, T0)
    r.server_events_before = 3
    doc = r.as_json()
    assert doc["to"] == "[2606:2800:21f:cb07::14]:25" and doc["verdict"] == "NO EVENT"
    assert "server_events_before" not in doc
    json.dumps(doc)


def test_reclaim_line_is_found_by_the_idle_socket_address():
    log = "\n".join([
        "not json",
        json.dumps({"ts": "2026-12-06T09:00:03.512Z", "msg": "reclaimed idle tcp 10.77.0.1:40001 -> "
                                                              "93.184.215.14:9000 of container app-a/eth0 on demo"}),
        json.dumps({"ts": "2026-12-06T09:00:04.000Z", "msg": "reclaimed idle tcp [fd77:5067:6174::1]:40002 -> "
                                                              "[2606:2800:21f:cb07::14]:9000 of container app-a"}),
    ])
    assert _reclaim_line(log, ("10.77.0.1", 40001))["ts"].endswith("03.512Z")
    assert _reclaim_line(log, ("10.77.0.1", 4000)) is None  # a prefix of the port is not the port
    assert _reclaim_line(log, ("fd77:5067:6174::1", 40002)) is not None


def test_progress_lines_go_to_their_stream_with_the_step_count():
    buf = io.StringIO()
    p = Progress(3, out=buf)
    p.step("building the lab")
    p.note("  detail")
    lines = buf.getvalue().splitlines()
    assert lines[0].endswith("step 1/3: building the lab") and lines[0].startswith("[")
    assert lines[1].endswith("  detail")


def _icmp4(kind: int, code: int, body: bytes) -> bytes:
    msg = struct.pack("!BBH", kind, code, 0) + body
    msg = msg[:2] + struct.pack("!H", csum16(msg)) + msg[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(msg), 0, 0, 64, 1, 0,
                     socket.inet_aton("93.184.215.14"), socket.inet_aton("10.77.0.1"))
    return ip + msg


def test_icmp_probe_reads_replies_and_errors_about_its_own_request():
    echo = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1)
    assert icmp_answer(socket.AF_INET, _icmp4(0, 0, struct.pack("!HH", 0x1234, 1) + b"x"), 0x1234, 1) == "reply"
    assert icmp_answer(socket.AF_INET, _icmp4(0, 0, struct.pack("!HH", 0x9999, 1)), 0x1234, 1) is None
    quoted = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 1, 0, socket.inet_aton("10.77.0.1"),
                         socket.inet_aton("93.184.215.14")) + echo
    refused = _icmp4(3, 13, b"\0\0\0\0" + quoted)
    assert icmp_answer(socket.AF_INET, refused, 0x1234, 1) == "admin-prohibited"
    assert icmp_answer(socket.AF_INET, refused, 0x4321, 1) is None  # about someone else's request
    # ICMPv6: no IP header from a raw socket; an error quotes the 40-byte IPv6 header.
    echo6 = struct.pack("!BBHHH", 128, 0, 0, 0x1234, 1)
    assert icmp_answer(socket.AF_INET6, struct.pack("!BBHHH", 129, 0, 0, 0x1234, 1), 0x1234, 1) == "reply"
    err6 = struct.pack("!BBHI", 1, 1, 0, 0) + b"\x60" + b"\0" * 39 + echo6
    assert icmp_answer(socket.AF_INET6, err6, 0x1234, 1) == "admin-prohibited"
    assert icmp_answer(socket.AF_INET6, struct.pack("!BBHI", 1, 1, 0, 0), 0x1234, 1) is None  # truncated
