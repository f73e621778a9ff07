"""Authoritative-only DNS server for the lab's internet netns (plays 8.8.8.8 & co).

    python -m runtime.lab.dns --records FILE [--listen ADDR ...] [--port 53] [--events FILE]

Answers A/AAAA for the names in FILE, a JSON object
    {"smtp.gmail.com": {"ttl": 300, "addresses": ["142.250.10.108", "2607:f8b0:..."]}, ...}
and NXDOMAIN for any other name; a record may hold "fail": {"A": "servfail", "AAAA":
"timeout"}. FILE is re-read when it changes. Prints "READY" once all sockets are bound;
exits on SIGTERM/SIGINT. Notes: docs/lab.md.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import socketserver
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer

from runtime.lab.servers import EventLog, enable_pktinfo, local_from_ancdata, norm, pktinfo_cmsg

MAX_TCP_CLIENTS = 64
TCP_CLIENT_TIMEOUT = 5.0


FAIL_MODES = ("servfail", "timeout")


@dataclass
class Entry:
    ttl: int
    v4: list[str] = field(default_factory=list)
    v6: list[str] = field(default_factory=list)
    fail: dict[str, str] = field(default_factory=dict)  # qtype -> one of FAIL_MODES


class RecordStore:
    """Records from a JSON file, reloaded when (inode, mtime, size) changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.key: tuple[int, int, int] | None = None
        self.entries: dict[str, Entry] = {}
        self.lock = threading.Lock()

    def reload(self) -> None:
        st = os.stat(self.path)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self.key:
            return
        with open(self.path, encoding="utf-8") as f:
            raw: dict[str, Any] = json.load(f)
        entries = {}
        for name, rec in raw.items():
            addrs = [ipaddress.ip_address(a) for a in rec.get("addresses", [])]
            fail = {str(t).upper(): str(m) for t, m in rec.get("fail", {}).items()}
            if any(m not in FAIL_MODES for m in fail.values()):
                raise ValueError(f"{name}: fail modes must be one of {FAIL_MODES}, got {fail}")
            entries[name.lower().rstrip(".")] = Entry(
                ttl=int(rec.get("ttl", 300)),
                v4=[str(a) for a in addrs if a.version == 4],
                v6=[str(a) for a in addrs if a.version == 6],
                fail=fail)
        self.entries, self.key = entries, key

    def lookup(self, name: str) -> Entry | None:
        with self.lock:
            try:
                self.reload()
            except (OSError, ValueError) as e:  # keep serving the last good copy
                print(f"dns: records reload failed: {e}", file=sys.stderr, flush=True)
            return self.entries.get(name.lower().rstrip("."))


class LabResolver(BaseResolver):
    def __init__(self, store: RecordStore, log: EventLog) -> None:
        self.store, self.log = store, log

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()  # copies id, question and RD; sets QR, AA
        reply.header.ra = 1      # look like the public resolver the app thinks it reached
        qname = str(request.q.qname)
        qtype = QTYPE[request.q.qtype]
        entry = self.store.lookup(qname)
        fail = entry.fail.get(qtype) if entry is not None else None
        self.log.write(ev="dns", proto=handler.protocol, peer=norm(handler.client_address[0]),
                       peer_port=handler.client_address[1], qname=qname.rstrip("."), qtype=qtype,
                       found=entry is not None, **({"fail": fail} if fail else {}))
        if entry is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if fail == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if fail == "timeout":
            # DNSHandler sends nothing when the resolver raises DNSError (it logs it).
            raise DNSError(f"no reply to {qtype} {qname} (lab: fail=timeout)")
        if qtype in ("A", "ANY"):
            for a in entry.v4:
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=entry.ttl, rdata=A(a)))
        if qtype in ("AAAA", "ANY"):
            for a in entry.v6:
                reply.add_answer(RR(request.q.qname, QTYPE.AAAA, ttl=entry.ttl, rdata=AAAA(a)))
        return reply  # other types: NOERROR, no data


class _PktinfoReplier:
    """Stands in for the socket DNSHandler calls .sendto() on; replies from the
    address the query was sent to (8.8.4.4 must answer as 8.8.4.4)."""

    def __init__(self, sock: socket.socket, local: str) -> None:
        self.sock, self.local = sock, local

    def sendto(self, data: bytes, addr: Any) -> int:
        return self.sock.sendmsg([data], pktinfo_cmsg(self.sock.family, self.local), 0, addr)


class PktinfoUDPServer(socketserver.UDPServer):
    """Single-threaded on purpose: the resolver is a dict lookup, and no thread per
    datagram means no unbounded growth under a flood."""

    allow_reuse_address = True

    def __init__(self, server_address: tuple[str, int], handler: type) -> None:
        self.address_family = socket.AF_INET6 if ":" in server_address[0] else socket.AF_INET
        super().__init__(server_address, handler)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        enable_pktinfo(self.socket)
        super().server_bind()

    def get_request(self) -> tuple[tuple[bytes, _PktinfoReplier], Any]:  # type: ignore[override]
        data, anc, _flags, addr = self.socket.recvmsg(self.max_packet_size, 256)
        return (data, _PktinfoReplier(self.socket, local_from_ancdata(self.socket, anc))), addr


class BoundedTCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """dnslib's handler blocks in recv() with no timeout; cap clients and time."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, server_address: tuple[str, int], handler: type) -> None:
        self.address_family = socket.AF_INET6 if ":" in server_address[0] else socket.AF_INET
        self.slots = threading.BoundedSemaphore(MAX_TCP_CLIENTS)
        super().__init__(server_address, handler)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        conn.settimeout(TCP_CLIENT_TIMEOUT)
        return conn, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="runtime.lab.dns", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", required=True)
    p.add_argument("--listen", action="append", default=None, help="address to serve on (repeatable)")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--events", default=None)
    a = p.parse_args(argv)

    store = RecordStore(a.records)
    store.reload()  # a bad records file is a lab bug: fail at start, not per query
    resolver = LabResolver(store, EventLog(a.events))
    # dnslib's default logger prints to stdout; stdout is the READY pipe only.
    logger = DNSLogger("-request,-reply,-recv,-send,-data", logf=lambda s: print(s, file=sys.stderr, flush=True))
    servers = [DNSServer(resolver, addr, a.port, logger=logger, server=cls)
               for addr in (a.listen or ["0.0.0.0", "::"])
               for cls in (PktinfoUDPServer, BoundedTCPServer)]
    for s in servers:
        s.start_thread()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("READY", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
