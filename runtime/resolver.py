"""Resolve the exception hostnames (smtp/pop/imap.gmail.com) on the node and keep
their addresses in the nft sets allow4_dns / allow6_dns.

Every element carries a timeout of the record's TTL (clamped) plus a small grace, and
each refresh re-arms it: an address the DNS stops returning expires in the kernel by
itself. A failed lookup adds nothing and is retried with backoff, so it never opens
anything; what was resolved before simply runs out.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.resolver

from netpolicy.policy import Policy, ResolverSettings
from runtime import nft
from runtime.fsutil import atomic_write_json

log = logging.getLogger(__name__)
GRACE_S = 2
MAX_BACKOFF_S = 60


@dataclass(frozen=True)
class Resolution:
    host: str
    addresses: tuple[str, ...]
    ttl: int  # clamped
    error: str = ""


def _resolver(settings: ResolverSettings) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)  # never /etc/resolv.conf: the policy says which
    r.nameservers = list(settings.nameservers)
    r.lifetime = settings.timeout
    r.timeout = settings.timeout
    r.cache = None
    return r


def resolve(host: str, settings: ResolverSettings) -> Resolution:
    resolver = _resolver(settings)
    addresses: list[str] = []
    ttls: list[int] = []
    errors = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(host, rdtype)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue  # a host without AAAA (or A) is normal
        except dns.exception.DNSException as exc:
            errors.append(f"{rdtype}: {type(exc).__name__}: {exc}")
            continue
        addresses += [r.address for r in answer]
        ttls.append(answer.rrset.ttl)
    if errors and not addresses:
        return Resolution(host, (), settings.min_ttl, "; ".join(errors))
    ttl = min(ttls) if ttls else settings.min_ttl
    return Resolution(host, tuple(sorted(addresses)), max(settings.min_ttl, min(settings.max_ttl, ttl)))


def elements_script(policy: Policy, res: Resolution) -> str:
    """Re-arm the timeout of every (address, proto, port) of this host. `add` leaves an
    existing element's timeout alone, so each one is added, deleted and added again
    in the same transaction (succeeds whether or not it existed)."""
    lines = []
    timeout = res.ttl + GRACE_S
    for allow in policy.allows:
        if not allow.is_host or allow.dest != res.host:
            continue
        for addr in res.addresses:
            set_name = "allow6_dns" if ":" in addr else "allow4_dns"
            for proto in allow.protos:
                for port in allow.ports:
                    elem = f"{addr} . {proto} . {port}"
                    lines += [f"add element inet sockgate {set_name} {{ {elem} timeout {timeout}s }}",
                              f"delete element inet sockgate {set_name} {{ {elem} }}",
                              f"add element inet sockgate {set_name} {{ {elem} timeout {timeout}s }}"]
    return "\n".join(lines) + "\n" if lines else ""


class Refresher:
    """Keeps every exception hostname resolved, each on its own TTL."""

    def __init__(self, policy: Policy, record: Path | None = None) -> None:
        self.policy = policy
        self.record = record  # resolved.json, read by `sockgate policy explain`
        self.due = {host: 0.0 for host in policy.hostnames}
        self.failures = {host: 0 for host in policy.hostnames}
        self.last: dict[str, Resolution] = {}

    def refresh_due(self, now: float | None = None) -> list[Resolution]:
        now = time.monotonic() if now is None else now
        done = []
        for host, due in sorted(self.due.items()):
            if due > now:
                continue
            res = resolve(host, self.policy.resolver)
            if res.error:
                self.failures[host] += 1
                backoff = min(MAX_BACKOFF_S, 2 ** (self.failures[host] - 1))
                log.warning("resolving %s failed (%s); retry in %ds", host, res.error, backoff)
                self.due[host] = now + backoff
            else:
                self.failures[host] = 0
                script = elements_script(self.policy, res)
                if script:
                    nft.run(script)
                log.info("resolved %s: %s (ttl %ds)", host, ", ".join(res.addresses) or "-", res.ttl)
                self.due[host] = now + res.ttl
            self.last[host] = res
            done.append(res)
        if done and self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.record, {h: list(r.addresses) for h, r in self.last.items()})
        return done

    def next_due(self) -> float:
        return min(self.due.values(), default=time.monotonic() + 3600)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.refresh_due()
            stop.wait(max(0.2, self.next_due() - time.monotonic()))
