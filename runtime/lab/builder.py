"""The lab: node, internet and app network namespaces for tests, benchmarks and the demo.

Invariant: nothing leaves the machine and the host stays untouched (everything is
configured inside lab namespaces, which have no link to the root netns; teardown also
on SIGTERM, and Lab.cleanup_stale() after a SIGKILL). Safety model: docs/lab.md.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

from runtime.defaults import RUN_DIR as DEFAULT_RUN_DIR
from runtime.fsutil import atomic_write, remove_stale_temps
from runtime.kernel import ethtool, segment_meter
from runtime.kernel.netns import in_netns

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
RUN_DIR = Path("/run/sockgate-lab")
PKG_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PKG_DIR.parents[1]
PROBE_PY = PKG_DIR / "probe.py"

AUTO_PREFIX_RE = re.compile(r"^sgl-[0-9a-f]{6}$")
PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")
APP_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")
START_TIMEOUT = 15.0
KILL_GRACE = 2.0


@dataclass(frozen=True)
class LabAddresses:
    """Fixed addresses of the lab. The public ones are real-world-looking on purpose:
    the policy under test must classify them like the real thing (checked against
    the 2024-04-25 goog.json/cloud.json snapshot in tests/test_lab.py)."""

    uplink_if: str = "uplink"          # in node, towards the internet
    downlink_if: str = "downlink"      # in internet, towards the node
    public_if: str = "lo"              # holds the public addresses in internet (this
                                       # kernel has no dummy module: "Unknown device type")
    node_uplink_v4: str = "198.18.0.2"
    node_uplink_v6: str = "2001:db8:5067::2"
    internet_v4: str = "198.18.0.1"    # node's default gateway
    internet_v6: str = "2001:db8:5067::1"
    uplink_prefixlen_v4: int = 24
    uplink_prefixlen_v6: int = 64
    dns_v4: tuple[str, ...] = ("8.8.8.8", "8.8.4.4")
    dns_v6: tuple[str, ...] = ("2001:4860:4860::8888", "2001:4860:4860::8844")
    public_v4: str = "93.184.215.14"             # ordinary public host
    public_v6: str = "2606:2800:21f:cb07::14"
    google_v4: str = "142.250.72.14"             # goog.json minus cloud.json
    google_v6: str = "2607:f8b0:4004:c1b::64"
    cloud_v4: str = "34.35.0.10"                 # cloud.json 34.35.0.0/16: not "Google"
    cloud_v6: str = "2600:1900:4000::10"         # cloud.json 2600:1900:4000::/44
    gmail: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({
        "smtp.gmail.com": ("142.250.10.108", "2607:f8b0:400e:c00::6c"),
        "pop.gmail.com": ("142.250.10.109", "2607:f8b0:400e:c00::6d"),
        "imap.gmail.com": ("142.250.10.110", "2607:f8b0:400e:c00::6e"),
    }))
    gmail_ttl: int = 300
    # TCP and UDP echo on every address. Port 53 of the dns_v4/dns_v6 addresses is the
    # DNS server instead (UDP and TCP); port 53 of every other address is echo.
    echo_ports: tuple[int, ...] = (7, 21, 25, 53, 80, 443, 465, 587, 993, 995, 9000)
    dns_port: int = 53
    iperf_port: int = 5201                   # never bound by the lab; for iperf3 -s
    container_pools: tuple[str, ...] = ("10.77.0.0/16", "fd77:5067:6174::/64")

    def public_addresses(self) -> tuple[str, ...]:
        """Every address on the internet's lo (LAB.public_if)."""
        gm = tuple(a for addrs in self.gmail.values() for a in addrs)
        return (*self.dns_v4, *self.dns_v6, self.public_v4, self.public_v6, self.google_v4,
                self.google_v6, self.cloud_v4, self.cloud_v6, *gm)


LAB = LabAddresses()


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    error: str | None          # errno name ("ECONNREFUSED"), "timeout", "bad_echo", ...
    peer_seen: str | None      # source address as the server saw it (after NAT)
    echo_ok: bool
    elapsed: float
    local: str | None = None         # the probe socket's own address
    server_local: str | None = None  # destination address as the server saw it
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> ProbeResult:
        d = json.loads(text.strip().splitlines()[-1])
        return cls(ok=bool(d["ok"]), error=d.get("error"), peer_seen=d.get("peer_seen"),
                   echo_ok=bool(d.get("echo_ok")), elapsed=float(d.get("elapsed", 0.0)),
                   local=d.get("local"), server_local=(d.get("server") or {}).get("local"), raw=d)


@dataclass(frozen=True)
class DnsAnswer:
    name: str
    type: str
    ttl: int
    data: str


@dataclass(frozen=True)
class DnsResult:
    ok: bool                   # a response arrived (rcode says which)
    error: str | None
    rcode: str | None
    answers: tuple[DnsAnswer, ...]
    elapsed: float

    @property
    def addresses(self) -> list[str]:
        return [a.data for a in self.answers if a.type in ("A", "AAAA")]

    @classmethod
    def parse(cls, text: str) -> DnsResult:
        d = json.loads(text.strip().splitlines()[-1])
        return cls(ok=bool(d["ok"]), error=d.get("error"), rcode=d.get("rcode"),
                   answers=tuple(DnsAnswer(**a) for a in d.get("answers", [])),
                   elapsed=float(d.get("elapsed", 0.0)))


@dataclass
class _Record:
    """Content of /run/sockgate-lab/<prefix>.pid: who made which namespaces."""
    prefix: str
    pid: int
    start: int                 # creator's start time (clock ticks): guards against pid reuse
    namespaces: list[str]
    created: float

    def save(self) -> None:
        atomic_write(RUN_DIR / f"{self.prefix}.pid", json.dumps(self.__dict__).encode(), durable=False)

    @classmethod
    def load(cls, path: Path) -> _Record | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


class LabCommandError(subprocess.CalledProcessError):
    """CalledProcessError whose message carries the command's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()} stderr: {(self.stderr or '').strip()[-2000:]}"


# --- small helpers -------------------------------------------------------------

def _proc_start(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after "comm)"


def _alive(pid: int, start: int) -> bool:
    return _proc_start(pid) == start


_GL = threading.RLock()
_GL_STATE: dict[str, Any] = {"depth": 0, "file": None}


@contextmanager
def _global_lock() -> Iterator[None]:
    """Serialises netns creation and stale cleanup between concurrent lab runs
    (`ip netns add` sets up the /run/netns mount on first use and can race).
    Re-entrant within the process: the SIGTERM handler tears down from the main
    thread, possibly while that thread already holds the lock; a second flock on a
    new file description would deadlock there."""
    with _GL:
        if _GL_STATE["depth"] == 0:
            RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
            f = open(RUN_DIR / ".lock", "w")
            fcntl.flock(f, fcntl.LOCK_EX)
            _GL_STATE["file"] = f
        _GL_STATE["depth"] += 1
        try:
            yield
        finally:
            _GL_STATE["depth"] -= 1
            if _GL_STATE["depth"] == 0:
                _GL_STATE["file"].close()  # releases the flock
                _GL_STATE["file"] = None


def _netns_pids(names: Sequence[str]) -> list[int]:
    """PIDs whose net namespace is one of `names` (what `ip netns pids` does)."""
    keys = set()
    for n in names:
        try:
            st = os.stat(NETNS_DIR / n)
            keys.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    if not keys:
        return []
    me = os.getpid()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            st = os.stat(f"/proc/{d}/ns/net")
        except OSError:
            continue  # gone, or a zombie
        if (st.st_dev, st.st_ino) in keys:
            pids.append(int(d))
    return pids


def _kill_netns_procs(names: Sequence[str], grace: float = KILL_GRACE) -> None:
    """SIGTERM, then SIGKILL, every process inside the namespaces. The pid list is
    re-read before SIGKILL so a pid reused meanwhile by an outside process is spared."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _netns_pids(names)
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while time.monotonic() < end and any(Path(f"/proc/{p}/ns/net").exists() for p in pids):
            time.sleep(0.02)  # a zombie has no ns link any more: it counts as gone


def _remove_segment_meter(name: str) -> None:
    """A node netns's segment meter goes first: its pinned links would keep the netns
    alive after `ip netns del` (runtime/kernel/segment_meter.py). Nothing to enter the
    netns for when no meter is pinned at all (app namespaces never have one)."""
    root = segment_meter.pin_root()
    try:
        if root.is_dir() and any(root.glob("net-*")):
            segment_meter.remove(in_netns(str(NETNS_DIR / name), segment_meter.netns_cookie))
        if segment_meter.unmount_if_unused():
            with contextlib.suppress(OSError):
                Path(DEFAULT_RUN_DIR).rmdir()  # made for the meter's lock, if nothing else is there
    except OSError as exc:
        log.warning("lab: the segment meter of %s: %s", name, exc)


def _delete_namespaces(names: Sequence[str]) -> list[str]:
    """Kill what runs inside, then `ip netns del`. Returns names that remain."""
    names = [n for n in names if (NETNS_DIR / n).exists()]
    _kill_netns_procs(names)
    for n in names:
        _remove_segment_meter(n)
        subprocess.run(["ip", "netns", "del", n], capture_output=True, text=True, timeout=30)
    return [n for n in names if (NETNS_DIR / n).exists()]


# --- process-wide teardown hooks -----------------------------------------------

_LIVE: set[Lab] = set()
_LIVE_LOCK = threading.RLock()
_HOOKS = False


def _close_all() -> None:
    with _LIVE_LOCK:
        labs = [lab for lab in _LIVE if lab._owner == os.getpid()]  # not a fork's parent's labs
    for lab in labs:
        try:
            lab.close()
        except Exception as e:  # keep closing the others
            print(f"sockgate lab: teardown of {lab.prefix} failed: {e}", file=sys.stderr)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _close_all()
    prev = _PREV_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)  # die with the right status
    os.kill(os.getpid(), signum)


_PREV_HANDLERS: dict[int, Any] = {}


def _install_hooks() -> None:
    global _HOOKS
    with _LIVE_LOCK:
        if _HOOKS:
            return
        _HOOKS = True
        atexit.register(_close_all)
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread
        for sig in (signal.SIGTERM, signal.SIGHUP):
            prev = signal.getsignal(sig)
            if prev == signal.SIG_IGN:
                continue  # the process chose to survive it; so does the lab
            _PREV_HANDLERS[sig] = prev
            signal.signal(sig, _on_signal)


# --- the lab -------------------------------------------------------------------

class Lab:
    """node + internet namespaces, echo and DNS servers; app namespaces on demand."""

    def __init__(self, prefix: str | None = None,
                 container_pools: Sequence[str] = LAB.container_pools, *,
                 start_servers: bool = True, clean_stale: bool = True, wire: bool = True) -> None:
        if prefix is None:
            prefix = f"sgl-{secrets.token_hex(3)}"
        if not PREFIX_RE.match(prefix):
            raise ValueError(f"bad lab prefix {prefix!r}")
        self.prefix = prefix
        self.container_pools = tuple(str(ipaddress.ip_network(p)) for p in container_pools)
        self.node = f"{prefix}-node"
        self.internet = f"{prefix}-internet"
        self.run_dir = RUN_DIR / prefix
        self.dns_records = self.run_dir / "dns.json"
        self.events_file = self.run_dir / "events.jsonl"
        self._start_servers = start_servers
        self._clean_stale = clean_stale
        self._wire = wire
        self._apps: dict[str, str] = {}      # short -> full name, once created
        self._owned: list[str] = []          # namespaces *this* Lab created: all it may delete
        self._made_run_dir = False
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.RLock()
        self._record: _Record | None = None
        self._owner = os.getpid()
        self._state = "new"  # new -> up -> closed

    # context manager
    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Lab({self.prefix!r}, {self._state})"

    # --- naming ---
    @property
    def namespaces(self) -> list[str]:
        return [self.node, self.internet, *self._apps.values()]

    @property
    def apps(self) -> dict[str, str]:
        return dict(self._apps)

    def _resolve(self, ns: str) -> str:
        """Full netns name of one of *our* namespaces; short names ("node", "a1") and
        /run/netns paths too. Refusing anything else keeps lab.run() from ever acting
        on a foreign netns."""
        if ns.startswith(f"{NETNS_DIR}/"):
            ns = ns[len(str(NETNS_DIR)) + 1:]
        with self._lock:
            if ns in self.namespaces:
                return ns
            short = {"node": self.node, "internet": self.internet, **self._apps}
            if ns in short:
                return short[ns]
        raise KeyError(f"{ns!r} is not a namespace of lab {self.prefix}")

    def ns_path(self, name: str) -> str:
        return str(NETNS_DIR / self._resolve(name))

    # --- lifecycle ---
    def start(self) -> Lab:
        if self._state != "new":
            raise RuntimeError(f"lab {self.prefix} already {self._state}")
        if self._clean_stale:
            Lab.cleanup_stale()
        with _LIVE_LOCK:
            _LIVE.add(self)
        _install_hooks()
        self._state = "up"
        try:
            with _global_lock():
                clash = [n for n in (self.node, self.internet) if (NETNS_DIR / n).exists()]
                if clash or (RUN_DIR / f"{self.prefix}.pid").exists() or self.run_dir.exists():
                    raise FileExistsError(f"lab prefix {self.prefix} in use: {clash}")
                self.run_dir.mkdir(mode=0o700)
                self._made_run_dir = True
                # Record first, create second: a crash in between leaves a record
                # naming namespaces that may not exist, never an unrecorded netns.
                self._record = _Record(self.prefix, os.getpid(), _proc_start(os.getpid()) or 0,
                                       [self.node, self.internet], time.time())
                self._record.save()
                for n in (self.node, self.internet):
                    self._netns_add(n)
            self._configure()
            self._write_records({n: {"ttl": LAB.gmail_ttl, "addresses": list(a)} for n, a in LAB.gmail.items()})
            if self._start_servers:
                self._launch_servers()
        except BaseException:
            self.close()
            raise
        return self

    def _netns_add(self, name: str) -> None:
        """Caller holds _global_lock and has checked the name is free."""
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True, timeout=30)
        with self._lock:
            self._owned.append(name)

    def _ip_batch(self, ns: str, lines: list[str]) -> None:
        self.run(ns, ["ip", "-batch", "-"], input="\n".join(lines) + "\n")

    def _configure(self) -> None:
        L = LAB
        # net.* sysctls written from inside a netns apply to that netns only.
        # A new netns copies the host's net.ipv4.conf.{all,default}.* (ip_forward,
        # rp_filter; see devconf_inherit_init_net), so set what matters explicitly:
        # - rp_filter 0: if the internet (or the node's baseline) dropped spoofed
        #   packets, a test of sockgate's own anti-spoofing would pass vacuously;
        # - DAD off before any link exists, so link-locals are usable at once too
        #   (otherwise v6 waits ~1-2 s before the first packet).
        common = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                  "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        self.run(self.node, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
                             "net.ipv6.conf.all.forwarding=1", *common])
        self.run(self.internet, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=0",
                                 "net.ipv6.conf.all.forwarding=0", *common])
        self._ip_batch(self.node, [
            "link set lo up",
            f"link add {L.uplink_if} type veth peer name {L.downlink_if} netns {self.internet}",
            f"addr add {L.node_uplink_v4}/{L.uplink_prefixlen_v4} dev {L.uplink_if}",
            f"addr add {L.node_uplink_v6}/{L.uplink_prefixlen_v6} dev {L.uplink_if} nodad",
            f"link set {L.uplink_if} up",
            f"route add default via {L.internet_v4} dev {L.uplink_if}",
            f"route add default via {L.internet_v6} dev {L.uplink_if}",
        ])
        if self._wire:
            # The internet's end is a veth, which takes a super-packet whole: the node's
            # uplink cuts its packets itself, so the internet counts what a wire would
            # carry (what billing bills, README "Billing"). Benchmarks leave it off
            # (wire=False): a NIC cuts them in hardware, at no cost to the node's CPU.
            in_netns(self.ns_path(self.node), lambda: ethtool.segmentation_off(L.uplink_if))
        inet = [
            "link set lo up",
            f"addr add {L.internet_v4}/{L.uplink_prefixlen_v4} dev {L.downlink_if}",
            f"addr add {L.internet_v6}/{L.uplink_prefixlen_v6} dev {L.downlink_if} nodad",
            f"link set {L.downlink_if} up",
        ]
        for a in L.public_addresses():
            v6 = ipaddress.ip_address(a).version == 6
            inet.append(f"addr add {a}/{128 if v6 else 32} dev {L.public_if}" + (" nodad" if v6 else ""))
        for pool in self.container_pools:
            via = L.node_uplink_v6 if ipaddress.ip_network(pool).version == 6 else L.node_uplink_v4
            inet.append(f"route add {pool} via {via} dev {L.downlink_if}")  # inbound tests hit the node
        self._ip_batch(self.internet, inet)

    def _launch_servers(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        py = [sys.executable, "-m"]
        echo = self.popen(self.internet, [*py, "runtime.lab.servers",
                                          "--ports", ",".join(map(str, LAB.echo_ports)),
                                          "--reuseport", str(LAB.dns_port),
                                          "--events", str(self.events_file)],
                          log=self.run_dir / "servers.log", die_with_parent=main, stdout=subprocess.PIPE)
        listen = [x for a in (*LAB.dns_v4, *LAB.dns_v6) for x in ("--listen", a)]
        dns = self.popen(self.internet, [*py, "runtime.lab.dns", "--records", str(self.dns_records),
                                         *listen, "--events", str(self.events_file)],
                         log=self.run_dir / "dns.log", die_with_parent=main, stdout=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        for proc, log in ((echo, "servers.log"), (dns, "dns.log")):
            self._wait_ready(proc, deadline, self.run_dir / log)

    def add_internet_address(self, addr: str) -> None:
        """One more address on the internet's lo: a "bait" for a destination the policy
        refuses. The echo servers listen on every address, so a packet that got through
        would reach them and show in server_events()."""
        self._internet_address("add", addr)

    def remove_internet_address(self, addr: str) -> None:
        self._internet_address("del", addr)

    def _internet_address(self, action: str, addr: str) -> None:
        v6 = ipaddress.ip_address(addr).version == 6
        self.run(self.internet, ["ip", "addr", action, f"{addr}/{128 if v6 else 32}", "dev", LAB.public_if,
                                 *(["nodad"] if v6 and action == "add" else [])])

    def start_echo(self, ns: str, ports: Sequence[int]) -> subprocess.Popen[Any]:
        """The echo server inside any lab netns (e.g. a listen socket in an app, for
        inbound tests); returns once it listens. Killed at teardown like every popen."""
        log = self.run_dir / f"echo-{self._resolve(ns)}.log"
        proc = self.popen(ns, [sys.executable, "-m", "runtime.lab.servers",
                               "--ports", ",".join(map(str, ports))],
                          log=log, die_with_parent=threading.current_thread() is threading.main_thread(),
                          stdout=subprocess.PIPE)
        self._wait_ready(proc, time.monotonic() + START_TIMEOUT, log)
        return proc

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[Any], deadline: float, log: Path) -> None:
        assert proc.stdout is not None
        fd, buf = proc.stdout.fileno(), b""
        while b"READY\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"lab server {proc.args!r} not ready: {log.read_text()[-2000:]}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    proc.wait(5)
                    raise RuntimeError(f"lab server {proc.args!r} exited {proc.returncode}: "
                                       f"{log.read_text()[-2000:]}")
                buf += chunk

    def close(self) -> None:
        """Idempotent; safe from a signal handler, atexit and __exit__ alike."""
        with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
            procs, self._procs = self._procs, []
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)  # own session: takes children along
                except ProcessLookupError:
                    pass
        end = time.monotonic() + KILL_GRACE
        for p in procs:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass  # the netns sweep below retries
            for f in (p.stdout, p.stderr, p.stdin):
                if f is not None:
                    f.close()
        with _global_lock():
            # Read under the global lock, which add_app() holds while creating: no app
            # slips past. Only what we created: a start() that failed on a prefix
            # clash must not delete the other lab's namespaces. Apps first.
            with self._lock:
                names = list(reversed(self._owned))
            left = _delete_namespaces(names)
            if self._made_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            if self._record is not None and not left:  # else cleanup_stale() retries later
                (RUN_DIR / f"{self.prefix}.pid").unlink(missing_ok=True)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if left:
            raise RuntimeError(f"lab {self.prefix}: namespaces not deleted: {left}")

    @staticmethod
    def _stale() -> tuple[list[tuple[Path, _Record]], list[str]]:
        """The records of labs whose creator died, and the orphans: namespaces named
        like an auto prefix (`sgl-<6 hex>-*`) that no record claims. Reads only."""
        dead: list[tuple[Path, _Record]] = []
        claimed: set[str] = set()
        for path in sorted(RUN_DIR.glob("*.pid")) if RUN_DIR.is_dir() else []:
            rec = _Record.load(path)
            if rec is None:
                continue
            if _alive(rec.pid, rec.start):
                claimed.update(rec.namespaces)
            else:
                dead.append((path, rec))
        orphans = [n for n in (os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else [])
                   if n not in claimed and AUTO_PREFIX_RE.match(n[:10]) and n[10:11] == "-"
                   and not (RUN_DIR / f"{n[:10]}.pid").exists()]
        return dead, orphans

    @classmethod
    def stale_namespaces(cls) -> list[str]:
        """The namespaces cleanup_stale() would delete, without deleting any (what
        `sockgate doctor` reports)."""
        dead, orphans = cls._stale()
        existing = set(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else set()
        mine = {n for _, rec in dead for n in rec.namespaces if n.startswith(rec.prefix + "-") and n in existing}
        return sorted(mine | set(orphans))

    @classmethod
    def cleanup_stale(cls) -> list[str]:
        """Delete labs whose creator died (SIGKILL, OOM...). Returns their prefixes.
        Touches only namespaces named in a dead creator's record, plus orphans named
        like an auto prefix (`sgl-<6 hex>-*`) that no record claims."""
        if not RUN_DIR.is_dir():
            return []
        cleaned = []
        with _global_lock():
            remove_stale_temps(RUN_DIR)  # records of labs whose creator died mid-write
            dead, _ = cls._stale()
            for path, rec in dead:
                mine = [n for n in rec.namespaces if n.startswith(rec.prefix + "-")]
                if not _delete_namespaces(mine):
                    shutil.rmtree(RUN_DIR / rec.prefix, ignore_errors=True)
                    path.unlink(missing_ok=True)
                    cleaned.append(rec.prefix)
            # Listed after those deletions: a dead lab's namespace it never recorded
            # is an orphan once its record is gone.
            _, orphans = cls._stale()
            if orphans:
                _delete_namespaces(orphans)
                cleaned.extend(sorted({n[:10] for n in orphans}))
        return cleaned

    # --- apps ---
    def add_app(self, name: str) -> str:
        """Empty netns "<prefix>-<name>" with lo up; the code under test wires it."""
        if not APP_RE.match(name) or name in ("node", "internet"):
            raise ValueError(f"bad app name {name!r}")
        full = f"{self.prefix}-{name}"
        with _global_lock():
            with self._lock:
                if self._state != "up":
                    raise RuntimeError(f"lab {self.prefix} is {self._state}")
                if name in self._apps or (NETNS_DIR / full).exists():
                    raise FileExistsError(full)
                self._save_record(pending=full)  # recorded before it exists, as in start()
            try:
                self._netns_add(full)
            finally:
                self._save_record()
        with self._lock:
            self._apps[name] = full
        try:
            self.run(full, ["ip", "link", "set", "lo", "up"])
        except BaseException:
            self.remove_app(name)
            raise
        return full

    def remove_app(self, name: str) -> None:
        """Kill what runs in the app netns and delete it (short or full name)."""
        with self._lock:
            full = self._apps.get(name) or (name if name in self._apps.values() else None)
            if full is None:
                raise KeyError(name)
        with _global_lock():
            left = _delete_namespaces([full])
            if left:
                raise RuntimeError(f"netns {full} not deleted")
            with self._lock:
                self._apps = {k: v for k, v in self._apps.items() if v != full}
                self._owned = [n for n in self._owned if n != full]
                self._save_record()

    def _save_record(self, pending: str | None = None) -> None:
        if self._record is not None:
            self._record.namespaces = [*self._owned, *([pending] if pending else [])]
            self._record.save()

    # --- running things inside ---
    def _nsenter(self, ns: str, argv: Sequence[str]) -> list[str]:
        # nsenter, not `ip netns exec`: the latter remounts /sys, which breaks dockerd.
        return ["nsenter", f"--net={self.ns_path(ns)}", "--", *map(str, argv)]

    def run(self, ns: str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True,
            input: str | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv inside netns ns; text mode, output captured. check=True raises
        CalledProcessError with the command's stderr in the message."""
        cp = subprocess.run(self._nsenter(ns, argv), capture_output=True, text=True,
                            timeout=timeout, input=input, env=None if env is None else dict(env))
        if check and cp.returncode:
            raise LabCommandError(cp.returncode, cp.args, cp.stdout, cp.stderr)
        return cp

    def popen(self, ns: str, argv: Sequence[str], *, log: Path | str | None = None,
              die_with_parent: bool = False, **kw: Any) -> subprocess.Popen[Any]:
        """Start argv inside netns ns; killed (with its process group) at teardown.
        Default stdout/stderr: the log file if given, else DEVNULL / inherited (an
        unread PIPE would stall a chatty child such as iperf3). die_with_parent: SIGKILL it
        if this *thread* dies (PR_SET_PDEATHSIG, via setpriv), for servers that must
        not outlive a kill -9 of the test run."""
        cmd = self._nsenter(ns, argv)
        if die_with_parent:
            cmd = ["setpriv", "--pdeathsig", "KILL", *cmd]
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("cwd", str(PROJECT_ROOT))
        env = dict(kw.pop("env", None) or os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        logf = open(log, "ab") if log is not None else None
        try:
            kw.setdefault("stdout", logf if logf is not None else subprocess.DEVNULL)
            if logf is not None:
                kw.setdefault("stderr", logf)
            with self._lock:
                if self._state != "up":
                    raise RuntimeError(f"lab {self.prefix} is {self._state}")
                proc = subprocess.Popen(cmd, env=env, **kw)
                self._procs.append(proc)
        finally:
            if logf is not None:
                logf.close()  # the child has its own copy
        return proc

    # --- probes ---
    def _probe(self, ns: str, args: list[str], timeout: float, payload: bytes | None = None) -> str:
        # -I -S: no site, no package imports: probe.py is stdlib only and starts fast.
        stdin = None
        if payload is not None:
            if len(payload) <= 2048:
                args = [*args, "--payload-hex", payload.hex()]
            else:  # argv strings are capped at 128 KiB
                args, stdin = [*args, "--payload-hex", "-"], payload.hex()
        cp = self.run(ns, [sys.executable, "-I", "-S", str(PROBE_PY), *args], timeout=timeout + 10, input=stdin)
        return cp.stdout

    def probe(self, ns: str, proto: str, host: str, port: int, payload: bytes = b"hello",
              timeout: float = 2.0, *, bind: str | None = None, bind_port: int = 0,
              freebind: bool = False) -> ProbeResult:
        if proto not in ("tcp", "udp"):
            raise ValueError(proto)
        args = [proto, host, str(port), "--timeout", str(timeout)]
        if bind:
            args += ["--bind", bind]
        if bind_port:
            args += ["--bind-port", str(bind_port)]
        if freebind:
            args.append("--freebind")
        return ProbeResult.parse(self._probe(ns, args, timeout, payload))

    def ping(self, ns: str, host: str, timeout: float = 1.0) -> ProbeResult:
        """One ICMP echo request; ok when the reply came, else error is "timeout" or the
        ICMP error that came back instead ("admin-prohibited", ...)."""
        return ProbeResult.parse(self._probe(ns, ["icmp", host, "--timeout", str(timeout)], timeout))

    def spoof_udp(self, ns: str, src: str, dst: str, port: int, payload: bytes = b"spoof",
                  sport: int = 0) -> ProbeResult:
        """Send one UDP datagram with a forged source; ok means it was handed to the
        kernel. Check arrival with server_events()."""
        args = ["spoof-udp", src, dst, str(port)]
        if sport:
            args += ["--sport", str(sport)]
        return ProbeResult.parse(self._probe(ns, args, 2.0, payload))

    def dns_query(self, ns: str, name: str, qtype: str = "A", server: str = LAB.dns_v4[0], *,
                  tcp: bool = False, timeout: float = 2.0) -> DnsResult:
        args = ["dns", name, qtype, server, "--timeout", str(timeout)] + (["--tcp"] if tcp else [])
        return DnsResult.parse(self._probe(ns, args, timeout))

    # --- lab DNS and server-side evidence ---
    def _write_records(self, records: dict[str, Any]) -> None:
        atomic_write(self.dns_records, json.dumps(records, indent=1).encode(), durable=False)

    def set_dns(self, name: str, addresses: Sequence[str], ttl: int,
                fail: Mapping[str, str] | None = None) -> None:
        """Change (or add) a name's A/AAAA answers; the next query sees it. `fail`
        makes a query type fail instead, e.g. {"AAAA": "servfail"} or {"A": "timeout"}
        (no reply at all); the other type still answers."""
        addrs = [str(ipaddress.ip_address(a)) for a in addresses]
        if not 0 <= ttl < 2**31:
            raise ValueError(f"bad ttl {ttl}")
        record: dict[str, Any] = {"ttl": int(ttl), "addresses": addrs}
        if fail:
            if any(t not in ("A", "AAAA") for t in fail) or any(m not in ("servfail", "timeout")
                                                                for m in fail.values()):
                raise ValueError(f"bad fail {dict(fail)}: types A/AAAA, modes servfail/timeout")
            record["fail"] = dict(fail)
        with self._lock:
            records = json.loads(self.dns_records.read_text())
            records[name.lower().rstrip(".")] = record
            self._write_records(records)

    def server_events(self) -> list[dict[str, Any]]:
        """Everything the internet's servers saw, oldest first: tcp_open/tcp_close
        (with bytes_in/bytes_out), udp (with the first 64 payload bytes as "head"), dns."""
        try:
            text = self.events_file.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def reached(self, dst: str, since: int = 0, port: int | None = None) -> bool:
        """Whether any of server_events()[since:] arrived at address dst (an IPv4-mapped
        dst counts as its IPv4 address), on `port` if given: evidence that a packet got
        through. (A connection's close is logged when it ends, possibly after `since`:
        the port tells an earlier connection to another port of dst apart.)"""
        want = ipaddress.ip_address(dst)
        if want.version == 6 and want.ipv4_mapped:
            want = want.ipv4_mapped
        for ev in self.server_events()[since:]:
            if port is not None and ev.get("port") != port:
                continue
            try:
                if ipaddress.ip_address(ev.get("local", "")) == want:
                    return True
            except ValueError:
                continue
        return False
