"""CNI commands, one function each, all calling the core in runtime.core.attach.

Each handler takes a parsed request and returns the JSON to print (or None for
commands whose success prints nothing). Errors are SockgateError with the spec's code.
"""
from __future__ import annotations

from typing import Callable

from runtime.cni.request import CNIRequest
from runtime.cni.result import build_result
from runtime.core import attach as core
from runtime.core.netconf import NetConf, parse_netconf
from runtime.core.node import Node
from runtime.errors import INVALID_CONFIG, SockgateError

# Labels kept with the attachment (billing needs to know whose traffic it is).
_LABEL_ARGS = {"K8S_POD_NAMESPACE": "pod_namespace", "K8S_POD_NAME": "pod_name",
               "K8S_POD_UID": "pod_uid"}


def cmd_add(node: Node, req: CNIRequest, conf: NetConf) -> dict:
    labels = {_LABEL_ARGS[k]: v for k, v in req.args.items() if k in _LABEL_ARGS}
    att = core.attach(node, core.AttachRequest(conf=conf, container_id=req.container_id,
                                         ifname=req.ifname, netns=req.netns, labels=labels,
                                         runtime_config=conf.runtime_config))
    return build_result(att, conf, req.cni_version)


def cmd_del(node: Node, req: CNIRequest, conf: NetConf) -> None:
    core.detach(node, conf, req.container_id, req.ifname)


def cmd_check(node: Node, req: CNIRequest, conf: NetConf) -> None:
    core.check(node, conf, req.container_id, req.ifname, req.netns)


def cmd_status(node: Node, req: CNIRequest, conf: NetConf) -> None:
    core.status(node, conf)


def _valid_attachments(config: dict) -> set[tuple[str, str]]:
    raw = config.get("cni.dev/valid-attachments", config.get("cni.dev/attachments"))
    if raw is None:
        raise SockgateError(INVALID_CONFIG, "GC needs cni.dev/valid-attachments",
                            "refusing to treat every attachment as garbage")
    if not isinstance(raw, list) or not all(
            isinstance(a, dict) and isinstance(a.get("containerID"), str) and isinstance(a.get("ifname"), str)
            for a in raw):
        raise SockgateError(INVALID_CONFIG, "invalid network configuration: field "
                            "'cni.dev/valid-attachments' must be a list of {containerID, ifname}")
    return {(a["containerID"], a["ifname"]) for a in raw}


def cmd_gc(node: Node, req: CNIRequest, conf: NetConf) -> None:
    core.gc(node, conf, _valid_attachments(req.config))


HANDLERS: dict[str, Callable[[Node, CNIRequest, NetConf], dict | None]] = {
    "ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc,
}


def handle(req: CNIRequest, node: Node | None = None) -> dict | None:
    """`node`: the agent's; a plugin running the request in-process opens its own."""
    config = {k: v for k, v in req.config.items() if not k.startswith("cni.dev/")}
    conf = parse_netconf(config)
    return HANDLERS[req.command](node if node is not None else Node.open(), req, conf)
