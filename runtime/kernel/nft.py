"""Talks to nftables: each script is one atomic transaction (`nft -f` semantics).

Through libnftables (runtime/kernel/libnft.py) when it loads, else through the `nft`
command; one attachment's elements through runtime/kernel/netlink/nftables.py. Notes: docs/dataplane.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import json
import logging
import socket
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from netpolicy.ruleset import (
    COUNTED_SETS,
    FAMILY,
    GATEWAY_V6,
    METER_SET,
    NODE_SETS,
    REVISION_SET,
    TABLE,
    EgressPolicy,
    Endpoint,
    add_endpoint,
    add_pools,
    element_comment,
    endpoint_keys,
    meter_key,
    meter_record_script,
    node_addresses_script,
    parse_comment,
    remove_elements,
    render_table,
    renew_counted_script,
    revision,
    revision_key,
    revision_script,
)
from runtime.errors import KERNEL_FAILURE, SockgateError
from runtime.kernel import segment_meter
from runtime.kernel.libnft import Nft, Unavailable
from runtime.kernel.netlink import nftables as nftnl

log = logging.getLogger(__name__)
NFT = "nft"


# A per-process resource, never rebound: libnftables contexts (one per netns) behind
# one lock, shared by every caller in the process (the core, for which this module is
# the TableBackend, billing, metrics, the resolver and the commands).
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


def table_current(policy: EgressPolicy = EgressPolicy()) -> bool:
    """Whether the loaded table was rendered from `policy` (its first rule's stamp: the
    rules themselves, not changed since), loaded to the end (its revision element: a
    load that had more to do writes it last, see load_table), and counts along the
    segment meter the node netns has now (METER_SET): one whose meter was removed or
    replaced must be loaded again."""
    rc, listed, _ = _nft(f"list chain {FAMILY} {TABLE} forward")
    if rc != 0 or f"rev {revision(policy)}" not in listed:
        return False
    with nftnl.current() as sock:
        if sock.get(TABLE, REVISION_SET, revision_key(policy)) is None:
            return False
    return counts_along_meter()


def counts_along_meter() -> bool:
    """Whether the table records the segment meter the node netns has now (its map's
    id in METER_SET; 0 for none)."""
    with _meter("identify the segment meter"):
        meter = segment_meter.current_id()
    return _records(meter)


def _records(meter: int) -> bool:
    """Whether the table's record is `meter` (0: none). A meter's id is asserted by one
    element lookup: it is unique until the ids wrap, so nothing else could match. "None"
    must be the record's only element: a 0 beside another id (written by hand) would
    otherwise pass for a node without a meter once that meter went (review 7)."""
    if meter:
        with nftnl.current() as sock:
            return sock.get(TABLE, METER_SET, meter_key(meter)) is not None
    return recorded_meter() == [0]


def loaded_revision() -> str | None:
    """The revision stamped on the loaded table's first rule (see table_current); None
    when there is no table or no stamp."""
    for item in _listing(f"list chain {FAMILY} {TABLE} forward"):
        comment = str(item.get("rule", {}).get("comment", ""))
        if comment.startswith("rev "):
            return comment[4:]
    return None


def load_table(policy: EgressPolicy, endpoints: Sequence[tuple[Endpoint, tuple[str, ...]]] = (), *,
               pending: bool = False) -> None:
    """The table and the elements of `endpoints` (each with its pools), the node's own
    addresses and the segment meter it counts along, in one transaction: the table
    never exists without them. The rendering is idempotent (elements already there
    stay, with their counters), so a load racing another leaves one table.

    A veth's tx counters are its elements' plus the meter's count, and the two must
    start together. The counts of the veths whose elements this load creates are
    cleared before the transaction, not after it: a process killed in between leaves
    counts of elements that are gone (nothing bills them), never old counts beside new
    counters. A table that counted along a meter that is gone (its pins removed, its
    bpffs unmounted) or another one has counters that can't be read any more (see
    endpoint_counters): its counted elements are created anew, from zero, under the
    load's generation (billing notes counter_reset).

    pending: the table is loaded without its revision element, so that it is not
    current (nor added to) until mark_loaded(): the caller's steps in between are
    repeated by whoever loads it next if the caller dies before them."""
    meter = _meter_in_place()
    recorded = recorded_meter()
    # Any record but this meter's alone (another meter, gone or replaced; none while
    # there is one now; none at all, from a table of an earlier version): the counters
    # went along other counts, or none, and can't go on with these.
    renew = recorded is not None and recorded != [meter]
    if renew:
        log.warning("the table counted along another segment meter (%s, now %d): its counted elements are "
                    "created anew; what was sent since the last billing flush is lost",
                    ", ".join(map(str, recorded or [])) or "none recorded", meter)
    if meter:
        with _meter("clear the segment meter's counts"):
            c = segment_meter.opened()
            if c is not None:
                with c:
                    c.clear(None if renew else _not_counted(endpoints))
    run(render_table(policy, pending=pending) + (renew_counted_script([ep for ep, _ in endpoints]) if renew else "")
        + add_pools([p for _, pools in endpoints for p in pools])
        + "".join(add_endpoint(ep) for ep, _ in endpoints) + node_addresses_script(node_addresses())
        + meter_record_script(meter))


def mark_loaded(policy: EgressPolicy) -> None:
    """A table loaded with pending=True made current (its revision element)."""
    run(revision_script(policy))


def _meter_in_place() -> int:
    """The node netns' segment meter, installed unless it is: its map's id; 0 where
    there can't be one (the reason logged; containers keep TCP's offload off there)."""
    try:
        return segment_meter.ensure()
    except segment_meter.MeterError as exc:
        log.warning("no segment meter (%s): containers' TCP segmentation offload stays off", exc)
        return 0


def recorded_meter() -> list[int] | None:
    """What the loaded table records of its meter (METER_SET: one id, 0 for none); []
    when nothing (a table from before the record); None without a table."""
    elements = _set_elements(METER_SET)
    if elements is None:
        return [] if table_exists() else None
    return sorted(int(e) for e in elements if isinstance(e, int))


def _not_counted(endpoints: Sequence[tuple[Endpoint, tuple[str, ...]]]) -> list[int]:
    """The veth indexes of the endpoints without an rx element now: a load creates
    their elements, counters from zero. (All of them without a table.)"""
    rx = counters("rx")
    return [ep.host_ifindex for ep, _ in endpoints if rx is None or ep.host_ifname not in rx]


def node_addresses() -> tuple[str, ...]:
    """Every address of the calling thread's netns (the node's: where the table lives),
    v4 and v6, loopback and link-local included; and GATEWAY_V6, the node's end of
    every container veth, whether or not one exists yet: an ADD without an agent loads
    the table before it gives its veth that address, and nothing would read the
    addresses again (review 9: the node's probes from it were dropped)."""
    from pyroute2 import IPRoute  # read only when the table is loaded or checked, never per ADD
    with IPRoute() as ipr:
        found = {a.get("IFA_LOCAL") or a.get("IFA_ADDRESS") for a in ipr.get_addr()} | {GATEWAY_V6}
    return tuple(sorted(str(ipaddress.ip_address(a)) for a in found if a))


def node_addresses_loaded() -> set[str] | None:
    """What node4/node6 hold; None when the table (or a set) is missing."""
    out: set[str] = set()
    for name in NODE_SETS:
        elements = _set_elements(name)
        if elements is None:
            return None
        out.update(str(ipaddress.ip_address(e)) for e in elements if isinstance(e, str))
    return out


def sync_node_addresses() -> bool:
    """Bring node4/node6 in line with the node's addresses now (an address added or
    removed since the table was loaded). True if they changed; False if they were
    current or there is no table (whoever loads it fills them)."""
    now = node_addresses()
    loaded = node_addresses_loaded()
    if loaded is None or loaded == set(now):
        return False
    rc, _, err = _nft(node_addresses_script(now))
    if rc != 0:
        if not table_exists():
            return False
        raise SockgateError(KERNEL_FAILURE, "nftables transaction failed", err.strip())
    log.info("node addresses updated in the table: %s", ", ".join(now))
    return True


def ensure_table(policy: EgressPolicy = EgressPolicy()) -> bool:
    """Load the table (without restoring anything) if it is missing or was rendered
    from other rules; True if it did."""
    if table_current(policy):
        return False
    load_table(policy)
    return True


def _endpoint_ops(ep: Endpoint, op: str) -> list[nftnl.ElementOp]:
    comment = element_comment(ep)
    return [nftnl.ElementOp(op, s, key, comment if op == "add" and s in COUNTED_SETS else "")
            for s, key in endpoint_keys(ep)]


def add_if_current(ep: Endpoint, pools: tuple[str, ...], policy: EgressPolicy) -> bool:
    """Add the endpoint's elements in a transaction that asserts the loaded table was
    rendered from `policy` (deleting and re-adding its revision element). False, with
    nothing changed, when it wasn't (or is missing): the caller loads the table and
    adds again. The pools go through libnftables first (interval sets, merged there);
    they are the network's, harmless to add twice, and checked by the same assert."""
    if pools and _nft(add_pools(pools))[0] != 0:
        return False
    with _meter(f"clear the segment meter's count of {ep.host_ifname}"):
        meter = segment_meter.forget(ep.host_ifindex)  # a veth before this one had its index
    # Asserted as the revision is: a table counting along a meter that is gone (or
    # none, where there is one now) is loaded again first.
    asserted = ((REVISION_SET, revision_key(policy)), (METER_SET, meter_key(meter)))
    ops = [nftnl.ElementOp(op, s, key) for s, key in asserted for op in ("delete", "add")]
    ops += _endpoint_ops(ep, "add")
    try:
        with nftnl.current() as sock:
            sock.batch(TABLE, ops)
    except nftnl.NftnlError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise SockgateError(KERNEL_FAILURE, "nftables transaction failed", str(exc)) from exc
    return True


def remove(ep: Endpoint) -> None:
    ifindex = _remove_elements(ep)
    with _meter(f"clear the segment meter's count of {ep.host_ifname}"):
        segment_meter.forget(ifindex)


def _remove_elements(ep: Endpoint) -> int:
    """The veth's index: the endpoint's, or the one its rx element was keyed by when the
    record never got it (review 9: else its count stayed in the meter's map)."""
    if ep.host_ifindex:
        # Idempotent: `delete` of a missing element would abort the transaction, so
        # each element is first added (a no-op if it is there).
        try:
            with nftnl.current() as sock:
                sock.batch(TABLE, _endpoint_ops(ep, "add") + _endpoint_ops(ep, "delete"))
        except nftnl.NftnlError as exc:
            if table_exists():
                raise SockgateError(KERNEL_FAILURE, "nftables transaction failed", str(exc)) from exc
        return ep.host_ifindex
    if not table_exists():
        return 0
    # The index never reached the record (a crash between creating the veth and the
    # record's last write, or a DEL rebuilt from leases): find the elements by the
    # comment they carry, and delete them by the key nft lists them under.
    found = [("ifaces", f'"{ep.host_ifname}"')] if has_element("ifaces", f'"{ep.host_ifname}"') else []
    for set_name in COUNTED_SETS:
        for elem in _set_elements(set_name) or []:
            if isinstance(elem, dict) and parse_comment(elem.get("elem", {}).get("comment", ""))[0] == ep.host_ifname:
                found.append((set_name, _key_text(elem["elem"]["val"])))
    if found:
        run(remove_elements(found))
    # rx's key is the index alone: listed as a number once the veth is gone, as its
    # name while the agent's reaper still holds it down.
    for set_name, key in found:
        if set_name == "rx":
            with contextlib.suppress(OSError):
                return int(key) if key.isdigit() else socket.if_nametoindex(key.strip('"'))
    return 0


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
    with nftnl.current() as sock:
        return [name for name, key in endpoint_keys(ep) if sock.get(TABLE, name, key) is None]


@dataclass(frozen=True)
class Counted:
    """What one counted element holds: its counter and its generation (the token of
    its creation, from its comment)."""

    packets: int
    bytes: int
    generation: str = ""
    key: str = ""  # as nft lists it: rx's is the veth's name, or its index once the veth is gone


# An endpoint's counters, in the order billing records them.
COUNTER_FIELDS = ("tx_bytes", "tx_packets", "rx_bytes", "rx_packets")


@dataclass(frozen=True)
class Counters:
    """An endpoint's cumulative counters: tx sums its tx4 and tx6 elements. What
    billing and the metrics read. `generation` is that of its elements ("" for
    elements of versions that had none; "?" when they disagree: one was re-created
    behind the others'). A counter of another generation was re-created and counts
    from zero, whatever value it has reached."""

    tx_bytes: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    rx_packets: int = 0
    generation: str = ""

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in COUNTER_FIELDS)


@dataclass(frozen=True)
class Count:
    """Packets and bytes of nft counters summed (the rules of one drop reason)."""

    packets: int = 0
    bytes: int = 0


def counters(set_name: str) -> dict[str, list[Counted]] | None:
    """The counted elements of a set (tx4, tx6, rx) per host veth name, one nft call;
    None when the set can't be read (billing must not mistake that for zero)."""
    elements = _set_elements(set_name)
    if elements is None:
        return None
    out: dict[str, list[Counted]] = {}
    for elem in elements:
        if isinstance(elem, dict) and "comment" in elem.get("elem", {}):
            name, generation = parse_comment(elem["elem"]["comment"])
            c = elem["elem"].get("counter", {})
            out.setdefault(name, []).append(Counted(int(c.get("packets", 0)), int(c.get("bytes", 0)), generation,
                                                    str(elem["elem"].get("val", ""))))
    return out


def _summed(tx: list[Counted], rx: list[Counted]) -> Counters:
    """An endpoint's counted elements as its Counters (tx: its tx4 and tx6)."""
    generations = {c.generation for c in tx + rx}
    return Counters(tx_bytes=sum(c.bytes for c in tx), tx_packets=sum(c.packets for c in tx),
                    rx_bytes=sum(c.bytes for c in rx), rx_packets=sum(c.packets for c in rx),
                    generation=generations.pop() if len(generations) == 1 else "?")


def endpoint_counters_of(ep: Endpoint) -> Counters | None:
    """One endpoint's counters (see endpoint_counters), read element by element: what
    a DEL needs, at the same cost whatever the size of the sets. None when it has no
    rx element (its elements are gone), or when the meter its counters went along is
    gone: what a DEL then bills as missing, never a counter that went down."""
    meter, extras = _meter_counts([ep.host_ifindex])  # first: see endpoint_counters
    with nftnl.current() as sock:
        got = {s: sock.get(TABLE, s, key) for s, key in endpoint_keys(ep) if s in COUNTED_SETS}
    counted = {s: Counted(e.packets, e.bytes, parse_comment(e.comment)[1]) for s, e in got.items() if e is not None}
    if "rx" not in counted:
        return None
    if not _records(meter):
        log.warning("the counters of %s can't be read: %s", ep.host_ifname, METER_GONE)
        return None
    return _metered(_summed([c for s, c in counted.items() if s != "rx"], [counted["rx"]]),
                    extras.get(ep.host_ifindex))


METER_GONE = ("the segment meter they count along is gone (its pins removed or its bpffs unmounted); "
              "the agent's table check (or the next ADD or DEL) loads the table with new elements and a new meter")


def endpoint_counters() -> dict[str, Counters] | None:
    """{host veth: Counters} for every endpoint with an element in rx. None when a
    set can't be read; a KERNEL_FAILURE when the meter the counters go along is gone.

    The segment meter's counts are read first and the elements after: a DEL removes
    the elements first and the counts after, so a read that meets no counts meets no
    elements either; read the other way round, a DEL in between would show a counter
    that went down, which billing takes for one created again (billed twice). A veth's
    index: rx's key, which nft lists as the veth's name while it exists, looked up in
    the names taken before the elements were (a veth named only after that is newer
    than its counts, which ADD cleared)."""
    meter, extras = _meter_counts(None)
    index = {name: i for i, name in socket.if_nameindex()} if extras else {}
    tx4, tx6, rx = (counters(s) for s in COUNTED_SETS)
    if tx4 is None or tx6 is None or rx is None:
        return None
    if not _records(meter):  # the meter's part of them can't be told any more
        raise SockgateError(KERNEL_FAILURE, "cannot read the accounting counters", METER_GONE)
    out = {}
    for name, rx_elems in rx.items():
        key = rx_elems[0].key
        ifindex = int(key) if key.isdigit() else index.get(key, 0)
        out[name] = _metered(_summed(tx4.get(name, []) + tx6.get(name, []), rx_elems), extras.get(ifindex))
    return out


def _meter_counts(ifindexes: list[int] | None) -> tuple[int, dict[int, segment_meter.Extra]]:
    """(the id of the node netns' meter, 0 without one; its counts of `ifindexes`, or
    of every veth with one)."""
    with _meter("read the segment meter's counts"):
        c = segment_meter.opened()
        if c is None:
            return 0, {}
        with c:
            return c.id, c.all() if ifindexes is None else {i: c.of(i) for i in ifindexes}


@contextlib.contextmanager
def _meter(what: str) -> Iterator[None]:
    """A segment meter that can't be read or changed is a kernel failure, named: its
    counts are a part of the tx counters (never mistaken for zero)."""
    try:
        yield
    except OSError as exc:
        raise SockgateError(KERNEL_FAILURE, f"cannot {what}", f"segment meter: {exc}") from exc


def _metered(c: Counters, extra: segment_meter.Extra | None) -> Counters:
    """The tx counters with what the segment meter counted beside them: the packets
    and header bytes the veth's super-packets became on the wire."""
    if not extra:
        return c
    return dataclasses.replace(c, tx_packets=c.tx_packets + extra.packets, tx_bytes=c.tx_bytes + extra.bytes)


def drop_counters() -> dict[str, Count]:
    """Packets and bytes refused or dropped per reason, summed over the rules whose
    comment is "drop:<reason>"."""
    out: dict[str, Count] = {}
    for item in _listing(f"list table {FAMILY} {TABLE}"):
        rule = item.get("rule")
        if not rule or not str(rule.get("comment", "")).startswith("drop:"):
            continue
        reason = rule["comment"][5:]
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                seen = out.get(reason, Count())
                out[reason] = Count(seen.packets + expr["counter"]["packets"], seen.bytes + expr["counter"]["bytes"])
    with _meter("read the segment meter's refusals"):
        refused = segment_meter.refused()
    for reason, packets in refused.items():
        out[reason] = Count(packets, 0)  # the meter keeps no bytes for them
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

