"""The Docker door's records on disk: STATE_DIR/docker/{networks,endpoints}/<id>.json,
one file per network or endpoint, each written atomically. Ids are checked by the
caller (runtime.docker.options.check_id) before they name a file."""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic, TypeVar

from runtime.fsutil import atomic_write_json, read_json, remove, remove_stale_temps


@dataclass
class NetworkRecord:
    id: str
    options: dict[str, str]            # the validated -o options
    sockgate_network: str              # the core network (lease and attachment space)
    name: str = ""                     # Docker's name, learnt in the background
    created: float = 0.0
    answered: bool = True              # False from CreateNetwork's record to its answer's write


@dataclass
class EndpointRecord:
    network_id: str
    id: str
    state: str = "created"             # answering (CreateEndpoint, until its answer is written) ->
                                       # created -> joined (Join) -> created (Leave)
                                       # -> deleting (DeleteEndpoint under way; the sweep finishes
                                       # one whose agent was killed)
    ifname: str = ""
    sandbox: str = ""
    container_id: str = ""             # Docker's, learnt in the background
    container_name: str = ""
    created: float = 0.0


R = TypeVar("R", NetworkRecord, EndpointRecord)


class RecordDir(Generic[R]):
    """One kind of record, DIR/<id>.json."""

    def __init__(self, directory: Path, kind: type[R], write: threading.Lock) -> None:
        self.dir = directory
        self.kind: type[R] = kind
        self._write = write

    def get(self, key: str) -> R | None:
        data = read_json(self.dir / f"{key}.json")
        return self.kind(**data) if data else None

    def all(self) -> list[R]:
        return [self.kind(**d) for p in sorted(self.dir.glob("*.json")) if (d := read_json(p))]

    def save(self, rec: R) -> None:
        with self._write:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write_json(self.dir / f"{rec.id}.json", asdict(rec))

    def delete(self, key: str) -> None:
        remove(self.dir / f"{key}.json")


class DockerStore:
    def __init__(self, state_dir: str) -> None:
        self.root = Path(state_dir) / "docker"
        # One writer at a time in this process (fsutil's lock on the temp file is what
        # keeps writers of one record apart across processes).
        write = threading.Lock()
        self.networks = RecordDir(self.root / "networks", NetworkRecord, write)
        self.endpoints = RecordDir(self.root / "endpoints", EndpointRecord, write)

    def remove_stale_temps(self) -> list[Path]:
        """Temp files of record writes killed mid-write (kill -9 of the agent)."""
        return [*remove_stale_temps(self.networks.dir), *remove_stale_temps(self.endpoints.dir)]
