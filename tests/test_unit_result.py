"""CNI result building (pure)."""
from runtime.cni.result import build_result
from runtime.core.netconf import parse_netconf
from runtime.state.store import Attachment

ATT = Attachment(network="n", container_id="c", ifname="eth0", netns="/run/netns/x",
                 host_ifname="sg0123456789ab", ipv4="10.77.0.5", ipv6="fd77::5",
                 host_mac="aa:aa:aa:aa:aa:aa", container_mac="bb:bb:bb:bb:bb:bb")


def conf(version: str, **extra):
    return parse_netconf({"cniVersion": version, "name": "n", "type": "sockgate", **extra})


def test_result_1_x_shape():
    res = build_result(ATT, conf("1.1.0"), "1.1.0")
    assert res["cniVersion"] == "1.1.0"
    assert res["interfaces"][1] == {"name": "eth0", "mac": "bb:bb:bb:bb:bb:bb", "sandbox": "/run/netns/x"}
    assert res["ips"] == [
        {"address": "10.77.0.5/32", "gateway": "169.254.1.1", "interface": 1},
        {"address": "fd77::5/128", "gateway": "fe80::1", "interface": 1},
    ]
    assert {"dst": "0.0.0.0/0", "gw": "169.254.1.1"} in res["routes"]
    assert {"dst": "::/0", "gw": "fe80::1"} in res["routes"]
    assert res["dns"]["nameservers"][:2] == ["8.8.8.8", "8.8.4.4"]


def test_result_0_3_tags_ip_versions():
    res = build_result(ATT, conf("0.3.1"), "0.3.1")
    assert [ip["version"] for ip in res["ips"]] == ["4", "6"]


def test_result_appends_to_prev_result():
    prev = {"cniVersion": "0.4.0", "interfaces": [{"name": "lo"}],
            "ips": [{"version": "4", "address": "127.0.0.1/8", "interface": 0}],
            "dns": {"nameservers": ["1.2.3.4"]}}
    res = build_result(ATT, conf("1.0.0", prevResult=prev), "1.0.0")
    assert [i["name"] for i in res["interfaces"]] == ["lo", "sg0123456789ab", "eth0"]
    assert res["ips"][0] == {"address": "127.0.0.1/8", "interface": 0}
    assert res["ips"][1]["interface"] == 2
    assert res["dns"] == {"nameservers": ["1.2.3.4"]}


def test_configured_dns():
    res = build_result(ATT, conf("1.1.0", dns={"nameservers": ["9.9.9.9"], "search": ["a.b"]}), "1.1.0")
    assert res["dns"] == {"nameservers": ["9.9.9.9"], "search": ["a.b"]}
