"""Google's IP ranges at run time: fetched (`sockgate ranges update`), goog minus cloud
cached under STATE_DIR/ranges/google.json, and read back from the cache. A container's
ADD reads only the cache, never the network; netpolicy/ranges.py does the arithmetic."""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

from netpolicy.policy import Policy
from netpolicy.ranges import IPNetwork, google_ranges
from runtime.errors import INVALID_CONFIG, IO_FAILURE, NOT_AVAILABLE, SockgateError
from runtime.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)


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
