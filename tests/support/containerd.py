"""A private containerd inside a lab network namespace, and ``ctr run --cni``.

What was checked on Debian 12 (containerd/ctr 1.6.20~ds1, runc 1.1.5, cgroup v1
hybrid, ext4 root):

* ``ctr run --cni`` does the CNI calls in the ctr process itself (go-cni/libcni):
  it reads the first file of ``/etc/cni/net.d`` and passes
  ``CNI_PATH=/opt/cni/bin:/usr/lib/cni`` (Debian adds /usr/lib/cni, so the stock
  plugins are found even with an empty /opt/cni/bin), and caches results in
  ``/var/lib/cni/results``. Plugins run in ctr's netns and mount namespace. The
  container id is ``<namespace>-<name>``, ifname ``eth0``, CNI_ARGS empty (no
  IgnoreUnknown), no capability args.
* ``ctr run --rm --cni`` (foreground) sends DEL when the task exits, with
  ``CNI_NETNS=""`` and the cached ADD result as prevResult.
* ``ctr run -d --cni``, then ``ctr task kill``/``task delete``/``container rm``:
  no DEL at all (lease and libcni cache stay). ``remove()`` below therefore sends the
  DEL itself from ctr's libcni cache, the way ``ctr run --rm`` would (empty netns).
* None of ``/etc/cni/net.d``, ``/opt/cni/bin``, ``/var/lib/cni``, ``/run/containerd``
  may be touched on the host (and the last three don't even exist here), so every
  containerd/ctr process runs in a private mount namespace (``private_mounts``) that
  binds per-test directories over them; missing mount points are created in an
  overlay over their parent, inside that namespace only.
* Gotcha for plugins run by ctr: they inherit that mount namespace. Where
  /run/containerd, /var/lib/cni or /opt/cni/bin don't exist on the host, /run,
  /var/lib or /opt are overlays there: existing subdirectories (e.g. /run/netns,
  /run/sockgate) are bound back and write-through, but a directory the plugin
  *creates* directly in /run or /var/lib lands in a tmpfs and is gone when ctr
  exits. Give the plugin state/run dirs that exist beforehand (tests: under tmp).
* containerd 1.6 hard-codes shim sockets to ``/run/containerd/s/`` and runc's root to
  ``/run/containerd/runc/<ns>``: covered by the private /run/containerd.
  ``io.containerd.runtime.v1.linux`` must stay enabled (tasks service needs it);
  CRI and ``opt`` (which would create /opt/containerd) are disabled.
* runc puts tasks in cgroup ``/<namespace>/<id>`` in every hierarchy and leaves the
  ``/<namespace>`` directories behind: ``stop()`` removes them, so each instance
  uses its own namespace ``sgt-<hex>``.
* Snapshotter: overlayfs works here (probe falls back to native if it doesn't).
* Right after ADD the container side of a ptp veth may still show NO-CARRIER in
  ``ip link`` (IFF_RUNNING is set by the kernel's linkwatch a moment later), while
  ``carrier`` is 1 and traffic already flows.
* Timings here (2 cores): containerd ready ~0.3 s (incl. the snapshotter probe),
  image import 0.2-0.5 s, any ctr call >= 0.1 s (nsenter + mounts + ctr), ``ctr run
  --rm --cni`` with ptp+host-local 0.4-0.6 s, ``remove()`` ~0.4 s, ``stop()`` ~0.5 s.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from runtime.lab.policy import write_lab_policy

from . import cnitool
from .service import Service

# sh script run as: unshare -m --propagation private sh -c SCRIPT sh SCRATCH [TARGET SOURCE]... -- CMD...
# Binds each SOURCE dir over TARGET, then execs CMD. A missing TARGET is created in an
# overlay over its nearest existing ancestor (upper layer on a private tmpfs); that
# ancestor's subdirectories are bound back so they stay write-through (e.g.
# /var/lib/sockgate under an overlaid /var/lib) and keep their submounts.
# mount -n: without it libmount creates /run/mount (utab) on the host.
_PRIVMOUNT_SH = r'''set -e
S=$1; shift
mount -n -t tmpfs -o mode=0700 sgt-scratch "$S"
i=0
ensure_dir() {
  [ -d "$1" ] && return 0
  a=$1
  while [ ! -e "$a" ]; do a=$(dirname "$a"); done
  if [ ! -d "$a" ] || [ "$a" = / ]; then echo "private_mounts: cannot create $1 (nearest: $a)" >&2; exit 1; fi
  i=$((i+1)); mkdir -p "$S/$i/orig" "$S/$i/u" "$S/$i/w"
  mount -n --rbind "$a" "$S/$i/orig"
  mount -n -t overlay sgt-shadow -o "lowerdir=$a,upperdir=$S/$i/u,workdir=$S/$i/w" "$a"
  for e in "$S/$i/orig"/* "$S/$i/orig"/.[!.]*; do
    if [ -d "$e" ] && [ ! -L "$e" ]; then mount -n --rbind "$e" "$a/${e##*/}"; fi
  done
  mkdir -p "$1"
}
while [ "$1" != -- ]; do ensure_dir "$1"; mount -n --bind "$2" "$1"; shift 2; done
shift
exec "$@"
'''


def private_mounts(binds: Mapping[str, str | os.PathLike[str]], scratch: str | os.PathLike[str],
                   argv: Sequence[str]) -> list[str]:
    """argv that runs ``argv`` in a new private mount namespace with ``binds``
    (target dir -> source dir). ``scratch`` must be an existing empty directory; a
    tmpfs is mounted on it inside the namespace only. Nothing changes on the host."""
    pairs: list[str] = []
    for target, source in binds.items():
        pairs += [target, os.fspath(source)]
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", _PRIVMOUNT_SH, "sh",
            os.fspath(scratch), *pairs, "--", *argv]


def pick_snapshotter(workdir: str | os.PathLike[str]) -> str:
    """overlayfs if an overlay mount works on ``workdir``'s filesystem, else native."""
    probe = Path(workdir) / ".ovl-probe"
    for d in ("l", "u", "w", "m"):
        (probe / d).mkdir(parents=True, exist_ok=True)
    try:
        rc = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-n", "-t", "overlay", "probe", "-o",
                             f"lowerdir={probe}/l,upperdir={probe}/u,workdir={probe}/w", f"{probe}/m"],
                            capture_output=True, timeout=10).returncode
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return "overlayfs" if rc == 0 else "native"


@dataclass
class CtrResult:
    rc: int
    stdout: str
    stderr: str
    seconds: float


class Containerd(Service):
    """Debian's containerd running in network namespace ``netns_path`` with all of its
    files under ``workdir`` (keep the path short: unix socket paths max 107 bytes).

    Use as a context manager. ``stop()`` kills and deletes tasks, sends CNI DEL for
    detached ``--cni`` containers started through ``ctr_run_cni``, stops containerd and
    leftover shims, removes its cgroups and its files (the log file stays)."""

    def __init__(self, netns_path: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                 snapshotter: str | None = None, namespace: str | None = None,
                 start_timeout: float = 30.0) -> None:
        self.netns_path = os.fspath(netns_path)
        self.workdir = Path(workdir).resolve()
        self.namespace = namespace or f"sgt-{secrets.token_hex(4)}"
        # The top cgroup directory runc leaves behind (removed at stop()).
        self.cgroup_top = self.namespace
        self.address = str(self.workdir / "containerd.sock")
        if len(self.address) > 100:
            raise ValueError(f"workdir path too long for a unix socket: {self.address}")
        self.snapshotter = snapshotter
        self.start_timeout = start_timeout
        self.log_path = self.workdir / "containerd.log"
        self.run_dir = self.workdir / "run"          # bound over /run/containerd
        self.cni_cache_dir = self.workdir / "cni-cache"  # bound over /var/lib/cni for ctr
        self.proc: subprocess.Popen[bytes] | None = None
        # detached --cni containers: name -> (conf dir, bin dir), for DEL at removal
        self.cni_containers: dict[str, tuple[Path, Path]] = {}
        self._created: list[Path] = []

    # ---- lifecycle -----------------------------------------------------------------
    def _mkdir(self, p: Path) -> Path:
        if not p.exists():
            p.mkdir(parents=True)
            self._created.append(p)
        return p

    def _scratch(self) -> Path:
        # One per invocation (a tmpfs is mounted on it inside that namespace only);
        # removed with "scratch" at stop().
        p = self.workdir / "scratch" / secrets.token_hex(4)
        p.mkdir(parents=True)
        return p

    def _wrap(self, argv: Sequence[str], binds: Mapping[str, str | os.PathLike[str]]) -> list[str]:
        return ["nsenter", f"--net={self.netns_path}", *private_mounts(binds, self._scratch(), argv)]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in ("root", "state", "run", "cni-cache", "scratch"):
            self._mkdir(self.workdir / d)
        if self.snapshotter is None:
            self.snapshotter = pick_snapshotter(self.workdir / "root")
        config = self.workdir / "config.toml"
        config.write_text(f'''version = 2
root = "{self.workdir}/root"
state = "{self.workdir}/state"
# cri would read the host's /etc/cni; opt would create /opt/containerd
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
''')
        self._created.append(config)
        self._launch(self._wrap(["containerd", "-c", str(config)], {"/run/containerd": self.run_dir}))

    def _launch(self, argv: list[str]) -> None:
        """Start containerd with `argv` and wait until it answers."""
        with self.log_path.open("ab") as log:
            # nsenter, unshare and sh all exec: self.proc.pid is containerd's pid.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.address) and self.ctr("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.05)
        raise TimeoutError(f"containerd not ready after {self.start_timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        errors: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._remove_all()
            except Exception as e:  # keep going: the rest of the cleanup must still run
                errors.append(f"removing containers: {e}")
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._kill_shims()
        self._remove_cgroups(errors)
        for p in reversed(self._created):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        self._created.clear()
        for name in ("containerd.sock", "containerd.sock.ttrpc"):
            (self.workdir / name).unlink(missing_ok=True)
        if errors:
            raise RuntimeError("containerd cleanup: " + "; ".join(errors))

    def _remove_all(self) -> None:
        for name in self.ctr("containers", "ls", "-q", timeout=30).stdout.split():
            self.remove(name)

    def _kill_shims(self) -> None:
        # Shims are reparented to init and outlive containerd; find ours by address.
        needle = self.address.encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-address" in args and needle in args and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _remove_cgroups(self, errors: list[str]) -> None:
        root = Path("/sys/fs/cgroup")
        tops = [root / self.cgroup_top] + [d / self.cgroup_top for d in root.iterdir() if d.is_dir()]
        for top in tops:
            if not top.is_dir():
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError as e:
                    errors.append(f"rmdir {dirpath}: {e}")

    # ---- ctr -----------------------------------------------------------------------
    def ctr(self, *args: str, cni_conf_dir: str | os.PathLike[str] | None = None,
            cni_bin_dir: str | os.PathLike[str] | None = None, timeout: float = 60.0,
            check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a <sock> -n <namespace> args...`` in the netns, with private
        /run/containerd (fifos), /var/lib/cni (libcni cache) and, if given, CNI dirs."""
        binds: dict[str, str | os.PathLike[str]] = {"/run/containerd": self.run_dir,
                                                    "/var/lib/cni": self.cni_cache_dir}
        if cni_conf_dir is not None:
            binds["/etc/cni/net.d"] = cni_conf_dir
        if cni_bin_dir is not None:
            binds["/opt/cni/bin"] = cni_bin_dir
        argv = self._wrap(["ctr", "-a", self.address, "-n", self.namespace, *args], binds)
        env = {**os.environ, "CONTAINERD_SNAPSHOTTER": self.snapshotter or ""}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def import_image(self, archive: str | os.PathLike[str]) -> list[str]:
        """``ctr images import`` (unpacks too); returns the image names in the store."""
        self.ctr("images", "import", os.fspath(archive), timeout=120)
        return self.ctr("images", "ls", "-q").stdout.split()

    def remove(self, name: str, *, cni_del: bool = True) -> None:
        """Kill and delete ``name``'s task, send the CNI DEL that ``ctr`` never sends
        for detached containers, then delete the container and its snapshot."""
        self.ctr("tasks", "kill", "-s", "KILL", name, check=False, timeout=30)
        for _ in range(100):  # the task must have stopped before it can be deleted
            r = self.ctr("tasks", "delete", name, check=False, timeout=30)
            if r.returncode == 0 or "not found" in r.stderr:
                break
            time.sleep(0.05)
        dirs = self.cni_containers.pop(name, None)
        if cni_del and dirs is not None:
            self.cni_del(name, cni_bin_dir=dirs[1])
        self.ctr("containers", "rm", name, check=False, timeout=30)

    def cni_del(self, name: str, cni_bin_dir: str | os.PathLike[str] | None = None) -> int:
        """DEL every attachment ctr cached for container ``name`` (as ``ctr run --rm``
        does: ``CNI_NETNS=""``, prevResult from the cache). Returns how many."""
        path = ([cni_bin_dir] if cni_bin_dir is not None else []) + ["/usr/lib/cni"]
        atts = cnitool.cached_attachments(self.cni_cache_dir, f"{self.namespace}-{name}")
        for att in atts:
            cni = cnitool.CNI.from_cache(self.cni_cache_dir, att, path, runner_netns=self.netns_path)
            cni.delete(att["containerId"], "", att["ifName"], att.get("cniArgs"), att.get("capabilityArgs"))
        return len(atts)


def sockgate_conflist_dir(tmp: Path, network: str) -> tuple[Path, dict]:
    """A net.d under tmp holding one conflist with sockgate (state, run dir, log and
    the lab policy under tmp); returns it and the plugin's config."""
    conf_dir = tmp / "net.d"
    conf_dir.mkdir()
    plugin = {"type": "sockgate", "stateDir": str(tmp / "state"), "runDir": str(tmp / "run"),
              "logFile": str(tmp / "cni.log"), "policyFile": str(write_lab_policy(tmp / "policy.json"))}
    # Debian 12's containerd 1.6 links a libcni that predates CNI 1.1.0.
    (conf_dir / "10-sockgate.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": network, "plugins": [plugin]}))
    return conf_dir, plugin


def ctr_run_cni(containerd: Containerd, image: str, name: str, cmd: Sequence[str],
                cni_conf_dir: str | os.PathLike[str], cni_bin_dir: str | os.PathLike[str], *,
                detach: bool = False, timeout: float = 60.0, extra_args: Sequence[str] = ()) -> CtrResult:
    """``ctr run --cni`` with private CNI dirs bound over /etc/cni/net.d and
    /opt/cni/bin (``/usr/lib/cni`` stays on CNI_PATH, after it).

    Foreground (default): ``--rm``; ctr sends ADD, runs ``cmd``, sends DEL (empty
    CNI_NETNS) and removes the container; returns its exit code and output.
    ``detach=True``: ``-d``; returns once the task runs. Remove it with
    ``containerd.remove(name)`` (or let ``stop()`` do it), which sends the DEL."""
    mode = ["-d"] if detach else ["--rm"]
    t0 = time.monotonic()
    proc = containerd.ctr("run", "--cni", *mode, *extra_args, image, name, *cmd, cni_conf_dir=cni_conf_dir,
                          cni_bin_dir=cni_bin_dir, timeout=timeout, check=False)
    if detach and proc.returncode == 0:
        containerd.cni_containers[name] = (Path(cni_conf_dir), Path(cni_bin_dir))
    return CtrResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)
