"""The Grafana dashboard (deploy/grafana/sockgate-dashboard.json): it loads as a
dashboard Grafana imports (panels with unique ids and places on the grid, queries,
a data source variable), its queries are PromQL (promql-parser), and every metric and
label they use is one the agent's collector exports. tests/test_agent.py checks it
against a real agent's scrape too (with the kernel's drop counters)."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from runtime.agent.metrics import SockgateCollector, registry_for
from runtime.state.store import Attachment, AttachmentStore
from tests.support import dashboard

GRID_WIDTH = 24
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables.
BUILTIN_VARIABLES = {"__rate_interval", "__interval", "__range", "__all"}


def collector_output(tmp_path: Path) -> str:
    """The agent's registry rendered as a scrape would be, over a state dir with one
    attachment that had an idle flow reclaimed and a flow refused, after one CNI
    request and one Docker call (so that every family the doors observe has samples)."""
    state = tmp_path / "state"
    AttachmentStore(state / "networks" / "sockgate" / "attachments").save(Attachment(
        "sockgate", "c1", "eth0", "/run/netns/x", "sgabc", "10.77.0.5",
        labels={"pod_namespace": "shop", "pod_name": "web-0"}))
    class Events:  # the refused-flow events component: one blocked-port event of the pod
        def counts(self) -> dict[tuple[str, ...], int]:
            return {("sockgate", "c1", "eth0", "shop", "web-0", "", "blocked-port"): 1}

        def dropped(self) -> int:
            return 0

    collector = SockgateCollector(str(state), reclaims=lambda: {("sockgate", "c1", "eth0"): 2}, events=Events())
    registry, requests = registry_for(collector)
    requests.observe_cni("ADD", "ok", 0.012)
    requests.observe_docker("/NetworkDriver.Join", True, 0.02)
    return generate_latest(registry).decode()


def panels(board: dict) -> list[dict]:
    return [p for top in board["panels"] for p in (top, *top.get("panels", []))]


def structure_problems(board: dict) -> list[str]:
    """What would keep Grafana from importing the dashboard as meant."""
    found = []
    for key, kind in (("title", str), ("uid", str), ("schemaVersion", int), ("panels", list), ("templating", dict)):
        if not isinstance(board.get(key), kind):
            found.append(f"top level: {key} missing or not {kind.__name__}")
    if found:
        return found
    variables = board["templating"].get("list", [])
    sources = [v for v in variables if v.get("type") == "datasource"]
    if [(v.get("name"), v.get("query")) for v in sources] != [("datasource", "prometheus")]:
        found.append(f"templating: want one Prometheus data source variable named datasource, not {sources}")
    for v in variables:
        if v.get("type") == "query" and v.get("datasource") != DATASOURCE:
            found.append(f"variable {v.get('name')}: data source {v.get('datasource')} is not {DATASOURCE}")
    names = {v.get("name") for v in variables} | BUILTIN_VARIABLES
    ids: set[int] = set()
    boxes: list[tuple[str, tuple[int, int, int, int]]] = []
    for p in panels(board):
        title = p.get("title")
        if not isinstance(p.get("id"), int) or p["id"] in ids:
            found.append(f"panel {title!r}: id {p.get('id')!r} missing or not unique")
        ids.add(p.get("id"))
        grid = p.get("gridPos", {})
        if not all(isinstance(grid.get(k), int) and grid[k] >= 0 for k in "hwxy") or grid["w"] == 0 \
                or grid["h"] == 0 or grid["x"] + grid["w"] > GRID_WIDTH:
            found.append(f"panel {title!r}: gridPos {grid} is not a place on the {GRID_WIDTH}-wide grid")
            continue
        box = (grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"])
        for other, b in boxes:
            if box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3]:
                found.append(f"panel {title!r} overlaps panel {other!r}")
        boxes.append((title, box))
        if p.get("type") == "row":
            continue
        if not p.get("type") or not title:
            found.append(f"panel {p.get('id')}: no type or title")
        if p.get("datasource") != DATASOURCE:
            found.append(f"panel {title!r}: data source {p.get('datasource')} is not {DATASOURCE}")
        targets = p.get("targets") or []
        if not targets:
            found.append(f"panel {title!r}: no query")
        refs = [t.get("refId") for t in targets]
        if len(set(refs)) != len(refs) or not all(refs):
            found.append(f"panel {title!r}: refIds {refs} missing or repeated")
        for t in targets:
            if not str(t.get("expr", "")).strip():
                found.append(f"panel {title!r}: query {t.get('refId')} has no expr")
            if t.get("datasource", DATASOURCE) != DATASOURCE:
                found.append(f"panel {title!r}: query {t.get('refId')} data source {t.get('datasource')}")
            for var in re.findall(r"\$\{?(\w+)", str(t.get("expr", ""))):
                if var not in names:
                    found.append(f"panel {title!r}: ${var} is not a variable of the dashboard")
    return found


def test_the_dashboard_loads_as_a_grafana_dashboard():
    board = dashboard.load()
    assert structure_problems(board) == []
    # What an operator looks for, each in a panel of its own.
    titles = {p["title"] for p in panels(board)}
    for wanted in ("Sent out of the node (tx, billed)", "Delivered to the pod (rx)", "Refused flows per pod",
                   "CNI request latency", "Idle flows reclaimed per pod (per minute)", "Drops by reason",
                   "Attachments", "Agent versions"):
        assert wanted in titles


@pytest.mark.parametrize("breakage", ["repeated id", "no expr", "off the grid", "overlap", "other data source",
                                      "unknown variable", "no data source variable"])
def test_a_broken_dashboard_is_caught(breakage):
    """Negative control for the structure check."""
    board = copy.deepcopy(dashboard.load())
    graphs = [p for p in board["panels"] if p["type"] != "row"]
    if breakage == "repeated id":
        graphs[1]["id"] = graphs[0]["id"]
    elif breakage == "no expr":
        graphs[0]["targets"][0]["expr"] = ""
    elif breakage == "off the grid":
        graphs[0]["gridPos"]["x"] = GRID_WIDTH - 1
    elif breakage == "overlap":
        graphs[1]["gridPos"] = dict(graphs[0]["gridPos"])
    elif breakage == "other data source":
        graphs[0]["datasource"] = {"type": "prometheus", "uid": "my-prom"}
    elif breakage == "unknown variable":
        graphs[0]["targets"][0]["expr"] += ' * on() group_left() vector($nodes)'
    else:
        board["templating"]["list"] = [v for v in board["templating"]["list"] if v["type"] != "datasource"]
    assert structure_problems(board) != []


def test_every_metric_and_label_the_dashboard_uses_is_exported(tmp_path):
    have = dashboard.exported(collector_output(tmp_path))
    assert dashboard.problems(dashboard.load(), have) == []
    # The check does look: the names the agent exports are there ...
    assert {"sockgate_tx_bytes_total", "sockgate_cni_request_duration_seconds_bucket",
            "sockgate_build_info"} <= set(have.labels)
    # ... and what it doesn't export is reported, as is a label no metric carries.
    board = dashboard.load()
    broken = copy.deepcopy(board)
    target = next(p for p in broken["panels"] if p.get("title") == "Sent out of the node (tx, billed)")["targets"][0]
    target["expr"] = target["expr"].replace("sockgate_tx_bytes_total", "sockgate_tx_bytes")
    assert any("sockgate_tx_bytes is not exported" in p for p in dashboard.problems(broken, have))
    broken = copy.deepcopy(board)
    target = next(p for p in broken["panels"] if p.get("title") == "CNI request latency")["targets"][0]
    target["expr"] = target["expr"].replace("by (le, command)", "by (le, cmd)")
    assert any("groups by 'cmd'" in p for p in dashboard.problems(broken, have))
    broken = copy.deepcopy(board)
    target = next(p for p in broken["panels"] if p.get("title") == "Agents up")["targets"][0]
    target["expr"] = target["expr"].replace("instance=~", "node=~")
    assert any("has no label 'node'" in p for p in dashboard.problems(broken, have))
    broken = copy.deepcopy(board)
    target = next(p for p in broken["panels"] if p.get("title") == "Drops by reason")["targets"][0]
    target["expr"] = target["expr"].replace("[$__rate_interval]", "[$__rate_interval")
    assert any("not PromQL" in p for p in dashboard.problems(broken, have))
    broken = copy.deepcopy(board)
    broken["templating"]["list"][-1]["query"]["query"] = "label_values(sockgate_tx_bytes_total, namespace)"
    assert any("groups by 'namespace'" in p for p in dashboard.problems(broken, have))
