"""Build CNI results (pure). Versions 0.3.x/0.4.0 tag each IP with "version"; 1.x
dropped that field. A prevResult from an earlier plugin in the chain is kept and ours
is appended to it, whatever version it came in."""
from __future__ import annotations

import copy

from runtime.core.netconf import NetConf
from runtime.kernel.netns import GATEWAY_V4, GATEWAY_V6
from runtime.state.store import Attachment


def _legacy(version: str) -> bool:
    return version.startswith("0.")


def _convert_ips(ips: list[dict], version: str) -> list[dict]:
    out = []
    for ip in ips:
        ip = dict(ip)
        if _legacy(version):
            ip.setdefault("version", "6" if ":" in ip.get("address", "") else "4")
        else:
            ip.pop("version", None)
        out.append(ip)
    return out


def build_result(att: Attachment, conf: NetConf, version: str) -> dict:
    prev = copy.deepcopy(conf.prev_result) if conf.prev_result else {}
    interfaces = list(prev.get("interfaces", []))
    host_index = len(interfaces)
    interfaces.append({"name": att.host_ifname, "mac": att.host_mac})
    interfaces.append({"name": att.ifname, "mac": att.container_mac, "sandbox": att.netns})
    container_index = host_index + 1
    ips = list(prev.get("ips", [])) + [
        {"address": f"{att.ipv4}/32", "gateway": GATEWAY_V4, "interface": container_index},
        {"address": f"{att.ipv6}/128", "gateway": GATEWAY_V6, "interface": container_index},
    ]
    routes = list(prev.get("routes", [])) + [
        {"dst": "0.0.0.0/0", "gw": GATEWAY_V4},
        {"dst": "::/0", "gw": GATEWAY_V6},
    ]
    dns = prev.get("dns") or conf.dns.to_cni()
    return {"cniVersion": version, "interfaces": interfaces, "ips": _convert_ips(ips, version),
            "routes": routes, "dns": dns}


def passthrough(conf: NetConf, version: str) -> dict:
    """The result of a command that adds nothing: prevResult as is (or empty)."""
    prev = copy.deepcopy(conf.prev_result) if conf.prev_result else {}
    prev["cniVersion"] = version
    if "ips" in prev:
        prev["ips"] = _convert_ips(prev["ips"], version)
    return prev
