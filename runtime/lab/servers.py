"""TCP and UDP echo servers for the lab's internet netns.

    python -m runtime.lab.servers --ports 7,53,80,443 [--reuseport 53] [--events FILE]

TCP: on accept one JSON line {"peer", "peer_port", "local", "port"}, then an echo of
everything until EOF. UDP: each datagram answered with that line plus its payload.
Prints "READY" once every socket is bound; exits on SIGTERM/SIGINT. Notes: docs/lab.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any

IPERF_PORT = 5201  # left free for iperf3 -s
SOL_IP = 0
IP_PKTINFO = 8     # not exported by Python's socket module
MAX_TCP_CONNS = 2048
MAX_EVENTS_BYTES = 64 << 20


def norm(addr: str) -> str:
    return addr.split("%", 1)[0]


def header(peer: str, peer_port: int, local: str, port: int) -> bytes:
    return (json.dumps({"peer": norm(peer), "peer_port": peer_port, "local": norm(local),
                        "port": port}) + "\n").encode()


class EventLog:
    """Append-only JSON Lines; one write() per line so two processes can share a file."""

    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if path else -1

    def write(self, **ev: Any) -> None:
        if self.fd < 0:
            return
        ev["ts"] = round(time.time(), 6)
        try:
            if os.fstat(self.fd).st_size < MAX_EVENTS_BYTES:  # bounded on purpose
                os.write(self.fd, (json.dumps(ev) + "\n").encode())
        except OSError:
            pass


# --- pktinfo: reply from the address the client sent to ---------------------------
# A wildcard-bound UDP socket would otherwise answer from the routing source
# (198.18.0.1), which the client's connected socket and conntrack both reject.

def enable_pktinfo(sock: socket.socket) -> None:
    if sock.family == socket.AF_INET:
        sock.setsockopt(SOL_IP, IP_PKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)


def local_from_ancdata(sock: socket.socket, ancdata: list[tuple[int, int, bytes]]) -> str:
    for level, kind, data in ancdata:
        if level == SOL_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[8:12])  # ipi_addr: header dst
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
            return socket.inet_ntop(socket.AF_INET6, data[:16])
    return norm(sock.getsockname()[0])


def pktinfo_cmsg(family: int, local: str) -> list[tuple[int, int, bytes]]:
    if family == socket.AF_INET:
        return [(SOL_IP, IP_PKTINFO, struct.pack("i4s4s", 0, socket.inet_aton(local), b"\0" * 4))]
    info = struct.pack("16si", socket.inet_pton(socket.AF_INET6, local), 0)
    return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)]


def bound_socket(family: int, kind: int, port: int, reuseport: bool = False) -> socket.socket:
    """One socket per family (v6 with V6ONLY), so v4 peers are never ::ffff:-mapped."""
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    s.setblocking(False)
    return s


@dataclass
class Limits:
    idle: float
    max_conns: int = MAX_TCP_CONNS


class EchoServers:
    def __init__(self, ports: list[int], reuseport: list[int], log: EventLog, limits: Limits) -> None:
        self.ports, self.reuseport, self.log, self.limits = ports, set(reuseport), log, limits
        self.active = 0
        self.udp_socks: list[socket.socket] = []
        self.servers: list[asyncio.Server] = []
        # A connection's events carry its own id: after a container's DEL the next holder
        # of its address can reopen the same four addresses and ports, and a test must
        # not take the old connection's close for its own.
        self.conns = 0

    async def handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        self.conns += 1
        info = {"proto": "tcp", "peer": norm(peer[0]), "peer_port": peer[1],
                "local": norm(local[0]), "port": local[1], "conn": f"{os.getpid()}.{self.conns}"}
        if self.active >= self.limits.max_conns:
            self.log.write(ev="tcp_refused", **info)
            writer.close()
            return
        self.active += 1
        self.log.write(ev="tcp_open", **info)
        bytes_in = bytes_out = 0
        try:
            hdr = header(peer[0], peer[1], local[0], local[1])
            writer.write(hdr)
            bytes_out += len(hdr)
            while True:
                data = await asyncio.wait_for(reader.read(65536), self.limits.idle)
                if not data:
                    break
                bytes_in += len(data)
                writer.write(data)
                await writer.drain()  # backpressure keeps memory bounded
                bytes_out += len(data)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            info["error"] = type(e).__name__
        finally:
            self.active -= 1
            self.log.write(ev="tcp_close", bytes_in=bytes_in, bytes_out=bytes_out, **info)
            writer.close()

    def on_udp(self, sock: socket.socket) -> None:
        for _ in range(64):  # bounded batch, then let TCP work run
            try:
                data, anc, _flags, addr = sock.recvmsg(65535, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. a queued ICMP error on the socket; keep serving
            local = local_from_ancdata(sock, anc)
            port = sock.getsockname()[1]
            self.log.write(ev="udp", proto="udp", peer=norm(addr[0]), peer_port=addr[1], local=local,
                           port=port, bytes=len(data), head=data[:64].decode("utf-8", "replace"))
            reply = header(addr[0], addr[1], local, port) + data
            try:
                sock.sendmsg([reply], pktinfo_cmsg(sock.family, local), 0, addr)
            except OSError:
                pass  # full buffer, EMSGSIZE, unreachable: a lab echo may drop like UDP does

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port in self.ports:
            for fam in (socket.AF_INET, socket.AF_INET6):
                s = bound_socket(fam, socket.SOCK_STREAM, port, port in self.reuseport)
                s.listen(1024)
                self.servers.append(await asyncio.start_server(self.handle_tcp, sock=s, limit=65536))
                s = bound_socket(fam, socket.SOCK_DGRAM, port, port in self.reuseport)
                enable_pktinfo(s)
                loop.add_reader(s.fileno(), self.on_udp, s)
                self.udp_socks.append(s)

    def stop(self) -> None:
        for srv in self.servers:
            srv.close()
        for s in self.udp_socks:
            s.close()


def port_list(text: str) -> list[int]:
    ports = sorted({int(p) for p in text.split(",") if p.strip()})
    if any(not 0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"bad port in {text!r}")
    if IPERF_PORT in ports:
        raise argparse.ArgumentTypeError(f"port {IPERF_PORT} is reserved for iperf3")
    return ports


async def amain(a: argparse.Namespace) -> None:
    srv = EchoServers(a.ports, a.reuseport, EventLog(a.events), Limits(idle=a.idle_timeout))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await srv.start()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await stop.wait()
    srv.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="runtime.lab.servers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ports", type=port_list, required=True, help="TCP and UDP echo ports")
    p.add_argument("--reuseport", type=port_list, default=[],
                   help="ports shared with a server bound to specific addresses (53: DNS)")
    p.add_argument("--events", default=None, help="JSON Lines file of connections and datagrams")
    p.add_argument("--idle-timeout", type=float, default=900.0,
                   help="close idle TCP connections (longer than the 600 s reclaim window)")
    asyncio.run(amain(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
