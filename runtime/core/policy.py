"""The node's egress policy at run time: the policy file, the Google ranges cache, and
loading the compiled table. netpolicy/ decides; this module reads files and talks to
the kernel."""
from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from netpolicy.compile import Compiled, compile_policy
from netpolicy.policy import Policy, PolicyError, parse_policy
from netpolicy.ranges import IPNetwork, google_ranges
from netpolicy.ruleset import EgressPolicy
from runtime.core import restore
from runtime.errors import INVALID_CONFIG, IO_FAILURE, NOT_AVAILABLE, SockgateError
from runtime.fsutil import atomic_write_json, file_stamp, locked, read_json

if TYPE_CHECKING:
    from runtime.core.node import Node

log = logging.getLogger(__name__)


def load_policy(path: str) -> Policy:
    """A missing file means the default contract; a broken one is an error naming the
    field, and nothing is applied."""
    try:
        raw = Path(path).read_text()
    except FileNotFoundError:
        return Policy()
    except OSError as exc:
        raise SockgateError(IO_FAILURE, f"cannot read policy file {path}", exc.strerror or str(exc)) from None
    try:
        return parse_policy(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise SockgateError(INVALID_CONFIG, f"policy file {path} is not valid JSON", str(exc)) from None
    except PolicyError as exc:
        raise SockgateError(INVALID_CONFIG, f"invalid policy file {path}: {exc}", exc.field) from None


def resolved_record(state_dir: str) -> Path:
    return Path(state_dir) / "policy" / "resolved.json"


def ranges_cache(state_dir: str) -> Path:
    return Path(state_dir) / "ranges" / "google.json"


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch(source: str) -> dict[str, Any]:
    """Google's published JSON, from a URL or a file path."""
    try:
        if _is_url(source):
            import requests  # only the `ranges update` command fetches over HTTP

            resp = requests.get(source, timeout=30)
            resp.raise_for_status()
            data = resp.json()
        else:
            data = json.loads(Path(source).read_text())
    except Exception as exc:  # requests, OS and JSON errors all mean "could not load"
        raise SockgateError(IO_FAILURE, f"cannot load Google IP ranges from {source}",
                            f"{type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise SockgateError(INVALID_CONFIG, f"{source} is not Google's IP ranges format")
    return data


def update_ranges(policy: Policy, state_dir: str) -> dict[str, Any]:
    """Load goog.json and cloud.json, compute goog minus cloud, and cache the result.
    The cache is replaced atomically, and only once both files loaded and parsed."""
    goog, cloud = fetch(policy.google.goog), fetch(policy.google.cloud)
    try:
        ranges = google_ranges(goog, cloud)
    except ValueError as exc:
        raise SockgateError(INVALID_CONFIG, "Google IP ranges are malformed", str(exc)) from None
    cache = {
        "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sources": {name: {"source": src, "syncToken": doc.get("syncToken"),
                           "creationTime": doc.get("creationTime")}
                    for name, src, doc in (("goog", policy.google.goog, goog),
                                           ("cloud", policy.google.cloud, cloud))},
        "ipv4": [str(n) for n in ranges if n.version == 4],
        "ipv6": [str(n) for n in ranges if n.version == 6],
    }
    path = ranges_cache(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_json(path, cache)
    log.info("Google ranges updated: %d IPv4 and %d IPv6 CIDRs", len(cache["ipv4"]), len(cache["ipv6"]))
    return cache


def load_ranges(policy: Policy, state_dir: str) -> list[IPNetwork]:
    cache = read_json(ranges_cache(state_dir))
    if cache is None:
        if _is_url(policy.google.goog) or _is_url(policy.google.cloud):
            # Never fetch from the network on a container's ADD.
            raise SockgateError(NOT_AVAILABLE, "Google IP ranges are not loaded",
                                "run `sockgate ranges update` first")
        cache = update_ranges(policy, state_dir)
    return [ipaddress.ip_network(c) for c in cache["ipv4"] + cache["ipv6"]]


def compiled(policy_file: str, state_dir: str) -> Compiled:
    """The policy compiled now (a one-shot command); a serving process goes through
    its Node's CompiledPolicies."""
    policy = load_policy(policy_file)
    return compile_policy(policy, load_ranges(policy, state_dir))


class CompiledPolicies:
    """The last compiled policy of a process, valid until the policy file or the ranges
    cache changes: the agent compiles once per change, not on every ADD (compiling
    takes ~15 ms; checking two stats takes microseconds)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[object, ...], Compiled] = {}

    def get(self, policy_file: str, state_dir: str) -> Compiled:
        key = (policy_file, state_dir, file_stamp(Path(policy_file)), file_stamp(ranges_cache(state_dir)))
        if key[3] is not None and key in self._cache:
            return self._cache[key]
        result = compiled(policy_file, state_dir)
        self._cache.clear()
        self._cache[key] = result
        return result


def apply(node: Node, policy_file: str, state_dir: str) -> Compiled:
    """Compile, then load in one transaction. Any error before the load leaves the
    policy in force untouched. A table that had to be loaded gets the elements of
    every recorded attachment back (see runtime.core.restore)."""
    result = node.policies.get(policy_file, state_dir)
    ensure_loaded(node, result.egress, state_dir)
    return result


def table_lock(state_dir: str, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
    """ADD and DEL hold it (shared, side by side) while they change an attachment's
    elements and record; a reload holds it alone, so the attachments it restores are
    exactly the ready ones, none half added or half removed."""
    return locked(Path(state_dir) / "table.lock", shared=not exclusive)


def ensure_loaded(node: Node, egress: EgressPolicy, state_dir: str) -> bool:
    """The table rendered from `egress` is loaded; if it had to be (re)loaded, with the
    elements of every ready attachment recorded under state_dir in the same
    transaction. True if it was. A failed load changes nothing and is retried by the
    next call (the agent's check, the next ADD)."""
    if node.table.table_current(egress):
        return False
    started = time.monotonic()
    with table_lock(state_dir, exclusive=True):
        if node.table.table_current(egress):
            return False  # another process loaded it while we waited
        endpoints = restore.ready_endpoints(node.links, state_dir)
        node.table.load_table(egress, endpoints)
    log.warning("nft table was loaded with the elements of %d attachment(s) in %.0f ms",
                len(endpoints), (time.monotonic() - started) * 1000)
    if endpoints:
        restore.end_escaped_flows(node.flows, endpoints)
    return True
