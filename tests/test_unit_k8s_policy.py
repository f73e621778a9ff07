"""netpolicy (pure): `"source": "node"` ingress and `clusterDns`, parsed, compiled and
rendered, and explain()'s verdicts for them. The packets: tests/test_k8s_policy.py."""
from __future__ import annotations

import re

import pytest

from netpolicy.compile import compile_policy, explain
from netpolicy.policy import Policy, PolicyError, parse_policy
from netpolicy.ruleset import node_addresses_script, render_table
from tests.test_unit_ruleset import ends_in

DOC = {"ingress": [{"source": "node", "protocols": ["tcp", "udp"], "ports": [8080, 8090]},
                   {"source": "192.0.2.10", "ports": [9000]}],
       "clusterDns": {"services": ["10.96.0.10", "fd00:10:96::a", "10.96.0.10"]}}
POLICY = parse_policy(DOC)
TEXT = render_table(compile_policy(POLICY, []).egress)


def _chain(name: str) -> list[str]:
    prefix = f"add rule inet sockgate {name} "
    return [line.removeprefix(prefix) for line in TEXT.splitlines() if line.startswith(prefix)]


def _elements(name: str) -> list[str]:
    m = re.search(rf"^add element inet sockgate {name} {{ (.*) }}$", TEXT, re.M)
    return sorted(m[1].split(", ")) if m else []


def test_parse_node_source_and_cluster_dns():
    assert [(i.source, i.from_node, i.protos, i.ports) for i in POLICY.ingress] == [
        ("node", True, ("tcp", "udp"), (8080, 8090)), ("192.0.2.10/32", False, ("tcp",), (9000,))]
    assert POLICY.cluster_dns == ("10.96.0.10", "fd00:10:96::a")  # duplicates dropped, order kept
    assert Policy().cluster_dns == () and parse_policy({}).cluster_dns == ()


@pytest.mark.parametrize("raw, field", [
    ({"ingress": [{"source": "Node", "ports": [80]}]}, "ingress[0].source"),
    ({"ingress": [{"source": "nodes", "ports": [80]}]}, "ingress[0].source"),
    ({"ingress": [{"source": ["node"], "ports": [80]}]}, "ingress[0].source"),
    ({"ingress": [{"source": "node"}]}, "ingress[0].ports"),
    ({"clusterDns": {"services": ["10.96.0.0/12"]}}, "clusterDns.services[0]"),
    ({"clusterDns": {"services": ["kube-dns.kube-system"]}}, "clusterDns.services[0]"),
    ({"clusterDns": {"services": []}}, "clusterDns.services"),
    ({"clusterDns": {"services": "10.96.0.10"}}, "clusterDns.services"),
    ({"clusterDns": {"service": "10.96.0.10"}}, "clusterDns.service"),
    ({"clusterDns": {}}, "clusterDns.services"),
    ({"clusterDns": ["10.96.0.10"]}, "clusterDns"),
])
def test_invalid_fields_are_named(raw, field):
    with pytest.raises(PolicyError) as exc:
        parse_policy(raw)
    assert exc.value.field == field


def test_node_source_fills_its_own_set_never_the_cidr_ones():
    assert _elements("ingress_node") == ["tcp . 8080", "tcp . 8090", "udp . 8080", "udp . 8090"]
    assert _elements("ingress4") == ["192.0.2.10 . tcp . 9000"]
    assert _elements("ingress6") == []
    assert _elements("cluster_dns4") == ["10.96.0.10"] and _elements("cluster_dns6") == ["fd00:10:96::a"]
    # The node's addresses are the runtime's: declared, never flushed or filled by a load.
    assert "add set inet sockgate node4 { type ipv4_addr; }" in TEXT.splitlines()
    assert "flush set inet sockgate node4" not in TEXT and _elements("node4") == []


def test_node_rules_sit_in_the_node_chains_only():
    node_in = "ip saddr @node4 meta l4proto . th dport @ingress_node accept"
    reply = ("ct direction reply ct state established ct original ip saddr @node4 "
             "meta l4proto . th sport @ingress_node accept")
    out, to_node, forward = _chain("node_to_container"), _chain("container_to_node"), _chain("to_container")
    # The node's connections: in the output hook's chain, before its drop.
    assert out.index(node_in) < len(out) - 1 and ends_in(out[-1], "drop", "node-to-container")
    # Their replies: after the container's anti-spoofing, before the drop of the rest.
    spoof = max(i for i, r in enumerate(to_node) if "spoofed-source" in r)
    assert spoof < to_node.index(reply) < len(to_node) - 1
    assert ends_in(to_node[-1], "jump refuse", "container-to-node")
    # Never for forwarded packets; those claiming a node address are dropped first.
    assert not [r for r in forward if "ingress_node" in r]
    assert forward[0].startswith("ip saddr @node4 counter ") and ends_in(forward[0], "drop", "spoofed-node")
    assert forward[1].startswith("ip6 saddr @node6 counter ") and ends_in(forward[1], "drop", "spoofed-node")
    assert not [r for r in _chain("forward") + _chain("from_container") if "ingress_node" in r]


def test_cluster_dns_rule_matches_the_original_destination_on_53_through_a_dnat():
    rules = _chain("egress_policy")
    dns = [r for r in rules if "@cluster_dns" in r]
    assert dns == ["meta l4proto { tcp, udp } ct status dnat ct original ip daddr @cluster_dns4 "
                   "ct original proto-dst 53 return",
                   "meta l4proto { tcp, udp } ct status dnat ct original ip6 daddr @cluster_dns6 "
                   "ct original proto-dst 53 return"]
    # Right after the protocol check: before the ranges that refuse the DNAT's target.
    assert rules.index(dns[0]) == 1
    assert all(rules.index(dns[1]) < i for i, r in enumerate(rules) if "@blocked" in r or "@pools" in r)


def test_node_addresses_script():
    text = node_addresses_script(["198.18.0.2", "::1", "127.0.0.1", "fe80::1", "fe80::1", "2001:db8::2"])
    assert text.splitlines() == [
        "flush set inet sockgate node4", "flush set inet sockgate node6",
        "add element inet sockgate node4 { 127.0.0.1, 198.18.0.2 }",
        "add element inet sockgate node6 { ::1, 2001:db8::2, fe80::1 }"]
    # No addresses: emptied, nothing added (an empty `add element` is a syntax error).
    assert node_addresses_script([]).splitlines() == ["flush set inet sockgate node4",
                                                      "flush set inet sockgate node6"]


def test_explain_cluster_dns():
    compiled = compile_policy(POLICY, [])
    for proto in ("udp", "tcp"):
        v = explain(compiled, "10.96.0.10", 53, proto)
        assert (v.verdict, v.rule) == ("accept", "cluster-dns"), v
        assert "DNAT" in v.detail
    assert explain(compiled, "fd00:10:96::a", 53, "udp").rule == "cluster-dns"
    # Another port of the service, another private address on 53, or no opt-in: refused.
    for dst, port in (("10.96.0.10", 54), ("10.96.0.11", 53)):
        assert (explain(compiled, dst, port, "udp").verdict, explain(compiled, dst, port, "udp").rule) == \
            ("refuse", "blocked-range")
    assert explain(compile_policy(Policy(), []), "10.96.0.10", 53, "udp").rule == "blocked-range"
