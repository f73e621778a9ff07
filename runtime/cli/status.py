"""`sockgate status`: what this node's sockgate is doing, read from the agent's
socket and record, the nft table, the state dir and the events file. Reads only; run
it in the node's netns (the table and the veths are there).

Each part is gathered on its own and says what went wrong instead of failing the
whole report: an operator runs this when something is broken."""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from runtime import defaults, textable, wire
from runtime.agent import agent_info
from runtime.core.netconf import DEFAULT_IPV4_POOL, DEFAULT_IPV6_POOL
from runtime.core.ranges import ranges_cache
from runtime.errors import SockgateError
from runtime.state.store import READY, attachments

DEFAULT_CNI_CONF_DIR = "/etc/cni/net.d"
PROBE_TIMEOUT_S = 5.0
RECENT_REFUSALS = 10


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _parse_time(text: object) -> dt.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def age_text(seconds: float | None) -> str:
    """3 s, 4 min, 5 h, 2 d: the coarsest unit that is at least 1."""
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


# --- the agent ------------------------------------------------------------------------

def probe_socket(path: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Whether an agent answers on `path`, the way the Kubernetes liveness probe asks:
    connect, send nothing, read its reply. (up, why not)."""
    if not os.path.exists(path):
        return False, f"no socket at {path}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.shutdown(socket.SHUT_WR)
        if not sock.recv(64):
            return False, f"{path} accepted but closed without an answer"
        return True, ""
    except ConnectionRefusedError:
        return False, f"{path} refuses connections (left by an agent that was killed)"
    except PermissionError:
        return False, f"{path}: permission denied (the socket is root's: run as root)"
    except TimeoutError:
        return False, f"{path} accepted but sent no answer within {timeout:.0f} s (agent hung?)"
    except OSError as exc:
        return False, f"{path}: {exc.strerror or exc}"
    finally:
        sock.close()


@dataclass
class AgentState:
    up: bool
    socket: str
    detail: str = ""
    pid: int | None = None
    version: str | None = None
    started: str | None = None
    uptime_seconds: float | None = None


def agent_state(run_dir: str) -> AgentState:
    path = wire.agent_socket(run_dir)
    up, why = probe_socket(path)
    info = agent_info.read(run_dir) or {}
    started = _parse_time(info.get("started"))
    state = AgentState(up=up, socket=path, detail=why)
    if info:
        state.pid, state.version, state.started = info.get("pid"), info.get("version"), info.get("started")
        if up and started is not None:
            state.uptime_seconds = round((_now() - started).total_seconds(), 1)
        if not up:
            state.detail += (f"; {agent_info.info_path(run_dir)} names pid {state.pid}, started "
                             f"{state.started}: that agent did not stop cleanly")
    elif up:
        state.detail = f"no {agent_info.info_path(run_dir)} (an agent of a version before it)"
    return state


# --- table, policy, ranges ------------------------------------------------------------

@dataclass
class FileState:
    path: str
    exists: bool
    modified: str | None = None
    age_seconds: float | None = None
    detail: str = ""


def file_state(path: Path) -> FileState:
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return FileState(str(path), False)
    except OSError as exc:
        return FileState(str(path), False, detail=exc.strerror or str(exc))
    when = dt.datetime.fromtimestamp(mtime, dt.timezone.utc)
    return FileState(str(path), True, when.isoformat(timespec="seconds"), round((_now() - when).total_seconds(), 1))


@dataclass
class RangesState(FileState):
    updated: str | None = None
    ipv4: int | None = None
    ipv6: int | None = None


def ranges_state(state_dir: str) -> RangesState:
    path = ranges_cache(state_dir)
    f = file_state(path)
    state = RangesState(**asdict(f))
    if not f.exists:
        return state
    try:
        cache = json.loads(path.read_text())
        state.ipv4, state.ipv6 = len(cache["ipv4"]), len(cache["ipv6"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        state.detail = f"unreadable: {exc}"
        return state
    updated = _parse_time(cache.get("updated"))
    if updated is not None:  # when it was fetched, not when the file was last copied
        state.updated = updated.isoformat(timespec="seconds")
        state.age_seconds = round((_now() - updated).total_seconds(), 1)
    return state


@dataclass
class TableState:
    loaded: bool
    loaded_revision: str | None = None
    policy_revision: str | None = None
    current: bool | None = None  # None: the policy's revision is not known
    detail: str = ""


def policy_revision(policy_file: str, state_dir: str) -> tuple[str | None, str]:
    """The revision the policy file renders (what the agent would load), or why it
    can't be told. Never computes a missing ranges cache: that would write it."""
    from netpolicy.ruleset import revision
    from runtime.core import policy
    if not ranges_cache(state_dir).exists():
        return None, f"no Google ranges cache ({ranges_cache(state_dir)})"
    try:
        return revision(policy.compiled(policy_file, state_dir).egress), ""
    except SockgateError as exc:
        return None, f"the policy does not compile: {exc}"


def table_state(policy_file: str, state_dir: str) -> TableState:
    from runtime.kernel import nft
    try:
        if not nft.table_exists():
            return TableState(False, detail="no table inet sockgate in this network namespace")
        loaded = nft.loaded_revision()
    except (OSError, SockgateError) as exc:
        return TableState(False, detail=f"cannot read nftables: {exc}")
    rendered, why = policy_revision(policy_file, state_dir)
    current = None if rendered is None else rendered == loaded
    return TableState(True, loaded, rendered, current, why)


# --- pools ----------------------------------------------------------------------------

@dataclass
class PoolUsage:
    network: str
    family: str
    pool: str | None
    size: int | None       # usable addresses (the network address, and v4's broadcast, never are)
    leased: int
    outside: int = 0        # leases outside the configured pool (the pool changed since)
    source: str = ""        # where the pool was read


def usable(pool: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return pool.num_addresses - (2 if pool.version == 4 else 1)


def _cni_files(conf_dir: str) -> list[Path]:
    d = Path(conf_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix in (".conf", ".conflist", ".json") and p.is_file())


def configured_pools(state_dir: str, run_dir: str, policy_file: str,
                     cni_conf_dir: str) -> dict[str, tuple[dict[int, str], str]]:
    """{network: ({4: pool, 6: pool}, source)} from the CNI configs in `cni_conf_dir`
    whose sockgate plugin keeps its state in `state_dir`, and from the Docker door's
    network records there. The agent doesn't know the pools: each ADD brings its own
    config."""
    found: dict[str, tuple[dict[int, str], str]] = {}
    mine = os.path.realpath(state_dir)
    for path in _cni_files(cni_conf_dir):
        try:
            conf = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(conf, dict):
            continue
        listed = conf.get("plugins")
        plugins: list[Any] = listed if isinstance(listed, list) else [conf]
        for plugin in plugins:
            if not isinstance(plugin, dict) or plugin.get("type") != "sockgate":
                continue
            if os.path.realpath(str(plugin.get("stateDir", defaults.STATE_DIR))) != mine:
                continue
            name = str(conf.get("name", ""))
            found.setdefault(name, ({4: str(plugin.get("ipv4Pool", DEFAULT_IPV4_POOL)),
                                     6: str(plugin.get("ipv6Pool", DEFAULT_IPV6_POOL))}, str(path)))
    try:
        from runtime.docker.options import DriverConfig, DriverError, network_conf
        from runtime.docker.store import DockerStore
        cfg = DriverConfig(state_dir=state_dir, run_dir=run_dir, policy_file=policy_file)
        for rec in DockerStore(state_dir).networks.all():
            try:
                conf = network_conf(cfg, rec.options, rec.sockgate_network)
            except DriverError:
                continue
            found.setdefault(rec.sockgate_network, ({4: str(conf.ipv4_pool), 6: str(conf.ipv6_pool)},
                                                    f"Docker network {rec.name or rec.id[:12]}"))
    except (OSError, ValueError, TypeError):
        pass  # an unreadable Docker record: its pools are shown as unknown
    return found


def pool_usage(state_dir: str, run_dir: str, policy_file: str, cni_conf_dir: str,
               networks: Iterable[str]) -> list[PoolUsage]:
    pools = configured_pools(state_dir, run_dir, policy_file, cni_conf_dir)
    rows = []
    for name in sorted(set(networks) | set(pools)):
        leases_dir = Path(state_dir) / "networks" / name / "leases"
        leased: dict[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {4: [], 6: []}
        for entry in os.listdir(leases_dir) if leases_dir.is_dir() else []:
            try:
                addr = ipaddress.ip_address(entry)
            except ValueError:
                continue  # the cursors, temp files
            leased[addr.version].append(addr)
        configured, source = pools.get(name, ({}, ""))
        for version in (4, 6):
            text = configured.get(version)
            try:
                pool = ipaddress.ip_network(text) if text else None
            except ValueError:
                pool = None
            inside = [a for a in leased[version] if pool is not None and a in pool]
            rows.append(PoolUsage(name, f"ipv{version}", str(pool) if pool else None,
                                  usable(pool) if pool else None, len(leased[version]),
                                  len(leased[version]) - len(inside) if pool else 0,
                                  source or f"no config found (looked in {cni_conf_dir} and Docker's records)"))
    return rows


# --- attachments ----------------------------------------------------------------------

@dataclass
class AttachmentRow:
    network: str
    container_id: str
    ifname: str
    pod: str | None
    container_name: str | None
    state: str
    ipv4: str
    ipv6: str
    host_ifname: str
    netns: str
    created: str
    veth: bool | None          # the node-side veth exists (None: not asked)
    tx_bytes: int | None = None
    tx_packets: int | None = None
    rx_bytes: int | None = None
    rx_packets: int | None = None


def attachment_rows(state_dir: str) -> tuple[list[AttachmentRow], list[str], list[str]]:
    """Every attachment with its counters (what billing reads: runtime.billing.flush),
    the networks listed, and what could not be read."""
    from runtime.billing.flush import kernel_counters
    from runtime.kernel import netns
    problems: list[str] = []
    listing = attachments(state_dir)
    problems += [f"unreadable attachment record {p} (`sockgate gc` removes it)" for p in listing.unreadable]
    try:
        counters = kernel_counters()
    except (OSError, SockgateError) as exc:
        counters = {}
        problems.append(f"counters not read: {exc}")
    try:
        present: set[str] | None = set(netns.links([a.host_ifname for a in listing.records]))
    except (OSError, SockgateError) as exc:
        present = None
        problems.append(f"links not read: {exc}")
    rows = []
    for att in listing.records:
        row = AttachmentRow(att.network, att.container_id, att.ifname, att.pod, att.labels.get("container_name"),
                            att.state, att.ipv4, att.ipv6, att.host_ifname, att.netns, att.created,
                            None if present is None else att.host_ifname in present)
        c = counters.get(att.host_ifname)
        if c is not None:
            row.tx_bytes, row.tx_packets, row.rx_bytes, row.rx_packets = (c.tx_bytes, c.tx_packets,
                                                                          c.rx_bytes, c.rx_packets)
        rows.append(row)
    return rows, listing.networks, problems


# --- refusals -------------------------------------------------------------------------

def recent_refusals(state_dir: str, count: int) -> tuple[list[dict], str]:
    """The last `count` refused-flow events, oldest first (runtime.agent.event_log, which
    reads the files from their ends), or why they could not be read."""
    from runtime.agent.event_log import last_events
    try:
        return [dict(e) for e in last_events(state_dir, count)], ""
    except OSError as exc:
        return [], f"events not read: {exc.strerror or exc}"


# --- the report -----------------------------------------------------------------------

@dataclass
class Status:
    agent: AgentState
    table: TableState
    policy: FileState
    ranges: RangesState
    pools: list[PoolUsage]
    attachments: list[AttachmentRow]
    refusals: list[dict]
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def gather(state_dir: str, run_dir: str, policy_file: str, cni_conf_dir: str = DEFAULT_CNI_CONF_DIR,
           refusals: int = RECENT_REFUSALS) -> Status:
    rows, networks, problems = attachment_rows(state_dir)
    events, why = recent_refusals(state_dir, refusals)
    if why:
        problems.append(why)
    return Status(agent=agent_state(run_dir), table=table_state(policy_file, state_dir),
                  policy=file_state(Path(policy_file)), ranges=ranges_state(state_dir),
                  pools=pool_usage(state_dir, run_dir, policy_file, cni_conf_dir, networks),
                  attachments=rows, refusals=events, problems=problems)


def _size_text(size: int | None) -> str:
    if size is None:
        return "?"
    return f"{size:,}" if size < 10 ** 9 else f"2^{(size + 1).bit_length() - 1}-1"


def _use_text(row: PoolUsage) -> str:
    if not row.size:
        return "?"
    return f"{100 * (row.leased - row.outside) / row.size:.2f} %"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def render(st: Status) -> str:
    out: list[str] = []
    a = st.agent
    if a.up:
        since = f", up {age_text(a.uptime_seconds)} (since {a.started})" if a.started else ""
        out.append(f"agent:    up, pid {a.pid if a.pid is not None else '?'}, version {a.version or '?'}{since}"
                   + (f"; {a.detail}" if a.detail else ""))
    else:
        out.append(f"agent:    DOWN: {a.detail}")
    t = st.table
    if not t.loaded:
        out.append(f"table:    NOT LOADED: {t.detail}")
    elif t.current is None:
        out.append(f"table:    loaded, revision {t.loaded_revision}; the policy's revision is unknown: {t.detail}")
    elif t.current:
        out.append(f"table:    loaded, revision {t.loaded_revision}, the one the policy renders")
    else:
        out.append(f"table:    loaded, revision {t.loaded_revision}, OUTDATED: the policy renders "
                   f"{t.policy_revision} (the agent reloads it within seconds; is it running?)")
    p = st.policy
    out.append(f"policy:   {p.path}, changed {age_text(p.age_seconds)} ago" if p.exists else
               f"policy:   {p.path} missing: the default contract applies" + (f" ({p.detail})" if p.detail else ""))
    r = st.ranges
    if not r.exists:
        out.append(f"ranges:   {r.path} MISSING (`sockgate ranges update`)")
    elif r.detail:
        out.append(f"ranges:   {r.path}: {r.detail}")
    else:
        out.append(f"ranges:   {r.path}, fetched {age_text(r.age_seconds)} ago ({r.ipv4} IPv4, {r.ipv6} IPv6 CIDRs)")
    out.append("")
    out += textable.lines(["network", "family", "pool", "addresses", "leased", "outside pool", "use"],
                          [(u.network, u.family, u.pool or "?", _size_text(u.size), u.leased, u.outside, _use_text(u))
                           for u in st.pools], left=[0, 1, 2]) if st.pools else ["pools: no network on this node"]
    out.append("")
    if st.attachments:
        out += textable.lines(
            ["network", "pod/container", "container id", "ifname", "state", "ipv4", "ipv6", "veth",
             "tx bytes", "tx packets", "rx bytes", "rx packets"],
            [(r.network, r.pod or r.container_name or "-", r.container_id[:12], r.ifname, r.state, r.ipv4, r.ipv6,
              {True: r.host_ifname, False: f"{r.host_ifname} GONE", None: "?"}[r.veth],
              _count(r.tx_bytes), _count(r.tx_packets), _count(r.rx_bytes), _count(r.rx_packets))
             for r in st.attachments], left=range(8))
        gone = [r for r in st.attachments if r.veth is False and r.state == READY]
        if gone:
            out.append(f"{len(gone)} attachment(s) whose veth is gone: their container vanished without a DEL; "
                       f"the agent's sweep removes them, or `sockgate gc` now")
    else:
        out.append("attachments: none")
    out.append("")
    if st.refusals:
        out.append(f"recent refusals (last {len(st.refusals)}; `sockgate events` for more):")
        out += textable.lines(["time", "pod/container", "destination", "port", "protocol", "reason", "rule",
                               "element"],
                              [(e.get("time", ""), e.get("pod") or e.get("container_name")
                                or str(e.get("container_id", ""))[:12] or "-",
                                e.get("destination", ""), _count(e.get("port")), e.get("protocol", ""),
                                e.get("reason", ""), e.get("rule", ""), e.get("element") or "-")
                               for e in st.refusals], left=range(8))
    else:
        out.append("recent refusals: none")
    for problem in st.problems:
        out.append(f"warning: {problem}")
    return "\n".join(out)
