"""Talks to nftables through the `nft` command: `nft -f -` is one atomic transaction.

Why the CLI and not a binding: libnftables' Python binding ships only as a Debian
package for the system interpreter, and python-iptables drives legacy iptables only.
The CLI is the stable interface, and one exec per transaction costs a few ms.
"""
from __future__ import annotations

import json
import logging
import subprocess

from netpolicy.ruleset import (FAMILY, TABLE, EgressPolicy, Endpoint, add_endpoint, add_pools, endpoint_elements,
                               remove_endpoint, render_table, revision)
from runtime.errors import KERNEL_FAILURE, SockgateError

log = logging.getLogger(__name__)
NFT = "nft"


def run(script: str) -> None:
    proc = subprocess.run([NFT, "-f", "-"], input=script, text=True, capture_output=True)
    if proc.returncode != 0:
        log.error("nft transaction failed: %s\n%s", proc.stderr.strip(), script)
        raise SockgateError(KERNEL_FAILURE, "nftables transaction failed",
                            proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else "")


def _quiet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([NFT, *args], text=True, capture_output=True)


def table_exists() -> bool:
    return _quiet("list", "table", FAMILY, TABLE).returncode == 0


def ensure_table(policy: EgressPolicy = EgressPolicy()) -> None:
    """Load the table if it is missing or was rendered from other rules. The rendering
    is idempotent, so two plugins racing here both succeed and leave one table."""
    listed = _quiet("list", "chain", FAMILY, TABLE, "forward")
    if listed.returncode != 0 or f"rev {revision(policy)}" not in listed.stdout:
        run(render_table(policy))


def add(ep: Endpoint, pools: tuple[str, ...] = ()) -> None:
    run(add_pools(pools) + add_endpoint(ep))


def remove(ep: Endpoint) -> None:
    if table_exists():
        run(remove_endpoint(ep))


def has_element(set_name: str, element: str) -> bool:
    return _quiet("get", "element", FAMILY, TABLE, set_name, "{", element, "}").returncode == 0


def endpoint_present(ep: Endpoint) -> list[str]:
    """Names of the sets missing one of the endpoint's elements (empty: all there)."""
    return [name for name, element in endpoint_elements(ep) if not has_element(name, element)]


def counters(set_name: str) -> dict[str, tuple[int, int]]:
    """Per-element (packets, bytes) of a counter set such as acct_tx, one nft call."""
    proc = _quiet("-j", "list", "set", FAMILY, TABLE, set_name)
    if proc.returncode != 0:
        return {}
    out = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:
                c = elem["elem"].get("counter", {})
                out[str(elem["elem"]["val"])] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
    return out


def prefixes(set_name: str) -> list[str]:
    """The CIDRs in an interval set of single-type elements (e.g. pools4), as text."""
    proc = _quiet("-j", "list", "set", FAMILY, TABLE, set_name)
    if proc.returncode != 0:
        return []
    out = []
    for item in json.loads(proc.stdout).get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "prefix" in elem:
                out.append(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
            elif isinstance(elem, str):
                out.append(elem)
    return out


def delete_table() -> None:
    if table_exists():
        run(f"delete table {FAMILY} {TABLE}\n")
