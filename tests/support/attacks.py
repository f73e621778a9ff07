"""Crafted packets for the hostile-tenant tests (tests/test_hostile.py).

Three parts:
- builders: pure functions that return the bytes of an IP packet or an Ethernet frame
  (IPv4/IPv6 with checksums, UDP, TCP SYN, ICMP errors that quote a packet, IP
  fragments, IPv6 extension headers, ARP, neighbour discovery). The test process
  builds what the attacker sends, so every byte is in the test.
- modes run as a script *inside* a lab netns (`python -I -S attacks.py MODE`: stdlib
  only, so it starts in a few tens of milliseconds), playing the app in a container or
  the far end:
    send        stdin {"l3": [hex], "l2": [[ifname, hex]], "ifname", "repeat", "pps", "ring"}:
                every IP packet through a raw IPPROTO_RAW socket (header included: the
                source is whatever the packet says), every frame through AF_PACKET
                (with "ring": through a PACKET_TX_RING, see send_ring);
                prints {"sent": n, "errors": {errno: n}}
    flows       stdin {"src4", "src6", "dst4", "dst6", "families", "protos", "pps",
                "seconds"}: new flows without end, one UDP datagram or TCP SYN per new
                port pair, from the container's own addresses; prints {"sent": n}
    sniff       every ICMP/ICMPv6 message the netns receives, a JSON line each
    hold        a connected UDP socket with IP(V6)_RECVERR, one exchange per stdin line
    big-server  answers each datagram with BIG bytes (fragmented on the way)
    big-client  requests BIG answers for a while; prints the tries each took
    segments    HOST PORT SIZE COUNT REPEAT [cmsg]: an ordinary UDP socket asking its
                kernel to cut each send into COUNT datagrams of SIZE bytes
                (UDP_SEGMENT; "cmsg": per sendmsg() call, no setsockopt at all)
    small-mss   HOST PORT MSS BYTES: a TCP connection with TCP_MAXSEG=MSS sends BYTES
    vnet        stdin {"frames": [hex], "gso_type", "gso_size", "hdr_len", "csum_start",
                "csum_offset"}: each frame through AF_PACKET with PACKET_VNET_HDR, i.e.
                with a virtio header that asks the kernel to segment it (GSO)
    count       HOST PORT SECONDS: counts the UDP datagrams it receives (after READY)
- test-side helpers (send, run, drop_counters, conntrack_entries, neighbours, ...)
  that run the above through a runtime.lab.Lab and read the node's state.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import sys
import time

IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, IPPROTO_ICMPV6 = 6, 17, 1, 58
NH_HOP, NH_ROUTING, NH_FRAGMENT, NH_DSTOPTS = 0, 43, 44, 60
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
BROADCAST = "ff:ff:ff:ff:ff:ff"


def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(addr)


def is_v6(addr: str) -> bool:
    return _ip(addr).version == 6


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    s, d = _ip(src).packed, _ip(dst).packed
    if len(s) == 4:
        return s + d + struct.pack("!BBH", 0, proto, length)
    return s + d + struct.pack("!IxxxB", length, proto)


def _with_csum(src: str, dst: str, proto: int, segment: bytes, at: int) -> bytes:
    ck = csum(_pseudo(src, dst, proto, len(segment)) + segment)
    if proto == IPPROTO_UDP and ck == 0:
        ck = 0xFFFF
    return segment[:at] + struct.pack("!H", ck) + segment[at + 2:]


# --- IP -------------------------------------------------------------------------

def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ident: int = 0, df: bool = True,
         mf: bool = False, offset: int = 0, ttl: int = 64, options: bytes = b"") -> bytes:
    """offset in bytes (a multiple of 8); options padded to a multiple of 4 bytes."""
    assert offset % 8 == 0
    options = options.ljust((len(options) + 3) // 4 * 4, b"\0")
    frag = (0x4000 if df else 0) | (0x2000 if mf else 0) | (offset // 8)
    size = 20 + len(options)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | size // 4, 0, size + len(payload),
                      ident or int.from_bytes(os.urandom(2), "big"), frag, ttl, proto, 0,
                      _ip(src).packed, _ip(dst).packed) + options
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def ipv6(src: str, dst: str, nh: int, payload: bytes, *, hlim: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, hlim, _ip(src).packed, _ip(dst).packed) + payload


def ip_packet(src: str, dst: str, proto: int, payload: bytes, **kw) -> bytes:
    return ipv6(src, dst, proto, payload, **kw) if is_v6(src) else ipv4(src, dst, proto, payload, **kw)


def ext_options(nh: int) -> bytes:
    """A hop-by-hop or destination options header of 8 bytes (one PadN option)."""
    return struct.pack("!BB", nh, 0) + b"\x01\x04\0\0\0\0"


def ext_routing(nh: int) -> bytes:
    """A routing header of an experimental type (253) with segments left 0: every node
    skips it and goes on with the next header."""
    return struct.pack("!BBBB", nh, 0, 253, 0) + b"\0" * 4


def frag6(nh: int, offset: int, more: bool, ident: int) -> bytes:
    return struct.pack("!BBHI", nh, 0, (offset & ~7) | (1 if more else 0), ident)


# --- transport --------------------------------------------------------------------

def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """The UDP segment (header + payload), checksummed for src/dst."""
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _with_csum(src, dst, IPPROTO_UDP, seg, 6)


def tcp_syn(src: str, dst: str, sport: int, dport: int, seq: int = 1, flags: int = 0x02) -> bytes:
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 64240, 0, 0)
    return _with_csum(src, dst, IPPROTO_TCP, seg, 16)


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes, **kw) -> bytes:
    return ip_packet(src, dst, IPPROTO_UDP, udp(src, dst, sport, dport, payload), **kw)


def tcp_syn_packet(src: str, dst: str, sport: int, dport: int, **kw) -> bytes:
    return ip_packet(src, dst, IPPROTO_TCP, tcp_syn(src, dst, sport, dport), **kw)


# --- ICMP errors --------------------------------------------------------------------

def icmp4(type_: int, code: int, rest: bytes, data: bytes) -> bytes:
    msg = struct.pack("!BBH", type_, code, 0) + rest + data
    return msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]


def icmp6(src: str, dst: str, type_: int, code: int, rest: bytes, data: bytes) -> bytes:
    msg = struct.pack("!BBH", type_, code, 0) + rest + data
    return _with_csum(src, dst, IPPROTO_ICMPV6, msg, 2)


# What an attacker sends "about" a flow: (v4 type, code), (v6 type, code).
ERRORS = {
    "port-unreachable": ((3, 3), (1, 4)),
    "too-big": ((3, 4), (2, 0)),              # v4: fragmentation needed; v6: Packet Too Big
    "time-exceeded": ((11, 0), (3, 0)),
}


def icmp_error(kind: str, src: str, dst: str, quoted: bytes, mtu: int = 1280, trailer: bytes = b"") -> bytes:
    """An ICMP(v6) error from src to dst quoting `quoted` (the packet it is about);
    `trailer` goes after the quote (a marker the far end can look for)."""
    (t4, c4), (t6, c6) = ERRORS[kind]
    if is_v6(src):
        rest = struct.pack("!I", mtu) if kind == "too-big" else b"\0" * 4
        return ipv6(src, dst, IPPROTO_ICMPV6, icmp6(src, dst, t6, c6, rest, quoted + trailer))
    rest = struct.pack("!HH", 0, mtu) if kind == "too-big" else b"\0" * 4
    return ipv4(src, dst, IPPROTO_ICMP, icmp4(t4, c4, rest, quoted + trailer))


# --- fragments --------------------------------------------------------------------

def fragments(src: str, dst: str, proto: int, l4: bytes, size: int, ident: int, *,
              keep: tuple[int, ...] | None = None, chain: tuple[str, ...] = (), df: bool = False) -> list[bytes]:
    """The L4 bytes `l4` (a whole UDP segment, say) cut into fragments of `size` bytes
    (a multiple of 8). `keep` picks which fragments to return (default all: a datagram
    that would reassemble); e.g. (0,) is an unfinished datagram. `chain` (v6 only):
    extension headers before the fragment header ("hop", "dst", "routing"). `df` (v4
    only): set Don't Fragment too, which no sender does on a fragment but nothing stops."""
    assert size % 8 == 0 and size > 0
    pieces = [l4[i:i + size] for i in range(0, len(l4), size)]
    out = []
    for i, piece in enumerate(pieces):
        if keep is not None and i not in keep:
            continue
        more, off = i < len(pieces) - 1, i * size
        if not is_v6(src):
            out.append(ipv4(src, dst, proto, piece, ident=ident & 0xFFFF or 1, df=df, mf=more, offset=off))
            continue
        body = frag6(proto, off, more, ident) + piece
        nh = NH_FRAGMENT
        for kind in reversed(chain):
            body = (ext_routing(nh) if kind == "routing" else ext_options(nh)) + body
            nh = {"hop": NH_HOP, "dst": NH_DSTOPTS, "routing": NH_ROUTING}[kind]
        out.append(ipv6(src, dst, nh, body))
    return out


# --- link layer: ARP and neighbour discovery -------------------------------------

def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def ether(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return _mac(dst) + _mac(src) + struct.pack("!H", ethertype) + payload


def arp(op: int, sha: str, spa: str, tha: str, tpa: str) -> bytes:
    """op 1 request, 2 reply."""
    return struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op) + _mac(sha) + _ip(spa).packed + _mac(tha) + _ip(tpa).packed


def arp_frame(op: int, sha: str, spa: str, tha: str, tpa: str, *, eth_dst: str = BROADCAST,
              eth_src: str | None = None) -> bytes:
    return ether(eth_dst, eth_src or sha, ETH_P_ARP, arp(op, sha, spa, tha, tpa))


def solicited_node(addr: str) -> str:
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | (int(_ip(addr)) & 0xFFFFFF)))


def multicast_mac(addr: str) -> str:
    return "33:33:" + ":".join(f"{b:02x}" for b in _ip(addr).packed[-4:])


def _lladdr_opt(kind: int, mac: str) -> bytes:
    return struct.pack("!BB", kind, 1) + _mac(mac)


def nd(kind: str, src: str, dst: str, mac: str, target: str = "::", *, flags: int = 0) -> bytes:
    """An IPv6 neighbour discovery packet (hop limit 255) from src with link-layer
    address mac: kind ns, na (flags: 0x20 override, 0x40 solicited, 0x80 router),
    rs, ra (a prefix and a default route), redirect (target is the better hop, the
    destination is 2001:db8:dead::1)."""
    if kind == "ns":
        t, rest, body = 135, b"\0" * 4, _ip(target).packed + _lladdr_opt(1, mac)
    elif kind == "na":
        t, rest, body = 136, struct.pack("!B3x", flags), _ip(target).packed + _lladdr_opt(2, mac)
    elif kind == "rs":
        t, rest, body = 133, b"\0" * 4, _lladdr_opt(1, mac)
    elif kind == "ra":
        prefix = struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0, _ip("2001:db8:bad::").packed)
        t, rest, body = 134, struct.pack("!BBH", 64, 0, 1800), struct.pack("!II", 0, 0) + _lladdr_opt(1, mac) + prefix
    elif kind == "redirect":
        t, rest, body = 137, b"\0" * 4, _ip(target).packed + _ip("2001:db8:dead::1").packed + _lladdr_opt(2, mac)
    else:
        raise ValueError(kind)
    return ipv6(src, dst, IPPROTO_ICMPV6, icmp6(src, dst, t, 0, rest, body), hlim=255)


def nd_frame(kind: str, src: str, dst: str, mac: str, target: str = "::", *, eth_dst: str | None = None,
             flags: int = 0) -> bytes:
    if eth_dst is None:
        eth_dst = multicast_mac(dst) if _ip(dst).is_multicast else BROADCAST
    return ether(eth_dst, mac, ETH_P_IPV6, nd(kind, src, dst, mac, target, flags=flags))


def made_up_mac(i: int) -> str:
    return "02:5a:" + ":".join(f"{b:02x}" for b in struct.pack("!I", i))


# --- the sender (runs inside a netns) ----------------------------------------------

def _dst_of(pkt: bytes) -> tuple[int, str]:
    if pkt[0] >> 4 == 6:
        return socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, pkt[24:40])
    return socket.AF_INET, socket.inet_ntop(socket.AF_INET, pkt[16:20])


# PACKET_TX_RING (linux/if_packet.h), TPACKET_V2
SOL_PACKET, PACKET_VERSION, PACKET_TX_RING, TPACKET_V2 = 263, 10, 13, 1
TP_STATUS_SEND_REQUEST = 1
_RING_FRAME = 4096
_RING_DATA = 32  # TPACKET2_HDRLEN - sizeof(struct sockaddr_ll): where a TX frame's data starts


def send_ring(name: str, frames: list[bytes]) -> int:
    """Send Ethernet frames through a TPACKET_V2 TX ring bound to `name`. The kernel
    builds such a packet with only the link-layer header in its linear part and the
    rest as page fragments pointing into the ring: the IP header is not where a
    classifier reading skb->data finds it. Returns how many the kernel took."""
    import mmap

    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
        nr = max(1, len(frames))
        s.setsockopt(SOL_PACKET, PACKET_TX_RING, struct.pack("IIII", _RING_FRAME, nr, _RING_FRAME, nr))
        s.bind((name, 0))
        ring = mmap.mmap(s.fileno(), _RING_FRAME * nr, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            for i, frame in enumerate(frames):
                off = i * _RING_FRAME
                ring[off + _RING_DATA:off + _RING_DATA + len(frame)] = frame
                struct.pack_into("II", ring, off + 4, len(frame), len(frame))   # tp_len, tp_snaplen
                struct.pack_into("I", ring, off, TP_STATUS_SEND_REQUEST)
            s.send(b"")   # sends every frame marked, and waits until the kernel is done with them
            return sum(1 for i in range(len(frames)) if struct.unpack_from("I", ring, i * _RING_FRAME)[0] == 0)
        finally:
            ring.close()
    finally:
        s.close()


def send_all(l3: list[bytes], l2: list[tuple[str, bytes]], ifname: str = "eth0", repeat: int = 1,
             pps: float = 0, ring: bool = False) -> dict:
    """Send every packet `repeat` times, paced at `pps` packets a second (0: at once).
    ring: the frames through a TX ring (send_ring), all at once."""
    if ring:
        names = {name for name, _ in l2}
        return {"sent": sum(send_ring(n, [f for name, f in l2 if name == n]) for n in names), "errors": {}}
    errors: dict[str, int] = {}
    sent = 0
    socks: dict = {}
    t0 = time.monotonic()
    try:
        for _ in range(repeat):
            for pkt in l3:
                fam, dst = _dst_of(pkt)
                s = socks.get(fam)
                if s is None:
                    s = socks[fam] = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
                    if fam == socket.AF_INET:  # 255.255.255.255 too
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                a = ipaddress.ip_address(dst)
                scoped = a.version == 6 and (a.is_link_local or a.is_multicast)
                addr = (dst, 0, 0, socket.if_nametoindex(ifname) if scoped else 0) if a.version == 6 else (dst, 0)
                try:
                    s.sendto(pkt, addr)
                    sent += 1
                except OSError as e:
                    errors[str(e.errno)] = errors.get(str(e.errno), 0) + 1
                _pace(t0, sent + sum(errors.values()), pps)
            for name, frame in l2:
                s = socks.get(("l2", name))
                if s is None:
                    s = socks[("l2", name)] = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
                    s.bind((name, 0))
                try:
                    s.send(frame)
                    sent += 1
                except OSError as e:
                    errors[str(e.errno)] = errors.get(str(e.errno), 0) + 1
                _pace(t0, sent + sum(errors.values()), pps)
    finally:
        for s in socks.values():
            s.close()
    return {"sent": sent, "errors": errors}


def _pace(t0: float, n: int, pps: float) -> None:
    if pps:
        ahead = t0 + n / pps - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def flows(spec: dict) -> dict:
    """New flows without end (until `seconds`): each packet a new 5-tuple (sport and
    dport move on every time), UDP datagrams and TCP SYNs from the container's own
    addresses, paced at `pps`."""
    targets = [(spec[f"src{fam}"], spec[f"dst{fam}"], proto) for fam in spec["families"] for proto in spec["protos"]]
    socks = {4: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
             6: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)}
    pps, end = float(spec["pps"]), time.monotonic() + float(spec["seconds"])
    sent, n, t0 = 0, 0, time.monotonic()
    while time.monotonic() < end:
        src, dst, proto = targets[n % len(targets)]
        sport = 1024 + (n // len(targets)) % 60000
        dport = 1024 + (n * 7919) % 60000
        pkt = (udp_packet(src, dst, sport, dport, b"flood") if proto == "udp"
               else tcp_syn_packet(src, dst, sport, dport))
        try:
            socks[6 if is_v6(src) else 4].sendto(pkt, (dst, 0))
            sent += 1
        except OSError:
            pass
        n += 1
        _pace(t0, n, pps)
    return {"sent": sent}


def sniff() -> None:
    """Every ICMP and ICMPv6 message this netns receives, one JSON line each
    {"src", "type", "code", "data": hex of the message after its first 8 bytes},
    after a line READY; until killed."""
    import select
    s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    print("READY", flush=True)
    while True:
        for s in select.select([s4, s6], [], [])[0]:
            data, addr = s.recvfrom(65535)
            if s is s4:
                data = data[(data[0] & 0xF) * 4:]
            print(json.dumps({"src": addr[0], "type": data[0], "code": data[1], "data": data[8:].hex()}), flush=True)


UDP_SEGMENT, SOL_PACKET, PACKET_VNET_HDR = 103, 263, 15


def _family(host: str) -> int:
    return socket.AF_INET6 if is_v6(host) else socket.AF_INET


def segments(host: str, port: int, size: int, count: int, repeat: int, cmsg: bool) -> dict:
    """No capability needed: each send is one packet inside the container's kernel
    (GSO), which leaves as `count` datagrams."""
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    if not cmsg:
        s.setsockopt(IPPROTO_UDP, UDP_SEGMENT, size)
    s.connect((host, port))
    sent = 0
    for _ in range(repeat):
        data = b"G" * (size * count)
        sent += (s.sendmsg([data], [(IPPROTO_UDP, UDP_SEGMENT, struct.pack("=H", size))]) if cmsg
                 else s.send(data))
        time.sleep(0.01)
    return {"sent_bytes": sent}


def small_mss(host: str, port: int, mss: int, size: int) -> dict:
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.setsockopt(IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    s.settimeout(10)
    s.connect((host, port))
    s.sendall(b"T" * size)
    s.shutdown(socket.SHUT_WR)
    got = 0
    while chunk := s.recv(1 << 20):  # the echo, until the server closes: all has arrived
        got += len(chunk)
    s.close()
    return {"sent_bytes": size, "echoed": got}


def vnet(spec: dict) -> dict:
    """virtio_net_hdr {flags NEEDS_CSUM, gso_type, hdr_len, gso_size, csum_start,
    csum_offset} in front of each frame: the kernel takes the frame as one GSO packet."""
    hdr = struct.pack("<BBHHHH", 1, spec["gso_type"], spec["hdr_len"], spec["gso_size"],
                      spec["csum_start"], spec["csum_offset"])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.bind((spec.get("ifname", "eth0"), 0))
    sent, errors = 0, {}
    for frame in spec["frames"]:
        try:
            s.send(hdr + bytes.fromhex(frame))
            sent += 1
        except OSError as e:
            errors[str(e.errno)] = errors.get(str(e.errno), 0) + 1
    return {"sent": sent, "errors": errors}


def count(host: str, port: int, seconds: float) -> None:
    s = socket.socket(_family(host), socket.SOCK_DGRAM)
    s.bind((host, port))
    s.settimeout(0.1)
    print("READY", flush=True)
    n = size = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            size += len(s.recv(65535))
            n += 1
        except socket.timeout:
            pass
    print(json.dumps({"datagrams": n, "bytes": size}), flush=True)


def reset_once(host: str, port: int) -> None:
    """A TCP server that resets (SO_LINGER 0) the first connection from each address
    and port, and holds every later one: a peer that resets a connection and takes
    it again when the same ports come back. Prints READY, then a line per accept."""
    ls = socket.socket(_family(host), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(256)
    print("READY", flush=True)
    seen: set = set()
    held = []
    while True:
        c, peer = ls.accept()
        if peer[:2] in seen:
            held.append(c)
            print(json.dumps({"held": peer[1]}), flush=True)
            continue
        seen.add(peer[:2])
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        print(json.dumps({"reset": peer[1]}), flush=True)


def _connect_from(host: str, port: int, sport: int) -> tuple[socket.socket | None, str]:
    """Connect from a fixed source port; wait for what the far end does next."""
    import errno as errnos
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", sport))
    s.settimeout(2.0)
    try:
        s.connect((host, port))
        s.settimeout(0.5)
        try:
            return (None, "reset") if not s.recv(1) else (s, "data")
        except ConnectionResetError:
            return None, "reset"
        except socket.timeout:
            return s, "held"
    except ConnectionResetError:   # the peer's reset came before connect() returned
        s.close()
        return None, "reset"
    except OSError as e:
        s.close()
        return None, errnos.errorcode.get(e.errno or 0, "timeout")


def reopen(host: str, port: int, first_port: int, count: int) -> None:
    """For each of `count` source ports: connect (the peer resets it), then connect again
    at once from the same port. Prints the outcomes of both rounds, holds the
    connections that stayed until stdin closes."""
    first = [_connect_from(host, port, first_port + i)[1] for i in range(count)]
    again = [_connect_from(host, port, first_port + i) for i in range(count)]
    print(json.dumps({"first": first, "again": [r for _, r in again]}), flush=True)
    sys.stdin.read()
    for s, _ in again:
        if s is not None:
            s.close()


def _last_ack(sniffer: socket.socket, sport: int, v6: bool) -> tuple[int, int] | None:
    """(seq, ack) of the last ACK-carrying segment sent from `sport` that the packet
    socket on eth0 holds; drains it."""
    last = None
    while True:
        try:
            frame, where = sniffer.recvfrom(65535)
        except (BlockingIOError, socket.timeout):
            return last
        ip = frame[14:]
        if where[2] != socket.PACKET_OUTGOING or (ip[6] if v6 else ip[9]) != IPPROTO_TCP:
            continue
        tcp = ip[40 if v6 else (ip[0] & 15) * 4:]
        sp, _, seq, ack = struct.unpack("!HHII", tcp[:12])
        if sp == sport and tcp[13] & 0x10:
            last = (seq, ack)


def close_keep(me: str, host: str, port: int, first_port: int, count: int, pps: float, seconds: float) -> dict:
    """Open `count` connections from consecutive source ports, `pps` a second, each of
    which the peer resets (a CLOSE entry on the node); then, until `seconds` have gone
    since the start, send an in-window ACK on each every 3 s, as a raw packet: what
    keeps a closing entry alive (review 3)."""
    v6 = is_v6(host)
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sniffer.bind(("eth0", 0))
    sniffer.setblocking(False)
    raw = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    tuples: dict[int, tuple[int, int]] = {}
    t0, acks, opened, next_keep = time.monotonic(), 0, 0, time.monotonic() + 3
    while time.monotonic() - t0 < seconds:
        if opened < count and time.monotonic() >= t0 + opened / pps:
            sport = first_port + opened
            opened += 1
            if _connect_from(host, port, sport)[1] == "reset":
                time.sleep(0.05)
                found = _last_ack(sniffer, sport, v6)
                if found:
                    tuples[sport] = found
        if time.monotonic() >= next_keep:
            for sport, (seq, ack) in tuples.items():
                seg = struct.pack("!HHIIBBHHH", sport, port, seq, ack, 5 << 4, 0x10, 64240, 0, 0)
                raw.sendto(ip_packet(me, host, IPPROTO_TCP, _with_csum(me, host, IPPROTO_TCP, seg, 16)), (host, 0))
                acks += 1
            next_keep += 3
        _last_ack(sniffer, 0, v6)  # keep the packet socket's queue short
        time.sleep(0.02)
    return {"reset": len(tuples), "acks": acks}


def md5_listener(host: str, port: int, peer: str) -> None:
    """A TCP listener with a TCP_MD5SIG key for `peer` (no privilege needed): the kernel
    then drops, without answering, every segment from that peer that lacks the
    signature, so raw segments can play TCP on this port without the kernel resetting
    them (review 4). Holds until stdin closes."""
    fam = _family(host)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    key = b"k" * 16
    if fam == socket.AF_INET6:
        addr = struct.pack("=H", fam) + struct.pack("!HI", 0, 0) + socket.inet_pton(fam, peer) + struct.pack("=I", 0)
    else:
        addr = struct.pack("=H", fam) + struct.pack("!H", 0) + socket.inet_aton(peer)
    s.setsockopt(socket.IPPROTO_TCP, 14, addr.ljust(128, b"\0") + struct.pack("=BBHi", 0, 0, len(key), 0)
                 + key.ljust(80, b"\0"))   # TCP_MD5SIG, struct tcp_md5sig
    s.listen(8)
    print("READY", flush=True)
    sys.stdin.read()


def tcp_segment(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int) -> bytes:
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 64240, 0, 0)
    return ip_packet(src, dst, IPPROTO_TCP, _with_csum(src, dst, IPPROTO_TCP, seg, 16))


SOL_IP, IP_RECVERR, IP_MTU, IPV6_RECVERR, IPV6_MTU, MSG_ERRQUEUE = 0, 11, 14, 25, 24, 0x2000


def _errqueue(s: socket.socket) -> list[dict]:
    """What the kernel queued on a socket with IP(V6)_RECVERR: ICMP errors about its flow."""
    out: list[dict] = []
    timeout = s.gettimeout()
    s.setblocking(False)
    try:
        while True:
            try:
                _, anc, _, _ = s.recvmsg(2048, 1024, MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as e:
                out.append({"recvmsg": e.errno})
                return out
            for _level, _kind, data in anc:
                if len(data) >= 16:
                    ee_errno, origin, type_, code, _pad, info, _data = struct.unpack_from("=IBBBBII", data)
                    out.append({"errno": ee_errno, "origin": origin, "type": type_, "code": code, "info": info})
    finally:
        s.settimeout(timeout)


def hold(host: str, port: int) -> None:
    """A victim's connected UDP socket (IP(V6)_RECVERR on, so every ICMP error about
    its flow is kept): each line on stdin is sent as a datagram and answered with one
    JSON line {"reply": the echo server's header or null, "error": errno name,
    "errqueue": [...], "mtu": the socket's path MTU, "port": its local port}."""
    import errno as errnos
    v6 = is_v6(host)
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(*((socket.IPPROTO_IPV6, IPV6_RECVERR) if v6 else (SOL_IP, IP_RECVERR)), 1)
    s.connect((host, port))
    for line in sys.stdin:
        out: dict = {"reply": None, "error": None, "errqueue": _errqueue(s)}
        try:
            s.settimeout(2.0)
            s.send(line.strip().encode())
            data = s.recv(65535)
            out["reply"] = json.loads(data.split(b"\n", 1)[0])
            out["echo"] = data.split(b"\n", 1)[1].decode(errors="replace")
        except OSError as e:
            out["error"] = errnos.errorcode.get(e.errno or 0, "timeout")
        except ValueError:
            out["error"] = "bad reply"
        out["errqueue"] += _errqueue(s)
        out["mtu"] = s.getsockopt(*((socket.IPPROTO_IPV6, IPV6_MTU) if v6 else (SOL_IP, IP_MTU)))
        out["port"] = s.getsockname()[1]
        print(json.dumps(out), flush=True)


BIG = 6000  # bytes of the big server's answers: fragmented on a 1500-byte path


def big_server(port: int, hosts: list[str]) -> None:
    """Answers every datagram with BIG bytes starting with the request (fragmented by
    this netns's kernel); a line per answer on stdout, after READY."""
    import select
    socks = []
    for host in hosts:
        s = socket.socket(socket.AF_INET6 if is_v6(host) else socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, port))
        socks.append(s)
    print("READY", flush=True)
    while True:
        for s in select.select(socks, [], [])[0]:
            data, addr = s.recvfrom(2048)
            s.sendto((data + b"|" * BIG)[:BIG], addr)
            print(json.dumps({"answered": addr[0]}), flush=True)


def big_client(host: str, port: int, seconds: float, at_least: int) -> dict:
    """Requests answered with BIG bytes, for `seconds` and at least `at_least` of them;
    each request is tried up to three times (1 s apart). Returns the tries per request
    (0: never answered)."""
    results = []
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(results) < at_least:
        tries = 0
        for attempt in range(1, 4):
            with socket.socket(socket.AF_INET6 if is_v6(host) else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host, port))
                s.settimeout(1.0)
                token = f"req-{len(results)}-{attempt}-{time.monotonic_ns()}".encode()
                try:
                    s.send(token)
                    data = s.recv(65535)
                except OSError:
                    continue
                if len(data) == BIG and data.startswith(token):
                    tries = attempt
                    break
        results.append(tries)
        time.sleep(0.05)
    return {"tries": results}


# --- test side: the modes above, run inside the lab's namespaces -------------------

SCRIPT = os.path.abspath(__file__)


def argv(mode: str, *args: object) -> list[str]:
    # -I -S: stdlib only, no site: starts in a few tens of milliseconds.
    return [sys.executable, "-I", "-S", SCRIPT, mode, *map(str, args)]


def run(lab, ns: str, mode: str, *args: object, spec: dict | None = None, timeout: float = 60) -> dict:
    cp = lab.run(ns, argv(mode, *args), input=None if spec is None else json.dumps(spec), timeout=timeout)
    return json.loads(cp.stdout.strip().splitlines()[-1])


def send(lab, ns: str, l3=(), l2=(), **kw) -> dict:
    """Send crafted IP packets (l3) and Ethernet frames ((ifname, frame) in l2) from
    inside ns, as an app with CAP_NET_RAW would; returns {"sent", "errors"}."""
    return run(lab, ns, "send", spec={"l3": [p.hex() for p in l3], "l2": [[n, f.hex()] for n, f in l2], **kw})


def spec_file(path, l3=(), l2=(), **kw):
    """The same spec as send(), written to a file, for a sender started in the
    background (lab.popen(ns, argv("send"), stdin=open(path)))."""
    with open(path, "w") as f:
        json.dump({"l3": [p.hex() for p in l3], "l2": [[n, fr.hex()] for n, fr in l2], **kw}, f)
    return path


def offloads_on(ethtool_k: str) -> list[str]:
    """The segmentation offloads `ethtool -k` says are on (what sockgate turns off on
    a container's end of its veth)."""
    return [line.split(":")[0].strip() for line in ethtool_k.splitlines()
            if line.strip().endswith("segmentation: on") or line.strip().startswith("tx-gso-list: on")]


def wait_ready(log, proc, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while "READY" not in open(log).read():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{proc.args} not ready: {open(log).read()[-2000:]}")
        time.sleep(0.02)


def json_lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines() if line.startswith("{")]


def drop_counters(lab) -> dict[str, int]:
    """Packets counted by sockgate's "drop:<reason>" rules in the node, per reason."""
    listing = json.loads(lab.run(lab.node, ["nft", "-j", "list", "table", "inet", "sockgate"]).stdout)
    out: dict[str, int] = {}
    for item in listing["nftables"]:
        rule = item.get("rule")
        if not rule or not str(rule.get("comment", "")).startswith("drop:"):
            continue
        for e in rule["expr"]:
            if "counter" in e:
                reason = rule["comment"][5:]
                out[reason] = out.get(reason, 0) + e["counter"]["packets"]
    return out


# The node's own link-local multicast into a veth: the kernel sends a new link's MLD
# reports in its own time, whatever a test is doing (see test_events.py).
NODE_NOISE = ("node-multicast",)


def delta(before: dict[str, int], after: dict[str, int], noise: tuple[str, ...] = NODE_NOISE) -> dict[str, int]:
    """What each reason counted between two drop_counters, but `noise`."""
    return {k: after.get(k, 0) - before.get(k, 0) for k in after
            if after.get(k, 0) != before.get(k, 0) and k not in noise}


def conntrack_lines(lab, address: str) -> list[str]:
    """The node's conntrack entries whose original source is `address`, as conntrack
    prints them."""
    cmd = ["conntrack", "-L", "-s", address] + (["-f", "ipv6"] if is_v6(address) else [])
    return [line for line in lab.run(lab.node, cmd).stdout.splitlines() if line.strip()]


def conntrack_entries(lab, address: str) -> list[tuple[str, str]]:
    """(protocol, TCP state or "") of the node's conntrack entries whose original
    source is `address`, i.e. the flows of the container that owns it."""
    entries = []
    for line in conntrack_lines(lab, address):
        f = line.split()
        entries.append((f[0], f[3] if f[0] == "tcp" else ""))
    return entries


def forget_flows(lab, *addresses: str) -> None:
    """Delete the node's conntrack entries from these addresses, and see them gone: CI
    once found 17 entries of earlier tests' containers after a single `conntrack -D`
    (which exits 0 or 1 alike, whether it deleted all, some or none)."""
    for a in addresses:
        for _ in range(10):
            lab.run(lab.node, ["conntrack", "-D", "-s", a] + (["-f", "ipv6"] if is_v6(a) else []), check=False)
            if not (left := conntrack_lines(lab, a)):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"conntrack entries from {a} would not go:\n" + "\n".join(left))


def neighbours(lab, ns: str) -> list[dict]:
    """Every neighbour entry of a netns, all states (permanent, noarp, failed ...)."""
    return json.loads(lab.run(ns, ["ip", "-j", "neigh", "show", "nud", "all"]).stdout or "[]")


def path_mtu(lab, ns: str, dst: str) -> int | None:
    """The path MTU a netns has learned for dst (a cached exception), None if none."""
    words = lab.run(ns, ["ip", "route", "get", dst]).stdout.split()
    return int(words[words.index("mtu") + 1]) if "mtu" in words else None


def main(args: list[str]) -> int:
    mode, args = args[0], args[1:]
    if mode == "sniff":
        sniff()
    elif mode == "hold":
        hold(args[0], int(args[1]))
    elif mode == "big-server":
        big_server(int(args[0]), args[1:])
    elif mode == "big-client":
        print(json.dumps(big_client(args[0], int(args[1]), float(args[2]), int(args[3]))))
    elif mode == "segments":
        print(json.dumps(segments(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]),
                                  args[5:] == ["cmsg"])))
    elif mode == "small-mss":
        print(json.dumps(small_mss(args[0], int(args[1]), int(args[2]), int(args[3]))))
    elif mode == "reset-once":
        reset_once(args[0], int(args[1]))
    elif mode == "md5-listener":
        md5_listener(args[0], int(args[1]), args[2])
    elif mode == "close-keep":
        print(json.dumps(close_keep(args[0], args[1], int(args[2]), int(args[3]), int(args[4]), float(args[5]),
                                    float(args[6]))))
    elif mode == "reopen":
        reopen(args[0], int(args[1]), int(args[2]), int(args[3]))
    elif mode == "count":
        count(args[0], int(args[1]), float(args[2]))
    elif mode == "vnet":
        print(json.dumps(vnet(json.loads(sys.stdin.read()))))
    elif mode in ("send", "flows"):
        spec = json.loads(sys.stdin.read() or "{}")
        if mode == "send":
            res = send_all([bytes.fromhex(h) for h in spec.get("l3", [])],
                           [(name, bytes.fromhex(h)) for name, h in spec.get("l2", [])], spec.get("ifname", "eth0"),
                           int(spec.get("repeat", 1)), float(spec.get("pps", 0)), bool(spec.get("ring")))
        else:
            res = flows(spec)
        print(json.dumps(res))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
