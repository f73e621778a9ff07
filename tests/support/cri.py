"""Kubernetes' side of a node without Kubernetes: a private containerd with its CRI
plugin, driven over gRPC with the CRI v1 API the way kubelet drives it, and sockgate
installed by the DaemonSet's own node script with its agent run with the DaemonSet's
arguments.

What was checked on Debian 12 (containerd 1.6.20~ds1, runc 1.1.5, cgroup v1 hybrid):

* CRI v1 (``runtime.v1``) is served next to v1alpha2. The messages come from
  ``cri_api.proto`` beside this file (our subset; field numbers are upstream's), compiled
  by grpcio-tools at session start into a cache dir rather than committed: generated
  ``_pb2`` files are tied to the protobuf runtime version that generated them.
* ``restrict_oom_score_adj = true``: without it RunPodSandbox fails here (the sandbox
  writes oom_score_adj -998 and the test machine lacks CAP_SYS_RESOURCE).
* ``sandbox_image`` must be in the store before RunPodSandbox (no registry is
  reachable): a busybox-static OCI layout (tests/support/images.py) imported with
  ``ctr -n k8s.io images import``. Its command must run until killed (the pause
  container is the pod's pid namespace holder): ``sleep``.
* CRI always uses the containerd namespace ``k8s.io``; runc's cgroups go under the pod's
  ``cgroup_parent``, which the harness makes unique (``/sgt-cri-<hex>``) so that
  ``stop()`` removes exactly its own.
* CRI calls CNI itself (go-cni): CNI_PATH is ``bin_dir`` only, the network is the first
  config in ``conf_dir``, CNI_ARGS ``IgnoreUnknown=1;K8S_POD_NAMESPACE=…;K8S_POD_NAME=…;
  K8S_POD_INFRA_CONTAINER_ID=…;K8S_POD_UID=…``, results cached in /var/lib/cni (bound to
  a private dir here). The plugin runs in containerd's netns and mount namespace.
* Pod netns pins: ``/var/run/netns/cni-<uuid>`` by default (a private dir is bound over
  /run/netns in containerd's mount namespace), or ``<state>/netns/cni-<uuid>`` with
  ``netns_mounts_under_state_dir = true`` (supported by 1.6.20). The pin is a bind mount
  made in containerd's mount namespace: a process in another mount namespace sees an
  empty file at that path unless mounts propagate to it. In a cluster the agent's
  container gets them through a HostToContainer (rslave) volume; here containerd's mount
  namespace is made rshared inside (new peer groups: nothing reaches the host's) and the
  agent runs in a slave copy of it (``agent_argv``).
* busybox's ``wget`` segfaults in these containers; ``nc`` works, as servers too
  (``nc -ll -p PORT -e cat``), and so do ``httpd`` and ``nslookup``.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import yaml

from runtime.lab import LAB
from runtime.lab.builder import PROJECT_ROOT
from runtime.lab.policy import write_lab_policy

from . import images
from .containerd import Containerd

PROTO = Path(__file__).with_name("cri_api.proto")
MANIFEST = PROJECT_ROOT / "deploy" / "kubernetes" / "sockgate.yaml"
PAUSE_REF = "localhost/sockgate-pause:latest"
# The pause process: PID 1 of the pod's sandbox, until StopPodSandbox kills it.
PAUSE_CMD = ("/bin/sleep", "2147483647")
K8S_NAMESPACE = "k8s.io"
VENV = Path(sys.executable).parent.parent
# What the DaemonSet image's bundle holds besides sockgate: its dependencies, needed by
# the in-process fallback when no agent runs (top-level import names). A DaemonSet node
# has no fallback; InstalledNode(python_fallback=True) adds one, as a node that also has
# a sockgate installation does.
DEPENDENCY_PACKAGES = ("pyroute2", "dns", "requests", "urllib3", "idna", "certifi", "charset_normalizer",
                       "prometheus_client")

LOOPBACK_PLUGIN = Path("/usr/lib/cni/loopback")   # Debian's containernetworking-plugins

_compile_lock = threading.Lock()


# ---- the CRI v1 messages -------------------------------------------------------------------

@dataclass(frozen=True)
class CriApi:
    pb2: Any
    grpc: Any


def compile_cri_api(out_dir: Path) -> CriApi:
    """Compile cri_api.proto with grpcio-tools into out_dir and import it."""
    from grpc_tools import protoc  # type: ignore[import-untyped]
    with _compile_lock:
        out_dir.mkdir(parents=True, exist_ok=True)
        include = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main(["protoc", f"-I{PROTO.parent}", f"-I{include}", f"--python_out={out_dir}",
                          f"--grpc_python_out={out_dir}", str(PROTO)])
        if rc != 0:
            raise RuntimeError(f"protoc failed ({rc}) on {PROTO}")
        if str(out_dir) not in sys.path:
            sys.path.insert(0, str(out_dir))
        pb2: ModuleType = importlib.import_module("cri_api_pb2")
        stubs: ModuleType = importlib.import_module("cri_api_pb2_grpc")
    return CriApi(pb2, stubs)


@dataclass
class Exec:
    exit_code: int
    stdout: str
    stderr: str


@dataclass
class Pod:
    """What kubelet knows of a pod: its metadata and the PodSandboxConfig it sent."""
    name: str
    namespace: str
    uid: str
    config: Any
    id: str = ""
    seconds: float = 0.0     # how long RunPodSandbox took
    containers: list[str] = field(default_factory=list)


class CriClient:
    """kubelet's calls, over containerd's gRPC socket."""

    def __init__(self, api: CriApi, address: str, *, cgroup_parent: str, timeout: float = 120.0) -> None:
        import grpc  # type: ignore[import-untyped]
        self.api, self.pb = api, api.pb2
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.runtime = api.grpc.RuntimeServiceStub(self.channel)
        self.images = api.grpc.ImageServiceStub(self.channel)
        self.cgroup_parent = cgroup_parent
        self.timeout = timeout
        self.pods: dict[str, Pod] = {}   # sandbox id -> pod, until removed
        self._lock = threading.Lock()

    def close(self) -> None:
        self.channel.close()

    def version(self) -> Any:
        return self.runtime.Version(self.pb.VersionRequest(version="v1"), timeout=self.timeout)

    def conditions(self) -> dict[str, bool]:
        status = self.runtime.Status(self.pb.StatusRequest(), timeout=self.timeout).status
        return {c.type: c.status for c in status.conditions}

    def image_present(self, ref: str) -> bool:
        resp = self.images.ImageStatus(self.pb.ImageStatusRequest(image=self.pb.ImageSpec(image=ref)),
                                       timeout=self.timeout)
        return resp.HasField("image")

    def pod_config(self, name: str, namespace: str = "default", uid: str | None = None,
                   dns_servers: Sequence[str] = (), dns_searches: Sequence[str] = (),
                   dns_options: Sequence[str] = ()) -> Pod:
        uid = uid or f"{secrets.token_hex(4)}-{secrets.token_hex(2)}-{secrets.token_hex(2)}-" \
                     f"{secrets.token_hex(2)}-{secrets.token_hex(6)}"
        pb = self.pb
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace=namespace, uid=uid, attempt=0),
            hostname=name,
            labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                    "io.kubernetes.pod.uid": uid},
            linux=pb.LinuxPodSandboxConfig(cgroup_parent=self.cgroup_parent))
        if dns_servers or dns_searches or dns_options:
            # What kubelet sends for dnsPolicy: None with a pod dnsConfig.
            config.dns_config.CopyFrom(pb.DNSConfig(servers=list(dns_servers), searches=list(dns_searches),
                                                    options=list(dns_options)))
        return Pod(name, namespace, uid, config)

    def run_pod(self, pod: Pod) -> Pod:
        t0 = time.monotonic()
        resp = self.runtime.RunPodSandbox(self.pb.RunPodSandboxRequest(config=pod.config), timeout=self.timeout)
        pod.seconds = time.monotonic() - t0
        pod.id = resp.pod_sandbox_id
        with self._lock:
            self.pods[pod.id] = pod
        return pod

    def pod_status(self, pod_id: str, verbose: bool = False) -> Any:
        return self.runtime.PodSandboxStatus(self.pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose),
                                             timeout=self.timeout)

    def pod_ips(self, pod_id: str) -> list[str]:
        net = self.pod_status(pod_id).status.network
        return [ip for ip in [net.ip, *(a.ip for a in net.additional_ips)] if ip]

    def list_pods(self) -> list[Any]:
        return list(self.runtime.ListPodSandbox(self.pb.ListPodSandboxRequest(), timeout=self.timeout).items)

    def start_container(self, pod: Pod, name: str, image: str, command: Sequence[str]) -> str:
        pb = self.pb
        config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name, attempt=0),
                                    image=pb.ImageSpec(image=image), command=list(command),
                                    labels={"io.kubernetes.container.name": name})
        cid = self.runtime.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod.id, config=config,
                                                                     sandbox_config=pod.config),
                                           timeout=self.timeout).container_id
        pod.containers.append(cid)
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=self.timeout)
        return cid

    def exec_sync(self, container_id: str, cmd: Sequence[str], timeout: int = 30) -> Exec:
        resp = self.runtime.ExecSync(self.pb.ExecSyncRequest(container_id=container_id, cmd=list(cmd),
                                                             timeout=timeout), timeout=timeout + 30)
        return Exec(resp.exit_code, resp.stdout.decode(errors="replace"), resp.stderr.decode(errors="replace"))

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)

    def remove_pod(self, pod_id: str) -> None:
        """StopPodSandbox, then RemovePodSandbox, as kubelet does."""
        self.stop_pod(pod_id)
        self.runtime.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=self.timeout)
        with self._lock:
            self.pods.pop(pod_id, None)


# ---- the DaemonSet's node install --------------------------------------------------------

def _manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _configmap(name: str) -> dict[str, str]:
    (doc,) = [d for d in _manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    return dict(doc["data"])


def daemonset_agent_args(env: dict[str, str]) -> list[str]:
    """The agent container's ``sockgate agent …`` arguments, as the manifest's shell
    command gives them: words unquoted, ``$NAME`` of the container's environment
    (``env``: the values the kubelet would set, e.g. HOST_IP) expanded."""
    (ds,) = [d for d in _manifests() if d["kind"] == "DaemonSet"]
    (agent,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "agent"]
    assert {e["name"] for e in agent.get("env", [])} == set(env), (agent.get("env"), env)
    script = agent["command"][-1]
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], word)
            for word in shlex.split(script.split("exec sockgate ", 1)[1])]


def make_bundle(path: Path, *, dependencies: bool) -> Path:
    """The image's /opt/sockgate/lib: sockgate's packages, and with ``dependencies`` the
    pure-Python packages it imports (the venv's copies), for the in-process fallback."""
    for pkg in ("cni_plugin", "runtime", "netpolicy"):
        shutil.copytree(PROJECT_ROOT / pkg, path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    if dependencies:
        import importlib.util
        for name in DEPENDENCY_PACKAGES:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                raise RuntimeError(f"{name} is not installed in {VENV}")
            src = Path(spec.origin).parent
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
    return path


class InstalledNode:
    """A node's files under ``root`` as the DaemonSet's install-cni init container lays
    them out: ``sockgate-node.sh install`` from the manifest, with the ConfigMap's conflist
    (its node paths moved under root, the lab's policy) and the compiled CNI executable
    (build/sockgate-cni, the image's copy). With ``bundle_dependencies`` the node also gets
    ``sockgate-python`` beside it after the install: the node's python3 on the bundle, the
    in-process fallback of a node with a sockgate installation (a DaemonSet node has none:
    without the agent its CNI executable answers error 11)."""

    NETWORK = "sockgate"

    def __init__(self, root: Path, *, bundle_dependencies: bool = False, policy: dict | None = None) -> None:
        self.root = root
        self.python_fallback = bundle_dependencies
        root.mkdir(parents=True, exist_ok=True)
        self.script = root / "sockgate-node.sh"
        self.script.write_text(_configmap("sockgate-scripts")["sockgate-node.sh"])
        self.bundle = make_bundle(root / "image-lib", dependencies=bundle_dependencies)
        self.config = root / "config"
        self.config.mkdir()
        self.lib = root / "opt/sockgate"
        self.bin_dir = root / "opt/cni/bin"
        self.conf_dir = root / "etc/cni/net.d"
        self.policy = root / "etc/sockgate/policy.json"
        self.state = root / "var/lib/sockgate"
        self.run_dir = root / "run/sockgate"
        self.cni_log = root / "cni.log"
        conf = json.loads(_configmap("sockgate-config")["00-sockgate.conflist"])
        conf["plugins"][0].update(stateDir=str(self.state), runDir=str(self.run_dir), policyFile=str(self.policy),
                                  logFile=str(self.cni_log))
        self.conflist = conf
        (self.config / "00-sockgate.conflist").write_text(json.dumps(conf))
        # The lab's policy (Google's ranges from the local snapshot: no network), with
        # the test's keys.
        self.set_configmap_policy(**(policy or {}))
        for d in (self.state, self.run_dir):
            d.mkdir(parents=True)
        # containerd's CRI plugin sets up each pod's lo with the reference "loopback"
        # plugin from its bin_dir (RunPodSandbox fails without it): a Kubernetes node has
        # it there (kubeadm's kubernetes-cni package); here Debian's copy.
        self.bin_dir.mkdir(parents=True)
        shutil.copy2(LOOPBACK_PLUGIN, self.bin_dir / "loopback")

    def set_configmap_policy(self, **extra: Any) -> None:
        """The ConfigMap's policy.json: the lab's policy with ``extra``'s keys set (as an
        operator edits it). The node's copy changes with ``install`` or ``sync_policy``."""
        # Atomically, as kubelet updates a ConfigMap volume.
        tmp = write_lab_policy(self.config / ".policy.json.tmp", **extra)
        tmp.replace(self.config / "policy.json")

    def _script_env(self) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "SOCKGATE": str(VENV / "bin" / "sockgate"), "PYTHON": sys.executable,
               "BUNDLE": str(self.bundle), "CNI_EXE": str(PROJECT_ROOT / "build" / "sockgate-cni"),
               "HOST_LIB_DIR": str(self.lib), "HOST_LIB_PATH": str(self.lib), "CNI_BIN_DIR": str(self.bin_dir),
               "CNI_CONF_DIR": str(self.conf_dir), "CONFIG_DIR": str(self.config), "POLICY_FILE": str(self.policy),
               "STATE_DIR": str(self.state)}

    def _script_argv(self, command: str) -> list[str]:
        # As the DaemonSet's containers run it: root, no capability.
        return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "sh", str(self.script),
                command]

    def install(self) -> str:
        """Run the node script as the init container does."""
        r = subprocess.run(self._script_argv("install"), env=self._script_env(), capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"sockgate-node.sh install failed ({r.returncode}): {r.stderr}")
        if self.python_fallback:
            launcher = self.bin_dir / "sockgate-python"
            launcher.write_text(f"#!/usr/bin/python3 -IS\nimport sys\nsys.path.insert(0, {str(self.bundle)!r})\n"
                                "from cni_plugin.shim import main\nraise SystemExit(main())\n")
            launcher.chmod(0o755)
        return r.stderr

    def use_shim(self, shim: str) -> None:
        """Lay out the bin dir as ``sockgate install-cni --shim <shim>`` does: "compiled",
        the static forwarder as ``sockgate`` (with a launcher beside it as
        ``sockgate-python`` only if one was there); "python", the launcher alone as
        ``sockgate``. Whichever of the two the node script installed."""
        from runtime.cli.install import COMPILED_SHIM, PYTHON_LAUNCHER, cni_launcher
        exe, launcher = self.bin_dir / "sockgate", self.bin_dir / PYTHON_LAUNCHER
        is_script = exe.read_bytes()[:2] == b"#!"
        if shim == "compiled" and is_script:
            exe.replace(launcher)
            shutil.copy2(COMPILED_SHIM, exe)
        elif shim == "python" and not is_script:
            # The DaemonSet installs the compiled one alone: this installation's
            # launcher takes its place, as `install-cni --shim python` writes it.
            exe.write_text(cni_launcher())
            exe.chmod(0o755)
        elif shim not in ("compiled", "python", "auto"):
            raise ValueError(f"unknown shim {shim!r}")
        if shim != "auto":
            assert (exe.read_bytes()[:4] == b"\x7fELF") == (shim == "compiled"), f"{exe} is not the {shim} one"

    def sync_policy(self, timeout: float = 30.0) -> None:
        """One round of the DaemonSet's policy-sync sidecar (``sockgate-node.sh
        sync-policy``): run until the node's policy file equals the ConfigMap's, then
        stopped with its process group (its ``sleep`` too)."""
        want = (self.config / "policy.json").read_bytes()
        env = dict(self._script_env(), SYNC_EVERY="3600")
        log = self.root / "sync-policy.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(self._script_argv("sync-policy"), env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not (self.policy.exists() and self.policy.read_bytes() == want):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sync-policy did not install the ConfigMap's policy "
                                       f"(rc {proc.poll()}): {log.read_text()}")
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def agent_args(self, ready_file: Path) -> list[str]:
        """The DaemonSet's agent arguments, node paths moved under root."""
        moved = {"/var/lib/sockgate": str(self.state), "/run/sockgate": str(self.run_dir),
                 "/etc/sockgate/policy.json": str(self.policy), "/pod/agent.ready": str(ready_file)}
        # status.hostIP: the lab node's address, where the agent then serves its metrics.
        args = daemonset_agent_args({"HOST_IP": LAB.node_uplink_v4})
        assert args[0] == "agent", args
        return [moved.get(a, a) for a in args]

    def billing_records(self) -> list[dict]:
        from runtime.billing.ledger import Ledger
        return list(Ledger(self.state / "billing").records())


# ---- containerd with CRI --------------------------------------------------------------------

class CriContainerd(Containerd):
    """containerd with its CRI plugin, CNI from ``cni_bin_dir``/``cni_conf_dir``, in the
    lab's node netns and its own mount namespace (see the module docstring)."""

    def __init__(self, netns_path: str, workdir: Path, api: CriApi, *, cni_bin_dir: Path, cni_conf_dir: Path,
                 netns_under_state_dir: bool = False, start_timeout: float = 30.0) -> None:
        super().__init__(netns_path, workdir, namespace=K8S_NAMESPACE, start_timeout=start_timeout)
        self.cgroup_top = f"sgt-cri-{secrets.token_hex(4)}"
        self.api = api
        self.cni_bin_dir, self.cni_conf_dir = cni_bin_dir, cni_conf_dir
        self.netns_under_state_dir = netns_under_state_dir
        self.netns_dir = self.workdir / "netns"   # bound over /run/netns unless under state
        self.client: CriClient | None = None

    @property
    def cri(self) -> CriClient:
        assert self.client is not None, "containerd not started"
        return self.client

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for d in ("root", "state", "run", "cni-cache", "scratch", "netns"):
            self._mkdir(self.workdir / d)
        if self.snapshotter is None:
            from .containerd import pick_snapshotter
            self.snapshotter = pick_snapshotter(self.workdir / "root")
        config = self.workdir / "config.toml"
        cri = '"io.containerd.grpc.v1.cri"'
        config.write_text(f'''version = 2
root = "{self.workdir}/root"
state = "{self.workdir}/state"
# opt would create /opt/containerd
disabled_plugins = ["io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[plugins.{cri}]
  sandbox_image = "{PAUSE_REF}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = {str(self.netns_under_state_dir).lower()}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins.{cri}.containerd]
    snapshotter = "{self.snapshotter}"
  [plugins.{cri}.cni]
    bin_dir = "{self.cni_bin_dir}"
    conf_dir = "{self.cni_conf_dir}"
    max_conf_num = 1
''')
        self._created.append(config)
        binds: dict[str, str | os.PathLike[str]] = {"/run/containerd": self.run_dir,
                                                    "/var/lib/cni": self.cni_cache_dir}
        if not self.netns_under_state_dir:
            binds["/run/netns"] = self.netns_dir
        # rshared inside: pod netns pins propagate to the agent's slave mount namespace.
        self._launch(self._wrap(["sh", "-c", 'mount -n --make-rshared / && exec "$@"', "sh",
                                 "containerd", "-c", str(config)], binds))
        self.client = CriClient(self.api, self.address, cgroup_parent=f"/{self.cgroup_top}")

    def import_images(self, cache_dir: Path) -> None:
        """The pause image (sandbox_image) and busybox, into CRI's namespace."""
        self.import_image(images.busybox_oci_archive(cache_dir, PAUSE_REF, PAUSE_CMD))
        self.import_image(images.busybox_oci_archive(cache_dir))

    def mount_ns(self) -> str:
        assert self.proc is not None
        return f"/proc/{self.proc.pid}/ns/mnt"

    def agent_argv(self, args: Sequence[str]) -> list[str]:
        """``sockgate args…`` in a slave copy of containerd's mount namespace (what the
        DaemonSet's HostToContainer volumes give the agent), to be run in the node netns."""
        return ["nsenter", f"--mount={self.mount_ns()}", f"--wd={PROJECT_ROOT}", "unshare", "-m", "--propagation",
                "slave", sys.executable, "-m", "runtime.cli.main", *args]

    def _remove_all(self) -> None:
        # As kubelet would: every pod stopped (CNI DEL) and removed, then whatever ctr sees.
        errors = []
        if self.client is not None:
            for item in self.client.list_pods():
                try:
                    self.client.remove_pod(item.id)
                except Exception as e:  # keep removing the others
                    errors.append(f"{item.id[:12]}: {e}")
            self.client.close()
        super()._remove_all()
        if errors:
            raise RuntimeError("removing pods: " + "; ".join(errors))
