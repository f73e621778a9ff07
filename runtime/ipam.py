"""Address leases on disk: one file per leased address, named by the address.

Creating a lease is O_EXCL, so two allocators can never hand out the same address,
and the lease survives a crash of the process that took it; DEL and GC find leases by
their owner and release them. Leases are not fsynced: after a crash of the node no
container holds an address any more, and a lease left empty by it names no owner,
so GC frees it.
"""
from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from runtime.errors import TRY_AGAIN_LATER, SockgateError
from runtime.fsutil import remove

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Owner:
    container_id: str
    ifname: str

    def encode(self) -> bytes:
        return f"{self.container_id}\n{self.ifname}\n".encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Owner":
        container_id, _, rest = raw.decode().partition("\n")
        return cls(container_id, rest.strip())


def candidates(pool: IPNetwork, after: IPAddress | None) -> Iterator[IPAddress]:
    """Usable addresses of `pool`, starting after the last one handed out so a freed
    address is not reused at once (a late packet for the old container would reach the
    new one). The network address, and the v4 broadcast address, are never used."""
    first = int(pool.network_address) + 1
    last = int(pool.broadcast_address) - (1 if pool.version == 4 else 0)
    start = int(after) + 1 if after is not None and first <= int(after) < last else first
    # Scanning a whole /64 is not an option; any pool has a free address within the
    # first million tries unless a million containers are attached.
    limit = min(last - first + 1, 1 << 20)
    span = last - first + 1
    for i in range(limit):
        yield ipaddress.ip_address(first + (start - first + i) % span)


class LeaseStore:
    """Leases of one network. Callers hold the network's lock while allocating, which
    keeps the round-robin cursor consistent; O_EXCL alone keeps addresses unique."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _cursor_path(self, version: int) -> Path:
        return self.directory / f".last-v{version}"

    def _last(self, version: int) -> IPAddress | None:
        try:
            return ipaddress.ip_address(os.readlink(self._cursor_path(version)))
        except (FileNotFoundError, ValueError, OSError):
            return None

    def _set_last(self, addr: IPAddress) -> None:
        # A symlink whose target is the address: replacing it touches no data block.
        # (Rewriting a small file in place makes ext4 flush it at close, ~0.6 ms.)
        cursor = self._cursor_path(addr.version)
        tmp = cursor.with_name(f"{cursor.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        os.symlink(str(addr), tmp)
        os.replace(tmp, cursor)

    def allocate(self, pool: IPNetwork, owner: Owner) -> IPAddress:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        used = set(os.listdir(self.directory))
        for addr in candidates(pool, self._last(pool.version)):
            if str(addr) in used:
                continue
            try:
                fd = os.open(self.directory / str(addr), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            try:
                os.write(fd, owner.encode())
            finally:
                os.close(fd)
            self._set_last(addr)
            return addr
        raise SockgateError(TRY_AGAIN_LATER, f"address pool {pool} is exhausted",
                            "every address is leased; retry after containers are deleted "
                            "or configure a larger pool")

    def leases(self) -> dict[IPAddress, Owner]:
        out: dict[IPAddress, Owner] = {}
        if not self.directory.is_dir():
            return out
        for name in os.listdir(self.directory):
            try:
                addr = ipaddress.ip_address(name)
                out[addr] = Owner.decode((self.directory / name).read_bytes())
            except (ValueError, FileNotFoundError):
                continue
        return out

    def release(self, addr: IPAddress) -> None:
        remove(self.directory / str(addr))

    def release_owner(self, owner: Owner) -> list[IPAddress]:
        freed = [addr for addr, o in self.leases().items() if o == owner]
        for addr in freed:
            self.release(addr)
        return freed
