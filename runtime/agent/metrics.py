"""Prometheus metrics of the agent. Read from the kernel at scrape time: per-attachment
bytes and packets (the same counters billing reads), policy drops by reason, idle
reclaims, attachments. Observed as they happen: the CNI requests and Docker driver
calls the agent serves, and how long they took. Served on loopback by default.

Names follow Prometheus' conventions (README, "Monitoring" has the table): counters
end in `_total` (prometheus_client adds the suffix to a counter family's samples and
strips it from the family's name, so the names below are written as exposed),
durations are histograms in `_seconds`, and `sockgate_build_info` is a gauge of 1
whose labels carry the version."""
from __future__ import annotations

import logging
import socket
import socketserver
import threading
from typing import Callable, Iterator, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from runtime.errors import SockgateError
from runtime.kernel import nft
from runtime.state import store
from runtime.version import version

log = logging.getLogger(__name__)
_ATT_LABELS = ["network", "container_id", "ifname", "pod_namespace", "pod_name", "container_name"]
_POD_LABELS = ("pod_namespace", "pod_name", "container_name")
# Seconds. A CNI ADD takes milliseconds on an idle node and up to seconds on a busy
# one; a Docker call is bounded by the driver's operation timeout (60 s, OP_TIMEOUT_S).
REQUEST_BUCKETS = (.005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30, 60)
# Docker driver calls by their name in the plugin protocol; any other path is "other",
# so that a client's arbitrary URL can't create time series.
DOCKER_CALLS = frozenset({"Activate", "GetCapabilities", "CreateNetwork", "DeleteNetwork", "CreateEndpoint",
                          "EndpointOperInfo", "DeleteEndpoint", "Join", "Leave", "DiscoverNew", "DiscoverDelete",
                          "ProgramExternalConnectivity", "RevokeExternalConnectivity", "AllocateNetwork",
                          "FreeNetwork"})


class EventCounts(Protocol):
    """What the refused-flow events component (runtime.agent.events) counts."""

    def counts(self) -> dict[tuple[str, ...], int]: ...

    def dropped(self) -> int: ...


class SockgateCollector:
    def __init__(self, state_dir: str, reclaims: Callable[[], dict[tuple[str, str, str], int]] | None = None,
                 events: EventCounts | None = None):
        self.state_dir = state_dir
        self.reclaims = reclaims
        self.events = events
        # A reclaim counter's pod labels, as first seen: its container may be detached
        # by the next scrape, and a series whose labels changed would be a new series.
        self._reclaim_labels: dict[tuple[str, str, str], list[str]] = {}

    def collect(self) -> Iterator[Metric]:
        atts = store.attachments(self.state_dir).records
        yield GaugeMetricFamily("sockgate_attachments", "Containers attached on this node", value=len(atts))
        counted = self._counted()
        families = {
            name: CounterMetricFamily(f"sockgate_{name}_total", help_text, labels=_ATT_LABELS)
            for name, help_text in (
                ("tx_bytes", "IP bytes a container sent out of the node (billed as outgoing bandwidth)"),
                ("tx_packets", "IP packets a container sent out of the node"),
                ("rx_bytes", "IP bytes delivered to a container"),
                ("rx_packets", "IP packets delivered to a container"))}
        pod_labels = {}
        for att in atts:
            pods = [att.labels.get(name, "") for name in _POD_LABELS]
            pod_labels[(att.network, att.container_id, att.ifname)] = pods
            labels = [att.network, att.container_id, att.ifname, *pods]
            c = counted.get(att.host_ifname) if counted is not None else None
            for name in nft.COUNTER_FIELDS:
                families[name].add_metric(labels, getattr(c, name) if c else 0)
        if counted is not None:
            yield from families.values()
        drops = CounterMetricFamily("sockgate_policy_drops_total", "Packets refused or dropped, by reason",
                                    labels=["reason"])
        for reason, count in sorted(nft.drop_counters().items()):
            drops.add_metric([reason], count.packets)
        yield drops
        reclaims = CounterMetricFamily("sockgate_reclaims_total", "Idle flows reclaimed (their sockets aborted)",
                                       labels=_ATT_LABELS)
        for key, reclaimed in sorted((self.reclaims() if self.reclaims else {}).items()):
            pods = self._reclaim_labels.setdefault(key, pod_labels.get(key, ["", "", ""]))
            reclaims.add_metric([*key, *pods], reclaimed)
        yield reclaims
        yield from event_families(self.events)
        yield GaugeMetricFamily("sockgate_agent_up", "1 while the agent serves", value=1)
        build = GaugeMetricFamily("sockgate_build_info", "1, labelled with the agent's version", labels=["version"])
        build.add_metric([version()], 1)
        yield build


    def _counted(self) -> dict[str, nft.Counters] | None:
        """The counters billing reads, as billing reads them: under the table lock
        (shared), so never in the middle of a reload, which creates elements and
        clears meter counts. None when they can't be read (the series are left out of
        this scrape: a counter shown lower than it was reads as a reset)."""
        try:
            with store.table_lock(self.state_dir):
                return nft.endpoint_counters() or {}
        except SockgateError as exc:
            log.warning("metrics: per-container counters left out of this scrape: %s", exc)
            return None


class RequestMetrics:
    """What the agent's doors observe per request: the CNI requests it serves (by
    command and result) and the Docker driver calls, with their durations."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cni_requests = Counter(
            "sockgate_cni_requests_total", "CNI requests served by the agent, by command and result",
            ["command", "result"], registry=registry)
        self.cni_duration = Histogram(
            "sockgate_cni_request_duration_seconds",
            "Time from a CNI request's connection to its answer sent, by command", ["command"],
            registry=registry, buckets=REQUEST_BUCKETS)
        self.docker_duration = Histogram(
            "sockgate_docker_request_duration_seconds",
            "Time to answer a Docker network driver call, by call and result", ["call", "result"],
            registry=registry, buckets=REQUEST_BUCKETS)

    def observe_cni(self, command: str, result: str, seconds: float) -> None:
        self.cni_requests.labels(command, result).inc()
        self.cni_duration.labels(command).observe(seconds)

    def observe_docker(self, path: str, ok: bool, seconds: float) -> None:
        call = path.rsplit(".", 1)[-1]
        self.docker_duration.labels(call if call in DOCKER_CALLS else "other", "ok" if ok else "error").observe(seconds)


def registry_for(collector: SockgateCollector) -> tuple[CollectorRegistry, RequestMetrics]:
    """Everything the agent exports, in one registry (the endpoint serves it; the
    dashboard test renders it)."""
    # No `_created` series next to each counter and histogram: in the text format
    # they are gauges of their own, which nothing here reads.
    disable_created_metrics()
    registry = CollectorRegistry()
    registry.register(collector)
    return registry, RequestMetrics(registry)


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of "host:port"; an IPv6 host with or without brackets (the port is
    after the last colon); no host means loopback. ValueError says what is wrong."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics address {address!r} is not HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464)")
    return host.strip("[]") or "127.0.0.1", int(port)


class _Server(ThreadingWSGIServer):
    """prometheus_client's server, without the reverse lookup of its own address:
    http.server's server_bind asks the resolver for the address's host name
    (socket.getfqdn), only to fill in SERVER_NAME. Where the node's resolver doesn't
    answer, the agent's start, and so every pod's first ADD, waited for the
    resolver's timeout (10 s in the lab)."""

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass    # a scrape every few seconds is no news


def serve(address: str, registry: CollectorRegistry) -> _Server:
    """The endpoint at `address` (parse_address), in a thread of its own."""
    host, port = parse_address(address)
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    server_class: type[_Server] = type("MetricsServer", (_Server,), {"address_family": family})
    server = make_server(str(sockaddr[0]), port, make_wsgi_app(registry), server_class, _Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics on http://%s/metrics", address)
    return server


def event_families(events: EventCounts | None) -> Iterator[Metric]:
    """sockgate_refused_flows_total per attachment and reason, and
    sockgate_events_dropped_total (README "Refused-flow events")."""
    refused = CounterMetricFamily(
        "sockgate_refused_flows_total", "Refused first packets of flows reported as events (at most the "
        "per-container event rate: the refusals themselves are in sockgate_policy_drops_total), by attachment "
        "and reason", labels=[*_ATT_LABELS, "reason"])
    for key, count in sorted((events.counts() if events else {}).items()):
        refused.add_metric(list(key), count)
    yield refused
    yield CounterMetricFamily("sockgate_events_dropped_total", "Refused-flow events lost: the kernel's reports "
                              "that found the agent's socket full, events the agent could not queue or write",
                              value=events.dropped() if events else 0)
