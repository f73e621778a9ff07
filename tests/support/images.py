"""Tiny container images built offline from Debian's busybox-static.

No registry is reachable on these machines, so tests build their own image:

* ``busybox_rootfs_tar(cache_dir)``: a plain rootfs tar (``/bin/busybox``, one
  symlink per applet, ``/bin/sh``, ``/etc/passwd`` ...) that ``podman import``
  (or ``docker import``) takes.
* ``busybox_oci_archive(cache_dir)``: an OCI image layout tarball (``oci-layout``,
  ``index.json``, ``blobs/sha256/...``) that ``ctr images import`` takes and names
  ``BUSYBOX_REF`` (from the ``io.containerd.image.name`` annotation; without it ctr
  would want ``--base-name``).

Checked: ``podman import --change CMD=/bin/sh <rootfs.tar> <ref>`` with private
--root/--runroot (CONTAINERS_STORAGE_CONF) works, but podman still writes on the
host: its blob info cache (/var/lib/containers/cache), /etc/cni/net.d/cni.lock
(unless network_config_dir is set), /run/containers/networks, and on ``run``
/run/runc and cgroups under /libpod_parent. Run it under
``containerd.private_mounts`` (private /var/lib/containers, /run/containers,
/run/runc) with a containers.conf setting network_config_dir.

Both are deterministic (mtime 0, uid 0, sorted entries), so the digests only change
when /bin/busybox changes. Outputs are cached in ``cache_dir`` under a key derived
from busybox's own digest; writes are atomic (tmp + rename), so parallel test runs
may share a cache dir.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
import tempfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
BUSYBOX_REF = "localhost/sockgate-busybox:latest"
_FORMAT = "2"  # bump when the image layout below changes, to invalidate caches

_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost\n",
    # Runtimes usually bind-mount their own; an empty file keeps the mount target valid.
    "etc/resolv.conf": "",
    "etc/nsswitch.conf": "hosts: files dns\n",
}
_DIRS = ["bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr", "usr/bin", "usr/sbin", "sbin", "var", "run"]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _applets() -> list[str]:
    # "--list-full" gives install paths (bin/ls, usr/bin/wget, sbin/ip ...).
    out = subprocess.run([str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True).stdout
    return sorted({line.strip() for line in out.splitlines() if line.strip()})


def _rootfs_bytes() -> bytes:
    buf = io.BytesIO()
    # GNU format, fixed metadata: byte-for-byte reproducible for a given busybox.
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, 0, 0, 0
            ti.uname = ti.gname = "root"
            ti.linkname = link
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data) if data else None)

        for d in _DIRS:
            add(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755)
        add("bin/busybox", tarfile.REGTYPE, 0o755, BUSYBOX.read_bytes())
        for path in _applets():
            if path == "bin/busybox" or path.count("/") == 0:
                continue
            # Absolute target: valid from any directory depth.
            add(path, tarfile.SYMTYPE, 0o777, link="/bin/busybox")
        for name, text in sorted(_ETC.items()):
            add(name, tarfile.REGTYPE, 0o644, text.encode())
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _key() -> str:
    return f"busybox-{_sha256_file(BUSYBOX)[:16]}-v{_FORMAT}"


def busybox_rootfs_tar(cache_dir: str | os.PathLike[str]) -> Path:
    """Path to a rootfs tar with busybox and its applets (for ``podman import``)."""
    out = Path(cache_dir) / f"{_key()}-rootfs.tar"
    if not out.exists():
        _atomic_write(out, _rootfs_bytes())
    return out


def _goarch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x", "riscv64": "riscv64"}.get(platform.machine(), platform.machine())


def busybox_oci_archive(cache_dir: str | os.PathLike[str], ref: str = BUSYBOX_REF,
                        cmd: tuple[str, ...] = ("/bin/sh",)) -> Path:
    """Path to an OCI image layout tarball (for ``ctr images import``), named ``ref``,
    whose default command is ``cmd``."""
    safe = hashlib.sha256(json.dumps([ref, *cmd]).encode()).hexdigest()[:8]
    out = Path(cache_dir) / f"{_key()}-{safe}-oci.tar"
    if out.exists():
        return out
    layer = busybox_rootfs_tar(cache_dir).read_bytes()
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    plat = {"architecture": _goarch(), "os": "linux"}
    config = json.dumps({
        **plat,
        "config": {"Cmd": list(cmd), "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "WorkingDir": "/"},
        # Uncompressed layer: the diff_id equals the layer digest.
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "sockgate tests/support/images.py"}],
    }, sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": len(layer)}],
    }, sort_keys=True).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": len(manifest), "platform": plat,
            # containerd uses io.containerd.image.name as the full name; the OCI
            # ref.name is the tag, per the image-spec convention.
            "annotations": {"io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": tag},
        }],
    }, sort_keys=True).encode()

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, data: bytes | None) -> None:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "root", "root"
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(ti)
            else:
                ti.mode, ti.size = 0o644, len(data)
                tar.addfile(ti, io.BytesIO(data))

        add("blobs", None)
        add("blobs/sha256", None)
        for digest, data in ((config_digest, config), (layer_digest, layer), (manifest_digest, manifest)):
            add(f"blobs/sha256/{digest.split(':', 1)[1]}", data)
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
    _atomic_write(out, buf.getvalue())
    return out
