"""What Docker's requests carry, checked, and the driver's settings: endpoint and
network ids, the network options (`docker network create -o KEY=VALUE`) and the
core network config they make. A DriverError is a refusal with a message for Docker."""
from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from runtime import defaults
from runtime.core.netconf import DEFAULT_IPV4_POOL, DEFAULT_IPV6_POOL, NetConf, parse_netconf
from runtime.errors import SockgateError

DEFAULT_PLUGIN_SOCKET = "/run/docker/plugins/sockgate.sock"
OP_TIMEOUT_S = 60.0        # longest a handler makes Docker wait
GENERIC = "com.docker.network.generic"
INTERNAL = "com.docker.network.internal"
DOCKER_MTU = "com.docker.network.driver.mtu"
# Also what makes an id safe as a file name (runtime.docker.store).
DOCKER_ID = re.compile(r"^[0-9a-f]{64}$")

# Network options, all strings on the wire.
OPTIONS = {
    "ipv4Pool": "container IPv4 addresses (CIDR), default " + DEFAULT_IPV4_POOL,
    "ipv6Pool": "container IPv6 addresses (CIDR), default " + DEFAULT_IPV6_POOL,
    "mtu": "MTU of the container's veth end, 1280-65535; the node's is 4 less (also com.docker.network.driver.mtu)",
}


class DriverError(Exception):
    """Refused with a message for Docker."""


def check_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not DOCKER_ID.match(value):
        raise DriverError(f"malformed {what}: {value!r}")
    return value


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


def null_ipam(data: Any, family: int) -> bool:
    """Docker's null IPAM driver hands out the whole space and no address."""
    if not data:
        return True
    pools = {str(d.get("Pool", "")) for d in data if isinstance(d, dict)}
    return pools <= {"0.0.0.0/0" if family == 4 else "::/0"}


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
