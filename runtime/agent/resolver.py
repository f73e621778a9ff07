"""Resolve the exception hostnames (smtp/pop/imap.gmail.com, the policy file's own) on
the node and keep their addresses in the nft sets allow4_dns / allow6_dns. Elements
expire in the kernel at the record's TTL (plus a grace) unless refreshed; every answer
is screened (netpolicy.answers) before it opens anything.

Design notes: docs/resolver.md.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import dns.exception
import dns.resolver

from netpolicy.answers import Internal, NodeView, internal_networks, screen
from netpolicy.policy import Policy, ResolverSettings
from netpolicy.ruleset import CONTAINER_IFGROUP
from runtime.fsutil import atomic_write_json
from runtime.kernel import nft

log = logging.getLogger(__name__)
GRACE_S = 2
MAX_BACKOFF_S = 60
FAMILIES = ("A", "AAAA")
# While lookups are under way their answers are collected this often: the delay before
# an answer opens anything, and before a stop is noticed.
POLL_S = 0.2
_SETS = {"A": "allow4_dns", "AAAA": "allow6_dns"}
# resolved.json: {hostname: [addresses open now], ...}, the shape `policy explain` reads.
# Dropped answers go under this key, which can't be a hostname (policy._HOSTNAME).
DROPPED_KEY = "_dropped"


@dataclass(frozen=True)
class Lookup:
    """One family's answer for one hostname."""

    rdtype: str                      # "A" or "AAAA"
    addresses: tuple[str, ...] = ()  # as answered, before screening
    ttl: int = 0                     # clamped to the policy's minTtl..maxTtl
    error: str = ""                  # set: the lookup failed, nothing was learnt


@dataclass(frozen=True)
class Dropped:
    """An answer that opened nothing (or less than its exceptions ask for)."""

    address: str
    why: str
    closed: tuple[str, ...]  # "tcp/587": where an exception would have opened it


@dataclass(frozen=True)
class Resolution:
    """One refresh of one hostname: the families looked up this time, and what their
    answers opened."""

    host: str
    lookups: tuple[Lookup, ...]
    opened: tuple[str, ...] = ()
    dropped: tuple[Dropped, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.opened

    @property
    def error(self) -> str:
        return "; ".join(f"{lk.rdtype}: {lk.error}" for lk in self.lookups if lk.error)

    @property
    def ttl(self) -> int:
        return min((lk.ttl for lk in self.lookups if not lk.error), default=0)


@dataclass(frozen=True)
class _Held:
    """What a family's last good answer opened, until its elements time out."""

    opened: tuple[str, ...]
    dropped: tuple[Dropped, ...]
    expires: float  # wall clock: written to resolved.json by a later process too


def _resolver(settings: ResolverSettings) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)  # never /etc/resolv.conf: the policy says which
    r.nameservers = list(settings.nameservers)
    r.lifetime = settings.timeout
    r.timeout = settings.timeout
    r.cache = None
    return r


def _clamp(ttl: int, settings: ResolverSettings) -> int:
    return max(settings.min_ttl, min(settings.max_ttl, ttl))


def resolve(host: str, settings: ResolverSettings, rdtypes: Iterable[str] = FAMILIES) -> tuple[Lookup, ...]:
    """A and/or AAAA of host, each on its own: one failing says nothing of the other."""
    resolver = _resolver(settings)
    out = []
    for rdtype in rdtypes:
        try:
            answer = resolver.resolve(host, rdtype)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            # A host without AAAA (or A) is normal: an answer with no addresses, asked
            # again after minTtl. (Its old addresses then run out by their timeout.)
            out.append(Lookup(rdtype, (), settings.min_ttl))
        except dns.exception.DNSException as exc:
            out.append(Lookup(rdtype, error=f"{type(exc).__name__}: {exc}"))
        else:
            # An Answer that did not raise NoAnswer has its rrset.
            ttl = answer.rrset.ttl if answer.rrset is not None else settings.min_ttl
            out.append(Lookup(rdtype, tuple(sorted({r.address for r in answer})), _clamp(ttl, settings)))
    return tuple(out)


# --- what the node looks like from inside its netns -------------------------------

IFF_LOOPBACK = 0x8
RT_TABLE_LOCAL = 255
RTN_UNICAST = 1


def _pools() -> tuple[str, ...]:
    """The container pools from the loaded table's pools4/pools6, as CIDRs."""
    return tuple(nft.prefixes("pools4") + nft.prefixes("pools6"))


def _gateway(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("addr"), str):  # RTA_VIA
        return value["addr"]
    return None


def node_view() -> NodeView:
    """The node's own addresses, point-to-point peers, the networks of its own
    (non-container) links, its routes' gateways, and the container pools; read in
    the current netns, which is the node's wherever the agent or `sockgate policy`
    runs."""
    from pyroute2 import IPRoute  # the CNI shim's start must not pay for this import

    with IPRoute() as ipr:
        links = {link["index"]: link for link in ipr.get_links()}
        addrs = ipr.get_addr()
        routes = ipr.get_routes()
    name = {i: link.get("IFLA_IFNAME") or f"if{i}" for i, link in links.items()}
    # Container veths hold only fe80::1/64 and /32 routes into the pools: the pools
    # cover them, and listing each would only bloat the view.
    container = {i for i, link in links.items() if link.get("IFLA_GROUP") == CONTAINER_IFGROUP}
    loopback = {i for i, link in links.items() if link["flags"] & IFF_LOOPBACK}
    own, peers, on_link, gateways = [], [], [], []
    for a in addrs:
        dev = name.get(a["index"], f"if{a['index']}")
        local, address = a.get("IFA_LOCAL"), a.get("IFA_ADDRESS")
        mine = local or address
        if not mine:
            continue
        own.append((mine, dev))
        if local and address and local != address:
            peers.append((address, dev))
        maxlen = 32 if a["family"] == 2 else 128
        if a["index"] not in container and a["index"] not in loopback and 0 < a["prefixlen"] < maxlen:
            # The networks the node sits on. Not /0 (a tunnel's catch-all would make
            # every answer internal) and not /32 or /128 (the address itself, above).
            on_link.append((str(ipaddress.ip_network(f"{address or mine}/{a['prefixlen']}", strict=False)), dev))
    for r in routes:
        if r.get("RTA_TABLE", r["table"]) == RT_TABLE_LOCAL or r["type"] != RTN_UNICAST:
            continue
        hops = [(r.get("RTA_GATEWAY") or r.get("RTA_VIA"), r.get("RTA_OIF"))]
        for nh in r.get("RTA_MULTIPATH") or []:
            hops.append((nh.get_attr("RTA_GATEWAY") or nh.get_attr("RTA_VIA"), nh["oif"]))
        for gw, oif in hops:
            gw = _gateway(gw)
            if gw:
                gateways.append((gw, name.get(oif, f"if{oif}")))
    return NodeView(tuple(own), tuple(peers), tuple(on_link), tuple(gateways), _pools())


# --- screening and the nft elements -----------------------------------------------

@dataclass(frozen=True)
class Opening:
    """What one family's answer for one hostname opens."""

    elements: tuple[tuple[str, str, int], ...]  # (address, protocol, port)
    dropped: tuple[Dropped, ...]

    @property
    def opened(self) -> tuple[str, ...]:
        return tuple(sorted({e[0] for e in self.elements}, key=ipaddress.ip_address))


def screen_answer(policy: Policy, host: str, addresses: Iterable[str],
                  internal: tuple[Internal, ...]) -> Opening:
    """Screen the answers for each exception naming host: each opens on its own
    protocols and ports, with its own allowedAnswers."""
    addresses = tuple(addresses)
    opened: dict[str, set[tuple[str, int]]] = {}
    refused: dict[str, tuple[str, set[tuple[str, int]]]] = {}
    for allow in policy.allows:
        if not allow.is_host or allow.dest != host:
            continue
        pairs = {(proto, port) for proto in allow.protos for port in allow.ports}
        for v in screen(addresses, internal, allow.allowed_answers):
            if v.accepted:
                opened.setdefault(v.address, set()).update(pairs)
                if v.why:
                    log.info("answer %s for %s accepted: %s", v.address, host, v.why)
            else:
                refused.setdefault(v.address, (v.why, set()))[1].update(pairs)
    dropped = []
    for addr, (why, pairs) in refused.items():
        closed = pairs - opened.get(addr, set())
        if closed:
            dropped.append(Dropped(addr, why, tuple(f"{p}/{port}" for p, port in sorted(closed))))
    elements = tuple(sorted((a, p, port) for a, pairs in opened.items() for p, port in pairs))
    return Opening(elements, tuple(dropped))


def elements_script(elements: Iterable[tuple[str, str, int]], timeout: int) -> str:
    """Re-arm the timeout of every (address, proto, port). `add` leaves an existing
    element's timeout alone, so each one is added, deleted and added again in the
    same transaction (succeeds whether or not it existed)."""
    lines = []
    for addr, proto, port in elements:
        set_name = "allow6_dns" if ":" in addr else "allow4_dns"
        elem = f"{addr} . {proto} . {port}"
        lines += [f"add element inet sockgate {set_name} {{ {elem} timeout {timeout}s }}",
                  f"delete element inet sockgate {set_name} {{ {elem} }}",
                  f"add element inet sockgate {set_name} {{ {elem} timeout {timeout}s }}"]
    return "\n".join(lines) + "\n" if lines else ""


class _Pending:
    """One hostname's lookups (the families due) under way in a daemon thread. Nobody
    has to wait for it: abandoned (at shutdown, or when a new policy replaced the
    Refresher), it finishes within the resolver's lifetime and its answer is dropped."""

    def __init__(self, host: str, rdtypes: tuple[str, ...], settings: ResolverSettings, started: float) -> None:
        self.host, self.rdtypes, self.started = host, rdtypes, started
        self.lookups: tuple[Lookup, ...] = ()
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(settings,), name=f"resolve {host}", daemon=True).start()

    def _run(self, settings: ResolverSettings) -> None:
        try:
            self.lookups = resolve(self.host, settings, self.rdtypes)
        except Exception as exc:  # noqa: BLE001 - a socket error too is a failed lookup, retried with backoff
            self.lookups = tuple(Lookup(t, error=f"{type(exc).__name__}: {exc}") for t in self.rdtypes)
        finally:
            self.done.set()


class Refresher:
    """Keeps every exception hostname resolved, each family on its own TTL.

    Driven either a round at a time (refresh_due: start what is due, wait for the
    answers, apply them) or without ever waiting for DNS (run, and the agent's policy
    keeper: start_due, then collect what has come in, every POLL_S while lookups are
    under way)."""

    def __init__(self, policy: Policy, record: Path | None = None,
                 view: Callable[[], NodeView] = node_view) -> None:
        self.policy = policy
        self.record = record  # resolved.json, read by `sockgate policy explain`
        self.view = view
        keys = [(host, rdtype) for host in policy.hostnames for rdtype in FAMILIES]
        self.due = {key: 0.0 for key in keys}
        self.failures = {key: 0 for key in keys}
        self.held: dict[tuple[str, str], _Held] = {}
        self.last: dict[str, Resolution] = {}
        self.pending: dict[str, _Pending] = {}  # by hostname: at most one lookup each at a time

    def _internal(self) -> tuple[Internal, ...]:
        return internal_networks(self.policy.blocked, self.view())

    def refresh_due(self, now: float | None = None) -> list[Resolution]:
        """One round: look up what is due, wait for the answers, apply them."""
        self.start_due(now)
        for pending in list(self.pending.values()):
            pending.done.wait()
        return self.collect()

    def start_due(self, now: float | None = None) -> None:
        """Start looking up the families that are due, of hostnames not being looked up
        already. Their schedule counts from now (the start, as a TTL does)."""
        now = time.monotonic() if now is None else now
        by_host: dict[str, list[str]] = {}
        for (host, rdtype), due in sorted(self.due.items()):
            if due <= now and host not in self.pending:
                by_host.setdefault(host, []).append(rdtype)
        for host, rdtypes in by_host.items():
            self.pending[host] = _Pending(host, tuple(rdtypes), self.policy.resolver, now)

    def collect(self) -> list[Resolution]:
        """Apply the answers of the lookups that have finished (screened, into the nft
        sets, resolved.json); the others stay under way."""
        finished = sorted((p for p in self.pending.values() if p.done.is_set()), key=lambda p: p.host)
        internal: tuple[Internal, ...] | None = None  # read once per batch, when needed
        done = []
        for pending in finished:
            host = pending.host
            del self.pending[host]
            lookups: list[Lookup] = []
            opened: list[str] = []
            dropped: list[Dropped] = []
            for lk in pending.lookups:
                if not lk.error:
                    try:
                        if internal is None and lk.addresses:
                            internal = self._internal()
                        opening = self._open(host, lk, internal or ())
                    except Exception as exc:  # noqa: BLE001 - netlink, nft, anything: open nothing
                        lk = replace(lk, error=f"not applied: {type(exc).__name__}: {exc}")
                    else:
                        opened += opening.opened
                        dropped += opening.dropped
                self._schedule(host, lk, pending.started)
                lookups.append(lk)
            res = Resolution(host, tuple(lookups), tuple(opened), tuple(dropped))
            self.last[host] = res
            done.append(res)
        if done and self.record is not None:
            self._write_record()
        return done

    def _open(self, host: str, lk: Lookup, internal: tuple[Internal, ...]) -> Opening:
        opening = screen_answer(self.policy, host, lk.addresses, internal)
        before = self.held.get((host, lk.rdtype))
        seen = {(d.address, d.why) for d in before.dropped} if before else set()
        for d in opening.dropped:
            # Warn when a drop is new; its repeats at every TTL would drown the log.
            (log.warning if (d.address, d.why) not in seen else log.debug)(
                "dropped answer %s for %s (would open %s): %s", d.address, host, ", ".join(d.closed), d.why)
        script = elements_script(opening.elements, lk.ttl + GRACE_S)
        if script:
            nft.run(script)
        self.held[(host, lk.rdtype)] = _Held(opening.opened, opening.dropped, time.time() + lk.ttl + GRACE_S)
        return opening

    def _schedule(self, host: str, lk: Lookup, now: float) -> None:
        key = (host, lk.rdtype)
        if lk.error:
            self.failures[key] += 1
            backoff = min(MAX_BACKOFF_S, 2 ** (self.failures[key] - 1))
            held = self.held.get(key)
            left = (f"; {', '.join(held.opened)} stay open until their timeout runs out"
                    if held and held.opened and held.expires > time.time() else "")
            log.warning("resolving %s %s failed (%s); retry in %ds%s", host, lk.rdtype, lk.error, backoff, left)
            self.due[key] = now + backoff
        else:
            self.failures[key] = 0
            log.info("resolved %s %s: %s (ttl %ds)", host, lk.rdtype,
                     ", ".join(self.held[key].opened) or "-", lk.ttl)
            self.due[key] = now + lk.ttl

    def _write_record(self) -> None:
        """resolved.json: per hostname the addresses open now (a failed family's last
        answer until it times out), and what was dropped under DROPPED_KEY."""
        wall = time.time()
        if self.record is None:
            return
        record: dict[str, object] = {}
        dropped: dict[str, list[dict]] = {}
        for host in self.last:
            live = [self.held[(host, t)] for t in FAMILIES
                    if (host, t) in self.held and self.held[(host, t)].expires > wall]
            record[host] = [a for h in live for a in h.opened]
            drops = [{"address": d.address, "why": d.why, "closed": list(d.closed)} for h in live for d in h.dropped]
            if drops:
                dropped[host] = drops
        if dropped:
            record[DROPPED_KEY] = dropped
        self.record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record, record)

    def next_due(self) -> float:
        return min(self.due.values(), default=time.monotonic() + 3600)

    def wake_in(self) -> float:
        """Seconds until there is something to do: answers to collect (polled while
        lookups are under way) or a lookup to start."""
        if self.pending:
            return POLL_S
        return max(POLL_S, self.next_due() - time.monotonic())

    def run(self, stop: threading.Event) -> None:
        """Until stop is set, which ends it within POLL_S whatever DNS does."""
        while not stop.is_set():
            self.collect()
            self.start_due()
            stop.wait(self.wake_in())
