"""The network configuration an operator writes (the CNI config, or a Docker network's
options), validated into a record. Errors name the field at fault."""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Any

from runtime import defaults
from runtime.errors import INVALID_CONFIG, UNSUPPORTED_FIELD, SockgateError

DEFAULT_IPV4_POOL = "10.77.0.0/16"
DEFAULT_IPV6_POOL = "fd77:5067:6174::/64"
# Google Public DNS, the resolver App Engine apps are allowed to reach (C8).
DEFAULT_NAMESERVERS = ("8.8.8.8", "8.8.4.4", "2001:4860:4860::8888", "2001:4860:4860::8844")

# Keys the CNI spec or runtimes put into a plugin's config; we accept them silently.
_STANDARD_KEYS = {"cniVersion", "name", "type", "args", "prevResult", "runtimeConfig",
                  "capabilities", "cniVersions", "disableCheck", "disableGC"}
_OWN_KEYS = {"ipv4Pool", "ipv6Pool", "dns", "mtu", "stateDir", "runDir", "logFile", "policyFile",
             "billingDir"}
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")


@dataclass(frozen=True)
class Dns:
    nameservers: tuple[str, ...] = DEFAULT_NAMESERVERS
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    def to_cni(self) -> dict[str, Any]:
        out: dict[str, Any] = {"nameservers": list(self.nameservers)}
        if self.domain:
            out["domain"] = self.domain
        if self.search:
            out["search"] = list(self.search)
        if self.options:
            out["options"] = list(self.options)
        return out


@dataclass(frozen=True)
class NetConf:
    name: str
    cni_version: str = defaults.CNI_VERSION
    ipv4_pool: ipaddress.IPv4Network = ipaddress.IPv4Network(DEFAULT_IPV4_POOL)
    ipv6_pool: ipaddress.IPv6Network = ipaddress.IPv6Network(DEFAULT_IPV6_POOL)
    dns: Dns = field(default_factory=Dns)
    mtu: int = 1500
    state_dir: str = defaults.STATE_DIR
    run_dir: str = defaults.RUN_DIR
    log_file: str = ""
    policy_file: str = defaults.POLICY_FILE
    # Billing ledger; None: <state_dir>/billing (so a custom stateDir keeps billing
    # with it), "": no billing records at DEL.
    billing_dir: str | None = None
    prev_result: dict[str, Any] | None = None
    runtime_config: dict[str, Any] = field(default_factory=dict)


def _bad(field_name: str, problem: str) -> SockgateError:
    return SockgateError(INVALID_CONFIG, f"invalid network configuration: field {field_name!r} {problem}")


def _typed(conf: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = conf.get(key, default)
    # bool is an int in Python; a JSON true is never a valid MTU.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _bad(key, f"must be of type {names}, got {type(value).__name__} {value!r}")
    return value


def _pool(conf: dict[str, Any], key: str, default: str, version: int) -> Any:
    raw = _typed(conf, key, str, default)
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        raise _bad(key, f"is not a CIDR network: {exc}") from None
    if net.version != version:
        raise _bad(key, f"must be an IPv{version} network, got {raw!r}")
    # Room for at least a handful of containers; /30 and /126 leave two.
    if net.num_addresses < 4:
        raise _bad(key, f"is too small ({raw!r})")
    return net


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(key, "must be a list of strings")
    return tuple(value)


def _dns(conf: dict[str, Any]) -> Dns:
    raw = _typed(conf, "dns", dict, {})
    if not raw:
        return Dns()
    servers = _strings(raw.get("nameservers", list(DEFAULT_NAMESERVERS)), "dns.nameservers")
    for server in servers:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise _bad("dns.nameservers", f"holds {server!r}, which is not an IP address") from None
    domain = raw.get("domain", "")
    if not isinstance(domain, str):
        raise _bad("dns.domain", "must be a string")
    return Dns(servers, domain, _strings(raw.get("search", []), "dns.search"),
               _strings(raw.get("options", []), "dns.options"))


def parse_netconf(conf: dict[str, Any]) -> NetConf:
    unknown = sorted(set(conf) - _STANDARD_KEYS - _OWN_KEYS)
    if unknown:
        key = unknown[0]
        raise SockgateError(UNSUPPORTED_FIELD,
                            f"unsupported field in network configuration: {key}={conf[key]!r}",
                            "sockgate does its own IPAM; known fields: " + ", ".join(sorted(_OWN_KEYS)))
    name = _typed(conf, "name", str, "")
    if not _NETWORK_NAME.match(name):
        raise _bad("name", f"must be 1-63 characters of letters, digits, '_', '.', '-', got {name!r}")
    mtu = _typed(conf, "mtu", int, 1500)
    if not 1280 <= mtu <= 65535:
        # 1280 is IPv6's minimum link MTU; below it the v6 path breaks.
        raise _bad("mtu", f"must be between 1280 and 65535, got {mtu}")
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise _bad("prevResult", "must be an object")
    state_dir = _typed(conf, "stateDir", str, defaults.STATE_DIR)
    return NetConf(
        name=name,
        cni_version=_typed(conf, "cniVersion", str, defaults.CNI_VERSION),
        ipv4_pool=_pool(conf, "ipv4Pool", DEFAULT_IPV4_POOL, 4),
        ipv6_pool=_pool(conf, "ipv6Pool", DEFAULT_IPV6_POOL, 6),
        dns=_dns(conf),
        mtu=mtu,
        state_dir=state_dir,
        run_dir=_typed(conf, "runDir", str, defaults.RUN_DIR),
        log_file=_typed(conf, "logFile", str, ""),
        policy_file=_typed(conf, "policyFile", str, defaults.POLICY_FILE),
        billing_dir=_typed(conf, "billingDir", str, os.path.join(state_dir, "billing")),
        prev_result=prev,
        runtime_config=_typed(conf, "runtimeConfig", dict, {}),
    )
