"""Idle reclaim (runtime/reclaim.py) on the real lab: a policy with a 3 s idle timeout,
the reclaimer running in the node netns, apps holding real sockets to the lab's echo
server, and evidence from both ends (what the app's socket says, what the server got,
what reached the internet netns, what conntrack holds)."""
from __future__ import annotations

import ipaddress
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runtime.lab import LAB
from runtime.lab.policy import write_lab_policy
from runtime.reclaim import Destroyed, Flow, verdict

pytestmark = pytest.mark.lab
IDLE = 3            # s: the policy's idleTimeout in these tests
NUDGE = "1"         # s: the reclaimer's conntrack nudge (the kernel GC alone is up to 60 s late)
RECLAIM_DEADLINE = IDLE + 30.0
BUSY_PERIOD = 0.5   # s between packets of a flow that must stay alive

# The app: holds one socket to the echo server and does what stdin says, one JSON line
# per command on stdout. "echo X": send X, wait for the echo; "send X": send only;
# "recv": block in recv until something (data, EOF, an error) happens.
APP = r"""
import errno, json, socket, sys, time
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
def out(**kw):
    kw["t"] = time.time()
    print(json.dumps(kw), flush=True)
def name(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
if proto == "tcp":
    s = socket.create_connection((host, port), timeout=5)
    buf = b""
    while b"\n" not in buf:
        buf += s.recv(4096)
    server = json.loads(buf.split(b"\n")[0])
    s.settimeout(None)
else:
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.connect((host, port))
    server = None
out(local=list(s.getsockname()[:2]), server=server)
for line in sys.stdin:
    cmd, _, arg = line.rstrip("\n").partition(" ")
    try:
        if cmd == "echo":
            s.send(arg.encode())
            if proto == "tcp":
                got = b""
                while len(got) < len(arg):
                    chunk = s.recv(4096)
                    if not chunk:
                        raise ConnectionError(0, "EOF")
                    got += chunk
                out(ok=True, data=got.decode())
            else:
                s.settimeout(3)
                head, _, payload = s.recv(65535).partition(b"\n")
                s.settimeout(None)
                out(ok=True, data=payload.decode(), server=json.loads(head))
        elif cmd == "send":
            out(ok=True, sent=s.send(arg.encode()))
        elif cmd == "recv":
            got = s.recv(65535)
            out(ok=True, data=got.decode(errors="replace"))
    except OSError as e:
        out(ok=False, error=name(e))
"""

# One hand-made TCP segment (no options, payload = marker) from a raw socket: a packet
# of a flow the kernel no longer has a socket for. argv: src sport dst dport flags marker
RAW_TCP = r"""
import socket, struct, sys
src, sport, dst, dport, flags, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], bytes.fromhex(sys.argv[6])
bits = {"S": 0x02, "A": 0x10, "P": 0x08}
fl = sum(bits[c] for c in flags)
seq, ack = 0x1000, 0x2000 if "A" in flags else 0
hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, fl, 65535, 0, 0)
if ":" in dst:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s.setsockopt(socket.IPPROTO_IPV6, 7, 16)          # IPV6_CHECKSUM: the kernel fills it in
    s.bind((src, 0))
    s.sendto(hdr + marker, (dst, 0))
else:
    seg = hdr + marker
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(seg))
    data = pseudo + seg + b"\0" * (len(seg) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    seg = seg[:16] + struct.pack("!H", ~total & 0xFFFF) + seg[18:]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    s.bind((src, 0))
    s.sendto(seg, (dst, 0))
"""


def _unmap(addr: str) -> str:
    ip = ipaddress.ip_address(addr)
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else addr


class App:
    """An app process in a container netns holding one socket."""

    def __init__(self, lab, ns: str, proto: str, host: str, port: int = 9000) -> None:
        self.proto, self.host = proto, host
        self.proc = lab.popen(ns, [sys.executable, "-c", APP, proto, host, str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        hello = self.next(10)
        self.local: tuple[str, int] = (_unmap(hello["local"][0]), hello["local"][1])
        self.server: dict | None = hello["server"]      # TCP: what the server saw (NAT port)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, timeout: float) -> dict:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"app ({self.proto} to {self.host}) said nothing within {timeout} s") from None

    def ask(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def do(self, command: str, timeout: float = 10.0) -> dict:
        self.ask(command)
        return self.next(timeout)

    def echo(self, word: str) -> dict:
        r = self.do(f"echo {word}")
        assert r == {**r, "ok": True, "data": word}, f"{self.proto} echo of {word!r} to {self.host} failed: {r}"
        if self.proto == "udp":
            self.server = r["server"]
        return r

    def flow(self) -> Flow:
        """As conntrack sees it (a dual-stack socket's v4-mapped addresses are IPv4)."""
        return Flow(6 if self.proto == "tcp" else 17, self.local[0], self.local[1], _unmap(self.host), 9000)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


class ReclaimerProcess:
    """`python -m runtime.reclaim` in the node netns (what the agent will run)."""

    def __init__(self, lab, state_dir: Path, tmp: Path, *extra: str) -> None:
        self.log_path, self.counts_path = tmp / "reclaim.log", tmp / "reclaim-counts.json"
        self.proc = lab.popen(lab.node, [sys.executable, "-m", "runtime.reclaim", "--state-dir", str(state_dir),
                                         "--nudge-interval", NUDGE, "--counts-file", str(self.counts_path),
                                         *extra], log=self.log_path)
        deadline = time.monotonic() + 20
        while "sweep (start)" not in self.log():
            assert self.proc.poll() is None and time.monotonic() < deadline, f"reclaimer didn't start: {self.log()}"
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def counts(self) -> dict[str, int]:
        return json.loads(self.counts_path.read_text()) if self.counts_path.exists() else {}

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(15)


def _cli(lab, *args: str) -> subprocess.CompletedProcess:
    return lab.run(lab.node, [sys.executable, "-m", "runtime.cli", *args], check=False)


def _apply(lab, plugin, policy: str) -> None:
    r = _cli(lab, "policy", "apply", "--policy", policy, "--state-dir", str(plugin.state_dir))
    assert r.returncode == 0, r.stderr


def _conntrack(lab, flow: Flow) -> str:
    """The node's conntrack entries of this flow (read-only; in the lab's node netns)."""
    r = lab.run(lab.node, ["conntrack", "-L", "-f", "ipv6" if ":" in flow.src else "ipv4",
                           "-p", "tcp" if flow.proto == 6 else "udp", "--orig-src", flow.src,
                           "--sport", str(flow.sport)], check=False)
    return r.stdout.strip()


def _key(plugin, cid: str) -> str:
    return f"{plugin.conf['name']}/{cid}/eth0"


@pytest.fixture
def idle_policy(lab, plugin, tmp_path):
    """Apply a lab policy with idleTimeout=IDLE *after* the test's ADDs (an ADD loads its
    policyFile); the session policy is back in force afterwards, pass or fail."""
    def apply() -> None:
        _apply(lab, plugin, str(write_lab_policy(tmp_path / "idle.json", idleTimeout=IDLE)))
    yield apply
    _apply(lab, plugin, plugin.conf["policyFile"])


@pytest.fixture
def reclaimer(lab, plugin, tmp_path):
    started: list[ReclaimerProcess] = []

    def start(*extra: str) -> ReclaimerProcess:
        started.append(ReclaimerProcess(lab, plugin.state_dir, tmp_path, *extra))
        return started[-1]
    yield start
    for r in started:
        assert r.stop() == 0, f"reclaimer did not stop cleanly: {r.log()[-3000:]}"


@pytest.fixture
def apps():
    made: list[App] = []

    def make(*args) -> App:
        made.append(App(*args))
        return made[-1]
    yield make
    for a in made:
        a.close()


@pytest.fixture
def internet_counter(lab):
    """Counts TCP segments carrying a marker as they arrive in the internet netns."""
    table = "sgtest_reclaim"

    def add(name: str) -> bytes:
        marker = os.urandom(8)
        lab.run(lab.internet, ["nft", "-f", "-"], input=(
            f"add table inet {table}\n"
            f"add chain inet {table} pre {{ type filter hook prerouting priority -400; policy accept; }}\n"
            f'add rule inet {table} pre meta l4proto tcp @th,160,64 0x{marker.hex()} counter comment "{name}"\n'))
        return marker

    def count(name: str) -> int:
        out = json.loads(lab.run(lab.internet, ["nft", "-j", "list", "table", "inet", table]).stdout)
        for item in out["nftables"]:
            rule = item.get("rule")
            if rule and rule.get("comment") == name:
                return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        raise KeyError(name)

    add.count = count  # type: ignore[attr-defined]
    yield add
    lab.run(lab.internet, ["nft", "delete", "table", "inet", table], check=False)


def _wait(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


# The next operation of the idle app after the reclaim: "send" (an app that writes) or
# "recv" (an app already blocked in recv, which must wake up). "::ffff:" addresses: a
# dual-stack IPv6 socket talking IPv4 (what Java does by default).
MAPPED = "::ffff:" + LAB.public_v4
CASES = [("tcp", LAB.public_v4, "send"), ("tcp", LAB.public_v6, "recv"), ("tcp", MAPPED, "recv"),
         ("udp", LAB.public_v4, "recv"), ("udp", LAB.public_v6, "send"), ("udp", MAPPED, "recv")]


def _case_id(proto: str, host: str, op: str) -> str:
    return f"{proto}-{'v4mapped' if host == MAPPED else 'v6' if ':' in host else 'v4'}-{op}"


@pytest.mark.parametrize("proto,host,next_op", CASES, ids=[_case_id(*c) for c in CASES])
def test_idle_flow_is_reclaimed_and_an_active_one_is_not(lab, plugin, app, apps, idle_policy, reclaimer,
                                                         internet_counter, proto, host, next_op):
    plugin.add("idle", idle_ns := app())
    plugin.add("busy", busy_ns := app())
    idle_policy()
    rec = reclaimer("--sweep-interval", "0")       # the event path alone
    idle, busy = apps(lab, idle_ns, proto, host), apps(lab, busy_ns, proto, host)
    started = time.time()
    # UDP: the kernel applies the `replied` (idle) timeout only once a flow has been
    # active for more than 2 s; before that the entry has the 30 s `unreplied` one.
    for i in range(6 if proto == "udp" else 1):
        last = idle.echo(f"hi{i}")["t"]
        busy.echo(f"b{i}")
        if proto == "udp":
            time.sleep(BUSY_PERIOD)
    if proto == "udp":
        assert "ASSURED" in _conntrack(lab, idle.flow()), "UDP flow not yet under its idle timeout"
    public_port = idle.server["peer_port"]
    if next_op == "recv":
        idle.ask("recv")

    # The busy flow sends every BUSY_PERIOD s throughout; the idle one goes quiet.
    idle_key, busy_key = _key(plugin, "idle"), _key(plugin, "busy")
    reclaimed_at = None
    n = 0
    while reclaimed_at is None or time.time() - started < 3 * IDLE:
        busy.echo(f"keep{n}")
        n += 1
        if reclaimed_at is None and rec.counts().get(idle_key):
            reclaimed_at = time.time()
        assert time.time() - last < RECLAIM_DEADLINE, f"idle {proto} flow not reclaimed: {rec.log()[-3000:]}"
        time.sleep(BUSY_PERIOD)

    # The app learns: a blocked recv wakes up with ECONNABORTED, or the next send fails:
    # ECONNABORTED for TCP; a UDP socket is disconnected by the abort, so send() says
    # EDESTADDRREQ and the pending ECONNABORTED comes with the next recv.
    r = idle.next(10) if next_op == "recv" else idle.do("send late")
    expected = "EDESTADDRREQ" if (proto, next_op) == ("udp", "send") else "ECONNABORTED"
    assert r["ok"] is False and r["error"] == expected, r
    if expected != "ECONNABORTED":
        r2 = idle.do("recv")
        assert r2["ok"] is False and r2["error"] == "ECONNABORTED", r2
    delay = (r["t"] if next_op == "recv" else reclaimed_at) - last
    print(f"\n{_case_id(proto, host, next_op)}: reclaimed {delay:.2f} s after the last packet "
          f"(idle timeout {IDLE} s)")
    assert delay >= IDLE - 0.2, f"reclaimed after {delay:.2f} s, before the idle timeout"
    after = idle.do("send again")
    assert after["ok"] is False, after        # EPIPE (TCP) or EDESTADDRREQ (UDP): still nothing goes out

    # Counted for the idle container only, and logged with container and flow.
    assert rec.counts() == {idle_key: 1}
    flow = idle.flow()
    line = next((ln for ln in rec.log().splitlines() if "reclaimed idle" in ln and str(flow) in ln), None)
    assert line and "container idle/eth0" in line and plugin.conf["name"] in line, rec.log()[-3000:]

    # Nothing of the flow is left or passes: no conntrack entry came back ...
    assert _conntrack(lab, flow) == ""
    if proto == "tcp":
        # ... the server never heard of it (not even the abort's RST got out) and got no
        # more bytes: abort its end here to read its byte count ...
        tcp_closes = lambda: [e for e in lab.server_events()
                              if e["ev"] == "tcp_close" and e["peer_port"] == public_port]
        assert tcp_closes() == []
        peer = f"[{LAB.node_uplink_v6}]" if ":" in flow.dst else LAB.node_uplink_v4
        lab.run(lab.internet, ["ss", "-K", "-t", "dst", f"{peer}:{public_port}"])
        _wait(tcp_closes, 10, "server-side close")
        assert tcp_closes()[0]["bytes_in"] == len("hi0")
        # ... and a hand-made mid-stream segment of the flow is refused at the node,
        # while a SYN made the same way (the control) does reach the internet.
        control, midstream = internet_counter("control"), internet_counter("midstream")
        src, dst = flow.src, flow.dst
        lab.run(idle_ns, [sys.executable, "-c", RAW_TCP, src, "40999", dst, "9000", "S", control.hex()])
        lab.run(idle_ns, [sys.executable, "-c", RAW_TCP, src, str(idle.local[1]), dst, "9000", "PA",
                          midstream.hex()])
        _wait(lambda: internet_counter.count("control") == 1, 5, "control SYN in the internet")
        time.sleep(0.5)
        assert internet_counter.count("midstream") == 0
        assert _conntrack(lab, flow) == ""
    else:
        # ... and the server got no datagram of it after the reclaim.
        late = [e for e in lab.server_events() if e["ev"] == "udp" and e["peer_port"] == public_port
                and e["ts"] > last + 0.5]
        assert late == []

    # The busy flow lived through 3 idle timeouts and still echoes, uncounted.
    assert time.time() - started >= 3 * IDLE
    busy.echo("still")
    assert busy_key not in rec.counts()
    assert _conntrack(lab, busy.flow()) != ""


def test_entry_deleted_by_a_process_is_not_an_idle_reclaim(lab, plugin, app, apps, idle_policy, reclaimer):
    """`conntrack -D` of a live TCP flow: the flow can't go on (the table resets its next
    packet), so the socket is aborted at once, but it isn't counted as idle. A live UDP
    flow deleted that way just goes on (its next datagram is a new flow)."""
    plugin.add("del", ns := app())
    idle_policy()
    rec = reclaimer("--sweep-interval", "0")
    tcp, udp = apps(lab, ns, "tcp", LAB.public_v4), apps(lab, ns, "udp", LAB.public_v4)
    tcp.echo("x")
    udp.echo("y")
    tcp.ask("recv")
    for flow in (tcp.flow(), udp.flow()):
        lab.run(lab.node, ["conntrack", "-D", "-f", "ipv4", "-p", "tcp" if flow.proto == 6 else "udp",
                           "--orig-src", flow.src, "--sport", str(flow.sport)])
    r = tcp.next(10)
    assert r["ok"] is False and r["error"] == "ECONNABORTED", r
    assert udp.echo("z")["data"] == "z"
    time.sleep(1)
    assert rec.counts() == {}
    assert f"live {tcp.flow()}" in rec.log() and "was deleted by netlink port" in rec.log()


def test_flow_that_expired_while_no_reclaimer_ran_is_reclaimed_by_the_start_sweep(lab, plugin, app, apps,
                                                                                 idle_policy, reclaimer):
    plugin.add("swept", ns := app())
    plugin.add("alive", busy_ns := app())
    idle_policy()
    idle, busy = apps(lab, ns, "tcp", LAB.public_v6), apps(lab, busy_ns, "tcp", LAB.public_v4)
    idle.echo("a")
    busy.echo("b")
    idle.ask("recv")
    # No reclaimer: the entry expires (listing conntrack evicts it once expired), the
    # socket stays, and with nf_conntrack_events=2 no event would ever come for it.
    deadline = time.time() + RECLAIM_DEADLINE
    while _conntrack(lab, idle.flow()):
        assert time.time() < deadline, "entry never expired"
        busy.echo("b")
        time.sleep(BUSY_PERIOD)
    with pytest.raises(queue.Empty):
        idle.lines.get(timeout=0.5)
    rec = reclaimer()
    r = idle.next(10)
    assert r["ok"] is False and r["error"] == "ECONNABORTED", r
    assert rec.counts() == {_key(plugin, "swept"): 1}
    assert f"expired (found by sweep) {idle.flow()}" in rec.log()
    # The sweep checked the live flow too and left it alone.
    assert busy.echo("c")["data"] == "c"


def test_lost_events_are_logged_and_made_up_for_by_a_sweep(lab, plugin, app, apps, reclaimer):
    """A burst of DESTROY events overruns a (deliberately tiny) receive buffer: the
    reclaimer says so, sweeps, and the TCP flow whose entry went in the burst is aborted
    all the same; the reclaimer goes on."""
    plugin.add("burst", ns := app())
    rec = reclaimer("--sweep-interval", "0", "--rcvbuf", "2048")
    conn = apps(lab, ns, "tcp", LAB.public_v4)
    conn.echo("x")
    conn.ask("recv")
    flood = ("import socket\n"
             "for i in range(1500):\n"
             "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             f"    s.sendto(b'x', ('{LAB.public_v4}', 9000))\n"
             "    s.close()\n")
    lab.run(ns, [sys.executable, "-c", flood])     # 1500 UDP flows
    lab.run(lab.node, ["conntrack", "-F"])      # the lab node's table: this test's flows only
    r = conn.next(10)
    assert r["ok"] is False and r["error"] == "ECONNABORTED", r
    _wait(lambda: "sweep (lost events)" in rec.log(), 10, "sweep after the overrun")
    assert "conntrack events were lost" in rec.log()
    assert rec.proc.poll() is None


@pytest.mark.parametrize("proto,tcp_state,status,portid,expected", [
    (socket.IPPROTO_TCP, 3, 0x19e, 0, "idle"),            # ESTABLISHED, expired
    (socket.IPPROTO_TCP, 3, 0x19e, 4242, "deleted"),      # ESTABLISHED, `conntrack -D`
    (socket.IPPROTO_TCP, 7, 0x19e, 0, "closed"),          # CLOSE
    (socket.IPPROTO_TCP, 5, 0x19e, 0, "closed"),          # FIN_WAIT
    (socket.IPPROTO_UDP, None, 0x19e, 0, "idle"),         # ASSURED: ran under the idle timeout
    (socket.IPPROTO_UDP, None, 0x19a, 0, "unassured"),    # one exchange: the 30 s unreplied timeout
    (socket.IPPROTO_UDP, None, 0x19e, 4242, "ignored-deleted"),
])
def test_verdict(proto, tcp_state, status, portid, expected):
    ev = Destroyed(Flow(proto, "10.77.0.5", 40000, "93.184.215.14", 9000), status, tcp_state, portid)
    assert verdict(ev) == expected
