"""An app process inside a lab netns that holds one socket to a lab echo server and
does what it is told, for the idle-reclaim tests and `sockgate demo`: whether the
socket still works, and what errno the app gets, is only visible from the app's side."""
from __future__ import annotations

import ipaddress
import json
import queue
import subprocess
import sys
import threading
import time
from typing import Any

from runtime.hostport import host_port
from runtime.lab.builder import Lab

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


def unmap(addr: str) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 address conntrack sees."""
    ip = ipaddress.ip_address(addr)
    return str(ip.ipv4_mapped or ip) if ip.version == 6 else addr


class AppError(RuntimeError):
    """The app said nothing in time, or not what it was asked to."""


class SocketApp:
    """An app process in a lab netns holding one socket (TCP: connected and greeted by
    the echo server before the constructor returns). Killed by close() or at the
    lab's teardown."""

    def __init__(self, lab: Lab, ns: str, proto: str, host: str, port: int = 9000) -> None:
        self.proto, self.host, self.port = proto, host, port
        self.lab = lab
        self.proc = lab.popen(ns, [sys.executable, "-c", APP, proto, host, str(port)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        hello = self.next(10)
        self.local: tuple[str, int] = (unmap(hello["local"][0]), hello["local"][1])
        self.server: dict[str, Any] | None = hello["server"]  # TCP: what the server saw (NAT port)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, timeout: float) -> dict[str, Any]:
        """The app's next line; AppError if none comes within timeout seconds."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AppError(f"app ({self.proto} to {self.host}) said nothing within {timeout} s") from None

    def ask(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def do(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        self.ask(command)
        return self.next(timeout)

    def echo(self, word: str) -> dict[str, Any]:
        """Send word and wait for its echo; AppError unless it came back."""
        r = self.do(f"echo {word}")
        if r.get("ok") is not True or r.get("data") != word:
            raise AppError(f"{self.proto} echo of {word!r} to {self.host} failed: {r}")
        if self.proto == "udp":
            self.server = r["server"]
        return r

    def wait_acked(self, timeout: float = 5.0) -> None:
        """TCP: return once the echo server holds nothing the app hasn't acknowledged.
        The app's ACK of an echo may be delayed (up to 200 ms, more when the node is
        busy); a test that deletes the flow's conntrack entry waits for it first,
        because an ACK that reaches the node after the deletion is a packet without a
        flow, which the node refuses with a reset: the app would see ECONNRESET, not
        the reclaimer's abort that the test is about."""
        assert self.proto == "tcp" and self.server is not None
        srv = self.server
        argv = ["ss", "-Htn", "state", "established", "src", host_port(srv["local"], srv["port"]),
                "dst", host_port(srv["peer"], srv["peer_port"])]
        deadline = time.monotonic() + timeout
        while True:
            rows = self.lab.run(self.lab.internet, argv).stdout.split()
            # One row: Recv-Q, Send-Q, local, peer (a single state selected: no state column).
            if len(rows) == 4 and rows[1] == "0":
                return
            if time.monotonic() > deadline:
                raise AppError(f"the echo server's side of {host_port(*self.local)} still holds unacknowledged "
                               f"data after {timeout} s: {rows}")
            time.sleep(0.02)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
