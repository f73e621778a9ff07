"""Debian's podman (4.3, CNI backend) inside a lab network namespace, with every file
of its own under a per-test directory.

What was checked on Debian 12 (podman 4.3.1+ds1, conmon 2.1.6, runc 1.1.5, cgroup v1,
ext4 root):

* Config comes only from files we write: ``CONTAINERS_CONF`` (podman then reads no
  other containers.conf), ``CONTAINERS_STORAGE_CONF`` (private graphroot/runroot,
  driver overlay) and ``CONTAINERS_REGISTRIES_CONF`` (no registries).
  containers.conf holds ``[network] network_backend = "cni"``,
  ``network_config_dir`` (the conflist dir; libcni's ``cni.lock`` is taken there) and
  ``cni_plugin_dirs``; ``[containers] default_ulimits = []`` (without it runc fails:
  this machine doesn't allow raising rlimits); ``[engine]`` cgroupfs,
  ``tmp_dir``, file events log, file locks (instead of /dev/shm/libpod_lock).
* podman's libcni (1.1.x) knows CNI versions up to 1.0.0 and calls VERSION when it
  loads a conflist, keeping the network only if the conflist's ``cniVersion`` is in
  the plugin's ``supportedVersions``: use ``"cniVersion": "1.0.0"``.
* Even so, podman and runc write on the host: the blob info cache
  (/var/lib/containers/cache), /run/containers, /run/runc (runc's default root),
  libcni's result cache (/var/lib/cni), and the named netns it creates per container
  (/run/netns/netns-<uuid>). All run in one private mount namespace per ``Podman``,
  held open by a ``sleep`` (``holder``) and set up by ``containerd.private_mounts``,
  with per-test directories bound over those paths. Every podman command joins it
  (``nsenter --mount``), so the netns mounts of a detached container stay visible to
  the ``podman rm`` that comes later. Inside it /run/netns is private too: the lab's
  namespaces are not visible there, which nothing needs (podman is already in the
  node netns when it starts).
* Plugins run in podman's netns (the node's) and mount namespace. CNI_ARGS carry
  ``K8S_POD_NAME=<container name>`` (sockgate keeps it as the label ``pod_name``).
* podman refuses a ``--runroot`` longer than 50 characters, and the ``podman
  container cleanup`` that conmon runs when a container exits gets the runroot as that
  option: it then fails (exit 125, output lost), a detached container that exits is
  never cleaned up (no CNI DEL) until ``podman rm``, and ``podman wait`` hangs 20 s.
  So the runroot is a short mkdtemp under /tmp, not under ``workdir``.
* cgroups: ``podman run``/``create`` always get ``--cgroup-parent /sgt-podman-<hex>``
  (``argv()`` adds it; podman's default, /libpod_parent, would be shared). The
  container goes to ``<parent>/libpod-<id>`` and conmon to ``<parent>/conmon`` in
  every hierarchy, and those stay behind: ``stop()`` removes them.
* conmon outlives the podman that started it (it runs ``podman container cleanup``
  when the container exits, with the same global options and CONTAINERS_CONF).
  ``stop()`` removes all containers, then kills any conmon still naming this
  instance's directory, then the holder, so the mount namespace goes away with it.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from runtime.lab import LAB

from .containerd import private_mounts
from .service import Service

# Host paths podman (or runc, libcni) writes to even with a private root/runroot.
# Missing ones are created in an overlay over their parent, at most two deep (overlayfs'
# stacking limit): two under /run, two under /var/lib. tmp_dir replaces /run/libpod.
_PRIVATE = ("/var/lib/containers", "/run/containers", "/run/runc", "/var/lib/cni", "/run/netns",
            "/etc/cni/net.d")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class PodmanResult:
    rc: int
    stdout: str
    stderr: str
    seconds: float


class Podman(Service):
    """podman in network namespace ``netns_path``; its files under ``workdir`` (but the
    runroot, see above). ``network_dir`` holds the conflists (podman's
    network_config_dir), ``plugin_dir`` the CNI executables.

    Use as a context manager. ``stop()`` removes containers (sending CNI DEL through
    podman), kills leftover conmons and the mount-namespace holder, removes the
    cgroups and every file under ``workdir`` except the logs."""

    def __init__(self, netns_path: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                 network_dir: str | os.PathLike[str], plugin_dir: str | os.PathLike[str],
                 storage_driver: str = "overlay", cgroup_parent: str | None = None) -> None:
        self.netns_path = os.fspath(netns_path)
        self.workdir = Path(workdir).resolve()
        self.network_dir = Path(network_dir).resolve()
        self.plugin_dir = Path(plugin_dir).resolve()
        self.storage_driver = storage_driver
        self.cgroup_parent = cgroup_parent or f"sgt-podman-{secrets.token_hex(4)}"
        self.log_path = self.workdir / "podman.log"
        self.holder: subprocess.Popen[bytes] | None = None
        self.runroot: Path | None = None  # short, outside workdir: see start()
        self._dirs = {p: self.workdir / "priv" / p.strip("/").replace("/", "-") for p in _PRIVATE}

    # ---- lifecycle -----------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        w = self.workdir
        return {"PATH": PATH, "HOME": str(w / "home"), "TMPDIR": str(w / "tmp"),
                "CONTAINERS_CONF": str(w / "containers.conf"),
                "CONTAINERS_STORAGE_CONF": str(w / "storage.conf"),
                "CONTAINERS_REGISTRIES_CONF": str(w / "registries.conf")}

    def start(self) -> None:
        w = self.workdir
        # Short: podman refuses a --runroot over 50 characters (see the module docstring).
        self.runroot = Path(tempfile.mkdtemp(prefix="sgpm-", dir="/tmp")) / "runroot"
        if len(str(self.runroot)) > 50:
            raise ValueError(f"podman runroot too long: {self.runroot}")
        self.runroot.mkdir()
        for d in ("root", "tmp", "home", "libpod-tmp", "scratch", *self._dirs.values()):
            (w / d).mkdir(parents=True, exist_ok=True)
        (w / "containers.conf").write_text(f'''[containers]
default_ulimits = []
log_driver = "k8s-file"

[network]
network_backend = "cni"
network_config_dir = "{self.network_dir}"
cni_plugin_dirs = ["{self.plugin_dir}"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{w}/events.log"
lock_type = "file"
runtime = "runc"
tmp_dir = "{w}/libpod-tmp"
image_copy_tmp_dir = "{w}/tmp"
''')
        (w / "storage.conf").write_text(f'''[storage]
driver = "{self.storage_driver}"
graphroot = "{w}/root"
runroot = "{self.runroot}"
''')
        (w / "registries.conf").write_text("unqualified-search-registries = []\n")
        binds = {p: d for p, d in self._dirs.items()}
        # setpriv: the holder dies with this process even when it is SIGKILLed.
        argv = ["setpriv", "--pdeathsig", "KILL", *private_mounts(binds, w / "scratch", ["sleep", "infinity"])]
        with self.log_path.open("ab") as log:
            self.holder = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                           start_new_session=True)
        # setpriv, unshare and sh exec: the holder's pid runs sleep once the mounts are done.
        deadline = time.monotonic() + 10
        while True:
            if self.holder.poll() is not None:
                raise RuntimeError(f"mount namespace holder exited with {self.holder.returncode}: "
                                   f"{self.log_tail()}")
            try:
                if Path(f"/proc/{self.holder.pid}/comm").read_text().strip() == "sleep":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("mount namespace holder not ready")
            time.sleep(0.01)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        errors: list[str] = []
        if self.holder is not None and self.holder.poll() is None:
            r = self.podman("rm", "--all", "--force", "--time", "0", timeout=120)
            if r.rc != 0:
                errors.append(f"podman rm --all: {r.stderr.strip()}")
        self._kill_conmons()
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait(10)
        self._remove_cgroups(errors)
        if self.runroot is not None:
            shutil.rmtree(self.runroot.parent, ignore_errors=True)
        for p in self.workdir.iterdir() if self.workdir.is_dir() else ():
            if p.name in ("podman.log", "events.log"):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if errors:
            raise RuntimeError("podman cleanup: " + "; ".join(errors))

    def _kill_conmons(self) -> None:
        needle = str(self.workdir).encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if args and os.path.basename(args[0]) == b"conmon" and any(needle in a for a in args):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cgroups(self) -> list[Path]:
        """This instance's cgroup directories that exist (every hierarchy)."""
        root = Path("/sys/fs/cgroup")
        tops = [root / self.cgroup_parent] + [d / self.cgroup_parent for d in root.iterdir() if d.is_dir()]
        return [t for t in tops if t.is_dir()]

    def _remove_cgroups(self, errors: list[str]) -> None:
        for top in self.cgroups():
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                for _ in range(50):  # a killed task leaves its cgroup a moment later
                    try:
                        os.rmdir(dirpath)
                        break
                    except OSError as e:
                        err = e
                        time.sleep(0.05)
                else:
                    errors.append(f"rmdir {dirpath}: {err}")

    # ---- podman --------------------------------------------------------------------
    def argv(self, *args: str) -> list[str]:
        if self.holder is None or self.holder.poll() is not None:
            raise RuntimeError("podman: not started")
        argl = list(args)
        sub = 1 if argl[:1] == ["container"] else 0
        if argl[sub:sub + 1] in (["run"], ["create"]) and not any(a.startswith("--cgroup-parent") for a in argl):
            # Without it podman uses /libpod_parent, shared with everything else.
            argl[sub + 1:sub + 1] = ["--cgroup-parent", f"/{self.cgroup_parent}"]
        return ["nsenter", f"--net={self.netns_path}", f"--mount=/proc/{self.holder.pid}/ns/mnt",
                "--", "podman", *argl]

    def podman(self, *args: str, timeout: float = 60.0, input: str | None = None,
               check: bool = False) -> PodmanResult:
        t0 = time.monotonic()
        proc = subprocess.run(self.argv(*args), check=False, capture_output=True, text=True, timeout=timeout,
                              input=input, env=self.env, cwd="/")
        res = PodmanResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)
        with self.log_path.open("a") as log:
            log.write(f"$ podman {' '.join(args)}\nrc={res.rc} {res.seconds:.2f}s\n{res.stderr}")
        if check and res.rc != 0:
            raise RuntimeError(f"podman {' '.join(args)} failed ({res.rc}): {res.stderr.strip()}")
        return res

    def import_image(self, rootfs_tar: str | os.PathLike[str], ref: str) -> str:
        """``podman import`` a rootfs tar as ``ref``; returns the image id."""
        r = self.podman("import", "--change", "CMD=/bin/sh", os.fspath(rootfs_tar), ref, timeout=120, check=True)
        return r.stdout.strip().splitlines()[-1]

    def run(self, image: str, cmd: Sequence[str], *, network: str, name: str | None = None,
            detach: bool = False, extra_args: Sequence[str] = (), timeout: float = 60.0) -> PodmanResult:
        """``podman run --rm`` (foreground) or ``podman run -d`` on ``network``; never pulls."""
        mode = ["-d"] if detach else ["--rm"]
        named = ["--name", name] if name else []
        return self.podman("run", *mode, *named, "--pull=never", "--network", network, *extra_args,
                           image, *cmd, timeout=timeout)

    def networks(self) -> list[dict]:
        return json.loads(self.podman("network", "ls", "--format", "json", check=True).stdout or "[]")

    def netns_files(self) -> list[str]:
        """Named network namespaces podman made (in the private /run/netns)."""
        return sorted(os.listdir(self._dirs["/run/netns"]))

    def processes(self) -> list[int]:
        """Processes whose command line names this instance's directory (conmon, the
        container's podman cleanup) or that run in its mount namespace."""
        needle = str(self.workdir).encode()
        mnt = os.readlink(f"/proc/{self.holder.pid}/ns/mnt") if self.holder and self.holder.poll() is None else None
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes()
                ns = os.readlink(f"/proc/{pid}/ns/mnt")
            except OSError:
                continue
            if int(pid) != (self.holder.pid if self.holder else -1) and (needle in args or (mnt and ns == mnt)):
                found.append(int(pid))
        return found


# ---- the outbound contract, checked with busybox tools inside a container ------------
# (shared with tests/test_ctr_contract.py: the same script under another runtime)

def sections(out: str) -> dict[str, str]:
    """Split a script's output at "@name rc=N" markers: {"name": "<output>rc=N"}."""
    result, buf = {}, []
    for line in out.splitlines():
        m = re.fullmatch(r"@(\S+) (rc=\d+)", line)
        if m:
            result[m.group(1)] = "\n".join([*buf, m.group(2)])
            buf = []
        else:
            buf.append(line)
    return result


def peers(text: str) -> list[str]:
    """Sources the lab echo server reported (its first line per connection, JSON)."""
    return [json.loads(line)["peer"] for line in text.splitlines() if line.startswith("{")]


# Each step ends with "@<name> rc=<exit code>"; stderr is merged (nc's errors).
CONTRACT_SCRIPT = "; ".join([
    "exec 2>&1",
    "ip -4 addr show eth0; ip -6 addr show eth0 scope global; echo @addr rc=$?",
    f"echo hello | nc -w 3 {LAB.public_v4} 9000; echo @public4 rc=$?",
    f"echo hello6 | nc -w 3 {LAB.public_v6} 9000; echo @public6 rc=$?",
    f"echo x | nc -w 3 {LAB.google_v4} 443; echo @google4 rc=$?",
    f"echo x | nc -w 3 {LAB.google_v6} 443; echo @google6 rc=$?",
    f"echo x | nc -w 3 {LAB.public_v4} 25; echo @smtp25 rc=$?",
    f"nslookup smtp.gmail.com {LAB.dns_v4[0]}; echo @dns rc=$?",
])


def assert_contract(out: str) -> None:
    """CONTRACT_SCRIPT's output shows the contract: out with the node's address, Google
    and port 25 refused at once, Google Public DNS answering."""
    s = sections(out)
    assert set(s) >= {"addr", "public4", "public6", "google4", "google6", "smtp25", "dns"}, out
    assert "inet 10.77." in s["addr"] and "inet6 fd77:5067:6174::" in s["addr"], s["addr"]
    assert peers(s["public4"]) == [LAB.node_uplink_v4] and "hello" in s["public4"], s["public4"]
    assert peers(s["public6"]) == [LAB.node_uplink_v6] and "hello6" in s["public6"], s["public6"]
    # Refused (a reset), not timed out: nc -w 3 would say "timed out".
    for step in ("google4", "google6", "smtp25"):
        assert "Connection refused" in s[step] and s[step].endswith("rc=1"), (step, s[step])
    assert "Address: " + LAB.gmail["smtp.gmail.com"][0] in s["dns"] and s["dns"].endswith("rc=0"), s["dns"]
