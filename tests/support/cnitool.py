"""A small libcni look-alike for tests: run a CNI conflist the way runtimes do.

Behaviour follows libcni (containernetworking/cni ``libcni/api.go``) and the CNI
1.1.0 spec, section 3 "Execution of Network Configurations":

* ADD runs the plugins in order. Each gets its own config plus ``name`` and
  ``cniVersion`` of the list, ``prevResult`` = the previous plugin's result (none for
  the first), and ``runtimeConfig`` holding only the capability args whose key the
  plugin declares true in its ``capabilities`` (omitted when empty). The last result
  is cached and returned.
* DEL runs the plugins in reverse order with ``prevResult`` = the cached ADD result
  (cniVersion >= 0.4.0; no cache -> no prevResult), then drops the cache.
* CHECK (cniVersion >= 0.4.0, skipped with ``disableCheck``) runs in order with
  ``prevResult`` = the cached result.
* GC first DELs every cached attachment of this network that is not in the valid
  set, then (cniVersion >= 1.1.0) sends GC to each plugin with
  ``cni.dev/valid-attachments`` and ``cni.dev/attachments`` (libcni >= 1.2.3 sends
  both) and no CNI_CONTAINERID/NETNS/IFNAME. ``disableGC`` skips it all.
* STATUS (cniVersion >= 1.1.0) runs in order and stops at the first error.

Every invocation gets all six CNI_* variables (empty ones too, as libcni's
``Args.AsEnv`` does) on top of the caller's environment.

The cache is libcni's on-disk format (``<cache_dir>/results/<net>-<cid>-<ifname>``,
kind ``cniCacheV1``, config base64), so this module can also DEL attachments that a
real client (e.g. ``ctr run --cni -d``, which never sends DEL itself) left in a
private ``/var/lib/cni``: see ``cached_attachments`` and ``CNI.from_cache``.

Not done (unlike libcni): converting results between spec versions; plugin results
are passed on verbatim.
"""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

NetnsRunner = str | os.PathLike[str] | Callable[[list[str]], list[str]] | None

_CID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_NAME_RE = _CID_RE


class CNIError(Exception):
    """A plugin failed. ``code``/``msg``/``details`` come from its error JSON, if any."""

    def __init__(self, plugin: str, command: str, rc: int, stdout: Any, stderr: str) -> None:
        self.plugin, self.command, self.rc, self.stdout, self.stderr = plugin, command, rc, stdout, stderr
        err = stdout if isinstance(stdout, dict) else {}
        self.code: int | None = err.get("code")
        self.msg: str = err.get("msg", "")
        self.details: str = err.get("details", "")
        self.error_json: dict[str, Any] | None = err or None
        shown = json.dumps(err) if err else repr(stdout)[:500]
        super().__init__(f"CNI {command} failed in plugin {plugin!r} (exit {rc}): {shown}"
                         + (f"; stderr: {stderr.strip()[:500]}" if stderr.strip() else ""))


def _version_ge(v: str, ref: str) -> bool:
    def parse(s: str) -> tuple[int, ...]:
        return tuple(int(x) for x in (s or "0.1.0").split("."))
    return parse(v) >= parse(ref)


def _runner_prefix(netns_runner: NetnsRunner, argv: list[str]) -> list[str]:
    if netns_runner is None:
        return argv
    if callable(netns_runner):
        return netns_runner(argv)
    # nsenter --net only switches the network namespace: the plugin keeps the host's
    # mount namespace, so /proc/sys/net is the runner netns' but /sys is the host's.
    return ["nsenter", f"--net={os.fspath(netns_runner)}", *argv]


def exec_plugin(binary: str | os.PathLike[str], command: str, env: Mapping[str, str],
                stdin_dict: Mapping[str, Any] | bytes | str, netns_runner: NetnsRunner = None,
                timeout: float = 60.0) -> tuple[int, Any, str]:
    """Run one CNI plugin binary; return ``(rc, stdout, stderr)``.

    ``env`` is added to the current environment and ``CNI_COMMAND=command`` set.
    stdout is parsed JSON when it parses, else the raw text (e.g. empty for DEL).
    ``netns_runner``: a netns path to run the plugin in (via ``nsenter --net``) or a
    callable that wraps the argv. Raw bytes/str stdin is passed as is (for tests of
    malformed input).
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    full_env.update(env)
    full_env["CNI_COMMAND"] = command
    data = stdin_dict if isinstance(stdin_dict, (bytes, str)) else json.dumps(stdin_dict)
    raw = data.encode() if isinstance(data, str) else data
    proc = subprocess.run(_runner_prefix(netns_runner, [os.fspath(binary)]), input=raw, env=full_env,
                          capture_output=True, timeout=timeout)
    text = proc.stdout.decode(errors="replace")
    out: Any = text
    if text.strip():
        try:
            out = json.loads(text)
        except ValueError:
            pass
    return proc.returncode, out, proc.stderr.decode(errors="replace")


def find_plugin(plugin_type: str, path: Sequence[str | os.PathLike[str]]) -> Path:
    for d in path:
        p = Path(d) / plugin_type
        if p.is_file() and os.access(p, os.X_OK):
            return p
    raise FileNotFoundError(f"CNI plugin {plugin_type!r} not found in {[os.fspath(d) for d in path]}")


@dataclass
class Call:
    """One plugin invocation, kept for assertions and timing."""
    plugin: str
    command: str
    env: dict[str, str]
    stdin: dict[str, Any]
    rc: int
    stdout: Any
    stderr: str
    seconds: float


@dataclass
class CNI:
    """Runs one conflist like libcni. ``runner_netns``: where plugins execute (the
    "host" side of the veth, e.g. the lab's node netns); ``None`` = current netns."""
    conflist: Mapping[str, Any]
    path: Sequence[str | os.PathLike[str]]
    cache_dir: str | os.PathLike[str]
    runner_netns: NetnsRunner = None
    timeout: float = 60.0
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(f"invalid network name {self.name!r}")

    @classmethod
    def from_cache(cls, cache_dir: str | os.PathLike[str], attachment: Mapping[str, Any],
                   path: Sequence[str | os.PathLike[str]], runner_netns: NetnsRunner = None) -> "CNI":
        """A runner for the conflist that a cached attachment was added with."""
        return cls(json.loads(attachment["config"]), path, cache_dir, runner_netns)

    # ---- helpers -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.conflist["name"])

    @property
    def version(self) -> str:
        return str(self.conflist.get("cniVersion", "0.1.0"))

    def _cache_file(self, container_id: str, ifname: str) -> Path:
        return Path(self.cache_dir) / "results" / f"{self.name}-{container_id}-{ifname}"

    def cached_result(self, container_id: str, ifname: str = "eth0") -> dict[str, Any] | None:
        try:
            cached = json.loads(self._cache_file(container_id, ifname).read_text())
        except (OSError, ValueError):
            return None  # like libcni: an unreadable cache is no cache
        return cached.get("result") if cached.get("kind") == "cniCacheV1" else None

    @staticmethod
    def _args_list(args: Mapping[str, str] | Sequence[tuple[str, str]] | None) -> list[list[str]]:
        if args is None:
            return []
        items = args.items() if isinstance(args, Mapping) else args
        return [[str(k), str(v)] for k, v in items]

    def _plugin_conf(self, plugin: Mapping[str, Any], prev: Any, caps: Mapping[str, Any] | None) -> dict[str, Any]:
        conf = dict(plugin)
        conf["name"], conf["cniVersion"] = self.name, self.version
        if prev is not None:
            conf["prevResult"] = prev
        if caps is not None:
            rc = {k: caps[k] for k, on in (plugin.get("capabilities") or {}).items() if on and k in caps}
            if rc:
                conf["runtimeConfig"] = rc
        return conf

    def _run(self, plugin: Mapping[str, Any], command: str, conf: Mapping[str, Any], container_id: str = "",
             netns: str = "", ifname: str = "", args: list[list[str]] | None = None) -> Any:
        ptype = str(plugin["type"])
        binary = find_plugin(ptype, self.path)
        env = {"CNI_CONTAINERID": container_id, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
               "CNI_ARGS": ";".join(f"{k}={v}" for k, v in (args or [])),
               "CNI_PATH": os.pathsep.join(os.fspath(p) for p in self.path)}
        t0 = time.monotonic()
        rc, out, err = exec_plugin(binary, command, env, conf, self.runner_netns, self.timeout)
        self.calls.append(Call(ptype, command, env, dict(conf), rc, out, err, time.monotonic() - t0))
        if rc != 0:
            raise CNIError(ptype, command, rc, out, err)
        return out

    @staticmethod
    def _validate(container_id: str, ifname: str) -> None:
        # Same checks as libcni's utils.ValidateContainerID / ValidateInterfaceName.
        if not _CID_RE.match(container_id):
            raise ValueError(f"invalid container id {container_id!r}")
        if not ifname or len(ifname) > 15 or ifname in (".", "..") or re.search(r"[/:\s]", ifname):
            raise ValueError(f"invalid interface name {ifname!r}")

    # ---- commands ------------------------------------------------------------------
    def add(self, container_id: str, netns: str, ifname: str = "eth0",
            args: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
            capability_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self._validate(container_id, ifname)
        cargs = self._args_list(args)
        result: Any = None
        for plugin in self.conflist["plugins"]:
            conf = self._plugin_conf(plugin, result, capability_args or {})
            result = self._run(plugin, "ADD", conf, container_id, netns, ifname, cargs)
            if not isinstance(result, dict):
                raise CNIError(str(plugin["type"]), "ADD", 0, result, "ADD returned no JSON result")
        cached = {"kind": "cniCacheV1", "containerId": container_id,
                  "config": base64.b64encode(json.dumps(self.conflist).encode()).decode(),
                  "ifName": ifname, "networkName": self.name, "netns": netns,
                  "cniArgs": cargs or None, "capabilityArgs": dict(capability_args or {}) or None,
                  "result": result}
        f = self._cache_file(container_id, ifname)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({k: v for k, v in cached.items() if v is not None}))
        return result

    def check(self, container_id: str, netns: str, ifname: str = "eth0",
              args: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
              capability_args: Mapping[str, Any] | None = None) -> None:
        if not _version_ge(self.version, "0.4.0"):
            raise ValueError(f"configuration version {self.version!r} does not support the CHECK command")
        if self.conflist.get("disableCheck"):
            return
        prev = self.cached_result(container_id, ifname)
        for plugin in self.conflist["plugins"]:
            self._run(plugin, "CHECK", self._plugin_conf(plugin, prev, capability_args or {}),
                      container_id, netns, ifname, self._args_list(args))

    def delete(self, container_id: str, netns: str = "", ifname: str = "eth0",
               args: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
               capability_args: Mapping[str, Any] | None = None) -> None:
        prev = self.cached_result(container_id, ifname) if _version_ge(self.version, "0.4.0") else None
        for plugin in reversed(self.conflist["plugins"]):
            self._run(plugin, "DEL", self._plugin_conf(plugin, prev, capability_args or {}),
                      container_id, netns, ifname, self._args_list(args))
        self._cache_file(container_id, ifname).unlink(missing_ok=True)

    def gc(self, valid_attachments: Iterable[tuple[str, str]]) -> None:
        """``valid_attachments``: (container_id, ifname) pairs that must be kept."""
        if self.conflist.get("disableGC"):
            return
        valid = {(c, i) for c, i in valid_attachments}
        errors: list[Exception] = []
        for att in cached_attachments(self.cache_dir):
            if att["networkName"] != self.name or (att["containerId"], att["ifName"]) in valid:
                continue
            try:
                self.delete(att["containerId"], att.get("netns", ""), att["ifName"],
                            att.get("cniArgs"), att.get("capabilityArgs"))
            except CNIError as e:
                errors.append(e)
        if _version_ge(self.version, "1.1.0"):
            listed = [{"containerID": c, "ifname": i} for c, i in sorted(valid)]
            for plugin in self.conflist["plugins"]:
                conf = self._plugin_conf(plugin, None, None)
                conf["cni.dev/valid-attachments"] = listed
                conf["cni.dev/attachments"] = listed
                try:
                    self._run(plugin, "GC", conf)
                except CNIError as e:
                    errors.append(e)
        if errors:
            raise errors[0] if len(errors) == 1 else ExceptionGroup("CNI GC failed", errors)

    def status(self) -> None:
        if not _version_ge(self.version, "1.1.0"):
            return
        for plugin in self.conflist["plugins"]:
            self._run(plugin, "STATUS", self._plugin_conf(plugin, None, None))

    def version_info(self, plugin_type: str, cni_version: str = "1.1.0") -> dict[str, Any]:
        binary = find_plugin(plugin_type, self.path)
        env = {"CNI_CONTAINERID": "", "CNI_NETNS": "", "CNI_IFNAME": "", "CNI_ARGS": "",
               "CNI_PATH": os.pathsep.join(os.fspath(p) for p in self.path)}
        rc, out, err = exec_plugin(binary, "VERSION", env, {"cniVersion": cni_version}, self.runner_netns, self.timeout)
        if rc != 0 or not isinstance(out, dict):
            raise CNIError(plugin_type, "VERSION", rc, out, err)
        return out


def cached_attachments(cache_dir: str | os.PathLike[str], container_id: str | None = None) -> list[dict[str, Any]]:
    """libcni-format cached attachments (``config`` decoded to the conflist text)."""
    found = []
    results = Path(cache_dir) / "results"
    for f in sorted(results.iterdir()) if results.is_dir() else []:
        try:
            c = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if c.get("kind") != "cniCacheV1" or not c.get("ifName") or not c.get("networkName"):
            continue
        if container_id is not None and c.get("containerId") != container_id:
            continue
        c["config"] = base64.b64decode(c.get("config", "")).decode()
        found.append(c)
    return found


RECORDER_PLUGIN = r'''#!/usr/bin/python3
# A CNI plugin for tests: appends {"env": CNI_*, "stdin": config} as one JSON line to
# the config's "logFile", then behaves as a pass-through plugin (echoes prevResult).
import json, os, sys
cmd = os.environ.get("CNI_COMMAND", "")
conf = json.load(sys.stdin)
with open(conf["logFile"], "a") as f:
    f.write(json.dumps({"env": {k: v for k, v in os.environ.items() if k.startswith("CNI_")}, "stdin": conf}) + "\n")
if cmd == "VERSION":
    print(json.dumps({"cniVersion": conf.get("cniVersion", "1.1.0"),
                      "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}))
elif cmd == "ADD":
    print(json.dumps(conf.get("prevResult") or {"cniVersion": conf["cniVersion"]}))
'''


def write_recorder_plugin(bin_dir: str | os.PathLike[str], name: str = "recorder") -> Path:
    """Install the recording pass-through plugin as ``bin_dir/name``."""
    p = Path(bin_dir) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(RECORDER_PLUGIN)
    p.chmod(0o755)
    return p


def read_records(log_file: str | os.PathLike[str]) -> list[dict[str, Any]]:
    p = Path(log_file)
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
