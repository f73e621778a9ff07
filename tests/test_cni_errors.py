"""Bad input: the spec's error code, JSON on stdout, and nothing left behind."""
from __future__ import annotations

import json

import pytest

from tests.support.plugin import node_links

pytestmark = [pytest.mark.lab, pytest.mark.shims("compiled", "python")]


def assert_clean_error(plugin, call, code: int, before_links: set[str]) -> None:
    assert call.rc != 0
    err = json.loads(call.stdout)  # never a traceback on stdout
    assert set(err) == {"cniVersion", "code", "msg", "details"}
    assert err["code"] == code, err
    assert err["msg"]
    assert "Traceback" not in call.stdout
    assert plugin.leases() == [] and plugin.records() == []
    assert node_links(plugin.node_netns) == before_links


@pytest.mark.parametrize("case,code", [
    ("malformed-json", 6),
    ("unsupported-version", 1),
    ("missing-command", 4),
    ("missing-containerid", 4),
    ("missing-ifname", 4),
    ("missing-netns", 4),
    ("netns-does-not-exist", 3),
    ("wrong-field-type", 7),
    ("unknown-field", 2),
    ("bad-pool", 7),
    ("unknown-cni-arg", 4),
])
def test_bad_input(plugin, app, case, code):
    ns = app()
    before = node_links(plugin.node_netns)
    kw: dict = {}
    if case == "malformed-json":
        kw["stdin"] = b'{"cniVersion": "1.1.0", "name": '
    elif case == "unsupported-version":
        kw["conf"] = dict(plugin.conf, cniVersion="0.2.0")
    elif case.startswith("missing-"):
        kw["drop_env"] = ("CNI_" + case.split("-", 1)[1].upper(),)
    elif case == "netns-does-not-exist":
        ns = "/run/netns/sockgate-test-no-such-netns"
    elif case == "wrong-field-type":
        kw["conf"] = dict(plugin.conf, mtu="1500")
    elif case == "unknown-field":
        kw["conf"] = dict(plugin.conf, ipam={"type": "host-local"})
    elif case == "bad-pool":
        kw["conf"] = dict(plugin.conf, ipv4Pool="10.77.0.0/33")
    elif case == "unknown-cni-arg":
        kw["cni_args"] = "FOO=bar"
    call = plugin("ADD", "bad", ns, **kw)
    assert_clean_error(plugin, call, code, before)
    if case == "wrong-field-type":
        assert "mtu" in call.json["msg"]
    if case == "unknown-field":
        assert "ipam" in call.json["msg"]


def test_exhausted_pool(plugin, app):
    conf = dict(plugin.conf, ipv4Pool="10.77.250.0/30")  # two usable addresses
    plugin.add("a", app(), conf=conf)
    plugin.add("b", app(), conf=conf)
    leases, records, links = plugin.leases(), plugin.records(), node_links(plugin.node_netns)
    call = plugin("ADD", "c", app(), conf=conf)
    assert call.rc != 0 and call.json["code"] == 11
    assert "exhausted" in call.json["msg"]
    assert (plugin.leases(), plugin.records(), node_links(plugin.node_netns)) == (leases, records, links)
    plugin.delete("a", conf=conf)
    plugin.add("c", app(), conf=conf)  # room again


def test_ifname_taken_in_container_rolls_back(plugin, app):
    ns = app()
    import subprocess
    subprocess.run(["nsenter", f"--net={ns}", "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer"], check=True)
    before = node_links(plugin.node_netns)
    call = plugin("ADD", "taken", ns)
    assert call.rc != 0 and call.json["code"] >= 100
    assert plugin.leases() == [] and plugin.records() == []
    assert node_links(plugin.node_netns) == before
