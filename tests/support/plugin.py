"""Drive the installed `sockgate` CNI executable the way a runtime does: environment
variables plus config on stdin, run inside the lab's node netns."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from runtime.fsutil import is_temp_name
from runtime.lab.agent import wait_until_ready  # noqa: F401 - where the tests import it from


@dataclass
class CNICall:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)

    @property
    def code(self) -> int | None:
        return self.json.get("code") if self.rc != 0 and self.stdout.strip() else None


@dataclass
class Plugin:
    exe: str
    node_netns: str  # path
    conf: dict
    calls: list[CNICall] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return Path(self.conf["stateDir"])

    def __call__(self, command: str, cid: str = "", netns: str = "", ifname: str = "eth0",
                 cni_args: str = "IgnoreUnknown=1", conf: dict | None = None,
                 stdin: bytes | None = None, env: dict | None = None, drop_env: tuple = (),
                 mount_ns: str = "") -> CNICall:
        """`mount_ns`: a mount namespace (/proc/<pid>/ns/mnt) to run the executable in,
        as a runtime in its own mount namespace would."""
        environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
                   "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
                   "CNI_ARGS": cni_args, "CNI_PATH": str(Path(self.exe).parent)}
        environ.update(env or {})
        for key in drop_env:
            environ.pop(key, None)
        data = stdin if stdin is not None else json.dumps(conf or self.conf).encode()
        mnt = [f"--mount={mount_ns}"] if mount_ns else []
        proc = subprocess.run(["nsenter", *mnt, f"--net={self.node_netns}", self.exe], env=environ,
                              input=data, capture_output=True, timeout=60)
        call = CNICall(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
        self.calls.append(call)
        return call

    def add(self, cid: str, netns: str, ifname: str = "eth0", **kw) -> dict:
        call = self("ADD", cid, netns, ifname, **kw)
        assert call.rc == 0, f"ADD failed: {call.stdout} {call.stderr}"
        return call.json

    def delete(self, cid: str, netns: str = "", ifname: str = "eth0", **kw) -> None:
        call = self("DEL", cid, netns, ifname, **kw)
        assert call.rc == 0 and call.stdout.strip() == "", f"DEL failed: {call.stdout} {call.stderr}"

    # What the plugin left behind, to prove a failure or a DEL leaves nothing.
    def leases(self) -> list[str]:
        return state_leftovers(self.state_dir, self.conf["name"])["leases"]

    def records(self) -> list[str]:
        return state_leftovers(self.state_dir, self.conf["name"])["records"]


def node_links(node_netns: str) -> set[str]:
    out = subprocess.run(["nsenter", f"--net={node_netns}", "ip", "-j", "link", "show"],
                         capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out) if link["ifname"].startswith("sg")}


def state_leftovers(state_dir: Path, network: str) -> dict[str, list[str]]:
    """The leases and attachment records of `network` under a state dir (empty lists
    when clean). Each list also holds the temp files (`.….tmp`: an atomic write that
    never got renamed) in its directory, so that "nothing left" means none of those
    either; the lease cursor (`.last-v4`, `.last-v6`) is not a leftover."""
    base = state_dir / "networks" / network

    def names(d: Path, pattern: str) -> list[str]:
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.glob(pattern) if not p.name.startswith(".")) + temp_files(d)
    return {"leases": names(base / "leases", "*"), "records": names(base / "attachments", "*.json")}


def temp_files(directory: Path) -> list[str]:
    """Names of the temp files in `directory` (runtime.fsutil.is_temp_name)."""
    return sorted(name for name in os.listdir(directory) if is_temp_name(name)) if directory.is_dir() else []


def nft_set(node_netns: str, name: str) -> list[str]:
    proc = subprocess.run(["nsenter", f"--net={node_netns}", "nft", "-j", "list", "set", "inet",
                           "sockgate", name], capture_output=True, text=True)
    if proc.returncode != 0:
        return []
    elems = []
    for item in json.loads(proc.stdout)["nftables"]:
        for e in item.get("set", {}).get("elem", []):
            elems.append(json.dumps(e) if not isinstance(e, str) else e)
    return elems
