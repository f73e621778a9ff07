"""A private Docker host for tests: Debian's dockerd in the lab's node netns, in a
mount namespace of its own, with the sockgate agent able to join it.

What was checked on Debian 12 (docker.io 20.10.24, containerd 1.6.20, runc 1.1.5,
cgroup v1, this kernel without loadable modules or AppArmor):

* dockerd runs as ``nsenter --mount=<ns> --net=<node netns> dockerd --config-file …``
  (nsenter, never ``ip netns exec``: that remounts /sys and dockerd then fails on
  cgroups). Everything it writes lives under a per-instance work dir:
  ``data-root``, ``exec-root``, ``pidfile`` and the API socket are given to it, and
  the paths it hard-codes or defaults to are private binds in its mount namespace:
  /run/docker (libnetwork's external-key sockets, **the plugin dir
  /run/docker/plugins**, sandbox netns files), /var/lib/docker, /etc/docker
  (key.json, daemon.json, plugin specs), /run/containerd (containerd 1.6 shim
  sockets), /var/lib/containerd and /opt/containerd (containerd's ``opt`` plugin).
  Missing mount points are created in an overlay over their parent, inside that
  namespace only (``containerd.private_mounts``).
* The mount namespace is held by a ``sleep`` process, so dockerd can be stopped and
  started again in the *same* namespace (a dockerd restart keeps the sandbox netns
  bind mounts under /run/docker/netns), and so the agent can run in it too: Docker
  hands the driver a SandboxKey (``/var/run/docker/netns/<id>``) that is a bind
  mount visible only inside dockerd's mount namespace. In production both share the
  host's; here ``enter()`` puts the agent next to dockerd.
* iptables: dockerd runs ``iptables``/``ip6tables`` from PATH. A private bin dir of
  symlinks first on its PATH picks the backend (``iptables-nft`` or
  ``iptables-legacy``) for this dockerd only; ``update-alternatives`` would change
  the host. Its rules land in the node netns only. dockerd sets the FORWARD policy
  to DROP only when it has to turn forwarding on itself, so ``start()`` turns the
  node's forwarding off first: the node then looks like a host where Docker
  enabled forwarding (the lab's own traffic is not forwarded by the node).
* ``--bridge=none``: no docker0 (and no bridge netfilter) is needed for the driver's
  tests; Docker's firewall (FORWARD policy DROP, DOCKER-USER, DOCKER-ISOLATION-*)
  is set up all the same. IPv6 firewalling needs ``--experimental --ip6tables`` in
  20.10.
* Containers go into cgroup ``/<cgroup-parent>/<id>`` in every hierarchy
  (cgroupfs driver); ``stop()`` kills what is left there and removes the cgroups.
* ``stop()``: ``docker rm -f`` of every container, dockerd stopped (SIGTERM, then
  SIGKILL), every process left in the mount namespace or the cgroups killed, the
  cgroups and the work dir removed. Also after a failed start.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from .containerd import private_mounts
from .plugin import wait_until_ready
from .service import Service

IPTABLES_TOOLS = ("iptables", "iptables-save", "iptables-restore",
                  "ip6tables", "ip6tables-save", "ip6tables-restore")
PLUGIN_DIR = "/run/docker/plugins"
IMAGE = "sockgate-busybox:latest"      # inside the Docker host's mount namespace
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _backend_target(tool: str, backend: str) -> str:
    # iptables -> iptables-nft, iptables-save -> iptables-nft-save, ...
    family, _, rest = tool.partition("-")
    return f"/usr/sbin/{family}-{backend}" + (f"-{rest}" if rest else "")


class DockerHost(Service):
    """dockerd in ``node_netns`` inside a private mount namespace. Context manager."""

    def __init__(self, node_netns: str, *, iptables: str = "nft", live_restore: bool = False,
                 workdir: str | os.PathLike[str] | None = None, start_timeout: float = 60.0) -> None:
        if iptables not in ("nft", "legacy"):
            raise ValueError(f"iptables backend must be nft or legacy, got {iptables!r}")
        self.node_netns = node_netns
        self.iptables = iptables
        self.live_restore = live_restore
        self.start_timeout = start_timeout
        # Short: unix socket paths are limited to 107 bytes.
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sgd-", dir="/tmp"))
        self.socket = str(self.workdir / "docker.sock")
        self.base_url = f"unix://{self.socket}"
        self.cgroup_parent = f"sgt-docker-{secrets.token_hex(4)}"
        self.log_path = self.workdir / "dockerd.log"
        self.plugin_dir = self.workdir / "run-docker" / "plugins"  # host view of PLUGIN_DIR
        self.bin_dir = self.workdir / "bin"
        self.holder: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    # ---- lifecycle -----------------------------------------------------------------
    def _binds(self) -> dict[str, Path]:
        names = {"/run/docker": "run-docker", "/var/lib/docker": "var-lib-docker",
                 "/etc/docker": "etc-docker", "/run/containerd": "run-containerd",
                 "/var/lib/containerd": "var-lib-containerd", "/opt/containerd": "opt-containerd"}
        return {target: self.workdir / name for target, name in names.items()}

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in [*self._binds().values(), self.plugin_dir, self.bin_dir, self.workdir / "scratch",
                  self.workdir / "data", self.workdir / "exec", self.workdir / "tmp"]:
            d.mkdir(parents=True, exist_ok=True)
        for tool in IPTABLES_TOOLS:
            link = self.bin_dir / tool
            link.unlink(missing_ok=True)
            link.symlink_to(_backend_target(tool, self.iptables))
        (self.workdir / "daemon.json").write_text(json.dumps(self.daemon_config(), indent=2))
        self._start_holder()
        # See the module docstring: let dockerd find forwarding off and set DROP.
        self.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"])
        self.start_dockerd()

    def daemon_config(self) -> dict[str, Any]:
        w = self.workdir
        return {
            "data-root": str(w / "data"), "exec-root": str(w / "exec"), "pidfile": str(w / "dockerd.pid"),
            "hosts": [self.base_url], "bridge": "none", "iptables": True, "ip6tables": True,
            "experimental": True, "ip-forward": True, "live-restore": self.live_restore,
            "cgroup-parent": f"/{self.cgroup_parent}", "exec-opts": ["native.cgroupdriver=cgroupfs"],
            "storage-driver": "overlay2", "userland-proxy": False,
            # The lab's DNS (the node's resolv.conf names a server outside the lab).
            "dns": ["8.8.8.8"], "log-level": "info", "features": {"buildkit": False},
        }

    def set_live_restore(self, on: bool) -> None:
        """For the next start_dockerd()."""
        self.live_restore = on
        (self.workdir / "daemon.json").write_text(json.dumps(self.daemon_config(), indent=2))

    def _start_holder(self) -> None:
        scratch = self.workdir / "scratch" / "holder"
        scratch.mkdir(parents=True, exist_ok=True)
        argv = ["setpriv", "--pdeathsig", "KILL", "nsenter", f"--net={self.node_netns}",
                *private_mounts(self._binds(), scratch, ["sleep", "infinity"])]
        self.holder = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=open(self.workdir / "holder.log", "ab"), start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.holder.poll() is not None:
                raise RuntimeError(f"mount namespace holder exited {self.holder.returncode}: "
                                   f"{(self.workdir / 'holder.log').read_text()[-2000:]}")
            try:
                if os.readlink(f"/proc/{self.holder.pid}/exe").endswith("/sleep"):
                    return  # every exec done: the namespace is set up
            except OSError:
                pass
            time.sleep(0.02)
        raise TimeoutError("mount namespace holder not ready")

    @property
    def mount_ns(self) -> str:
        assert self.holder is not None
        return f"/proc/{self.holder.pid}/ns/mnt"

    def enter(self, argv: Sequence[str]) -> list[str]:
        """argv run inside this Docker host: its mount namespace and the node netns."""
        return ["nsenter", f"--mount={self.mount_ns}", f"--net={self.node_netns}", "--", *map(str, argv)]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"
        env["DOCKER_TMPDIR"] = str(self.workdir / "tmp")
        # And for what dockerd starts: when it gives up on its containerd (health checks
        # failing on a loaded machine) it sends it SIGUSR1 first, and containerd writes
        # containerd.<pid>.stacks.log to $TMPDIR, which would be the host's /tmp (seen once).
        env["TMPDIR"] = str(self.workdir / "tmp")
        return env

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.enter(argv), capture_output=True, text=True, timeout=timeout,
                              check=check, env=self.env())

    def popen(self, argv: Sequence[str], *, log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        logf = open(log, "ab")
        try:
            return subprocess.Popen(["setpriv", "--pdeathsig", "KILL", *self.enter(argv)], stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=logf, start_new_session=True, **kw)
        finally:
            logf.close()

    def start_dockerd(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("dockerd is running")
        self._client = None
        self.proc = self.popen(["dockerd", "--config-file", str(self.workdir / "daemon.json")],
                               log=self.log_path, env=self.env())
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.socket):
                try:
                    if self.client(timeout=5).ping():
                        return
                except Exception:
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"dockerd not ready after {self.start_timeout}s:\n{self.log_tail()}")

    def stop_dockerd(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Stop dockerd (without live-restore it stops its containers first)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        if self._client is not None:
            self._client.close()
            self._client = None
        return self.proc.returncode

    def client(self, timeout: float = 120.0) -> Any:
        import docker
        if self._client is None or timeout != 120.0:
            c = docker.DockerClient(base_url=self.base_url, version="auto", timeout=timeout)
            if timeout != 120.0:
                return c
            self._client = c
        return self._client

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ---- images --------------------------------------------------------------------
    def import_busybox(self, cache_dir: str | os.PathLike[str], ref: str = "sockgate-busybox:latest") -> str:
        """``docker import`` of the busybox rootfs (tests.support.images)."""
        from .images import busybox_rootfs_tar
        repo, tag = ref.rsplit(":", 1)
        tar = busybox_rootfs_tar(cache_dir)
        self.client().api.import_image_from_file(str(tar), repository=repo, tag=tag, changes=['CMD ["/bin/sh"]'])
        return ref

    # ---- teardown ------------------------------------------------------------------
    def _ns_pids(self) -> list[int]:
        """Processes in our mount namespace or our cgroups (containers), but never us."""
        pids: set[int] = set()
        if self.holder is not None:
            try:
                ino = os.stat(self.mount_ns).st_ino
            except OSError:
                ino = None
            if ino is not None:
                for d in os.listdir("/proc"):
                    if d.isdigit() and int(d) != os.getpid():
                        try:
                            if os.stat(f"/proc/{d}/ns/mnt").st_ino == ino:
                                pids.add(int(d))
                        except OSError:
                            pass
        for cg in self._cgroup_dirs():
            for procs in cg.rglob("cgroup.procs"):
                try:
                    pids.update(int(p) for p in procs.read_text().split())
                except OSError:
                    pass
        pids.discard(os.getpid())
        return sorted(pids)

    def _cgroup_dirs(self) -> list[Path]:
        if not CGROUP_ROOT.is_dir():
            return []
        return [h / self.cgroup_parent for h in CGROUP_ROOT.iterdir() if (h / self.cgroup_parent).is_dir()]

    def remove_containers(self) -> list[str]:
        """`docker rm -f` of every container (while the network driver still answers);
        returns the errors."""
        errors: list[str] = []
        if self.proc is None or self.proc.poll() is not None:
            return errors
        try:
            client = self.client(timeout=60)
            for c in client.containers.list(all=True):
                try:
                    c.remove(force=True)
                except Exception as exc:  # keep going
                    errors.append(f"rm -f {c.name}: {exc}")
        except Exception as exc:
            errors.append(f"listing containers: {exc}")
        return errors

    def stop(self) -> None:
        errors = self.remove_containers()
        if self.proc is not None and self.proc.poll() is None:
            self.stop_dockerd(timeout=30)
        # Whatever is left (shims, containers, the holder): SIGKILL, until none is left.
        for _ in range(50):
            pids = self._ns_pids()
            if self.holder is not None and self.holder.poll() is None:
                pids.append(self.holder.pid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        for p in (self.holder, self.proc):
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    errors.append(f"pid {p.pid} did not exit")
        for cg in self._cgroup_dirs():
            for d in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [cg]:
                try:
                    d.rmdir()
                except OSError:
                    pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise RuntimeError("docker host teardown: " + "; ".join(errors))


# The agent's metrics, in the node netns of the DockerEnv's own lab.
METRICS_ADDRESS = "127.0.0.1:9464"


class DockerAgent:
    """`sockgate agent --docker-socket /run/docker/plugins/sockgate.sock` inside a
    DockerHost (its mount namespace and the node netns), like a systemd service on a
    Docker host. State, run dir and policy are the test's."""

    def __init__(self, host: DockerHost, state_dir: Path, run_dir: Path, policy_file: str, log: Path) -> None:
        self.host, self.state_dir, self.run_dir, self.policy_file, self.log = host, state_dir, run_dir, policy_file, log
        self.ready = log.with_suffix(".ready")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "DockerAgent":
        import sys
        self.ready.unlink(missing_ok=True)
        project = Path(__file__).resolve().parents[2]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(project)
        self.proc = self.host.popen([sys.executable, "-m", "runtime.cli.main", "agent", "--state-dir", self.state_dir,
                                     "--run-dir", self.run_dir, "--policy", self.policy_file, "--ready-file", self.ready,
                                     "--metrics-address", METRICS_ADDRESS,
                                     "--docker-socket", f"{PLUGIN_DIR}/sockgate.sock",
                                     "--docker-host", self.host.base_url],
                                    log=self.log, cwd=str(project), env=env)
        wait_until_ready(self.proc, Path(self.ready), Path(self.log), timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def scrape(self) -> str:
        """The agent's metrics, fetched in the node netns."""
        import sys
        return subprocess.run(["nsenter", f"--net={self.host.node_netns}", sys.executable, "-c",
                               "import urllib.request; print(urllib.request.urlopen("
                               f"'http://{METRICS_ADDRESS}/metrics', timeout=5).read().decode())"],
                              capture_output=True, text=True, check=True, timeout=30).stdout

    def entries(self, logger: str | None = None) -> list[dict]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if logger is None or entry.get("logger") == logger:
                    out.append(entry)
        return out


class DockerEnv:
    """A lab of its own, a DockerHost in its node netns, the agent serving the Docker
    door in it, and the agent's state dir."""

    def __init__(self, lab: Any, host: DockerHost, agent: DockerAgent, state: Path) -> None:
        self.lab, self.host, self.agent, self.state = lab, host, agent, state
        self.node = lab.ns_path(lab.node)

    @property
    def client(self) -> Any:
        return self.host.client()


@contextlib.contextmanager
def docker_env(tmp: Path, image_cache: Path, iptables: str = "nft", live_restore: bool = True) -> Iterator[DockerEnv]:
    """Its own lab: dockerd leaves iptables rules (and FORWARD policy DROP) in the node
    netns, which a lab shared with other tests must not get."""
    from runtime.lab import Lab
    from runtime.lab.policy import write_lab_policy
    policy = str(write_lab_policy(tmp / "policy.json"))
    with Lab() as lab, DockerHost(lab.ns_path(lab.node), iptables=iptables, live_restore=live_restore) as host:
        host.import_busybox(image_cache, IMAGE)
        agent = DockerAgent(host, tmp / "state", tmp / "run", policy, tmp / "agent.log").start()
        try:
            yield DockerEnv(lab, host, agent, tmp / "state")
        finally:
            host.remove_containers()  # while the agent still answers Leave/DeleteEndpoint
            agent.stop()
