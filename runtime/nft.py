"""Talks to nftables: each script is one atomic transaction (`nft -f` semantics).

Through libnftables (runtime/libnft.py) when it loads, else through the `nft`
command. Not python-iptables: it drives the legacy iptables backend only.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import subprocess

from netpolicy.ruleset import (COUNTED_SETS, FAMILY, TABLE, EgressPolicy, Endpoint, add_endpoint, add_pools,
                               assert_revision, endpoint_elements, remove_elements, remove_endpoint, render_table,
                               revision)
from runtime.errors import KERNEL_FAILURE, SockgateError
from runtime.libnft import Nft, Unavailable

log = logging.getLogger(__name__)
NFT = "nft"


try:
    _LIB: Nft | None = Nft()
except Unavailable as exc:  # pragma: no cover - Debian's nftables package ships it
    log.warning("libnftables unavailable (%s); using the nft command", exc)
    _LIB = None


def _nft(script: str, json_output: bool = False) -> tuple[int, str, str]:
    if _LIB is not None:
        return _LIB.cmd(script, json_output)
    proc = subprocess.run([NFT, *(["-j"] if json_output else []), "-f", "-"], input=script,
                          text=True, capture_output=True)
    return proc.returncode, proc.stdout, proc.stderr


def run(script: str) -> None:
    rc, _, err = _nft(script)
    if rc != 0:
        log.error("nft transaction failed: %s\n%s", err.strip(), script)
        raise SockgateError(KERNEL_FAILURE, "nftables transaction failed",
                            err.strip().splitlines()[0] if err.strip() else "")


def _ok(command: str) -> bool:
    """Whether a read-only command (list/get) succeeds; failures are answers here."""
    return _nft(command)[0] == 0


def _listing(command: str) -> list[dict]:
    """The JSON objects of a list command; [] when it fails (e.g. no table)."""
    rc, out, _ = _nft(command, json_output=True)
    return json.loads(out).get("nftables", []) if rc == 0 else []


def _set_elements(set_name: str) -> list | None:
    rc, out, _ = _nft(f"list set {FAMILY} {TABLE} {set_name}", json_output=True)
    if rc != 0:
        return None
    return [e for item in json.loads(out).get("nftables", []) for e in item.get("set", {}).get("elem", [])]


def table_exists() -> bool:
    # `list tables` names them; `list table` would fetch every element of every set.
    return any(t.get("table", {}).get("name") == TABLE for t in _listing(f"list tables {FAMILY}"))


def ensure_table(policy: EgressPolicy = EgressPolicy()) -> bool:
    """Load the table if it is missing or was rendered from other rules; True if it
    did. The rendering is idempotent, so two plugins racing here both succeed and
    leave one table."""
    rc, listed, _ = _nft(f"list chain {FAMILY} {TABLE} forward")
    if rc != 0 or f"rev {revision(policy)}" not in listed:
        run(render_table(policy))
        return True
    return False


def add(ep: Endpoint, pools: tuple[str, ...] = ()) -> None:
    run(add_pools(pools) + add_endpoint(ep))


def add_many(endpoints: list[tuple[Endpoint, tuple[str, ...]]], batch: int = 200) -> None:
    """Elements of many endpoints (each with its pools), `batch` per transaction."""
    for i in range(0, len(endpoints), batch):
        run("".join(add_pools(pools) + add_endpoint(ep) for ep, pools in endpoints[i:i + batch]))


def add_if_current(ep: Endpoint, pools: tuple[str, ...], policy: EgressPolicy) -> bool:
    """Add the endpoint's elements in a transaction that asserts the loaded table was
    rendered from `policy`. False, with nothing changed, when it wasn't (or is missing):
    the caller loads the table and adds again. Saves an ADD the `list` that
    ensure_table costs (~1.5 ms)."""
    return _nft(assert_revision(policy) + add_pools(pools) + add_endpoint(ep))[0] == 0


def remove(ep: Endpoint) -> None:
    if ep.host_ifindex:
        rc, _, err = _nft(remove_endpoint(ep))
        if rc != 0 and table_exists():
            raise SockgateError(KERNEL_FAILURE, "nftables transaction failed", err.strip())
        return
    if not table_exists():
        return
    # The index never reached the record (a crash between creating the veth and the
    # record's last write, or a DEL rebuilt from leases): find the elements by the
    # comment they carry, and delete them by the key nft lists them under.
    found = [("ifaces", f'"{ep.host_ifname}"')] if has_element("ifaces", f'"{ep.host_ifname}"') else []
    for set_name in COUNTED_SETS:
        for elem in _set_elements(set_name) or []:
            if isinstance(elem, dict) and elem.get("elem", {}).get("comment") == ep.host_ifname:
                found.append((set_name, _key_text(elem["elem"]["val"])))
    if found:
        run(remove_elements(found))


def _key_text(val: object) -> str:
    """A listed element key back in nft syntax: names quoted, concatenations joined."""
    if isinstance(val, dict) and "concat" in val:
        return " . ".join(_key_text(v) for v in val["concat"])
    text = str(val)
    return text if text.isdigit() or ":" in text or text.replace(".", "").isdigit() else f'"{text}"'


def has_element(set_name: str, element: str) -> bool:
    return _ok(f"get element {FAMILY} {TABLE} {set_name} {{ {element} }}")


def endpoint_present(ep: Endpoint) -> list[str]:
    """Names of the sets missing one of the endpoint's elements (empty: all there)."""
    return [name for name, element in endpoint_elements(ep) if not has_element(name, element)]


def counters(set_name: str) -> dict[str, tuple[int, int]] | None:
    """(packets, bytes) per host veth name (the element's comment) of a counted set
    (tx4, tx6, rx), one nft call; None when the set can't be read (billing must not
    mistake that for zero)."""
    elements = _set_elements(set_name)
    if elements is None:
        return None
    out: dict[str, tuple[int, int]] = {}
    for elem in elements:
        if isinstance(elem, dict) and "comment" in elem.get("elem", {}):
            c = elem["elem"].get("counter", {})
            p, b = out.get(elem["elem"]["comment"], (0, 0))
            out[elem["elem"]["comment"]] = (p + int(c.get("packets", 0)), b + int(c.get("bytes", 0)))
    return out


def endpoint_counters() -> dict[str, tuple[int, int, int, int]] | None:
    """{host veth: (tx packets, tx bytes, rx packets, rx bytes)} for every endpoint with
    an element in rx; tx sums v4 and v6. None when a set can't be read."""
    tx4, tx6, rx = (counters(s) for s in COUNTED_SETS)
    if tx4 is None or tx6 is None or rx is None:
        return None
    out = {}
    for name, (rp, rb) in rx.items():
        (p4, b4), (p6, b6) = tx4.get(name, (0, 0)), tx6.get(name, (0, 0))
        out[name] = (p4 + p6, b4 + b6, rp, rb)
    return out


def drop_counters() -> dict[str, tuple[int, int]]:
    """(packets, bytes) refused or dropped per reason, summed over the rules whose
    comment is "drop:<reason>"."""
    out: dict[str, tuple[int, int]] = {}
    for item in _listing(f"list table {FAMILY} {TABLE}"):
        rule = item.get("rule")
        if not rule or not str(rule.get("comment", "")).startswith("drop:"):
            continue
        reason = rule["comment"][5:]
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                p, b = out.get(reason, (0, 0))
                out[reason] = (p + expr["counter"]["packets"], b + expr["counter"]["bytes"])
    return out


def prefixes(set_name: str) -> list[str]:
    """The CIDRs in an interval set of single-type elements (e.g. pools4), as text. An
    auto-merge set lists adjacent prefixes as one range (10.77.0.0-10.78.255.255): that
    comes back as the CIDRs covering it."""
    out = []
    for elem in _set_elements(set_name) or []:
        if isinstance(elem, dict) and "prefix" in elem:
            out.append(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
        elif isinstance(elem, dict) and "range" in elem:
            low, high = (ipaddress.ip_address(a) for a in elem["range"])
            out += [str(n) for n in ipaddress.summarize_address_range(low, high)]
        elif isinstance(elem, str):
            out.append(elem)
    return out


def delete_table() -> None:
    if table_exists():
        run(f"delete table {FAMILY} {TABLE}\n")
