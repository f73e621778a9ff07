"""The Docker door: Docker's remote network driver protocol (libnetwork's "remote"
driver, plugin API v1) served by the node agent on a unix socket, by default
/run/docker/plugins/sockgate.sock. The same core as CNI ADD/DEL makes and removes the
attachment, keyed by the Docker endpoint id; every operation is bounded (OP_TIMEOUT_S).

Design notes (the calls, the facts about dockerd relied on): docs/docker.md.
"""
from __future__ import annotations

import hashlib
import ipaddress
import logging
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from runtime import defaults
from runtime.core import attach
from runtime.core.netconf import DEFAULT_IPV4_POOL, DEFAULT_IPV6_POOL, NetConf, parse_netconf
from runtime.core.node import Node
from runtime.docker.firewall import ForwardAccept
from runtime.errors import SockgateError
from runtime.fsutil import atomic_write_json, read_json, remove, remove_stale_temps
from runtime.kernel import netns
from runtime.state.store import READY, attachments

log = logging.getLogger("sockgate.docker")

DEFAULT_PLUGIN_SOCKET = "/run/docker/plugins/sockgate.sock"
OP_TIMEOUT_S = 60.0        # longest a handler makes Docker wait
IDENTITY_GIVE_UP_S = 600.0
GENERIC = "com.docker.network.generic"
PORTMAP = "com.docker.network.portmap"
INTERNAL = "com.docker.network.internal"
DOCKER_MTU = "com.docker.network.driver.mtu"
_DOCKER_ID = re.compile(r"^[0-9a-f]{64}$")

# Network options (`docker network create -o KEY=VALUE`), all strings on the wire.
OPTIONS = {
    "ipv4Pool": "container IPv4 addresses (CIDR), default " + DEFAULT_IPV4_POOL,
    "ipv6Pool": "container IPv6 addresses (CIDR), default " + DEFAULT_IPV6_POOL,
    "mtu": "MTU of both veth ends, 1280-65535 (also com.docker.network.driver.mtu)",
}


class DriverError(Exception):
    """Refused with a message for Docker."""


# --- state on disk -------------------------------------------------------------------

@dataclass
class NetworkRecord:
    id: str
    options: dict[str, str]            # the validated -o options
    sockgate_network: str              # the core network (lease and attachment space)
    name: str = ""                     # Docker's name, learnt in the background
    created: float = 0.0


@dataclass
class EndpointRecord:
    network_id: str
    id: str
    state: str = "created"             # created (CreateEndpoint) -> joined (Join) -> created (Leave)
    ifname: str = ""
    sandbox: str = ""
    container_id: str = ""             # Docker's, learnt in the background
    container_name: str = ""
    created: float = 0.0


class DockerStore:
    """STATE_DIR/docker/{networks,endpoints}/<id>.json, each written atomically."""

    def __init__(self, state_dir: str) -> None:
        self.root = Path(state_dir) / "docker"
        self.networks_dir = self.root / "networks"
        self.endpoints_dir = self.root / "endpoints"
        # One writer at a time in this process (fsutil's lock on the temp file is what
        # keeps writers of one record apart across processes).
        self._write = threading.Lock()

    def remove_stale_temps(self) -> list[Path]:
        """Temp files of record writes killed mid-write (kill -9 of the agent)."""
        return [*remove_stale_temps(self.networks_dir), *remove_stale_temps(self.endpoints_dir)]

    @staticmethod
    def _check_id(value: Any, what: str) -> str:
        if not isinstance(value, str) or not _DOCKER_ID.match(value):
            raise DriverError(f"malformed {what}: {value!r}")
        return value

    def _save(self, directory: Path, key: str, data: dict) -> None:
        with self._write:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_json(directory / f"{key}.json", data)

    def network(self, nid: str) -> NetworkRecord | None:
        data = read_json(self.networks_dir / f"{nid}.json")
        return NetworkRecord(**data) if data else None

    def networks(self) -> list[NetworkRecord]:
        return [NetworkRecord(**d) for p in sorted(self.networks_dir.glob("*.json")) if (d := read_json(p))]

    def save_network(self, rec: NetworkRecord) -> None:
        self._save(self.networks_dir, rec.id, asdict(rec))

    def delete_network(self, nid: str) -> None:
        remove(self.networks_dir / f"{nid}.json")

    def endpoint(self, eid: str) -> EndpointRecord | None:
        data = read_json(self.endpoints_dir / f"{eid}.json")
        return EndpointRecord(**data) if data else None

    def endpoints(self) -> list[EndpointRecord]:
        return [EndpointRecord(**d) for p in sorted(self.endpoints_dir.glob("*.json")) if (d := read_json(p))]

    def save_endpoint(self, rec: EndpointRecord) -> None:
        self._save(self.endpoints_dir, rec.id, asdict(rec))

    def delete_endpoint(self, eid: str) -> None:
        remove(self.endpoints_dir / f"{eid}.json")


# --- options -> the core's network config -------------------------------------------

def parse_options(request_options: Any) -> dict[str, str]:
    """The `-o` options of CreateNetwork, validated. Unknown keys are refused (a typo
    must not silently give the defaults); Docker's own com.docker.* keys are ignored
    except the standard MTU one."""
    if not isinstance(request_options, dict):
        request_options = {}
    if request_options.get(INTERNAL) is True:
        raise DriverError("sockgate networks exist for outbound traffic: --internal is not supported")
    generic = request_options.get(GENERIC) or {}
    if not isinstance(generic, dict):
        raise DriverError(f"malformed {GENERIC}: {generic!r}")
    out: dict[str, str] = {}
    for key, value in generic.items():
        value = str(value)
        if key == DOCKER_MTU:
            key = "mtu"
        elif key.startswith("com.docker."):
            continue
        elif key not in OPTIONS:
            raise DriverError(f"unknown sockgate network option {key!r}; known: {', '.join(sorted(OPTIONS))}")
        out[key] = value
    return out


def sockgate_network_name(options: dict[str, str]) -> str:
    """Docker networks share the core network of their pools: two networks created with
    the default pools must lease from one lease space, or both would hand out the same
    first address. Each pool pair gets one core network."""
    v4 = str(ipaddress.ip_network(options.get("ipv4Pool", DEFAULT_IPV4_POOL), strict=False))
    v6 = str(ipaddress.ip_network(options.get("ipv6Pool", DEFAULT_IPV6_POOL), strict=False))
    if (v4, v6) == (DEFAULT_IPV4_POOL, DEFAULT_IPV6_POOL):
        return "docker"
    return "docker-" + hashlib.sha256(f"{v4}|{v6}".encode()).hexdigest()[:10]


@dataclass(frozen=True)
class DriverConfig:
    state_dir: str
    run_dir: str
    policy_file: str
    socket_path: str = DEFAULT_PLUGIN_SOCKET
    docker_host: str = defaults.DOCKER_HOST
    op_timeout: float = OP_TIMEOUT_S


def network_conf(cfg: DriverConfig, rec_options: dict[str, str], name: str) -> NetConf:
    conf: dict[str, Any] = {"cniVersion": defaults.CNI_VERSION, "name": name, "type": "sockgate",
                            "stateDir": cfg.state_dir, "runDir": cfg.run_dir, "policyFile": cfg.policy_file}
    for key in ("ipv4Pool", "ipv6Pool"):
        if key in rec_options:
            conf[key] = rec_options[key]
    if "mtu" in rec_options:
        try:
            conf["mtu"] = int(rec_options["mtu"])
        except ValueError:
            raise DriverError(f"option 'mtu' must be an integer, got {rec_options['mtu']!r}") from None
    try:
        return parse_netconf(conf)
    except SockgateError as exc:
        raise DriverError(str(exc)) from None


def peer_ifname(eid: str) -> str:
    """The container end's name in the node netns until Docker moves it into the
    sandbox (there Docker names it ethN). Also the attachment's ifname in the core: a
    function of the endpoint id, so DeleteEndpoint finds it without any record."""
    return "dk" + hashlib.sha256(eid.encode()).hexdigest()[:12]


def _node_links() -> set[str]:
    """Names of every link in this (the node's) netns: one netlink dump."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def _null_ipam(data: Any, family: int) -> bool:
    """Docker's null IPAM driver hands out the whole space and no address."""
    if not data:
        return True
    pools = {str(d.get("Pool", "")) for d in data if isinstance(d, dict)}
    return pools <= {"0.0.0.0/0" if family == 4 else "::/0"}


# --- who owns an endpoint (background) ------------------------------------------------

class IdentityResolver:
    """Asks dockerd which container owns an endpoint, and writes container id and name
    into the attachment's labels (billing reads them from there). Runs in its own
    thread with its own timeouts: never from a handler."""

    def __init__(self, driver: "DockerDriver") -> None:
        self.driver = driver
        self.pending: "queue.Queue[str]" = queue.Queue()
        self._client: Any = None

    def enqueue(self, eid: str) -> None:
        self.pending.put(eid)

    def _docker(self) -> Any:
        if self._client is None:
            import docker  # deferred: only the Docker door needs it
            self._client = docker.APIClient(base_url=self.driver.cfg.docker_host, version="auto", timeout=10)
        return self._client

    def lookup(self, ep: EndpointRecord) -> tuple[str, str, str] | None:
        """(container id, container name, network name), or None if not (yet) known."""
        api = self._docker()
        net_name = api.inspect_network(ep.network_id).get("Name", "")
        for c in api.containers(all=True, filters={"network": ep.network_id}):
            for settings in ((c.get("NetworkSettings") or {}).get("Networks") or {}).values():
                if settings.get("EndpointID") == ep.id:
                    names = c.get("Names") or [""]
                    return c["Id"], names[0].lstrip("/"), net_name
        return None

    def run(self, stop: threading.Event) -> None:
        waiting: dict[str, list[float]] = {}  # eid -> [next try, first seen, tries]
        while not stop.is_set():
            now = time.monotonic()
            for eid, entry in list(waiting.items()):
                due, since, tries = entry
                if due > now:
                    continue
                ep = self.driver.store.endpoint(eid)
                if ep is None or ep.state != "joined" or ep.container_id:
                    del waiting[eid]
                    continue
                try:
                    found = self.lookup(ep)
                except Exception as exc:
                    log.info("asking dockerd about endpoint %s: %s", eid[:12], exc)
                    self._client = None
                    found = None
                if found:
                    try:
                        self.driver.set_identity(eid, *found)
                    except Exception:
                        log.exception("recording the container of endpoint %s failed", eid[:12])
                    del waiting[eid]
                elif now - since > IDENTITY_GIVE_UP_S:
                    log.warning("no container found for endpoint %s; billing goes without its name", eid[:12])
                    del waiting[eid]
                else:
                    # Docker records the endpoint in the container's settings once the
                    # container started: retry quickly for a while, then back off.
                    entry[:] = [now + (0.2 if tries < 50 else min(10.0, 0.2 * 2 ** (tries - 50))), since, tries + 1]
            wait = min((e[0] for e in waiting.values()), default=now + 1.0) - time.monotonic()
            try:
                eid = self.pending.get(timeout=max(0.02, min(1.0, wait)))
                waiting.setdefault(eid, [0.0, time.monotonic(), 0])
            except queue.Empty:
                pass


# --- the driver ------------------------------------------------------------------------

class _Op:
    """One bounded operation: the handler waits at most `timeout`; the work goes on in
    its own thread, and `abandoned` tells it nobody waits for its answer any more."""

    def __init__(self, fn: Callable[["_Op"], dict], name: str) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.abandoned = False
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._body, name=f"docker-{name}", daemon=True)

    def _body(self) -> None:
        try:
            self.result = self.fn(self)
        except BaseException as exc:  # handed to the waiting handler
            self.error = exc
        finally:
            self.done.set()


class DockerDriver:
    def __init__(self, cfg: DriverConfig, firewall: ForwardAccept | None = None, node: Node | None = None) -> None:
        self.cfg = cfg
        self.node = node if node is not None else Node.open()  # the agent's, when it runs this door
        self.store = DockerStore(cfg.state_dir)
        self.firewall = firewall
        self.identity = IdentityResolver(self)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._ops: set[_Op] = set()
        self._ops_guard = threading.Lock()
        self.routes: dict[str, Callable[[dict, _Op], dict]] = {
            "/Plugin.Activate": lambda r, op: {"Implements": ["NetworkDriver"]},
            "/NetworkDriver.GetCapabilities": lambda r, op: {"Scope": "local", "ConnectivityScope": "local"},
            "/NetworkDriver.CreateNetwork": self.create_network,
            "/NetworkDriver.DeleteNetwork": self.delete_network,
            "/NetworkDriver.CreateEndpoint": self.create_endpoint,
            "/NetworkDriver.EndpointOperInfo": self.endpoint_info,
            "/NetworkDriver.DeleteEndpoint": self.delete_endpoint,
            "/NetworkDriver.Join": self.join,
            "/NetworkDriver.Leave": self.leave,
            "/NetworkDriver.DiscoverNew": lambda r, op: {},
            "/NetworkDriver.DiscoverDelete": lambda r, op: {},
            "/NetworkDriver.ProgramExternalConnectivity": lambda r, op: {},
            "/NetworkDriver.RevokeExternalConnectivity": lambda r, op: {},
            "/NetworkDriver.AllocateNetwork": self.allocate_network,
            "/NetworkDriver.FreeNetwork": lambda r, op: {},
        }
        # Teardown answers Docker once its wait is over even if the work isn't: the
        # work goes on and Docker's next step (removing the sandbox) is harmless to it.
        self.lenient = {"/NetworkDriver.Leave", "/NetworkDriver.DeleteEndpoint", "/NetworkDriver.DeleteNetwork"}

    # ---- plumbing ----
    def _lock(self, eid: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(eid, threading.Lock())

    def _forget_lock(self, eid: str) -> None:
        with self._locks_guard:
            self._locks.pop(eid, None)

    def dispatch(self, path: str, body: dict) -> tuple[int, dict]:
        handler = self.routes.get(path)
        if handler is None:
            return 404, {"Err": f"sockgate does not implement {path}"}
        op = _Op(lambda o: handler(body, o), path.rsplit(".", 1)[-1])
        with self._ops_guard:
            self._ops.add(op)
        op.thread.start()
        finished = op.done.wait(self.cfg.op_timeout)
        with self._ops_guard:
            if finished:
                self._ops.discard(op)
            else:
                op.abandoned = True
        if not finished:
            threading.Thread(target=self._reap, args=(op,), daemon=True).start()
            if path in self.lenient:
                log.warning("%s still running after %.0f s; answering Docker, it goes on", path, self.cfg.op_timeout)
                return 200, {}
            return 200, {"Err": f"sockgate: {path.rsplit('.', 1)[-1]} did not finish within "
                                f"{self.cfg.op_timeout:.0f} s"}
        if op.error is not None:
            if isinstance(op.error, (DriverError, SockgateError)):
                return 200, {"Err": str(op.error)}
            log.error("%s failed", path, exc_info=op.error)
            return 200, {"Err": f"sockgate internal error: {op.error}"}
        return 200, op.result or {}

    def _reap(self, op: _Op) -> None:
        op.done.wait()
        with self._ops_guard:
            self._ops.discard(op)

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._ops_guard:
                ops = list(self._ops)
            if not ops:
                return
            ops[0].done.wait(max(0.0, deadline - time.monotonic()))

    def _network(self, nid: Any) -> tuple[NetworkRecord, NetConf]:
        nid = DockerStore._check_id(nid, "NetworkID")
        rec = self.store.network(nid)
        if rec is None:
            raise DriverError(f"network {nid[:12]} is not known to sockgate (created while its state "
                              f"dir was elsewhere?); remove and re-create it")
        return rec, network_conf(self.cfg, rec.options, rec.sockgate_network)

    # ---- networks ----
    def create_network(self, req: dict, op: _Op) -> dict:
        nid = DockerStore._check_id(req.get("NetworkID"), "NetworkID")
        if not (_null_ipam(req.get("IPv4Data"), 4) and _null_ipam(req.get("IPv6Data"), 6)):
            raise DriverError("sockgate leases container addresses itself: create the network with "
                              "--ipam-driver null (compose: ipam: {driver: \"null\"})")
        options = parse_options(req.get("Options"))
        name = sockgate_network_name(options)
        conf = network_conf(self.cfg, options, name)
        for other in self.store.networks():
            if other.id == nid or other.sockgate_network == name:
                continue
            oconf = network_conf(self.cfg, other.options, other.sockgate_network)
            for mine, theirs in ((conf.ipv4_pool, oconf.ipv4_pool), (conf.ipv6_pool, oconf.ipv6_pool)):
                if mine.overlaps(theirs):
                    raise DriverError(f"pool {mine} overlaps {theirs} of network {other.name or other.id[:12]}; "
                                      f"use the same pools (they share addresses) or disjoint ones")
        self.store.save_network(NetworkRecord(id=nid, options=options, sockgate_network=name, created=time.time()))
        log.info("network %s created: core network %s, pools %s %s", nid[:12], name, conf.ipv4_pool, conf.ipv6_pool)
        return {}

    def delete_network(self, req: dict, op: _Op) -> dict:
        nid = DockerStore._check_id(req.get("NetworkID"), "NetworkID")
        for ep in self.store.endpoints():
            if ep.network_id == nid:
                self._drop_endpoint(ep.id, nid)
        self.store.delete_network(nid)
        log.info("network %s deleted", nid[:12])
        return {}

    def allocate_network(self, req: dict, op: _Op) -> dict:
        raise DriverError("sockgate is a local-scope driver: swarm networks are not supported")

    # ---- endpoints: the attachment lives from CreateEndpoint to DeleteEndpoint ----
    @staticmethod
    def _interface(att: Any) -> dict:
        return {"Interface": {"Address": f"{att.ipv4}/32", "AddressIPv6": f"{att.ipv6}/128"}}

    def _intact(self, conf: NetConf, eid: str, links: set[str] | None = None) -> Any:
        att = attach.Network(conf).attachments.load(eid, peer_ifname(eid))
        if att is None or att.state != READY:
            return None
        present = att.host_ifname in links if links is not None else netns.link_exists(att.host_ifname)
        return att if present else None

    def create_endpoint(self, req: dict, op: _Op) -> dict:
        rec, conf = self._network(req.get("NetworkID"))
        eid = DockerStore._check_id(req.get("EndpointID"), "EndpointID")
        options = req.get("Options") or {}
        if options.get(PORTMAP):
            raise DriverError("sockgate sandboxes are outbound-only: published ports (-p) are not supported")
        iface = req.get("Interface") or {}
        if iface.get("Address") or iface.get("AddressIPv6"):
            raise DriverError("Docker's IPAM assigned an address; sockgate networks need --ipam-driver null")
        with self._lock(eid):
            ep = self.store.endpoint(eid)
            att = self._intact(conf, eid) if ep is not None else None
            if att is not None:  # a repeated CreateEndpoint: same answer
                return self._interface(att)
            if ep is not None:
                attach.detach(self.node, conf, eid, peer_ifname(eid))
            labels = {"docker_network_id": rec.id, "docker_endpoint_id": eid}
            if rec.name:
                labels["docker_network"] = rec.name
            # A MAC asked for with `docker run --mac-address` is the one Docker sets on
            # the interface; both veth ends must have it.
            asked = iface.get("MacAddress")
            mac = asked if isinstance(asked, str) else ""
            request = attach.AttachRequest(conf=conf, container_id=eid, ifname=peer_ifname(eid), netns="",
                                           labels=labels, mac=mac)
            att = attach.attach_unplaced(self.node, request)
            if op.abandoned:
                # Docker got a timeout error for this call and will never delete it.
                log.warning("endpoint %s finished after Docker gave up; undoing it", eid[:12])
                attach.detach(self.node, conf, eid, peer_ifname(eid))
                return {}
            self.store.save_endpoint(EndpointRecord(network_id=rec.id, id=eid, ifname=att.ifname,
                                                    created=time.time()))
        return self._interface(att)

    def endpoint_info(self, req: dict, op: _Op) -> dict:
        eid = DockerStore._check_id(req.get("EndpointID"), "EndpointID")
        ep = self.store.endpoint(eid)
        value: dict[str, str] = {}
        if ep is not None:
            try:
                _, conf = self._network(ep.network_id)
                att = attach.Network(conf).attachments.load(eid, peer_ifname(eid))
            except DriverError:
                att = None
            if att is not None:
                value = {"sockgate.ipv4": att.ipv4, "sockgate.ipv6": att.ipv6, "sockgate.host_ifname": att.host_ifname}
        return {"Value": value}

    def delete_endpoint(self, req: dict, op: _Op) -> dict:
        eid = DockerStore._check_id(req.get("EndpointID"), "EndpointID")
        self._drop_endpoint(eid, req.get("NetworkID"))
        return {}

    def _drop_endpoint(self, eid: str, nid: Any) -> None:
        with self._lock(eid):
            self._detach(eid, nid)
            self.store.delete_endpoint(eid)
        self._forget_lock(eid)

    # ---- join / leave: Docker moves the interface in and out ----
    def join(self, req: dict, op: _Op) -> dict:
        rec, conf = self._network(req.get("NetworkID"))
        eid = DockerStore._check_id(req.get("EndpointID"), "EndpointID")
        sandbox = req.get("SandboxKey")
        if not isinstance(sandbox, str) or not sandbox.startswith("/"):
            raise DriverError(f"malformed SandboxKey: {sandbox!r}")
        with self._lock(eid):
            ep = self.store.endpoint(eid)
            att = self._intact(conf, eid) if ep is not None else None
            if ep is None or att is None:
                raise DriverError(f"endpoint {eid[:12]} has no sockgate interface (lost while the agent was "
                                  f"down?); restart the container")
            if not netns.link_exists(att.ifname):
                # Docker moves it back at Leave; not here means another sandbox has it.
                raise DriverError(f"interface {att.ifname} of endpoint {eid[:12]} is not on the node")
            if self.firewall is not None:
                try:
                    self.firewall.ensure(max_age=2.0)
                except Exception:
                    log.exception("checking Docker's firewall failed")
            attach.set_netns(conf, eid, att.ifname, sandbox)
            ep.state, ep.sandbox = "joined", sandbox
            self.store.save_endpoint(ep)
        self.identity.enqueue(eid)
        return {
            "InterfaceName": {"SrcName": att.ifname, "DstPrefix": "eth"},
            # The same gateways as every sockgate container: 169.254.1.1 on a
            # connected /32 route, fe80::1 on the link (an address of the node's end).
            "Gateway": netns.GATEWAY_V4,
            "GatewayIPv6": netns.GATEWAY_V6,
            "StaticRoutes": [{"Destination": f"{netns.GATEWAY_V4}/32", "RouteType": 1}],
            "DisableGatewayService": True,
        }

    def leave(self, req: dict, op: _Op) -> dict:
        eid = DockerStore._check_id(req.get("EndpointID"), "EndpointID")
        with self._lock(eid):
            ep = self.store.endpoint(eid)
            if ep is not None and ep.state == "joined":
                try:
                    _, conf = self._network(ep.network_id)
                    attach.set_netns(conf, eid, peer_ifname(eid), "")
                except DriverError:
                    pass
                ep.state, ep.sandbox = "created", ""
                self.store.save_endpoint(ep)
        return {}

    def _detach(self, eid: str, nid: Any) -> None:
        """Caller holds the endpoint's lock. Idempotent; needs no record: the ifname is
        a function of the endpoint id, and without a network record every core network
        of this door is tried."""
        ep = self.store.endpoint(eid)
        nid = ep.network_id if ep is not None else nid
        rec = self.store.network(nid) if isinstance(nid, str) and _DOCKER_ID.match(nid) else None
        if rec is not None:
            confs = [network_conf(self.cfg, rec.options, rec.sockgate_network)]
        else:
            confs = [self._conf_of(name) for name in sorted({n.sockgate_network for n in self.store.networks()})]
        for conf in confs:
            attach.detach(self.node, conf, eid, peer_ifname(eid))

    def _conf_of(self, core_name: str) -> NetConf:
        for n in self.store.networks():
            if n.sockgate_network == core_name:
                return network_conf(self.cfg, n.options, core_name)
        return network_conf(self.cfg, {}, core_name)

    # ---- background ----
    def set_identity(self, eid: str, container_id: str, container_name: str, network_name: str) -> None:
        with self._lock(eid):
            ep = self.store.endpoint(eid)
            if ep is None or ep.state != "joined":
                return
            rec, conf = self._network(ep.network_id)
            if network_name and rec.name != network_name:
                rec.name = network_name
                self.store.save_network(rec)
            ep.container_id, ep.container_name = container_id, container_name
            self.store.save_endpoint(ep)
            net = attach.Network(conf)
            with net.lock():
                att = net.attachments.load(eid, peer_ifname(eid))
                if att is None:
                    return
                att.labels.update({"docker_container_id": container_id, "container_name": container_name,
                                   **({"docker_network": network_name} if network_name else {})})
                net.attachments.save(att)
        log.info("endpoint %s belongs to container %s (%s)", eid[:12], container_name, container_id[:12])

    def sweep(self) -> list[str]:
        """Endpoints whose interface is gone: the container's netns died with it in
        while Docker's DeleteEndpoint never reached us (agent down, dockerd killed).
        Free their leases, records and set elements. Also attachments of this door
        whose endpoint record never got written (the agent died in CreateEndpoint)."""
        undone: list[str] = []
        self.store.remove_stale_temps()
        known = {ep.id: ep for ep in self.store.endpoints()}
        if not known and not self.store.networks():
            return undone
        links = _node_links()
        cores = {n.sockgate_network for n in self.store.networks()}
        for name in cores:  # the core networks' records and leases (Docker sends no GC)
            attach.remove_temps(attach.Network(self._conf_of(name)))
        orphans = {a.container_id for name in cores for a in attachments(self.cfg.state_dir, name).records
                   if a.container_id not in known and _DOCKER_ID.match(a.container_id)}
        for eid in sorted(set(known) | orphans):
            with self._lock(eid):
                ep = self.store.endpoint(eid)
                if ep is None:
                    if eid in orphans:
                        self._detach(eid, None)
                        undone.append(eid)
                        log.info("attachment of endpoint %s had no endpoint record; removed", eid[:12])
                    continue
                try:
                    _, conf = self._network(ep.network_id)
                except DriverError:
                    continue
                if self._intact(conf, eid, links) is not None or self._intact(conf, eid) is not None:
                    continue  # (the second look: the link dump may predate a CreateEndpoint)
                self._detach(eid, ep.network_id)
                self.store.delete_endpoint(eid)
                undone.append(eid)
                log.info("endpoint %s: its interface is gone (container netns deleted); attachment removed", eid[:12])
        return undone

    def pending_identities(self) -> None:
        for ep in self.store.endpoints():
            if ep.state == "joined" and not ep.container_id:
                self.identity.enqueue(ep.id)
