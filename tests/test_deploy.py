"""Deployment: the Kubernetes manifests validate against the Kubernetes API schema and
hold together; the DaemonSet's node script lays out the CNI executable on a "node" (a
temporary root) with no capability, and the agent runs under the DaemonSet's security
context; scripts/install-node.sh lays out executable, conflist, policy and units in a
temporary root, and a conflist installed that way drives a real `ctr run --cni`.

Nothing here writes to the host's /etc, /opt, /usr or systemd: installs go to tmp_path,
and containerd sees the temporary root's dirs through private bind mounts."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import kubernetes_validate
import pytest
import yaml

from netpolicy.policy import parse_policy
from runtime.core.netconf import parse_netconf
from runtime.defaults import RUN_DIR, SUPPORTED_VERSIONS
from runtime.kernel import segment_meter
from runtime.kernel.netns import in_netns
from runtime.lab import LAB
from runtime.lab.builder import PROJECT_ROOT
from runtime.lab.policy import GOOGLE_RANGES_DIR, lab_policy, write_lab_policy
from tests.support import cnitool, images
from tests.support.containerd import Containerd, ctr_run_cni, private_mounts
from tests.support.plugin import Plugin, node_links

K8S_DIR = PROJECT_ROOT / "deploy" / "kubernetes"
MANIFEST = K8S_DIR / "sockgate.yaml"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
SANDBOX_LABEL = "sockgate.io/sandbox"
# The runtimes' netns pin dirs the DaemonSet mounts by default (README, "Kubernetes
# workloads"): containerd's and CRI-O's default, containerd's netns_mounts_under_state_dir.
PIN_DIRS = ["/run/netns", "/run/containerd/io.containerd.grpc.v1.cri/netns"]
INSTALL_NODE = PROJECT_ROOT / "scripts" / "install-node.sh"
VENV = Path(sys.executable).parent.parent
# scripts/build-shim's output (scripts/setup builds it); the image carries the same file.
COMPILED = PROJECT_ROOT / "build" / "sockgate-cni"
# The oldest Kubernetes the manifests support (securityContext.appArmorProfile is 1.30),
# and the newest schema the installed kubernetes-validate ships.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
PODMAN_BRIDGE = Path("/etc/cni/net.d/87-podman-bridge.conflist")
HOST_PATHS = ["/etc/cni/net.d", "/opt/cni", "/opt/sockgate", "/etc/sockgate", "/var/lib/sockgate",
              "/run/sockgate", "/etc/systemd/system"]


def _snapshot_host() -> dict:
    listed = {p: sorted(os.listdir(p)) if os.path.isdir(p) else os.path.exists(p) for p in HOST_PATHS}
    # A lab test's ADD mounts the segment meter's bpffs at /run/sockgate/bpf (where the
    # host has none at /sys/fs/bpf), which the lab's teardown removes: not an install's.
    if listed["/run/sockgate"] == ["bpf"]:
        listed["/run/sockgate"] = False
    return listed


@pytest.fixture(autouse=True)
def host_unchanged() -> Iterator[None]:
    """No test here may touch the host's CNI, sockgate or systemd dirs."""
    before = _snapshot_host()
    yield
    assert _snapshot_host() == before, "host paths changed"


# ---- the manifests ---------------------------------------------------------------------

def manifests() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def kustomization() -> dict:
    return yaml.safe_load(KUSTOMIZATION.read_text())


# Manifests beside the base that it leaves out, and why.
OPTIONAL = {"podmonitor.yaml": "a PodMonitor: a cluster without the Prometheus Operator's CRD rejects it"}
PODMONITOR = K8S_DIR / "podmonitor.yaml"


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest of the base in deploy/kubernetes (the kustomization is
    not one, nor are the OPTIONAL ones)."""
    return sorted(p for p in K8S_DIR.glob("*.y*ml") if p != KUSTOMIZATION and p.name not in OPTIONAL)


def base_manifests() -> list[dict]:
    """What the kustomize base applies: the documents of every listed resource."""
    return [doc for name in kustomization()["resources"]
            for doc in yaml.safe_load_all((K8S_DIR / name).read_text()) if doc]


def one(kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in base_manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def daemonset() -> dict:
    return one("DaemonSet")


def container(name: str, init: bool = False) -> dict:
    spec = daemonset()["spec"]["template"]["spec"]
    (c,) = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    return c


def conflist_template() -> dict:
    return json.loads(one("ConfigMap", "sockgate-config")["data"]["00-sockgate.conflist"])


def node_script() -> str:
    return one("ConfigMap", "sockgate-scripts")["data"]["sockgate-node.sh"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schema(version: str) -> None:
    assert sorted(d["kind"] for d in manifests()) == ["ConfigMap", "ConfigMap", "DaemonSet", "Namespace",
                                                      "ServiceAccount"]
    docs = [doc for f in manifest_files() for doc in yaml.safe_load_all(f.read_text()) if doc]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "ConfigMap", "DaemonSet", "Namespace",
                                               "RuntimeClass", "ServiceAccount"]
    for doc in docs:
        # strict: a misspelt or misplaced field is an error, not silently dropped.
        assert kubernetes_validate.validate(doc, version, strict=True) == version.rsplit(".", 1)[0]


@pytest.mark.parametrize("breakage", ["unknown field", "wrong type", "missing required", "misplaced field"])
def test_broken_manifest_fails_validation(breakage: str) -> None:
    """Negative control: the validator does reject a broken copy of the DaemonSet."""
    ds = copy.deepcopy(daemonset())
    pod = ds["spec"]["template"]["spec"]
    if breakage == "unknown field":
        pod["hostNetwrk"] = True
    elif breakage == "wrong type":
        pod["hostNetwork"] = "yes"
    elif breakage == "missing required":
        del pod["containers"][0]["name"]
    else:  # capabilities belong in securityContext
        pod["containers"][0]["capabilities"] = pod["containers"][0]["securityContext"].pop("capabilities")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[0], strict=True)
    kubernetes_validate.validate(daemonset(), K8S_VERSIONS[0], strict=True)  # the original passes


def test_manifests_hold_together() -> None:
    """What the schema can't see: names that must match, paths that must agree."""
    ds = daemonset()
    ns = one("Namespace")["metadata"]["name"]
    assert ns == "sockgate-system"
    for doc in manifests()[1:]:
        assert doc["metadata"]["namespace"] == ns
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is False
    assert pod["dnsPolicy"] == "Default"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]

    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in pod["initContainers"] + pod["containers"]:
        for m in c["volumeMounts"]:
            assert m["name"] in volumes, f"{c['name']} mounts unknown volume {m['name']}"
        ctx = c["securityContext"]
        assert ctx["capabilities"]["drop"] == ["ALL"] and ctx["privileged"] is False
        assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
        assert c["image"] == container("agent")["image"]
        assert "memory" in c["resources"]["limits"]
    for cm in ("sockgate-config", "sockgate-scripts"):
        assert cm in {v.get("configMap", {}).get("name") for v in volumes.values()}

    # The conflist: first in lexical order, understood by containerd 1.6, valid for the
    # plugin, and its node paths are where the agent's hostPath mounts are.
    conflist = conflist_template()
    assert sorted(["00-sockgate.conflist", "10-calico.conflist", "05-cilium.conflist",
                   "87-podman-bridge.conflist", "10-containerd-net.conflist"])[0] == "00-sockgate.conflist"
    assert conflist["cniVersion"] == "1.0.0" and conflist["cniVersion"] in SUPPORTED_VERSIONS
    (plugin,) = conflist["plugins"]
    parse_netconf({"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin})
    agent = container("agent")
    mounts = {m["mountPath"]: volumes[m["name"]] for m in agent["volumeMounts"]}
    for key in ("stateDir", "runDir"):
        assert mounts[plugin[key]]["hostPath"]["path"] == plugin[key], key
    policy_dir = str(Path(plugin["policyFile"]).parent)
    assert mounts[policy_dir]["hostPath"]["path"] == policy_dir
    netns = [m for m in agent["volumeMounts"] if m["mountPath"] == "/run/netns"]
    assert netns and netns[0]["mountPropagation"] == "HostToContainer"
    assert volumes[netns[0]["name"]]["hostPath"]["path"] == "/run/netns"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux", SANDBOX_LABEL: "true"}

    # The agent: the dirs of the conflist, the ready file the probe looks for.
    command = " ".join(agent["command"])
    for flag, value in (("--state-dir", plugin["stateDir"]), ("--run-dir", plugin["runDir"]),
                        ("--policy", plugin["policyFile"])):
        assert f"{flag} {value}" in command
    assert "--ready-file /pod/agent.ready" in command and "rm -f /pod/agent.ready" in command
    assert "/pod/agent.ready" in " ".join(agent["readinessProbe"]["exec"]["command"])
    assert "/pod" in mounts and "emptyDir" in mounts["/pod"]
    assert plugin["runDir"] + "/agent.sock" in " ".join(agent["livenessProbe"]["exec"]["command"])
    caps = agent["securityContext"]["capabilities"]
    assert sorted(caps["add"]) == ["NET_ADMIN", "SYS_ADMIN"]
    # Metrics on the node's IP (the pod's, with hostNetwork), on the declared port.
    assert f'--metrics-address "$HOST_IP:{metrics_port()["containerPort"]}"' in command
    assert agent["env"] == [{"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}]
    assert agent["securityContext"]["appArmorProfile"] == {"type": "Unconfined"}

    # The policy: valid, and the same default the node installer ships.
    policy = json.loads(one("ConfigMap", "sockgate-config")["data"]["policy.json"])
    parse_policy(policy)
    assert policy == json.loads((PROJECT_ROOT / "deploy" / "systemd" / "policy.json").read_text())


def metrics_port() -> dict:
    (port,) = [p for p in container("agent")["ports"] if p["name"] == "metrics"]
    return port


def test_the_podmonitor_scrapes_the_agents_metrics_port() -> None:
    """deploy/kubernetes/podmonitor.yaml (Prometheus Operator): outside the base, in
    the DaemonSet's namespace, selecting its pods, on the port the agent serves."""
    assert "podmonitor.yaml" not in kustomization()["resources"]
    (pm,) = [d for d in yaml.safe_load_all(PODMONITOR.read_text()) if d]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    ds = daemonset()
    assert pm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    # Field names of the CRD (monitoring.coreos.com_podmonitors.yaml): a misspelt one
    # would be dropped by a lenient apply and the endpoint never scraped.
    assert set(pm["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                               "podTargetLabels", "sampleLimit", "attachMetadata"}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings",
                             "scheme", "honorLabels"}
    for relabel in endpoint.get("relabelings", []):
        assert set(relabel) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement", "separator"}
    assert endpoint["port"] == metrics_port()["name"] and endpoint.get("path", "/metrics") == "/metrics"
    assert metrics_port()["protocol"] == "TCP"


def _images(docs: list[dict]) -> list[str]:
    return [c["image"] for d in docs if d["kind"] == "DaemonSet"
            for c in d["spec"]["template"]["spec"]["initContainers"] + d["spec"]["template"]["spec"]["containers"]]


def _repository(image: str) -> str:
    """The image reference without its tag (a registry port's colon is not one)."""
    last = image.rsplit("/", 1)[-1]
    return image[: len(image) - len(last)] + last.split(":", 1)[0]


def render_images(docs: list[dict], images: list[dict]) -> list[dict]:
    """kustomize's `images` transformer, for what this base uses (name -> newName,
    newTag): the Python stand-in where kubectl isn't installed."""
    out = copy.deepcopy(docs)
    for d in out:
        if d["kind"] != "DaemonSet":
            continue
        pod = d["spec"]["template"]["spec"]
        for c in pod["initContainers"] + pod["containers"]:
            for img in images:
                if _repository(c["image"]) == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    return out


def test_kustomization_lists_every_manifest_and_sets_the_image_once(tmp_path: Path) -> None:
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    assert set(k) <= {"apiVersion", "kind", "resources", "images"}, "a field this test doesn't render"
    assert sorted(k["resources"]) == sorted(p.name for p in manifest_files())
    assert len(k["resources"]) == len(set(k["resources"]))
    # One place: a single images entry, and it names every container's image.
    (entry,) = k["images"]
    images = _images(manifests())
    assert len(images) == 3 and {_repository(i) for i in images} == {entry["name"]}
    assert isinstance(entry["newTag"], str)

    # Changing that one entry changes every container, and nothing else.
    moved = [dict(entry, newName="registry.example:5000/team/sockgate", newTag="9.9.9")]
    rendered = render_images(base_manifests(), moved)
    assert set(_images(rendered)) == {"registry.example:5000/team/sockgate:9.9.9"}
    assert [d["kind"] for d in rendered] == [d["kind"] for d in base_manifests()]
    assert set(_images(render_images(base_manifests(), k["images"]))) == {f"{entry['newName']}:{entry['newTag']}"}
    kubectl = shutil.which("kubectl")
    if kubectl:  # the real kustomize (built into kubectl, offline) agrees with the stand-in
        overlay = tmp_path / "overlay"
        shutil.copytree(K8S_DIR, overlay)
        (overlay / "kustomization.yaml").write_text(yaml.safe_dump(dict(k, images=moved)))
        out = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True,
                             check=True, timeout=60).stdout
        real = [d for d in yaml.safe_load_all(out) if d]
        key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        assert sorted(real, key=key) == sorted(rendered, key=key)


def test_runtimeclass_schedules_onto_the_daemonsets_nodes() -> None:
    rc = one("RuntimeClass")
    pod = daemonset()["spec"]["template"]["spec"]
    assert rc["metadata"]["name"] == "sockgate" and rc["handler"] == "runc"
    selector = rc["scheduling"]["nodeSelector"]
    assert selector == {SANDBOX_LABEL: "true"}
    # A pod of that class lands only where the DaemonSet runs: the DaemonSet's selector
    # asks no more than the class's (apart from the OS every node of the pool has).
    assert selector.items() <= pod["nodeSelector"].items()
    assert set(pod["nodeSelector"]) - set(selector) == {"kubernetes.io/os"}
    # The pool's taint: the class tolerates exactly it; the DaemonSet every taint.
    assert rc["scheduling"]["tolerations"] == [{"key": SANDBOX_LABEL, "operator": "Equal", "value": "true",
                                               "effect": "NoSchedule"}]
    assert pod["tolerations"] == [{"operator": "Exists"}]


def test_netns_pin_dirs_are_mounted_host_to_container() -> None:
    pod = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    pins = [m for m in container("agent")["volumeMounts"] if m["name"].startswith("netns-pin-")]
    assert sorted(m["mountPath"] for m in pins) == sorted(PIN_DIRS)
    for m in pins:
        # At the node's path (CNI_NETNS names it), seeing pins made after the start
        # (HostToContainer, not Bidirectional: nothing goes back to the node); the agent
        # only opens them.
        assert m["mountPropagation"] == "HostToContainer", m
        assert volumes[m["name"]]["hostPath"] == {"path": m["mountPath"], "type": "DirectoryOrCreate"}
        assert m["readOnly"] is True
    # Only the agent opens pod namespaces.
    for c in pod["initContainers"] + [c for c in pod["containers"] if c["name"] != "agent"]:
        assert not [m for m in c["volumeMounts"] if m["name"].startswith("netns-pin-")]
    # Every mount with propagation is a pin dir: nothing else needs to see later mounts.
    propagating = [m for c in pod["containers"] for m in c["volumeMounts"] if "mountPropagation" in m]
    assert propagating == pins


# ---- the DaemonSet's node script ---------------------------------------------------------

def make_bundle(path: Path) -> Path:
    """sockgate's own packages and nothing else: the CNI executable's path to the agent
    needs only the standard library (the image's bundle also has the dependencies, for
    the in-process fallback)."""
    for pkg in ("cni_plugin", "runtime", "netpolicy"):
        shutil.copytree(PROJECT_ROOT / pkg, path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return path


class Node:
    """A "node" in a temporary dir, and the DaemonSet's containers' view of it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.script = tmp / "sockgate-node.sh"
        self.script.write_text(node_script())
        self.bundle = make_bundle(tmp / "image-lib")
        self.config = tmp / "config"          # the sockgate-config ConfigMap
        self.config.mkdir()
        (self.config / "00-sockgate.conflist").write_text(json.dumps(self.conflist()))
        # The lab's policy: Google's ranges from the local snapshot (no network).
        write_lab_policy(self.config / "policy.json")
        self.lib = tmp / "opt" / "sockgate"
        self.bin = tmp / "opt" / "cni" / "bin"
        self.conf_dir = tmp / "etc" / "cni" / "net.d"
        self.policy = tmp / "etc" / "sockgate" / "policy.json"
        self.state = tmp / "var" / "lib" / "sockgate"
        self.run_dir = tmp / "run" / "sockgate"
        self.state.mkdir(parents=True)
        self.run_dir.mkdir(parents=True)
        self.exe = self.bin / "sockgate"

    def conflist(self) -> dict:
        """The ConfigMap's conflist, its node paths moved into the temporary root."""
        conf = conflist_template()
        plugin = conf["plugins"][0]
        plugin.update(stateDir=str(self.tmp / "var/lib/sockgate"), runDir=str(self.tmp / "run/sockgate"),
                      policyFile=str(self.tmp / "etc/sockgate/policy.json"), logFile=str(self.tmp / "cni.log"))
        return conf

    def env(self, **extra: str) -> dict:
        return {"PATH": os.environ["PATH"], "SOCKGATE": str(VENV / "bin" / "sockgate"),
                "PYTHON": sys.executable, "BUNDLE": str(self.bundle), "CNI_EXE": str(COMPILED),
                "HOST_LIB_DIR": str(self.lib),
                "HOST_LIB_PATH": str(self.lib), "CNI_BIN_DIR": str(self.bin),
                "CNI_CONF_DIR": str(self.conf_dir), "CONFIG_DIR": str(self.config),
                "POLICY_FILE": str(self.policy), "STATE_DIR": str(self.state), **extra}

    def argv(self, command: str) -> list[str]:
        # As the install-cni and policy-sync containers run it: root with no capability
        # at all (empty bounding set: nothing is gained at exec), no new privileges.
        return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs",
                "sh", str(self.script), command]

    def run(self, command: str = "install", **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(command), env=self.env(**extra), capture_output=True,
                              text=True, timeout=120)

    def libs(self) -> list[str]:
        return sorted(p.name for p in self.lib.glob("lib-*"))


def cni_version(exe: Path) -> dict:
    proc = subprocess.run([str(exe)], input=b'{"cniVersion": "1.0.0"}', capture_output=True, timeout=30,
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_node_script_installs_without_capabilities(tmp_path: Path) -> None:
    node = Node(tmp_path)
    (node.conf_dir).mkdir(parents=True)
    if PODMAN_BRIDGE.is_file():
        shutil.copy(PODMAN_BRIDGE, node.conf_dir)
    else:
        (node.conf_dir / PODMAN_BRIDGE.name).write_text('{"cniVersion": "0.4.0", "name": "podman", "plugins": []}')

    r = node.run()
    assert r.returncode == 0, r.stderr
    assert f"the runtime uses {node.conf_dir}/00-sockgate.conflist" in r.stderr
    assert json.loads((node.conf_dir / "00-sockgate.conflist").read_text()) == node.conflist()
    assert node.policy.read_text() == (node.config / "policy.json").read_text()
    assert "Google ranges" in r.stderr and (node.state / "ranges" / "google.json").is_file()
    # The compiled executable alone: nothing beside it runs Python on the node.
    assert node.exe.read_bytes() == COMPILED.read_bytes() and os.access(node.exe, os.X_OK)
    assert sorted(os.listdir(node.bin)) == ["sockgate"] and node.libs() == []
    assert "1.0.0" in cni_version(node.exe)["supportedVersions"]
    # No agent: "try again later", naming the socket (the runtime retries).
    conf = node.conflist()
    net = {"cniVersion": conf["cniVersion"], "name": conf["name"], **conf["plugins"][0]}
    add = subprocess.run([str(node.exe)], input=json.dumps(net).encode(), capture_output=True, timeout=30,
                         env={"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x",
                              "CNI_IFNAME": "eth0", "CNI_PATH": str(node.bin)})
    err = json.loads(add.stdout)
    assert add.returncode == 1 and err["code"] == 11 and f"{node.run_dir}/agent.sock" in err["details"], add

    # Idempotent: nothing rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in (node.exe, node.policy, node.conf_dir / "00-sockgate.conflist")}
    r = node.run()
    assert r.returncode == 0, r.stderr
    assert "installed" not in r.stderr and "removed" not in r.stderr, r.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_node_script_upgrades_from_the_python_launcher(tmp_path: Path) -> None:
    """A node of a version before the compiled executable: a Python launcher running
    /opt/sockgate/lib-<hash> (two such libraries after an upgrade). The install replaces
    the launcher, keeps the library it points to for calls still running from it, removes
    the other, and removes that one at the next install; a sockgate-python left by
    another installation goes too."""
    node = Node(tmp_path)
    for lib in ("lib-0123456789abcdef", "lib-fedcba9876543210"):
        (node.lib / lib / "cni_plugin").mkdir(parents=True)
    node.bin.mkdir(parents=True)
    node.exe.write_text("#!/usr/bin/python3 -IS\nimport sys\n"
                        f"sys.path.insert(0, '{node.lib}/lib-fedcba9876543210')\n"
                        "from cni_plugin.shim import main\nraise SystemExit(main())\n")
    (node.bin / "sockgate-python").write_text("#!/usr/bin/python3 -IS\n")
    r = node.run()
    assert r.returncode == 0, r.stderr
    assert node.exe.read_bytes() == COMPILED.read_bytes()
    assert node.libs() == ["lib-fedcba9876543210"] and f"removed {node.lib}/lib-0123456789abcdef" in r.stderr
    assert sorted(os.listdir(node.bin)) == ["sockgate"] and "removed" in r.stderr
    r = node.run()
    assert r.returncode == 0, r.stderr
    assert node.libs() == [] and f"removed {node.lib}/lib-fedcba9876543210" in r.stderr
    assert "1.0.0" in cni_version(node.exe)["supportedVersions"]


def test_node_script_refuses_clearly(tmp_path: Path) -> None:
    node = Node(tmp_path)
    # An image without the compiled executable: refused, naming where it looked.
    r = node.run(CNI_EXE="/nonexistent/sockgate-cni")
    assert r.returncode == 1 and "no CNI executable at /nonexistent/sockgate-cni" in r.stderr, r.stderr

    # A bad conflist in the ConfigMap: refused, naming the field; nothing written there.
    bad = node.conflist()
    bad["plugins"][0]["ipv4Pool"] = "10.77.0.0/33"
    (node.config / "00-sockgate.conflist").write_text(json.dumps(bad))
    r = node.run()
    assert r.returncode == 1 and "ipv4Pool" in r.stderr and "not a valid sockgate conflist" in r.stderr
    # Everything is checked before anything is written.
    assert not node.lib.exists() and not node.bin.exists() and not node.conf_dir.exists()
    assert not node.policy.exists()

    # An invalid policy and none on the node yet: refused.
    (node.config / "00-sockgate.conflist").write_text(json.dumps(node.conflist()))
    (node.config / "policy.json").write_text('{"blockedPorts": [{"protocol": "tcp", "port": 0}]}')
    r = node.run()
    assert r.returncode == 1 and "blockedPorts[0].port" in r.stderr and "no valid policy" in r.stderr


def test_policy_sync_follows_the_configmap(tmp_path: Path) -> None:
    node = Node(tmp_path)
    assert node.run().returncode == 0
    # No ranges cache yet (the first update failed, say): the sidecar fetches at once and
    # touches the policy file, which makes the agent re-apply it with the new ranges.
    cache = node.state / "ranges" / "google.json"
    cache.unlink()
    old_mtime = node.policy.stat().st_mtime_ns
    log = tmp_path / "sync.log"
    with log.open("w") as out:
        proc = subprocess.Popen(node.argv("sync-policy"), env=node.env(SYNC_EVERY="0.2"),
                                stdout=out, stderr=out, start_new_session=True)
    try:
        def wait_for(cond, what: str) -> None:
            deadline = time.monotonic() + 20
            while not cond():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"{what}: {log.read_text()}"
                time.sleep(0.1)

        wait_for(lambda: cache.is_file() and node.policy.stat().st_mtime_ns != old_mtime, "ranges not refreshed")
        # A ConfigMap edit (kubelet swaps the file) reaches the node.
        changed = json.dumps(lab_policy(blockedPorts=[{"protocol": "tcp", "port": 6667}]))
        (node.config / ".new").write_text(changed)
        os.replace(node.config / ".new", node.config / "policy.json")
        wait_for(lambda: node.policy.read_text() == changed, "valid policy not synced")
        # An invalid one is logged once and the node keeps its policy.
        (node.config / ".new").write_text('{"exceptions": [{"destination": "10.0.0.1", "ports": [70000]}]}')
        os.replace(node.config / ".new", node.config / "policy.json")
        wait_for(lambda: "invalid" in log.read_text(), "invalid policy not reported")
        time.sleep(1)
        assert node.policy.read_text() == changed
        assert log.read_text().count("policy is invalid") == 1 and "exceptions[0].ports[0]" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
    assert rc == 0, log.read_text()


# ---- scripts/install-node.sh ---------------------------------------------------------------

def install_node(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL_NODE), "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120)


def layout(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_install_node_layout(tmp_path: Path) -> None:
    root = tmp_path / "root"
    conf_dir = root / "etc/cni/net.d"
    conf_dir.mkdir(parents=True)
    (conf_dir / PODMAN_BRIDGE.name).write_text('{"cniVersion": "0.4.0", "name": "podman", "plugins": []}')

    r = install_node(root)
    assert r.returncode == 0, r.stderr
    assert "nothing enabled" in r.stdout and "warning" not in r.stderr
    assert layout(root) == {
        "opt/cni/bin/sockgate", "opt/cni/bin/sockgate-python", "etc/cni/net.d/00-sockgate.conflist", "etc/cni/net.d/87-podman-bridge.conflist",
        "etc/sockgate/policy.json", "etc/systemd/system/sockgate-agent.service",
        "etc/systemd/system/sockgate-ranges.service", "etc/systemd/system/sockgate-ranges.timer"}

    # The compiled executable, and the launcher of this installation's Python beside it
    # for requests while the agent is down.
    exe = root / "opt/cni/bin/sockgate"
    assert exe.read_bytes() == COMPILED.read_bytes() and os.access(exe, os.X_OK)
    launcher = root / "opt/cni/bin/sockgate-python"
    assert os.access(launcher, os.X_OK) and f"#!{VENV}/bin/python" in launcher.read_text().splitlines()[0]
    assert cni_version(exe)["supportedVersions"] == list(SUPPORTED_VERSIONS)

    conflist = json.loads((conf_dir / "00-sockgate.conflist").read_text())
    assert sorted(os.listdir(conf_dir))[0] == "00-sockgate.conflist"
    assert conflist == {"cniVersion": "1.0.0", "name": "sockgate", "plugins": [{
        "type": "sockgate", "ipv4Pool": "10.77.0.0/16", "ipv6Pool": "fd77:5067:6174::/64",
        "stateDir": "/var/lib/sockgate", "runDir": "/run/sockgate", "policyFile": "/etc/sockgate/policy.json"}]}

    policy = root / "etc/sockgate/policy.json"
    assert policy.read_text() == (PROJECT_ROOT / "deploy/systemd/policy.json").read_text()

    unit = (root / "etc/systemd/system/sockgate-agent.service").read_text()
    lines = unit.splitlines()
    assert "Type=notify" in lines and "Restart=on-failure" in lines and "KillSignal=SIGTERM" in lines
    assert (f"ExecStart={VENV}/bin/sockgate agent --state-dir /var/lib/sockgate --run-dir /run/sockgate "
            "--policy /etc/sockgate/policy.json --metrics-address 127.0.0.1:9464") in lines
    assert "StateDirectory=sockgate" in lines and "RuntimeDirectory=sockgate" in lines
    assert "RuntimeDirectoryPreserve=yes" in lines and "WantedBy=multi-user.target" in lines
    ranges = (root / "etc/systemd/system/sockgate-ranges.service").read_text().splitlines()
    assert (f"ExecStart={VENV}/bin/sockgate ranges update --policy /etc/sockgate/policy.json "
            "--state-dir /var/lib/sockgate") in ranges
    if shutil.which("systemd-analyze"):
        units = sorted((root / "etc/systemd/system").iterdir())
        v = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True,
                           timeout=60, cwd=root / "etc/systemd/system")
        assert v.returncode == 0 and v.stderr.strip() == "", v.stderr

    # Second run: idempotent, and an operator's policy is never overwritten.
    policy.write_text(json.dumps({"blockedPorts": [{"protocol": "tcp", "port": 6667}]}))
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    r = install_node(root)
    assert r.returncode == 0, r.stderr
    assert "installed" not in r.stdout and f"kept {policy}" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps

    # Options land in the conflist and the units.
    r = install_node(root, "--ipv4-pool", "10.78.0.0/20", "--network", "edge", "--metrics-address", "")
    assert r.returncode == 0, r.stderr
    plugin = json.loads((conf_dir / "00-sockgate.conflist").read_text())["plugins"][0]
    assert plugin["ipv4Pool"] == "10.78.0.0/20"
    assert ('--metrics-address ""\n' in (root / "etc/systemd/system/sockgate-agent.service").read_text())

    # --shim python: the launcher is the executable, and the compiled install's launcher goes.
    r = install_node(root, "--shim", "python")
    assert r.returncode == 0, r.stderr
    assert f"removed {root}/opt/cni/bin/sockgate-python" in r.stdout
    assert f"#!{VENV}/bin/python" in exe.read_text().splitlines()[0]
    assert not launcher.exists() and cni_version(exe)["supportedVersions"] == list(SUPPORTED_VERSIONS)
    assert install_node(root).returncode == 0 and exe.read_bytes() == COMPILED.read_bytes()

    # Uninstall: ours goes, the policy and the other runtime's config stay.
    r = install_node(root, "--uninstall")
    assert r.returncode == 0, r.stderr
    assert layout(root) == {"etc/cni/net.d/87-podman-bridge.conflist", "etc/sockgate/policy.json"}


@pytest.mark.lab
def test_install_node_uninstall_takes_the_table_and_the_meter_once_no_container_needs_them(lab, plugin, app,
                                                                                           tmp_path: Path) -> None:
    """--uninstall on a node (no --root): the table and the segment meter go too, but
    never from under an attached container. Run in the lab's node netns, with the node
    paths it writes or reads (CNI dirs, units, /run/systemd: no systemctl here) bound
    to scratch dirs in a private mount namespace, and the plugin's state and run dirs
    at node-like paths: nothing on the host is touched."""
    scratch = {d: tmp_path / "node" / d.strip("/").replace("/", "_")
               for d in ("/etc/cni/net.d", "/opt/cni/bin", "/etc/systemd/system", "/run/systemd")}
    for d in scratch.values():
        d.mkdir(parents=True)
    binds = {**scratch, "/var/lib/sgtest-state": plugin.state_dir, "/run/sgtest-run": Path(plugin.conf["runDir"])}
    Path(plugin.conf["runDir"]).mkdir(parents=True, exist_ok=True)

    def uninstall() -> subprocess.CompletedProcess[str]:
        argv = ["bash", str(INSTALL_NODE), "--uninstall", "--state-dir", "/var/lib/sgtest-state",
                "--run-dir", "/run/sgtest-run"]
        work = tmp_path / f"privmount{len(list(tmp_path.glob('privmount*')))}"
        work.mkdir()
        return subprocess.run(["nsenter", f"--net={lab.ns_path(lab.node)}", *private_mounts(binds, work, argv)],
                              capture_output=True, text=True, timeout=120)

    def table_there() -> bool:
        return lab.run(lab.node, ["nft", "list", "table", "inet", "sockgate"], check=False).returncode == 0

    ns = app()
    assert plugin.add("still-here", ns)
    try:
        r = uninstall()
        assert r.returncode == 1 and "nothing removed: containers are still attached" in r.stderr, r.stdout + r.stderr
        assert "container still-here is attached" in r.stderr and table_there()
        plugin.delete("still-here", ns)
        r = uninstall()
        assert r.returncode == 0, r.stdout + r.stderr
        assert "install-node.sh: removed:" in r.stdout and "nft table inet sockgate" in r.stdout
        assert not table_there()
        assert not in_netns(lab.ns_path(lab.node), segment_meter.installed)
    finally:
        # The ADD mounted the meter's bpffs in the host's view; the script's teardown
        # unmounted it in its private mounts only.
        if segment_meter.unmount_if_unused():
            with contextlib.suppress(OSError):
                Path(RUN_DIR).rmdir()


@pytest.mark.parametrize("args, message", [
    (["--ipv4-pool", "10.77.0.0/33"], "ipv4Pool"),
    (["--ipv6-pool", "10.0.0.0/8"], "ipv6Pool"),
    (["--cni-version", "9.9.9"], "--cni-version 9.9.9 is not one of"),
    (["--state-dir", "/srv/sockgate"], "--state-dir must be under /var/lib"),
    (["--conflist-name", "sockgate.conf"], "must end in .conflist"),
    (["--venv", "/nonexistent"], "no sockgate in /nonexistent"),
    (["--bogus"], "unknown option: --bogus"),
    (["--shim", "go"], "--shim must be auto, compiled or python"),
    (["--policy", "/nonexistent.json"], "--policy /nonexistent.json: no such file"),
])
def test_install_node_refuses_clearly(tmp_path: Path, args: list[str], message: str) -> None:
    r = install_node(tmp_path, *args)
    assert r.returncode == 1 and message in r.stderr and r.stderr.startswith("install-node.sh: error: "), r.stderr
    assert layout(tmp_path) == set(), "nothing may be written when the install is refused"


def test_install_node_refuses_an_invalid_existing_policy(tmp_path: Path) -> None:
    policy = tmp_path / "etc/sockgate/policy.json"
    policy.parent.mkdir(parents=True)
    policy.write_text('{"ingress": [{"source": "nowhere"}]}')
    r = install_node(tmp_path)
    assert r.returncode == 1 and "ingress[0]" in r.stderr and "nothing installed" in r.stderr
    # The checker's own prefix is cut: one "error:", the installer's.
    assert "error:" not in r.stderr.split("nothing installed: ", 1)[1], r.stderr
    assert layout(tmp_path) == {"etc/sockgate/policy.json"}


# ---- real runtimes -----------------------------------------------------------------------

class RootedContainerd(Containerd):
    """containerd whose processes (and so the CNI executables ctr runs) see some of a
    temporary root's dirs at their node paths, through private bind mounts."""

    def __init__(self, *args, binds: dict[str, Path], **kw) -> None:
        super().__init__(*args, **kw)
        self.extra_binds = binds

    def _wrap(self, argv, binds):
        return super()._wrap(argv, {**self.extra_binds, **binds})

    def cni_del(self, name: str, cni_bin_dir=None) -> int:
        """As Containerd.cni_del, with the plugin in the same private mounts."""
        def runner(argv: list[str]) -> list[str]:
            return ["nsenter", f"--net={self.netns_path}", *private_mounts(self.extra_binds, self._scratch(), argv)]
        path = ([cni_bin_dir] if cni_bin_dir is not None else []) + ["/usr/lib/cni"]
        atts = cnitool.cached_attachments(self.cni_cache_dir, f"{self.namespace}-{name}")
        for att in atts:
            cni = cnitool.CNI.from_cache(self.cni_cache_dir, att, path, runner_netns=runner)
            cni.delete(att["containerId"], "", att["ifName"], att.get("cniArgs"), att.get("capabilityArgs"))
        return len(atts)


@pytest.mark.lab
@pytest.mark.clients
def test_installed_conflist_drives_ctr_run_cni(lab, tmp_path: Path) -> None:
    """install-node.sh into a temporary root with the default node paths; containerd sees
    that root's /etc/cni/net.d, /opt/cni/bin, /etc/sockgate, /var/lib/sockgate and
    /run/sockgate. The lexically first conflist (ours, not podman's bridge) is used."""
    root = tmp_path / "root"
    conf_dir = root / "etc/cni/net.d"
    conf_dir.mkdir(parents=True)
    if PODMAN_BRIDGE.is_file():
        shutil.copy(PODMAN_BRIDGE, conf_dir)
    # The lab's policy is there before the install (which keeps it): local Google ranges.
    (root / "etc/sockgate").mkdir(parents=True)
    write_lab_policy(root / "etc/sockgate/policy.json")
    r = install_node(root)
    assert r.returncode == 0, r.stderr
    # What systemd's StateDirectory= and RuntimeDirectory= would create.
    for d in ("var/lib/sockgate", "run/sockgate"):
        (root / d).mkdir(parents=True, mode=0o700)

    binds = {"/etc/sockgate": root / "etc/sockgate", "/var/lib/sockgate": root / "var/lib/sockgate",
             "/run/sockgate": root / "run/sockgate"}
    archive = images.busybox_oci_archive(tmp_path / "images")
    node = lab.ns_path(lab.node)
    before = node_links(node)
    leases = root / "var/lib/sockgate/networks/sockgate/leases"
    with RootedContainerd(node, tmp_path / "ctd", binds=binds) as ctd:
        ctd.import_image(archive)
        script = f"ip -4 addr show eth0; echo hello | nc -w 3 {LAB.public_v4} 9000"
        r = ctr_run_cni(ctd, images.BUSYBOX_REF, "web", ["sh", "-c", script], conf_dir, root / "opt/cni/bin")
        assert r.rc == 0, r.stderr
        assert "inet 10.77." in r.stdout, r.stdout
        peers = [json.loads(line)["peer"] for line in r.stdout.splitlines() if line.startswith("{")]
        assert peers == [LAB.node_uplink_v4], r.stdout

        # Detached: the lease and record are in the temporary root while it runs.
        assert ctr_run_cni(ctd, images.BUSYBOX_REF, "bg", ["sleep", "600"], conf_dir, root / "opt/cni/bin",
                           detach=True).rc == 0
        assert len([p for p in leases.iterdir() if not p.name.startswith(".")]) == 2  # v4 + v6
        assert len(node_links(node) - before) == 1
        ctd.remove("bg")
    # --rm and remove() sent DEL: nothing left.
    assert [p for p in leases.iterdir() if not p.name.startswith(".")] == []
    assert not list((root / "var/lib/sockgate/networks/sockgate/attachments").glob("*.json"))
    assert node_links(node) == before


@pytest.mark.lab
@pytest.mark.clients
def test_agent_runs_under_the_daemonset_security_context(lab, app, tmp_path: Path) -> None:
    """The DaemonSet's shape on one "node": the node script installs the compiled CNI
    executable (nothing of Python on the node), and the agent runs in
    a container with exactly the agent container's capabilities, the runtime's default
    seccomp profile and read-only /proc/sys, its command taken from the manifest. A CRI
    style netns path (/run/netns/…) goes through the executable to the agent."""
    node_dir = tmp_path / "n"
    node_dir.mkdir()
    node = Node(node_dir)
    r = node.run()
    assert r.returncode == 0, r.stderr
    conf = node.conflist()
    plugin_conf = {"cniVersion": conf["cniVersion"], "name": "k8s" + os.urandom(3).hex(), **conf["plugins"][0]}
    pod_dir = tmp_path / "pod"
    pod_dir.mkdir()
    # Pods exist before containerd starts: its private mount namespace gets no later
    # netns mounts (in the cluster, mountPropagation: HostToContainer brings them).
    pod_ns = app()

    agent = container("agent")
    command = agent["command"][2]
    for node_path, here in (("/var/lib/sockgate", node.state), ("/run/sockgate", node.run_dir),
                            ("/etc/sockgate/policy.json", node.policy)):
        command = command.replace(f" {node_path} ", f" {here} ").replace(f" {node_path}\n", f" {here}\n")
    command = command.replace("exec sockgate ", f"exec {VENV}/bin/sockgate ") + " 2>>/pod/agent.log"
    assert f"--state-dir {node.state} " in command and "umount /proc/sys" in command

    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    for d in ("usr", "etc", "proc", "sys", "dev", "tmp", "run/netns", "pod"):
        (rootfs / d).mkdir(parents=True)
    mounts = {}
    for top in ("bin", "sbin", "lib", "lib64"):  # merged /usr or not
        if Path("/" + top).is_symlink():
            (rootfs / top).symlink_to(os.readlink("/" + top))
        elif Path("/" + top).is_dir():
            mounts["/" + top] = "/" + top
    mounts |= {"/usr": "/usr", "/etc": "/etc", str(PROJECT_ROOT): str(PROJECT_ROOT),
              str(VENV): str(VENV), str(GOOGLE_RANGES_DIR): str(GOOGLE_RANGES_DIR),
              str(node.state): str(node.state), str(node.run_dir): str(node.run_dir),
              str(node.policy.parent): str(node.policy.parent), "/pod": str(pod_dir)}
    ctx = agent["securityContext"]
    default_caps = ["CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE"]
    args = ["--net-host", "--seccomp", "-d", *(["--read-only"] if ctx["readOnlyRootFilesystem"] else []), "--rootfs"]
    # The downward API's status.hostIP: the lab node's address.
    host_ips = {"status.hostIP": LAB.node_uplink_v4}
    args += [a for e in agent["env"] for a in ("--env", f"{e['name']}={host_ips[e['valueFrom']['fieldRef']['fieldPath']]}")]
    args += [a for c in ctx["capabilities"]["add"] for a in ("--cap-add", f"CAP_{c}")]
    args += [a for c in default_caps if c not in ctx["capabilities"]["add"] for a in ("--cap-drop", f"CAP_{c}")]
    for dst, src in mounts.items():
        args += ["--mount", f"type=bind,src={src},dst={dst},options=rbind:{'rw' if src.startswith(str(tmp_path)) else 'ro'}"]
    # The manifest's pin dir mount for /run/netns (where the lab pins its namespaces),
    # as the kubelet makes it: rslave is HostToContainer.
    (pin,) = [m for m in agent["volumeMounts"] if m["mountPath"] == "/run/netns"]
    assert pin["mountPropagation"] == "HostToContainer"
    args += ["--mount", f"type=bind,src=/run/netns,dst=/run/netns,options=rbind:rslave:{'ro' if pin.get('readOnly') else 'rw'}"]

    with Containerd(lab.ns_path(lab.node), tmp_path / "ctd") as ctd:
        started = ctd.ctr("run", *args, str(rootfs), "agent", "/bin/sh", "-c", command, check=False)
        assert started.returncode == 0, started.stderr
        ready = pod_dir / "agent.ready"
        deadline = time.monotonic() + 30
        while not ready.exists():
            log = (pod_dir / "agent.log").read_text() if (pod_dir / "agent.log").exists() else ""
            assert time.monotonic() < deadline, f"agent not ready: {log[-3000:]}"
            assert "RUNNING" in ctd.ctr("tasks", "ls").stdout, f"agent exited: {log[-3000:]}"
            time.sleep(0.1)
        pid = int(next(line.split()[1] for line in ctd.ctr("tasks", "ls").stdout.splitlines()[1:]
                       if line.split()[0] == "agent"))
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        # CAP_NET_ADMIN (12) and CAP_SYS_ADMIN (21), nothing else.
        assert int(status["CapEff"], 16) == (1 << 12) | (1 << 21), status["CapEff"]
        assert status["Seccomp"].strip() == "2"

        # The probes, as the kubelet runs them in the agent container (paths moved).
        for probe_name in ("readinessProbe", "livenessProbe"):
            argv = [a.replace("/run/sockgate", str(node.run_dir)).replace("/pod/", f"{pod_dir}/")
                    for a in agent[probe_name]["exec"]["command"]]
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            assert p.returncode == 0, (probe_name, p.stderr)

        plugin = Plugin(str(node.exe), lab.ns_path(lab.node), plugin_conf)
        result = plugin.add("pod1", pod_ns)
        ip4 = next(i["address"] for i in result["ips"] if "." in i["address"])
        assert ip4.startswith("10.77.")
        served = [json.loads(line) for line in (pod_dir / "agent.log").read_text().splitlines()
                  if line.startswith("{")]
        assert any("ADD" in e["msg"] and "rc=0" in e["msg"] for e in served), served
        # Prometheus' view: the declared port on the node's (the pod's) address answers.
        port = metrics_port()["containerPort"]
        scrape = lab.run(lab.internet, [sys.executable, "-c", "import urllib.request; print(urllib.request.urlopen("
                                        f"'http://{LAB.node_uplink_v4}:{port}/metrics', timeout=5).read().decode())"])
        assert 'sockgate_cni_requests_total{command="ADD",result="ok"} 1.0' in scrape.stdout, scrape.stdout
        assert "sockgate_build_info{" in scrape.stdout
        # The sysctls were written from inside the container, in the pod's netns too.
        assert lab.run(pod_ns, ["cat", "/proc/sys/net/ipv6/conf/eth0/accept_ra"]).stdout.strip() == "0"
        probe = lab.probe(pod_ns, "tcp", LAB.public_v4, 9000)
        assert probe.ok and probe.peer_seen == LAB.node_uplink_v4, probe
        assert plugin("CHECK", "pod1", pod_ns).rc == 0
        plugin.delete("pod1", pod_ns)
        assert plugin.leases() == [] and plugin.records() == []

        ctd.ctr("tasks", "kill", "-s", "SIGTERM", "agent")
        deadline = time.monotonic() + 30
        while "RUNNING" in ctd.ctr("tasks", "ls").stdout:
            assert time.monotonic() < deadline, "agent did not stop on SIGTERM"
            time.sleep(0.1)
        assert not ready.exists() and not (node.run_dir / "agent.sock").exists()
        argv = [a.replace("/run/sockgate", str(node.run_dir)) for a in agent["livenessProbe"]["exec"]["command"]]
        assert subprocess.run(argv, capture_output=True, timeout=10).returncode != 0  # a dead agent fails it
        ctd.remove("agent", cni_del=False)
