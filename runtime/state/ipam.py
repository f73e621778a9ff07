"""Address leases on disk: one file per leased address, named by the address.

Created O_EXCL (no address handed out twice), found by owner at DEL and GC, not
fsynced (a lease with no owner is GC's). Design notes: docs/architecture.md.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from runtime.errors import TRY_AGAIN_LATER, SockgateError
from runtime.fsutil import is_temp_name, remove, temp_path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# allocate() tries this many addresses after the cursor before it lists the leases.
PROBES_BEFORE_LISTING = 16


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
        # Not fsutil.atomic_write: that writes a file's bytes; this renames a symlink
        # over the cursor, which needs no data, no fsync and no temp-file lock.
        # Only a hint: an allocator that doesn't hold the network lock (none does in
        # production; the unit tests' threads do) may find the temp name taken or its
        # temp gone, and then leaves the cursor as it is.
        cursor = self._cursor_path(addr.version)
        tmp = temp_path(cursor)
        try:
            try:
                os.symlink(str(addr), tmp)
            except FileExistsError:
                remove(tmp)  # an allocator killed before its rename left it
                os.symlink(str(addr), tmp)
            os.replace(tmp, cursor)
        except (FileExistsError, FileNotFoundError):
            pass

    def allocate(self, pool: IPNetwork, owner: Owner) -> IPAddress:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The address after the round-robin cursor is almost always free: try a few
        # with O_EXCL before listing the directory, whose cost grows with the node
        # (two leases per container).
        used: set[str] | None = None
        for i, addr in enumerate(candidates(pool, self._last(pool.version))):
            if used is None and i >= PROBES_BEFORE_LISTING:
                used = set(os.listdir(self.directory))
            if used is not None and str(addr) in used:
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

    def remove_temps(self, every: bool = False) -> list[Path]:
        """Remove the cursors' temp files left by killed allocators. The caller holds
        the network's lock, so no live allocator is between its symlink and its rename.
        every: also other temp names (earlier versions named them after pid and
        thread; this lists the directory) instead of the two fixed ones."""
        if every:
            try:
                names = [n for n in os.listdir(self.directory) if is_temp_name(n)]
            except FileNotFoundError:
                return []
        else:
            names = [temp_path(self._cursor_path(v)).name for v in (4, 6)]
        return [self.directory / name for name in names if remove(self.directory / name)]

    def release(self, addr: IPAddress) -> None:
        remove(self.directory / str(addr))

    def release_owner(self, owner: Owner, addresses: Iterable[str] = ()) -> list[IPAddress]:
        """Release the leases of `owner`; returns the addresses freed. `addresses`:
        where they are (the attachment record names them): then only those lease files
        are read, at the same cost whatever the number of leases. The whole directory
        is read when none of them is the owner's (no record, or a record that
        disagrees with the leases), or when no addresses are given."""
        freed = []
        for text in addresses:
            try:
                addr = ipaddress.ip_address(text)
                holder = Owner.decode((self.directory / str(addr)).read_bytes())
            except (ValueError, FileNotFoundError):
                continue
            if holder == owner:
                self.release(addr)
                freed.append(addr)
        if freed:
            return freed
        freed = [addr for addr, o in self.leases().items() if o == owner]
        for addr in freed:
            self.release(addr)
        return freed
