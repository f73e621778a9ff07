"""The Docker door: Docker's remote network driver protocol (libnetwork's "remote"
driver, plugin API v1) served by the node agent on a unix socket, by default
/run/docker/plugins/sockgate.sock. The same core as CNI ADD/DEL makes and removes the
attachment, keyed by the Docker endpoint id; every operation is bounded
(runtime.docker.ops, DriverConfig.op_timeout). Beside it: options.py (what requests
carry, checked), store.py (the door's records), identity.py (who owns an endpoint).

Design notes (the calls, the facts about dockerd relied on): docs/docker.md.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any, Callable

from runtime.core import attach
from runtime.core.netconf import NetConf
from runtime.core.node import Node
from runtime.docker.firewall import ForwardAccept
from runtime.docker.identity import IdentityResolver
from runtime.docker.ops import BoundedOps, Op
from runtime.docker.options import (
    DOCKER_ID,
    DriverConfig,
    DriverError,
    check_id,
    network_conf,
    null_ipam,
    parse_options,
    sockgate_network_name,
)
from runtime.docker.store import DockerStore, EndpointRecord, NetworkRecord
from runtime.errors import SockgateError
from runtime.kernel import netns
from runtime.state.store import READY, attachments

log = logging.getLogger("sockgate.docker")

PORTMAP = "com.docker.network.portmap"
ANSWERING = "answering"  # an endpoint record's state until CreateEndpoint's answer is written
DELETING = "deleting"  # an endpoint record's state from DeleteEndpoint's start to its end
SWEEP_FAILURE_LOG_S = 600  # an endpoint the sweep can't remove is logged again after this


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


class DockerDriver:
    def __init__(self, cfg: DriverConfig, firewall: ForwardAccept | None = None, node: Node | None = None) -> None:
        self.cfg = cfg
        self.node = node if node is not None else Node.open()  # the agent's, when it runs this door
        self.store = DockerStore(cfg.state_dir)
        self.firewall = firewall
        self.identity = IdentityResolver(self.store, cfg.docker_host, self.set_identity)
        self.ops = BoundedOps(cfg.op_timeout)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._sweep_failures: dict[str, tuple[float, float]] = {}  # endpoint -> (first, last logged)
        self.routes: dict[str, Callable[[dict, Op], dict]] = {
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
        call = path.rsplit(".", 1)[-1]
        op, finished = self.ops.run(lambda o: handler(body, o), call)
        if not finished:
            if path in self.lenient:
                log.warning("%s still running after %.0f s; answering Docker, it goes on", path, self.cfg.op_timeout)
                return 200, {}
            return 200, {"Err": f"sockgate: {call} did not finish within {self.cfg.op_timeout:.0f} s"}
        if op.error is not None:
            if isinstance(op.error, (DriverError, SockgateError)):
                return 200, {"Err": str(op.error)}
            log.error("%s failed", path, exc_info=op.error)
            return 200, {"Err": f"sockgate internal error: {op.error}"}
        return 200, op.result or {}

    def _network(self, nid: Any) -> tuple[NetworkRecord, NetConf]:
        nid = check_id(nid, "NetworkID")
        rec = self.store.networks.get(nid)
        if rec is None:
            raise DriverError(f"network {nid[:12]} is not known to sockgate (created while its state "
                              f"dir was elsewhere?); remove and re-create it")
        return rec, network_conf(self.cfg, rec.options, rec.sockgate_network)

    # ---- networks ----
    def create_network(self, req: dict, op: Op) -> dict:
        nid = check_id(req.get("NetworkID"), "NetworkID")
        if not (null_ipam(req.get("IPv4Data"), 4) and null_ipam(req.get("IPv6Data"), 6)):
            raise DriverError("sockgate leases container addresses itself: create the network with "
                              "--ipam-driver null (compose: ipam: {driver: \"null\"})")
        options = parse_options(req.get("Options"))
        name = sockgate_network_name(options)
        conf = network_conf(self.cfg, options, name)
        for other in self.store.networks.all():
            if other.id == nid or other.sockgate_network == name:
                continue
            oconf = network_conf(self.cfg, other.options, other.sockgate_network)
            for mine, theirs in ((conf.ipv4_pool, oconf.ipv4_pool), (conf.ipv6_pool, oconf.ipv6_pool)):
                if mine.overlaps(theirs):
                    raise DriverError(f"pool {mine} overlaps {theirs} of network {other.name or other.id[:12]}; "
                                      f"use the same pools (they share addresses) or disjoint ones")
        # answered=False until the answer is written (see answered()): a record whose
        # answer a killed agent never wrote is a network Docker doesn't have.
        self.store.networks.save(NetworkRecord(id=nid, options=options, sockgate_network=name, created=time.time(),
                                               answered=False))
        log.info("network %s created: core network %s, pools %s %s", nid[:12], name, conf.ipv4_pool, conf.ipv6_pool)
        return {}

    def delete_network(self, req: dict, op: Op) -> dict:
        nid = check_id(req.get("NetworkID"), "NetworkID")
        for ep in self.store.endpoints.all():
            if ep.network_id == nid:
                self._drop_endpoint(ep.id, nid)
        self.store.networks.delete(nid)
        log.info("network %s deleted", nid[:12])
        return {}

    def allocate_network(self, req: dict, op: Op) -> dict:
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

    def create_endpoint(self, req: dict, op: Op) -> dict:
        rec, conf = self._network(req.get("NetworkID"))
        eid = check_id(req.get("EndpointID"), "EndpointID")
        options = req.get("Options") or {}
        if options.get(PORTMAP):
            raise DriverError("sockgate sandboxes are outbound-only: published ports (-p) are not supported")
        iface = req.get("Interface") or {}
        if iface.get("Address") or iface.get("AddressIPv6"):
            raise DriverError("Docker's IPAM assigned an address; sockgate networks need --ipam-driver null")
        with self._lock(eid):
            ep = self.store.endpoints.get(eid)
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
            self.store.endpoints.save(EndpointRecord(network_id=rec.id, id=eid, ifname=att.ifname,
                                                    state=ANSWERING, created=time.time()))
        return self._interface(att)

    def answered(self, path: str, req: dict) -> None:
        """The transport wrote a successful answer to `path` (review 11): Docker has the
        network or endpoint now. Until then its record says otherwise, and the agent
        that starts after a kill removes it (sweep(startup=True)): Docker fails a call
        whose answer it never got and never deletes what that call made (its retry
        comes with an empty body)."""
        if path == "/NetworkDriver.CreateEndpoint":
            eid = req.get("EndpointID")
            if not isinstance(eid, str) or not DOCKER_ID.match(eid):
                return
            with self._lock(eid):
                ep = self.store.endpoints.get(eid)
                if ep is not None and ep.state == ANSWERING:  # (a Join may have come first)
                    ep.state = "created"
                    self.store.endpoints.save(ep)
        elif path == "/NetworkDriver.CreateNetwork":
            nid = req.get("NetworkID")
            if not isinstance(nid, str) or not DOCKER_ID.match(nid):
                return
            rec = self.store.networks.get(nid)
            if rec is not None and not rec.answered:
                rec.answered = True
                self.store.networks.save(rec)

    def endpoint_info(self, req: dict, op: Op) -> dict:
        eid = check_id(req.get("EndpointID"), "EndpointID")
        ep = self.store.endpoints.get(eid)
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

    def delete_endpoint(self, req: dict, op: Op) -> dict:
        eid = check_id(req.get("EndpointID"), "EndpointID")
        self._drop_endpoint(eid, req.get("NetworkID"))
        return {}

    def _drop_endpoint(self, eid: str, nid: Any) -> None:
        with self._lock(eid):
            ep = self.store.endpoints.get(eid)
            if ep is not None and ep.state != DELETING:
                # Docker forgets an endpoint whatever DeleteEndpoint answers (its retry
                # after a killed agent has an empty body): the record says the removal
                # was asked for, and the sweep finishes one the agent died in (review 11).
                ep.state = DELETING
                self.store.endpoints.save(ep)
            self._detach(eid, nid)
            self.store.endpoints.delete(eid)
        self._forget_lock(eid)

    # ---- join / leave: Docker moves the interface in and out ----
    def join(self, req: dict, op: Op) -> dict:
        rec, conf = self._network(req.get("NetworkID"))
        eid = check_id(req.get("EndpointID"), "EndpointID")
        sandbox = req.get("SandboxKey")
        if not isinstance(sandbox, str) or not sandbox.startswith("/"):
            raise DriverError(f"malformed SandboxKey: {sandbox!r}")
        with self._lock(eid):
            ep = self.store.endpoints.get(eid)
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
            self.store.endpoints.save(ep)
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

    def leave(self, req: dict, op: Op) -> dict:
        eid = check_id(req.get("EndpointID"), "EndpointID")
        with self._lock(eid):
            ep = self.store.endpoints.get(eid)
            if ep is not None and ep.state == "joined":
                try:
                    _, conf = self._network(ep.network_id)
                    attach.set_netns(conf, eid, peer_ifname(eid), "")
                except DriverError:
                    pass
                ep.state, ep.sandbox = "created", ""
                self.store.endpoints.save(ep)
        return {}

    def _detach(self, eid: str, nid: Any) -> None:
        """Caller holds the endpoint's lock. Idempotent; needs no record: the ifname is
        a function of the endpoint id, and without a network record every core network
        of this door is tried."""
        ep = self.store.endpoints.get(eid)
        nid = ep.network_id if ep is not None else nid
        rec = self.store.networks.get(nid) if isinstance(nid, str) and DOCKER_ID.match(nid) else None
        if rec is not None:
            confs = [network_conf(self.cfg, rec.options, rec.sockgate_network)]
        else:
            confs = [self._conf_of(name) for name in sorted({n.sockgate_network for n in self.store.networks.all()})]
        for conf in confs:
            attach.detach(self.node, conf, eid, peer_ifname(eid))

    def _conf_of(self, core_name: str) -> NetConf:
        for n in self.store.networks.all():
            if n.sockgate_network == core_name:
                return network_conf(self.cfg, n.options, core_name)
        return network_conf(self.cfg, {}, core_name)

    # ---- background ----
    def set_identity(self, eid: str, container_id: str, container_name: str, network_name: str) -> None:
        with self._lock(eid):
            ep = self.store.endpoints.get(eid)
            if ep is None or ep.state != "joined":
                return
            rec, conf = self._network(ep.network_id)
            if network_name and rec.name != network_name:
                rec.name = network_name
                self.store.networks.save(rec)
            ep.container_id, ep.container_name = container_id, container_name
            self.store.endpoints.save(ep)
            net = attach.Network(conf)
            with net.lock():
                att = net.attachments.load(eid, peer_ifname(eid))
                if att is None:
                    return
                att.labels.update({"docker_container_id": container_id, "container_name": container_name,
                                   **({"docker_network": network_name} if network_name else {})})
                net.attachments.save(att)
        log.info("endpoint %s belongs to container %s (%s)", eid[:12], container_name, container_id[:12])

    def sweep(self, startup: bool = False) -> list[str]:
        """Endpoints whose interface is gone: the container's netns died with it in
        while Docker's DeleteEndpoint never reached us (agent down, dockerd killed).
        Free their leases, records and set elements. Also attachments of this door
        whose endpoint record never got written (the agent died in CreateEndpoint).
        `startup` (before the socket serves, so no call is under way): also the
        endpoints and networks whose CreateEndpoint/CreateNetwork answer a killed agent
        never wrote (see answered())."""
        undone: list[str] = []
        self.store.remove_stale_temps()
        if startup:
            undone += self._unanswered()
        known = {ep.id: ep for ep in self.store.endpoints.all()}
        if not known and not self.store.networks.all():
            return undone
        links = _node_links()
        cores = {n.sockgate_network for n in self.store.networks.all()}
        for name in cores:  # the core networks' records and leases (Docker sends no GC)
            attach.remove_temps(attach.Network(self._conf_of(name)))
        orphans = {a.container_id for name in cores for a in attachments(self.cfg.state_dir, name).records
                   if a.container_id not in known and DOCKER_ID.match(a.container_id)}
        for eid in sorted(set(known) | orphans):
            try:
                if self._sweep_endpoint(eid, eid in orphans, links):
                    undone.append(eid)
                    self._sweep_failures.pop(eid, None)
            except Exception as exc:    # one endpoint that can't be undone holds up no other
                self._sweep_failed(eid, exc)
        return undone

    def _sweep_endpoint(self, eid: str, orphan: bool, links: Any) -> bool:
        """Undo one endpoint if the sweep should (sweep()); whether it did."""
        with self._lock(eid):
            ep = self.store.endpoints.get(eid)
            if ep is None:
                if orphan:
                    self._detach(eid, None)
                    log.info("attachment of endpoint %s had no endpoint record; removed", eid[:12])
                return orphan
            if ep.state == DELETING:  # a DeleteEndpoint the agent died in (review 11)
                self._detach(eid, ep.network_id)
                self.store.endpoints.delete(eid)
                log.info("endpoint %s: finished its DeleteEndpoint, cut short by the agent's end", eid[:12])
                return True
            try:
                _, conf = self._network(ep.network_id)
            except DriverError:
                return False
            if self._intact(conf, eid, links) is not None or self._intact(conf, eid) is not None:
                return False  # (the second look: the link dump may predate a CreateEndpoint)
            self._detach(eid, ep.network_id)
            self.store.endpoints.delete(eid)
            log.info("endpoint %s: its interface is gone (container netns deleted); attachment removed", eid[:12])
            return True

    def _sweep_failed(self, eid: str, exc: Exception) -> None:
        """Logged with its traceback the first time, then once every SWEEP_FAILURE_LOG_S
        while it goes on failing (the sweep runs every few seconds)."""
        now = time.monotonic()
        first, last = self._sweep_failures.get(eid, (now, float("-inf")))
        if now - last < SWEEP_FAILURE_LOG_S:
            return
        self._sweep_failures[eid] = (first, now)
        if last == float("-inf"):
            log.error("sweep: endpoint %s could not be removed (tried again at every sweep): %s", eid[:12], exc,
                      exc_info=exc)
        else:
            log.error("sweep: endpoint %s still could not be removed, for %.0f s: %s", eid[:12], now - first, exc)

    def _unanswered(self) -> list[str]:
        undone = []
        for ep in self.store.endpoints.all():
            if ep.state == ANSWERING:
                try:
                    with self._lock(ep.id):
                        self._detach(ep.id, ep.network_id)
                        self.store.endpoints.delete(ep.id)
                except Exception as exc:    # the agent starts all the same; a later startup retries
                    self._sweep_failed(ep.id, exc)
                    continue
                undone.append(ep.id)
                log.info("endpoint %s: its CreateEndpoint was never answered (the agent was killed before); "
                         "Docker failed that call and will not delete it: removed", ep.id[:12])
        used = {ep.network_id for ep in self.store.endpoints.all()}
        for rec in self.store.networks.all():
            if not rec.answered and rec.id not in used:
                self.store.networks.delete(rec.id)
                log.info("network %s: its CreateNetwork was never answered (the agent was killed before); "
                         "Docker doesn't have it: record removed", rec.id[:12])
        return undone

    def pending_identities(self) -> None:
        for ep in self.store.endpoints.all():
            if ep.state == "joined" and not ep.container_id:
                self.identity.enqueue(ep.id)
