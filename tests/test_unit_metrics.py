"""The agent's metrics as Prometheus reads them: names by its conventions, the build
info, the request histograms and reclaims with the pod labels of their container.
(The kernel's counters are read in the lab: tests/test_agent.py scrapes a real agent.)"""
from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runtime.agent.metrics import SockgateCollector, parse_address, registry_for, serve
from runtime.state.store import Attachment, AttachmentStore
from runtime.version import version


def render(state: Path, reclaims: dict) -> tuple[dict, str]:
    registry, requests = registry_for(SockgateCollector(str(state), reclaims=lambda: dict(reclaims)))
    requests.observe_cni("ADD", "ok", 0.03)
    requests.observe_cni("DEL", "error", 0.2)
    requests.observe_docker("/NetworkDriver.CreateEndpoint", True, 0.05)
    requests.observe_docker("/NetworkDriver.Unheardof", False, 0.001)
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}, text


def save(state: Path, cid: str, labels: dict[str, str]) -> None:
    AttachmentStore(state / "networks" / "sockgate" / "attachments").save(
        Attachment("sockgate", cid, "eth0", f"/run/netns/{cid}", f"sg{cid}", labels=labels))


def test_names_follow_the_prometheus_conventions(tmp_path):
    families, text = render(tmp_path, {})
    for name, family in families.items():
        assert name.startswith("sockgate_"), name
        if family.type == "counter":
            assert all(s.name == name + "_total" for s in family.samples), family
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
    assert {n for n, f in families.items() if f.type == "counter"} >= {
        "sockgate_tx_bytes", "sockgate_rx_bytes", "sockgate_tx_packets", "sockgate_rx_packets",
        "sockgate_policy_drops", "sockgate_reclaims", "sockgate_cni_requests"}
    assert families["sockgate_cni_request_duration_seconds"].type == "histogram"
    assert families["sockgate_docker_request_duration_seconds"].type == "histogram"
    # No `_created` gauge beside each counter and histogram.
    assert "_created" not in text


def test_build_info_and_agent_up(tmp_path):
    families, _ = render(tmp_path, {})
    (info,) = families["sockgate_build_info"].samples
    assert info.labels == {"version": version()} and info.value == 1
    assert version() not in ("", "unknown")  # the installed distribution's (setup.cfg)
    (up,) = families["sockgate_agent_up"].samples
    assert up.value == 1


def test_request_durations_by_command_and_call(tmp_path):
    families, _ = render(tmp_path, {})
    counts = {(s.labels["command"]): s.value for s in families["sockgate_cni_request_duration_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"ADD": 1, "DEL": 1}
    requests = {(s.labels["command"], s.labels["result"]): s.value for s in families["sockgate_cni_requests"].samples}
    assert requests == {("ADD", "ok"): 1, ("DEL", "error"): 1}
    docker = {(s.labels["call"], s.labels["result"]): s.value
              for s in families["sockgate_docker_request_duration_seconds"].samples if s.name.endswith("_count")}
    # An unknown path is "other": a client's URL can't create time series.
    assert docker == {("CreateEndpoint", "ok"): 1, ("other", "error"): 1}
    buckets = [s for s in families["sockgate_cni_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["command"] == "ADD"]
    assert {s.labels["le"]: s.value for s in buckets}["0.02"] == 0
    assert {s.labels["le"]: s.value for s in buckets}["0.05"] == 1


def test_traffic_and_reclaims_carry_the_pod_of_their_container(tmp_path):
    save(tmp_path, "c1", {"pod_namespace": "shop", "pod_name": "web-0"})
    save(tmp_path, "c2", {"container_name": "worker"})
    reclaims = {("sockgate", "c1", "eth0"): 3}
    families, _ = render(tmp_path, reclaims)
    tx = {s.labels["container_id"]: s.labels for s in families["sockgate_tx_bytes"].samples}
    assert tx["c1"]["pod_namespace"] == "shop" and tx["c1"]["pod_name"] == "web-0"
    assert tx["c2"]["container_name"] == "worker" and tx["c2"]["pod_name"] == ""
    assert families["sockgate_attachments"].samples[0].value == 2
    (reclaimed,) = families["sockgate_reclaims"].samples
    assert reclaimed.value == 3
    assert reclaimed.labels == {"network": "sockgate", "container_id": "c1", "ifname": "eth0",
                                "pod_namespace": "shop", "pod_name": "web-0", "container_name": ""}


def test_a_reclaim_series_keeps_its_labels_after_its_container_is_gone(tmp_path):
    """A series whose labels change is a new series: the pod labels of a reclaim
    counter stay those first seen, also once its attachment record is deleted."""
    save(tmp_path, "c1", {"pod_namespace": "shop", "pod_name": "web-0"})
    counts = {("sockgate", "c1", "eth0"): 1}
    registry, _ = registry_for(SockgateCollector(str(tmp_path), reclaims=lambda: dict(counts)))

    def reclaim_labels() -> dict:
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
        (sample,) = families["sockgate_reclaims"].samples
        return sample.labels
    first = reclaim_labels()
    assert first["pod_name"] == "web-0"
    AttachmentStore(tmp_path / "networks" / "sockgate" / "attachments").delete("c1", "eth0")
    counts[("sockgate", "c1", "eth0")] = 2
    assert reclaim_labels() == first


@pytest.mark.parametrize("address,parsed", [("127.0.0.1:9464", ("127.0.0.1", 9464)), (":9464", ("127.0.0.1", 9464)),
                                            ("[::1]:9464", ("::1", 9464)), ("fd00::5:9464", ("fd00::5", 9464)),
                                            ("10.0.0.7:1", ("10.0.0.7", 1))])
def test_metrics_addresses(address, parsed):
    assert parse_address(address) == parsed


@pytest.mark.parametrize("address", ["9464", "127.0.0.1", "127.0.0.1:http", "127.0.0.1:0", "[::1]:70000"])
def test_a_metrics_address_without_a_port_is_refused_clearly(address):
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_address(address)


def test_the_readme_table_names_every_exported_metric(tmp_path):
    """README "Monitoring": one row per metric the agent exports (and the ones the
    dashboard awaits from the events work), with its type."""
    from tests.support.dashboard import PENDING
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Monitoring\n", 1)[1].split("\n## ", 1)[0]
    rows = {cells[1].strip("` "): cells[2].strip() for cells in
            (line.split("|") for line in section.splitlines() if line.startswith("| `sockgate_"))}
    families, _ = render(tmp_path, {})
    exposed = {name + ("_total" if f.type == "counter" else ""): f.type for name, f in families.items()}
    assert {n: t for n, t in rows.items() if n not in PENDING or n in exposed} == exposed


def _free_port(family: int, host: str) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("family,host,address", [(socket.AF_INET, "127.0.0.1", "127.0.0.1:{}"),
                                                 (socket.AF_INET6, "::1", "[::1]:{}")])
def test_the_endpoint_starts_without_asking_the_resolver(tmp_path, monkeypatch, family, host, address):
    """http.server looks up its own address's host name when it binds (a reverse DNS
    query): on a node whose resolver doesn't answer, the agent's start waited 10 s for
    it. The endpoint must bind without any lookup, and serve."""
    def no_lookup(*_args):
        raise AssertionError("the metrics endpoint asked the resolver")
    monkeypatch.setattr(socket, "getfqdn", no_lookup)
    monkeypatch.setattr(socket, "gethostbyaddr", no_lookup)
    registry, _ = registry_for(SockgateCollector(str(tmp_path), reclaims=lambda: {}))
    port = _free_port(family, host)
    server = serve(address.format(port), registry)
    try:
        url = f"http://{address.format(port)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert "sockgate_build_info" in r.read().decode()
        assert server.address_family == family
    finally:
        server.shutdown()
        server.server_close()
