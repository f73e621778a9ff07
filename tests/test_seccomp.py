"""Contract row C12 in a real container: the seccomp profile from
``sockgate seccomp generate`` loaded by containerd/runc (``ctr run --seccomp
--seccomp-profile``), with a Python probe that tries socket options, socket kinds,
listen(), a DNS lookup and a non-blocking connect, and prints what happened.

The image is the busybox test image with the host's /usr (and /lib, /lib64) bound
read-only for python3. Containers get their own network namespace from runc (lo only,
no CNI); containerd runs in a throwaway netns and private mount namespaces, so nothing
here touches the host's root netns or its CNI/containerd directories.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from netpolicy import seccomp
from tests.support import images, temp_netns
from tests.support.containerd import Containerd

pytestmark = pytest.mark.clients

HOST_PATHS = ["/etc/cni/net.d", "/opt/cni", "/var/lib/cni", "/run/containerd", "/run/cni", "/opt/containerd",
              "/run/mount", "/run/runc"]

# Runs inside the container as `python3 -I -c PROBE`; prints one JSON object:
# check name -> "ok" (or a value) or the errno name of the failure.
PROBE = r'''
import asyncio, ctypes, errno, json, socket, struct, subprocess, threading

R = {}

def attempt(key, fn):
    try:
        out = fn()
        R[key] = "ok" if out is None else out
    except OSError as e:
        R[key] = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__ + ": " + str(e)

def opt(level, name, value, family=socket.AF_INET, kind=socket.SOCK_STREAM):
    def go():
        with socket.socket(family, kind) as s:
            s.setsockopt(level, name, value)
    return go

def getopt(level, name, family=socket.AF_INET, kind=socket.SOCK_STREAM):
    def go():
        with socket.socket(family, kind) as s:
            return s.getsockopt(level, name)
    return go

def sock(*args):
    def go():
        socket.socket(*args).close()
    return go

# -- the contract's options: accepted
attempt("set SO_KEEPALIVE", opt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
attempt("set TCP_NODELAY", opt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1))
attempt("set SO_LINGER", opt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5)))
attempt("set SO_REUSEADDR", opt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1))
attempt("set SO_SNDBUF", opt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536))
attempt("set SO_RCVBUF", opt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536))
attempt("set SO_OOBINLINE", opt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1))
attempt("set SO_DEBUG", opt(socket.SOL_SOCKET, socket.SO_DEBUG, 0))  # 1 needs CAP_NET_ADMIN
attempt("set TCP_NODELAY v6", opt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1, socket.AF_INET6))
attempt("set SO_KEEPALIVE unix", opt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1, socket.AF_UNIX))
attempt("get SO_KEEPALIVE", getopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
attempt("get TCP_NODELAY", getopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
attempt("get SO_ERROR", getopt(socket.SOL_SOCKET, socket.SO_ERROR))
attempt("get SO_TYPE", getopt(socket.SOL_SOCKET, socket.SO_TYPE))

# -- other options: refused
attempt("set SO_BROADCAST", opt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1, kind=socket.SOCK_DGRAM))
attempt("set IP_TRANSPARENT", opt(socket.SOL_IP, 19, 1))
attempt("set SO_REUSEPORT", opt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1))
attempt("set SO_BINDTODEVICE", opt(socket.SOL_SOCKET, 25, b"lo"))
attempt("set SO_MARK", opt(socket.SOL_SOCKET, 36, 7))
attempt("set IP_TOS", opt(socket.SOL_IP, socket.IP_TOS, 0x10))
attempt("set IPV6_V6ONLY", opt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1, socket.AF_INET6))
attempt("set TCP_KEEPIDLE", opt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30))
attempt("set TCP_CONGESTION", opt(socket.IPPROTO_TCP, 13, b"reno"))
attempt("get SO_BROADCAST", getopt(socket.SOL_SOCKET, socket.SO_BROADCAST, kind=socket.SOCK_DGRAM))
attempt("get TCP_INFO", getopt(socket.IPPROTO_TCP, 11))

# SO_KEEPALIVE with garbage in the upper half of the 64-bit level argument: the kernel
# reads the int (1 = SOL_SOCKET) and would accept it; the profile compares 64 bits.
def raw_setsockopt_upper_bits():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    one = ctypes.c_int(1)
    with socket.socket() as s:
        rc = libc.syscall(ctypes.c_long(54), ctypes.c_long(s.fileno()), ctypes.c_long((1 << 32) | 1),
                          ctypes.c_long(9), ctypes.byref(one), ctypes.c_long(4))
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, "setsockopt")
attempt("set SO_KEEPALIVE level|1<<32", raw_setsockopt_upper_bits)

# -- socket kinds
attempt("socket inet stream", sock(socket.AF_INET, socket.SOCK_STREAM))
attempt("socket inet dgram", sock(socket.AF_INET, socket.SOCK_DGRAM))
attempt("socket inet6 stream", sock(socket.AF_INET6, socket.SOCK_STREAM))
attempt("socket inet6 dgram", sock(socket.AF_INET6, socket.SOCK_DGRAM))
attempt("socket inet tcp nonblock cloexec",
        sock(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, socket.IPPROTO_TCP))
attempt("socket inet6 udp", sock(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_UDP))
attempt("socket unix stream", sock(socket.AF_UNIX, socket.SOCK_STREAM))
attempt("socket unix dgram", sock(socket.AF_UNIX, socket.SOCK_DGRAM))
attempt("socket unix seqpacket", sock(socket.AF_UNIX, socket.SOCK_SEQPACKET))
attempt("socketpair unix", lambda: [s.close() for s in socket.socketpair()] and None)
attempt("socket raw icmp", sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
attempt("socket raw6 icmpv6", sock(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
attempt("socket raw tcp", sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
attempt("socket packet", sock(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)))
attempt("socket packet dgram", sock(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3)))
attempt("socket ping", sock(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP))
attempt("socket netlink route", sock(socket.AF_NETLINK, socket.SOCK_RAW, 0))
attempt("socket sctp", sock(socket.AF_INET, socket.SOCK_STREAM, 132))
attempt("socket inet seqpacket", sock(socket.AF_INET, socket.SOCK_SEQPACKET, 0))

# -- listen()
def tcp_listen():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
def unix_listen():
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("\0sockgate-probe")
        s.listen()
attempt("listen tcp", tcp_listen)
attempt("listen unix", unix_listen)

# -- a non-blocking connect learns its result through getsockopt(SO_ERROR)
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
async def connect_refused():
    try:
        await asyncio.open_connection("127.0.0.1", closed_port())
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "connected"
R["asyncio connect to a closed port"] = asyncio.run(connect_refused())

async def echo_round_trip():
    async def handle(r, w):
        w.write(await r.read(5))
        await w.drain()
        w.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        w.write(b"hello")
        data = await r.read(5)
        w.close()
        return data.decode()
attempt("asyncio echo", lambda: asyncio.run(echo_round_trip()))

# -- name resolution: /etc/hosts, and DNS over UDP through glibc's stub resolver to a
# responder on 127.0.0.1:53 (the image's resolv.conf is empty: glibc asks 127.0.0.1)
attempt("getaddrinfo localhost ADDRCONFIG",
        lambda: sorted({a[4][0] for a in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_ADDRCONFIG)}))
def dns_responder(sock):
    while True:
        q, peer = sock.recvfrom(512)
        qend = 12 + q[12:].index(0) + 5
        qtype = int.from_bytes(q[qend - 4:qend - 2], "big")
        answer = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([192, 0, 2, 53])
        n = 1 if qtype == 1 else 0
        sock.sendto(q[:2] + b"\x81\x80\x00\x01" + n.to_bytes(2, "big") + b"\x00\x00\x00\x00"
                    + q[12:qend] + (answer if n else b""), peer)
def dns_lookup():
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 53))
    threading.Thread(target=dns_responder, args=(srv,), daemon=True).start()
    try:
        return sorted({a[4][0] for a in socket.getaddrinfo("probe.sockgate.test", 80, socket.AF_INET,
                                                            socket.SOCK_STREAM)})
    except socket.gaierror as e:
        return "gaierror: " + str(e)
attempt("dns lookup over udp", dns_lookup)

# -- an ordinary program's other needs: threads, fork+exec, files
attempt("fork and exec", lambda: str(subprocess.run(["/bin/true"]).returncode))
def threads():
    out = []
    t = threading.Thread(target=lambda: out.append(1))
    t.start(); t.join()
    return str(len(out))
attempt("threads", threads)
def files():
    with open("/tmp/probe", "w") as f:
        f.write("x")
    with open("/tmp/probe") as f:
        return f.read()
attempt("files", files)
print(json.dumps(R, sort_keys=True))
'''

MOUNTS = [f"type=bind,src={src},dst={dst},options=rbind:ro"
          for src, dst in (("/usr", "/usr"), ("/usr/lib", "/lib"), ("/usr/lib64", "/lib64"))]


def _snapshot_host() -> dict[str, Any]:
    return {p: sorted(os.listdir(p)) if os.path.isdir(p) else os.path.exists(p) for p in HOST_PATHS}


class Runner:
    def __init__(self, ctd: Containerd, workdir: Path) -> None:
        self.ctd, self.workdir, self.cache, self.count = ctd, workdir, {}, 0

    def profile(self, *args: str) -> Path:
        """`sockgate seccomp generate ARGS -o FILE` through the real CLI."""
        path = self.workdir / f"profile-{len(list(self.workdir.glob('profile-*')))}.json"
        subprocess.run([sys.executable, "-m", "runtime.cli.main", "seccomp", "generate", *args, "-o", str(path)],
                       check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        return path

    def probe(self, *generate_args: str, profile: bool = True) -> dict[str, Any]:
        key = (generate_args, profile)
        if key not in self.cache:
            sec = ["--seccomp", "--seccomp-profile", str(self.profile(*generate_args))] if profile else []
            self.count += 1
            mounts = [a for m in MOUNTS for a in ("--mount", m)]
            proc = self.ctd.ctr("run", "--rm", *sec, *mounts, images.BUSYBOX_REF, f"sc{self.count}",
                                "/usr/bin/python3", "-I", "-c", PROBE, check=False, timeout=120)
            assert proc.returncode == 0, f"probe failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}"
            self.cache[key] = json.loads(proc.stdout.strip().splitlines()[-1])
        return self.cache[key]


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    before = _snapshot_host()
    tmp = tmp_path_factory.mktemp("seccomp")
    archive = images.busybox_oci_archive(tmp / "images")
    with temp_netns() as netns, Containerd(netns, tmp / "ctd") as ctd:
        assert images.BUSYBOX_REF in ctd.import_image(archive)
        yield Runner(ctd, tmp)
    assert _snapshot_host() == before, "host CNI/containerd paths changed"


CONTRACT_OK = ["set SO_KEEPALIVE", "set TCP_NODELAY", "set SO_LINGER", "set SO_REUSEADDR", "set SO_SNDBUF",
               "set SO_RCVBUF", "set SO_OOBINLINE", "set SO_DEBUG", "set TCP_NODELAY v6", "set SO_KEEPALIVE unix",
               "get SO_KEEPALIVE", "get TCP_NODELAY"]
OTHER_OPTIONS = ["set SO_BROADCAST", "set IP_TRANSPARENT", "set SO_REUSEPORT", "set SO_BINDTODEVICE", "set SO_MARK",
                 "set IP_TOS", "set IPV6_V6ONLY", "set TCP_KEEPIDLE", "set TCP_CONGESTION", "get SO_BROADCAST",
                 "get TCP_INFO", "set SO_KEEPALIVE level|1<<32"]
SOCKETS_OK = ["socket inet stream", "socket inet dgram", "socket inet6 stream", "socket inet6 dgram",
              "socket inet tcp nonblock cloexec", "socket inet6 udp", "socket unix stream", "socket unix dgram",
              "socket unix seqpacket", "socketpair unix"]
SOCKETS_REFUSED = ["socket raw icmp", "socket raw6 icmpv6", "socket raw tcp", "socket packet", "socket packet dgram",
                   "socket ping", "socket netlink route", "socket sctp", "socket inet seqpacket"]
PROGRAM_OK = {"fork and exec": "0", "threads": "1", "files": "x",
              "getaddrinfo localhost ADDRCONFIG": ["127.0.0.1"], "dns lookup over udp": ["192.0.2.53"],
              "asyncio connect to a closed port": "ECONNREFUSED"}


def _pick(result: dict[str, Any], keys) -> dict[str, Any]:
    return {k: result[k] for k in keys}


@pytest.mark.parametrize("fmt", seccomp.FORMATS)
def test_profile_allows_only_the_contract_options(runner: Runner, fmt: str) -> None:
    r = runner.probe("--format", fmt)
    assert _pick(r, CONTRACT_OK) == dict.fromkeys(CONTRACT_OK, "ok") | {
        "get SO_KEEPALIVE": 0, "get TCP_NODELAY": 0}
    assert _pick(r, OTHER_OPTIONS) == dict.fromkeys(OTHER_OPTIONS, "ENOPROTOOPT")
    # read-only options stay readable
    assert r["get SO_ERROR"] == 0 and r["get SO_TYPE"] == 1


@pytest.mark.parametrize("fmt", seccomp.FORMATS)
def test_profile_allows_only_inet_stream_dgram_and_unix_sockets(runner: Runner, fmt: str) -> None:
    r = runner.probe("--format", fmt)
    assert _pick(r, SOCKETS_OK) == dict.fromkeys(SOCKETS_OK, "ok")
    assert _pick(r, SOCKETS_REFUSED) == dict.fromkeys(SOCKETS_REFUSED, "EPERM")


def test_profile_keeps_ordinary_programs_working(runner: Runner) -> None:
    r = runner.probe()
    assert _pick(r, PROGRAM_OK) == PROGRAM_OK
    assert r["listen tcp"] == r["listen unix"] == "ok"
    assert r["asyncio echo"] == "hello"


def test_strict_profile_denies_listen(runner: Runner) -> None:
    r = runner.probe("--strict")
    assert r["listen tcp"] == r["listen unix"] == "EPERM"
    assert r["asyncio echo"] == "EPERM"
    # everything else as in the normal profile
    assert _pick(r, CONTRACT_OK + OTHER_OPTIONS + SOCKETS_OK + SOCKETS_REFUSED) == \
        _pick(runner.probe(), CONTRACT_OK + OTHER_OPTIONS + SOCKETS_OK + SOCKETS_REFUSED)
    assert _pick(r, PROGRAM_OK) == PROGRAM_OK


def test_without_the_profile_the_same_calls_succeed(runner: Runner) -> None:
    """Control: the blocking comes from the profile, not from the container (ctr's default
    capabilities include CAP_NET_RAW, so raw sockets and IP_TRANSPARENT work there)."""
    r = runner.probe(profile=False)
    allowed_there = ["set SO_BROADCAST", "set IP_TRANSPARENT", "set SO_REUSEPORT", "set IP_TOS", "set IPV6_V6ONLY",
                     "set TCP_KEEPIDLE", "set SO_KEEPALIVE level|1<<32", "get SO_BROADCAST",
                     "socket raw icmp", "socket packet", "socket netlink route", "listen tcp"]
    assert _pick(r, allowed_there) == dict.fromkeys(allowed_there, "ok") | {"get SO_BROADCAST": 0}
    assert _pick(r, CONTRACT_OK + SOCKETS_OK) == _pick(runner.probe(), CONTRACT_OK + SOCKETS_OK)


def test_contract_only_profile_is_the_bare_list(runner: Runner) -> None:
    """--contract-only: exactly C12's eight options. glibc's resolver then can't enable
    IP_RECVERR and gives up on DNS over UDP, and a non-blocking connect can't read
    SO_ERROR: why the default profile adds them."""
    r = runner.probe("--contract-only")
    assert _pick(r, CONTRACT_OK) == _pick(runner.probe(), CONTRACT_OK)
    assert r["get SO_ERROR"] == r["get SO_TYPE"] == "ENOPROTOOPT"
    assert r["asyncio connect to a closed port"] == "ENOPROTOOPT"
    assert r["dns lookup over udp"] != ["192.0.2.53"]
    assert r["getaddrinfo localhost ADDRCONFIG"] == ["127.0.0.1"]


# Real syscalls newer than Debian 12's libseccomp (2.5.4): runtimes linked against it
# skip them (and runc answers ENOSYS for numbers past the filter's highest).
NEWER_THAN_LIBSECCOMP = {"getxattrat", "setxattrat", "listxattrat", "removexattrat", "mseal", "uretprobe"}


def test_every_syscall_name_is_known_to_libseccomp() -> None:
    """A misspelt name would be skipped silently by the runtime: resolve each one with
    the libseccomp runc uses, for x86_64 and aarch64."""
    import ctypes
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_syscall_resolve_name_arch.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name_arch.restype = ctypes.c_int
    scmp_error = -1  # __NR_SCMP_ERROR; other negative numbers: exists, not on this arch
    names = {n for strict in (False, True) for r in seccomp.generate(strict=strict)["syscalls"] for n in r["names"]}
    unknown = sorted(n for n in names
                     if all(lib.seccomp_syscall_resolve_name_arch(arch, n.encode()) == scmp_error
                            for arch in (0xC000003E, 0xC00000B7)))  # AUDIT_ARCH_X86_64, AUDIT_ARCH_AARCH64
    assert set(unknown) <= NEWER_THAN_LIBSECCOMP, unknown
    assert lib.seccomp_syscall_resolve_name_arch(0xC000003E, b"setsockopt") == 54
