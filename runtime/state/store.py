"""Attachment records: what an ADD created, kept on disk so DEL, CHECK and GC can find
it again after a crash of the plugin or the agent.

Records are written atomically (rename) but not fsynced: they describe veths, routes
and nft elements, all of which a crash of the node takes with it. A record torn by
such a crash is unreadable; it is treated as absent, and GC removes it (see
`attachments`). An fsync here cost ~3 ms of every ADD.

A writer killed in the middle of a write leaves the record's temp file
(`.<container>--<ifname>.json.tmp`, see runtime.fsutil): DEL removes that record's,
GC every one that no live writer holds."""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.fsutil import atomic_write_json, locked, read_json, remove, remove_stale_temps, remove_temp

ADDING = "adding"
READY = "ready"


def host_ifname(network: str, container_id: str, ifname: str) -> str:
    """Deterministic host-side name, so DEL can find the veth with no record at all.
    "sg" + 12 hex = 14 bytes, under Linux's 15-byte limit."""
    digest = hashlib.sha256(f"{network}/{container_id}/{ifname}".encode()).hexdigest()
    return "sg" + digest[:12]


@dataclass
class Attachment:
    network: str
    container_id: str
    ifname: str
    netns: str
    host_ifname: str
    ipv4: str = ""
    ipv6: str = ""
    mtu: int = 1500
    host_mac: str = ""
    # The node end's interface index: the key of its nft elements (0: not known, the
    # elements are then found by their comment, see nft.remove).
    host_ifindex: int = 0
    container_mac: str = ""
    # Who the container is, for billing: Kubernetes pod or Docker container name.
    labels: dict[str, str] = field(default_factory=dict)
    runtime_config: dict[str, Any] = field(default_factory=dict)
    state: str = ADDING
    created: str = ""
    # The token of the elements ADD created (runtime.core.restore.new_generation): billing
    # tells by it that a table reload re-created them before the first record.
    generation: str = ""
    # ADD turned off the container end's segmentation offloads (runtime/kernel/ethtool.py).
    # False in a record an earlier sockgate wrote: the next table reload does it then.
    segmentation_off: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)

    @property
    def pod(self) -> str | None:
        """"namespace/name" of a Kubernetes pod's attachment, else None."""
        ns, name = self.labels.get("pod_namespace"), self.labels.get("pod_name")
        return f"{ns}/{name}" if ns and name else None


_FIELDS = {f.name for f in fields(Attachment)}


def _read(path: Path) -> Attachment | None:
    try:
        data = read_json(path)
        if not isinstance(data, dict) or not data:
            return None
        # Fields of a later version are left out, so that a downgrade still reads
        # (and can DEL) what it wrote. (Versions before 2026-12-06 refused records
        # with the `generation` field added then.)
        return Attachment(**{k: v for k, v in data.items() if k in _FIELDS})
    except (ValueError, TypeError):
        return None


def read_record(path: Path) -> Attachment | None:
    """One attachment record by its path (record_paths); None when it is missing,
    unreadable or torn."""
    try:
        return _read(path)
    except OSError:
        return None


class AttachmentStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, container_id: str, ifname: str) -> Path:
        # Neither part can hold "/" (validated at the door); "--" can't start an ifname.
        return self.directory / f"{container_id}--{ifname}.json"

    def save(self, att: Attachment) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_json(self._path(att.container_id, att.ifname), asdict(att), durable=False)

    def load(self, container_id: str, ifname: str) -> Attachment | None:
        return _read(self._path(container_id, ifname))

    def delete(self, container_id: str, ifname: str) -> None:
        remove(self._path(container_id, ifname))

    def remove_temp(self, container_id: str, ifname: str) -> bool:
        """The temp file a writer of this record died with (never a live writer's)."""
        return remove_temp(self._path(container_id, ifname))

    def remove_stale_temps(self) -> list[Path]:
        """Every record's temp file that no live writer holds."""
        return remove_stale_temps(self.directory)


@dataclass(frozen=True)
class Listing:
    """What `attachments` found: the readable records, the paths of those that aren't
    (torn by a crash of the node: see the module's docstring), and the networks
    listed."""

    records: list[Attachment]
    unreadable: list[Path]
    networks: list[str]

    def complete(self) -> set[str]:
        """The networks none of whose records is unreadable."""
        return set(self.networks) - {path.parent.parent.name for path in self.unreadable}


def network_root(state_dir: str | os.PathLike[str], network: str) -> Path:
    """One network's directory: its leases, attachment records and lock."""
    return Path(state_dir) / "networks" / network


def _network_dirs(state_dir: str | os.PathLike[str], network: str | None) -> list[Path]:
    if network is not None:
        return [network_root(state_dir, network)]
    root = Path(state_dir) / "networks"
    return sorted(root.iterdir()) if root.is_dir() else []


def network_names(state_dir: str | os.PathLike[str]) -> list[str]:
    """The networks with a directory under the state dir, by name."""
    return [net.name for net in _network_dirs(state_dir, None) if net.is_dir()]


def record_paths(state_dir: str | os.PathLike[str], network: str | None = None) -> list[Path]:
    """The attachment records' paths (of one network, or of all) by network then
    name, without reading them: cheap enough to count every few seconds on a node of
    a thousand."""
    return _paths(_network_dirs(state_dir, network))


def _paths(nets: list[Path]) -> list[Path]:
    return [path for net in nets for path in sorted((net / "attachments").glob("*.json"))]


def attachments(state_dir: str | os.PathLike[str], network: str | None = None) -> Listing:
    """Every attachment record under a state dir (of one network, or of all), by
    network then file name. The one way to list them."""
    found: list[Attachment] = []
    unreadable: list[Path] = []
    nets = _network_dirs(state_dir, network)
    for path in _paths(nets):
        try:
            att = _read(path)
        except OSError:  # e.g. not a file: as unreadable as a torn one
            att = None
        if att is None:
            unreadable.append(path)
        else:
            found.append(att)
    return Listing(found, unreadable, [net.name for net in nets])


def table_lock(state_dir: str, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
    """ADD and DEL hold it (shared, side by side) while they change an attachment's
    elements and record; a reload holds it alone, so the attachments it restores are
    exactly the ready ones, none half added or half removed. The billing flush reads
    the counters under it too (runtime/billing/flush.py)."""
    return locked(Path(state_dir) / "table.lock", shared=not exclusive)
