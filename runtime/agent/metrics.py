"""Prometheus metrics of the agent, read from the kernel at scrape time: per-attachment
bytes and packets (the same counters billing reads), policy drops by reason, idle
reclaims, attachments. Served on loopback by default."""
from __future__ import annotations

import logging
from typing import Callable, Iterator, Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from runtime.kernel import nft
from runtime.state import store

log = logging.getLogger(__name__)
_ATT_LABELS = ["network", "container_id", "ifname", "pod_namespace", "pod_name", "container_name"]


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

    def collect(self) -> Iterator[Metric]:
        atts = store.attachments(self.state_dir).records
        yield GaugeMetricFamily("sockgate_attachments", "Containers attached on this node", value=len(atts))
        counted = nft.endpoint_counters() or {}
        families = {
            name: CounterMetricFamily(f"sockgate_{name}", help_text, labels=_ATT_LABELS)
            for name, help_text in (
                ("tx_bytes", "IP bytes a container sent out of the node (billed as outgoing bandwidth)"),
                ("tx_packets", "IP packets a container sent out of the node"),
                ("rx_bytes", "IP bytes delivered to a container"),
                ("rx_packets", "IP packets delivered to a container"))}
        for att in atts:
            labels = [att.network, att.container_id, att.ifname, att.labels.get("pod_namespace", ""),
                      att.labels.get("pod_name", ""), att.labels.get("container_name", "")]
            c = counted.get(att.host_ifname)
            for name in nft.COUNTER_FIELDS:
                families[name].add_metric(labels, getattr(c, name) if c else 0)
        yield from families.values()
        drops = CounterMetricFamily("sockgate_policy_drops", "Packets refused or dropped, by reason",
                                    labels=["reason"])
        for reason, count in sorted(nft.drop_counters().items()):
            drops.add_metric([reason], count.packets)
        yield drops
        reclaims = CounterMetricFamily("sockgate_reclaims", "Idle flows reclaimed",
                                       labels=["network", "container_id", "ifname"])
        for key, reclaimed in sorted((self.reclaims() if self.reclaims else {}).items()):
            reclaims.add_metric(list(key), reclaimed)
        yield reclaims
        yield from event_families(self.events)
        yield GaugeMetricFamily("sockgate_agent_up", "1 while the agent serves", value=1)


def serve(address: str, collector: SockgateCollector, registry: CollectorRegistry | None = None):
    """address is "host:port"; loopback unless the operator says otherwise."""
    host, _, port = address.rpartition(":")
    registry = registry or CollectorRegistry()
    registry.register(collector)
    server, thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
    log.info("metrics on http://%s/metrics", address)
    return registry, server


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
