"""Parse one CNI invocation (environment + stdin) into a request record.

Stdlib only: the shim's in-process path and error replies load it before anything heavy.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Mapping

from runtime.defaults import CNI_VERSION, SUPPORTED_VERSIONS
from runtime.errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_CONFIG, INVALID_ENV, SockgateError

COMMANDS = ("ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION")

# Which variables each command cannot do without. DEL may come with an empty
# CNI_NETNS: `ctr run --cni` sends it that way once the task is gone.
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
}
# CNI spec: container ids are alphanumerics plus "_", "." and "-".
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_KNOWN_ARGS = ("IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID",
               "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_NETWORK")


@dataclass(frozen=True)
class CNIRequest:
    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def cni_version(self) -> str:
        return str(self.config.get("cniVersion", CNI_VERSION))


def error_version(config: object) -> str:
    """The cniVersion an error reply should carry: the caller's, when we speak it."""
    if isinstance(config, dict) and config.get("cniVersion") in SUPPORTED_VERSIONS:
        return config["cniVersion"]
    return CNI_VERSION


def decode_config(stdin: bytes) -> dict:
    try:
        config = json.loads(stdin.decode("utf-8") or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SockgateError(DECODE_FAILURE, "network configuration is not valid JSON",
                            str(exc)) from None
    if not isinstance(config, dict):
        raise SockgateError(DECODE_FAILURE, "network configuration must be a JSON object",
                            f"got {type(config).__name__}")
    return config


def check_version(config: dict) -> None:
    version = config.get("cniVersion")
    if version is None:
        raise SockgateError(INVALID_CONFIG, "network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise SockgateError(INCOMPATIBLE_VERSION, f"unsupported cniVersion {version!r}",
                            "supported: " + ", ".join(SUPPORTED_VERSIONS))


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS is "K=V;K2=V2". Unknown keys are an error unless IgnoreUnknown is set,
    which runtimes (containerd, CRI-O, podman) always send."""
    args: dict[str, str] = {}
    for part in filter(None, raw.split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise SockgateError(INVALID_ENV, "CNI_ARGS is malformed",
                                f"expected KEY=VALUE, got {part!r}")
        args[key] = value
    ignore_unknown = args.get("IgnoreUnknown", "").lower() in ("1", "true")
    unknown = sorted(k for k in args if k not in _KNOWN_ARGS)
    if unknown and not ignore_unknown:
        raise SockgateError(INVALID_ENV, "CNI_ARGS has unknown keys",
                            ", ".join(unknown) + " (set IgnoreUnknown=1 to ignore them)")
    return {k: v for k, v in args.items() if k in _KNOWN_ARGS and k != "IgnoreUnknown"}


def _validate_ifname(name: str) -> None:
    # Linux limits names to 15 bytes and rejects "/", ":" and whitespace.
    if (len(name.encode()) > 15 or name in (".", "..")
            or any(c in name for c in "/: \t\n")):
        raise SockgateError(INVALID_ENV, "CNI_IFNAME is not a valid interface name",
                            repr(name))


def version_reply(req: CNIRequest) -> dict:
    asked = req.config.get("cniVersion")
    return {"cniVersion": asked if asked in SUPPORTED_VERSIONS else CNI_VERSION,
            "supportedVersions": list(SUPPORTED_VERSIONS)}


def parse_request(env: Mapping[str, str], stdin: bytes) -> CNIRequest:
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise SockgateError(INVALID_ENV, "CNI_COMMAND is not set")
    if command not in COMMANDS:
        raise SockgateError(INVALID_ENV, f"CNI_COMMAND {command!r} is not a CNI command",
                            "expected one of " + ", ".join(COMMANDS))
    config = decode_config(stdin)
    if command == "VERSION":
        return CNIRequest(command=command, config=config)
    check_version(config)
    for var in _REQUIRED_ENV.get(command, ()):
        if not env.get(var):
            raise SockgateError(INVALID_ENV, f"{var} is not set",
                                f"required for {command}")
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and not _CONTAINER_ID.match(container_id):
        raise SockgateError(INVALID_ENV, "CNI_CONTAINERID has invalid characters",
                            repr(container_id))
    ifname = env.get("CNI_IFNAME", "")
    if ifname:
        _validate_ifname(ifname)
    return CNIRequest(command=command, container_id=container_id,
                      netns=env.get("CNI_NETNS", ""), ifname=ifname,
                      args=parse_cni_args(env.get("CNI_ARGS", "")), config=config)
