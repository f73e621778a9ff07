"""One-shot network probe, run inside a lab netns (`nsenter --net=... python probe.py ...`).

Prints exactly one JSON object on stdout and exits 0, whatever happened on the
network; a non-zero exit means a usage error or a bug. Stdlib only, no package imports
(started with `python -I -S`; docs/lab.md).

Modes:
  tcp|udp HOST PORT [--payload STR|--payload-hex HEX|-] [--timeout S] [--bind ADDR]
                    [--bind-port N] [--freebind]
      talk to the lab echo server; result fields ok, error, peer_seen, echo_ok, elapsed
  dns NAME TYPE SERVER [--tcp] [--timeout S]
      one query, no recursion of our own; fields ok, error, rcode, answers, elapsed
  spoof-udp SRC DST PORT [--payload...] [--sport N]
      one UDP datagram with a forged source, built by hand on a raw IP socket
  icmp HOST [--timeout S]
      one ICMP (v6: ICMPv6) echo request on a raw socket; ok when the echo reply
      comes, error "timeout" or the ICMP error that came instead ("admin-prohibited")
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable

# Linux values; Python's socket module lacks some of them.
SOL_IP = 0
IP_FREEBIND = 15
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IPV6_FREEBIND = 78

QTYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16,
          "AAAA": 28, "SRV": 33, "ANY": 255}
QTYPE_NAMES = {v: k for k, v in QTYPES.items()}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def err_name(exc: BaseException) -> str:
    """errno name ("ECONNREFUSED") or "timeout"; tests compare these strings."""
    if isinstance(exc, (socket.timeout, TimeoutError)) and not getattr(exc, "errno", None):
        return "timeout"
    code = getattr(exc, "errno", None)
    if code:
        return errno.errorcode.get(code, f"errno{code}")
    return type(exc).__name__


def family_of(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def resolve(host: str) -> str:
    """Literal addresses pass through; names go through the netns' own resolver."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return str(socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0])


def norm(addr: str) -> str:
    return addr.split("%", 1)[0]


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.t0 = time.monotonic()
        self.end = self.t0 + seconds

    def left(self) -> float:
        rest = self.end - time.monotonic()
        if rest <= 0:
            raise socket.timeout("timed out")
        return rest

    def elapsed(self) -> float:
        return round(time.monotonic() - self.t0, 6)


def make_socket(host: str, kind: int, bind: str | None, bind_port: int, freebind: bool) -> socket.socket:
    fam = family_of(host)
    s = socket.socket(fam, kind)
    if freebind:
        # Lets a test try to use an address the netns doesn't own (spoof attempts).
        if fam == socket.AF_INET:
            s.setsockopt(SOL_IP, IP_FREEBIND, 1)
            s.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    if bind or bind_port:
        s.bind((bind or ("::" if fam == socket.AF_INET6 else "0.0.0.0"), bind_port))
    return s


def parse_reply(blob: bytes) -> tuple[dict[str, object] | None, bytes]:
    line, sep, rest = blob.partition(b"\n")
    if not sep:
        return None, blob
    try:
        return json.loads(line), rest
    except ValueError:
        return None, blob


def exchange(s: socket.socket, payload: bytes, got: bytes, dl: Deadline) -> bytes:
    """Send payload while reading the echo back. Sending everything first would
    deadlock on large payloads: the server stops reading when its echo can't drain."""
    s.setblocking(False)
    view, sent, chunks, have = memoryview(payload), 0, [got], len(got)
    while have < len(payload):
        want_w = [s] if sent < len(payload) else []
        r, w, _ = select.select([s], want_w, [], dl.left())
        if not r and not w:
            raise socket.timeout("timed out")
        if w:
            try:
                sent += s.send(view[sent:sent + 262144])
            except BlockingIOError:
                pass
        if r:
            try:
                chunk = s.recv(262144)
            except BlockingIOError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
            have += len(chunk)
    return b"".join(chunks)


def record_header(out: dict, header: dict | None) -> bool:
    """Note the server's greeting (who it saw); False if there was none."""
    if header is None:
        out["error"] = "bad_header"
        return False
    out["peer_seen"] = header.get("peer")
    out["server"] = header
    return True


def record_echo(out: dict, echoed: bytes, payload: bytes) -> None:
    out["echo_ok"] = out["ok"] = echoed == payload
    if not out["echo_ok"]:
        out["error"] = "bad_echo"


def run_probe(out: dict[str, object], timeout: float,
              body: Callable[[Deadline, contextlib.ExitStack], None],
              errors: tuple[type[Exception], ...] = (OSError, ValueError)) -> dict[str, object]:
    """Run one probe's `body` against a deadline: what it raises among `errors` becomes
    out["error"] (the exit status stays 0), the sockets it entered into the stack are
    closed, and out["elapsed"] is always set."""
    dl = Deadline(timeout)
    try:
        with contextlib.ExitStack() as sockets:
            body(dl, sockets)
    except errors as e:
        out["error"] = err_name(e)
    out["elapsed"] = dl.elapsed()
    return out


def echo_result() -> dict[str, object]:
    return {"ok": False, "error": None, "peer_seen": None, "echo_ok": False}


def probe_tcp(a: argparse.Namespace, payload: bytes) -> dict[str, object]:
    out = echo_result()

    def body(dl: Deadline, sockets: contextlib.ExitStack) -> None:
        host = resolve(a.host)
        s = sockets.enter_context(make_socket(host, socket.SOCK_STREAM, a.bind, a.bind_port, a.freebind))
        s.settimeout(dl.left())
        s.connect((host, a.port))
        out["connected"] = True
        out["local"] = norm(s.getsockname()[0])
        buf = b""
        while b"\n" not in buf and len(buf) < 4096:
            s.settimeout(dl.left())
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        header, rest = parse_reply(buf)
        if record_header(out, header):
            record_echo(out, exchange(s, payload, rest, dl), payload)
    return run_probe(out, a.timeout, body)


def probe_udp(a: argparse.Namespace, payload: bytes) -> dict[str, object]:
    out = echo_result()

    def body(dl: Deadline, sockets: contextlib.ExitStack) -> None:
        host = resolve(a.host)
        s = sockets.enter_context(make_socket(host, socket.SOCK_DGRAM, a.bind, a.bind_port, a.freebind))
        # Connected, so ICMP errors (port/host unreachable, admin prohibited) come
        # back as an errno on recv instead of being silently dropped.
        s.connect((host, a.port))
        out["local"] = norm(s.getsockname()[0])
        s.send(payload)
        s.settimeout(dl.left())
        data = s.recv(65535)
        header, rest = parse_reply(data)
        if record_header(out, header):
            record_echo(out, rest, payload)
    return run_probe(out, a.timeout, body)


# --- DNS (tiny stub client; the lab must not depend on the code under test) ---

def dns_query_packet(name: str, qtype: int, qid: int) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode("idna") for p in name.strip(".").split(".") if p)
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def dns_skip_name(msg: bytes, off: int) -> tuple[str, int]:
    """Read a (possibly compressed) name; return it and the offset after it."""
    labels: list[str] = []
    end = -1
    for _ in range(128):  # bound pointer loops in hostile packets
        n = msg[off]
        if n & 0xC0 == 0xC0:
            if end < 0:
                end = off + 2
            off = ((n & 0x3F) << 8) | msg[off + 1]
            continue
        if n == 0:
            return ".".join(labels), (end if end >= 0 else off + 1)
        labels.append(msg[off + 1: off + 1 + n].decode("ascii", "replace"))
        off += 1 + n
    raise ValueError("dns name loop")


def dns_parse(msg: bytes, qid: int) -> dict[str, object]:
    rid, flags, qd, an, _ns, _ar = struct.unpack("!HHHHHH", msg[:12])
    if rid != qid:
        raise ValueError("dns id mismatch")
    off = 12
    for _ in range(qd):
        _, off = dns_skip_name(msg, off)
        off += 4
    answers = []
    for _ in range(an):
        name, off = dns_skip_name(msg, off)
        rtype, _rclass, ttl, rdlen = struct.unpack("!HHIH", msg[off:off + 10])
        off += 10
        rdata = msg[off:off + rdlen]
        off += rdlen
        if rtype == 1 and rdlen == 4:
            data = socket.inet_ntop(socket.AF_INET, rdata)
        elif rtype == 28 and rdlen == 16:
            data = socket.inet_ntop(socket.AF_INET6, rdata)
        else:
            data = rdata.hex()
        answers.append({"name": name, "type": QTYPE_NAMES.get(rtype, str(rtype)), "ttl": ttl, "data": data})
    return {"rcode": RCODES.get(flags & 0xF, str(flags & 0xF)), "answers": answers,
            "truncated": bool(flags & 0x0200)}


def probe_dns(a: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {"ok": False, "error": None, "rcode": None, "answers": []}

    def body(dl: Deadline, sockets: contextlib.ExitStack) -> None:
        server = resolve(a.server)
        qtype = QTYPES.get(a.qtype.upper()) or int(a.qtype)
        qid = int.from_bytes(os.urandom(2), "big")
        q = dns_query_packet(a.name, qtype, qid)
        s = sockets.enter_context(
            socket.socket(family_of(server), socket.SOCK_STREAM if a.tcp else socket.SOCK_DGRAM))
        s.settimeout(dl.left())
        s.connect((server, a.port))
        if a.tcp:
            s.sendall(struct.pack("!H", len(q)) + q)
            buf = b""
            while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
                s.settimeout(dl.left())
                chunk = s.recv(65535)
                if not chunk:
                    raise ConnectionResetError(errno.ECONNRESET, "short dns/tcp reply")
                buf += chunk
            msg = buf[2:]
        else:
            s.send(q)
            s.settimeout(dl.left())
            msg = s.recv(65535)
        out.update(dns_parse(msg, qid))
        out["ok"] = True  # got an answer; rcode tells which
    return run_probe(out, a.timeout, body, (OSError, ValueError, struct.error, IndexError))


# --- ICMP echo ---

# ICMP errors by (family, type, code) -> the name a probe reports.
UNREACH_V4 = {0: "net-unreachable", 1: "host-unreachable", 3: "port-unreachable", 9: "net-prohibited",
              10: "host-prohibited", 13: "admin-prohibited"}
UNREACH_V6 = {0: "no-route", 1: "admin-prohibited", 3: "addr-unreachable", 4: "port-unreachable"}


def icmp_answer(fam: int, packet: bytes, ident: int, seq: int) -> str | None:
    """What one received ICMP packet says about our echo request: "reply", an error
    name (the error quotes our request), or None (someone else's packet). A v4 raw
    socket hands over the IP header too, a v6 one only the ICMPv6 message."""
    if fam == socket.AF_INET:
        packet = packet[(packet[0] & 0x0F) * 4:]
        reply_type, unreach_type, names, quoted_hdr = 0, 3, UNREACH_V4, None
    else:
        reply_type, unreach_type, names, quoted_hdr = 129, 1, UNREACH_V6, 40
    if len(packet) < 8:
        return None
    kind, code = packet[0], packet[1]
    if kind == reply_type:
        return "reply" if struct.unpack("!HH", packet[4:8]) == (ident, seq) else None
    if kind != unreach_type:
        return None
    inner = packet[8:]
    if quoted_hdr is None:  # the quoted IPv4 header's own length
        quoted_hdr = (inner[0] & 0x0F) * 4 if inner else 0
    echo = inner[quoted_hdr:quoted_hdr + 8]
    if len(echo) < 8 or struct.unpack("!HH", echo[4:8]) != (ident, seq):
        return None
    return names.get(code, f"unreachable-{code}")


def probe_icmp(a: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {"ok": False, "error": None}

    def body(dl: Deadline, sockets: contextlib.ExitStack) -> None:
        host = resolve(a.host)
        fam = family_of(host)
        ident, seq = int.from_bytes(os.urandom(2), "big"), 1
        if fam == socket.AF_INET:
            s = sockets.enter_context(socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMP))
            msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"sockgate-probe"
            msg = msg[:2] + struct.pack("!H", csum16(msg)) + msg[4:]
        else:  # the kernel fills in an ICMPv6 raw socket's checksum
            s = sockets.enter_context(socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
            msg = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + b"sockgate-probe"
        s.sendto(msg, (host, 0))
        while True:
            s.settimeout(dl.left())
            answer = icmp_answer(fam, s.recv(65535), ident, seq)
            if answer == "reply":
                out["ok"] = True
                return
            if answer is not None:
                out["error"] = answer
                return
    return run_probe(out, a.timeout, body)


# --- forged-source UDP ---

def csum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> tuple[int, bytes]:
    """Whole IP packet (header included); the kernel sends it as is."""
    s_ip, d_ip = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s_ip.version != d_ip.version:
        raise ValueError("source and destination families differ")
    ulen = 8 + len(payload)
    if s_ip.version == 4:
        pseudo = s_ip.packed + d_ip.packed + struct.pack("!BBH", 0, 17, ulen)
    else:
        pseudo = s_ip.packed + d_ip.packed + struct.pack("!IxxxB", ulen, 17)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    ck = csum16(pseudo + udp) or 0xFFFF  # 0 means "no checksum" on the wire
    udp = udp[:6] + struct.pack("!H", ck) + udp[8:]
    if s_ip.version == 4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, int.from_bytes(os.urandom(2), "big"),
                          0x4000, 64, 17, 0, s_ip.packed, d_ip.packed)
        hdr = hdr[:10] + struct.pack("!H", csum16(hdr)) + hdr[12:]
        return socket.AF_INET, hdr + udp
    hdr = struct.pack("!IHBB16s16s", 6 << 28, ulen, 17, 64, s_ip.packed, d_ip.packed)
    return socket.AF_INET6, hdr + udp


def spoof_udp(a: argparse.Namespace, payload: bytes) -> dict[str, object]:
    out = echo_result()

    def body(_dl: Deadline, sockets: contextlib.ExitStack) -> None:
        sport = a.sport or 20000 + int.from_bytes(os.urandom(2), "big") % 40000
        fam, pkt = build_udp(a.src, a.dst, sport, a.port, payload)
        # IPPROTO_RAW implies header-included for both families on Linux, so the
        # source address is whatever we wrote: no bind, no routing source check.
        s = sockets.enter_context(socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW))
        out["bytes"] = s.sendto(pkt, (a.dst, 0))
        out["sport"] = sport
        out["ok"] = True
    return run_probe(out, a.timeout, body)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)

    def payload_opts(sp: argparse.ArgumentParser) -> None:
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--payload", default=None)
        g.add_argument("--payload-hex", default=None, help="hex bytes, or - to read them from stdin")
        sp.add_argument("--timeout", type=float, default=2.0)

    for mode in ("tcp", "udp"):
        sp = sub.add_parser(mode)
        sp.add_argument("host")
        sp.add_argument("port", type=int)
        payload_opts(sp)
        sp.add_argument("--bind", default=None, help="source address to bind")
        sp.add_argument("--bind-port", type=int, default=0)
        sp.add_argument("--freebind", action="store_true", help="allow binding a non-local address")
    sp = sub.add_parser("dns")
    sp.add_argument("name")
    sp.add_argument("qtype")
    sp.add_argument("server")
    sp.add_argument("--port", type=int, default=53)
    sp.add_argument("--tcp", action="store_true")
    sp.add_argument("--timeout", type=float, default=2.0)
    sp = sub.add_parser("icmp")
    sp.add_argument("host")
    sp.add_argument("--timeout", type=float, default=2.0)
    sp = sub.add_parser("spoof-udp")
    sp.add_argument("src")
    sp.add_argument("dst")
    sp.add_argument("port", type=int)
    sp.add_argument("--sport", type=int, default=0)
    payload_opts(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.mode == "dns":
        res = probe_dns(a)
    elif a.mode == "icmp":
        res = probe_icmp(a)
    else:
        if a.payload_hex == "-":  # big payloads come on stdin: argv is limited to 128 KiB
            payload = bytes.fromhex(sys.stdin.read())
        elif a.payload_hex is not None:
            payload = bytes.fromhex(a.payload_hex)
        else:
            payload = (a.payload if a.payload is not None else "hello").encode()
        res = {"tcp": probe_tcp, "udp": probe_udp, "spoof-udp": spoof_udp}[a.mode](a, payload)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
