"""Billing: the nft accounting counters of every attachment, turned into an append-only
JSON Lines ledger (schema in README, "Billing").

Exactness rests on one idea: the ledger itself is the checkpoint. Every record carries
the cumulative kernel counters it was computed from, so "what was already billed" for
an attachment is its last record in the files, nothing else. A record that reached
the disk (complete line, fsynced) advanced the checkpoint; a record that didn't (crash
before or during the write) didn't, and the same bytes are billed by the next record.
Nothing is lost and nothing is billed twice, whenever a process dies.

- One writer at a time: every append holds an flock on `billing.lock`, and the kernel
  counters are read *under* that lock, so two processes (the agent's periodic flush
  and a plugin running DEL) can't interleave a read with the other's append.
- A torn last line (kill -9 or ENOSPC during the write) is cut off before the next
  append; it was never billed, so its bytes are billed again by the next record.
- `checkpoint.json` caches the last record of each attachment and names the byte
  offset of the ledger it reflects (file inode, offset, a hash of the bytes before
  it). It is only a cache: a reader catches up from that offset, and rebuilds from
  all files when the cache is missing or doesn't match them. The periodic flush
  rewrites it; a DEL leaves it behind (up to DEL_CACHE_LAG) to stay cheap.
- Files: `billing.jsonl` is appended to; when it would pass the size limit, or the
  UTC day changed since its first record, it is renamed to
  `billing-<first record's end, YYYYMMDDTHHMMSSZ>.jsonl` and never written again.

Stdlib only, plus runtime.nft's transport (libnftables or the `nft` command): DEL
writes its final record in whatever process serves it (the agent, or the plugin).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from netpolicy.ruleset import Endpoint
from runtime import nft
from runtime.errors import IO_FAILURE, KERNEL_FAILURE, SockgateError
from runtime.fsutil import atomic_write, fsync_dir, locked, read_json, remove_stale_temps
from runtime.store import READY, Attachment

if TYPE_CHECKING:
    from runtime.node import TableBackend

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CURRENT = "billing.jsonl"
ROTATED_PREFIX = "billing-"
CHECKPOINT = "checkpoint.json"
LOCK = "billing.lock"
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_INTERVAL = 60.0
DEL_CACHE_LAG = 1 << 20  # DEL leaves the cache up to this far behind (see Ledger.session)
# Labels copied from the attachment into every record, when known.
LABELS = ("pod_namespace", "pod_name", "pod_uid", "container_name", "docker_container_id", "docker_network")
_TAIL = 64  # bytes hashed in the cache to recognise the ledger offset it reflects


# --- time --------------------------------------------------------------------------

def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def fmt_time(t: dt.datetime) -> str:
    """UTC, ISO 8601, milliseconds, "Z": 2024-05-01T12:00:00.123Z."""
    t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_time(text: str) -> dt.datetime:
    """ISO 8601; a time without a zone is UTC."""
    t = dt.datetime.fromisoformat(text.strip().replace("z", "Z"))
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


# --- counters ----------------------------------------------------------------------

@dataclass(frozen=True)
class Counters:
    """Cumulative counters of one attachment's set elements (tx4 + tx6, rx), and their
    generation: the token of the elements' creation ("" for elements of versions that
    had none; "?" when they disagree). A counter of another generation was re-created
    and counts from zero, whatever value it has reached."""

    tx_bytes: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    rx_packets: int = 0
    generation: str = ""

    @classmethod
    def of_record(cls, rec: Mapping[str, Any]) -> Counters:
        return cls(*(int(rec[f"counter_{f}"]) for f in FIELDS), generation=rec.get("counter_generation", ""))

    def __bool__(self) -> bool:
        return any(getattr(self, f) for f in FIELDS)


FIELDS = ("tx_bytes", "tx_packets", "rx_bytes", "rx_packets")
ZERO = Counters()


def kernel_counters(table: TableBackend | None = None) -> dict[str, Counters]:
    """{host veth: Counters} for every attachment with elements in the counted sets,
    read in this thread's netns (the node's). No table: {}. A table whose sets can't
    be read is an error: "no counters" must never be mistaken for "nothing sent".
    `table`: the node's (runtime.node); default runtime.nft."""
    table = table if table is not None else nft
    counted = table.endpoint_counters()
    if counted is None:
        if not table.table_exists():
            return {}
        raise SockgateError(KERNEL_FAILURE, "cannot read the accounting counters",
                            "nft list set inet sockgate tx4/tx6/rx failed")
    return {name: _from_kernel(c) for name, c in counted.items()}


def _from_kernel(c: nft.VethCounters) -> Counters:
    return Counters(c.tx_bytes, c.tx_packets, c.rx_bytes, c.rx_packets, c.generation)


# --- records -----------------------------------------------------------------------

def attachment_key(att: Attachment) -> str:
    """Identifies one attachment's life: a re-created attachment with the same ids has
    another `created`, hence another key and counters of its own."""
    return f"{att.network}/{att.container_id}/{att.ifname}/{att.created}"


_MARK_KEYS = frozenset({"attachment", "seq", "end", "network", *(f"counter_{f}" for f in FIELDS)})


def _valid(rec: Any) -> bool:
    return (isinstance(rec, dict) and isinstance(rec.get("attachment"), str) and isinstance(rec.get("seq"), int)
            and all(isinstance(rec.get(f"counter_{f}"), int) for f in FIELDS))


def _parse_line(line: bytes) -> dict | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if _valid(rec) else None


def _created(text: str) -> str | None:
    """An attachment's `created` as a record time, or None when it doesn't parse."""
    try:
        return fmt_time(parse_time(text)) if text else None
    except ValueError:
        return None


def _encode(rec: dict) -> bytes:
    return (json.dumps(rec, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


# --- the ledger --------------------------------------------------------------------

class Session:
    """One locked read-modify-append of the ledger (see Ledger.session). `marks` holds
    the last record of each attachment key: the billing checkpoint."""

    def __init__(self, ledger: Ledger, marks: dict[str, dict], now: dt.datetime) -> None:
        self.ledger = ledger
        self.marks = marks
        self.now = now
        self.pending: list[dict] = []
        self.dirty = False  # marks differ from the cache on disk

    def bill(self, att: Attachment, cur: Counters | None, *, final: bool = False) -> dict | None:
        """Queue the record of `att` for the interval since its last record. Periodic
        (final=False): only when something moved. Final: always, for every attachment
        that was ready (a DEL's rollback of a failed ADD excepted). cur None: the
        elements are gone."""
        key = attachment_key(att)
        mark = self.marks.get(key)
        notes: dict[str, bool] = {}
        base = Counters.of_record(mark) if mark else ZERO
        if cur is None:
            # No elements: nothing to read. A final record still closes the key: an
            # attachment whose elements went behind sockgate's back (a flushed table
            # that was never restored) may have carried traffic nobody can count now.
            if not final or (mark is not None and mark.get("final")):
                return None
            if mark is None and att.state != READY:
                return None  # a failed ADD's rollback: it never carried anything
            cur, notes["counters_missing"] = base, True
        if mark and mark.get("final"):
            if cur == base:
                return None  # the deleted link's frozen counters (a repeated DEL): billed already
            # Counters moved after a final record: the same key (same ids, `created`
            # in the same second) got a new element, which counts from zero.
            base, notes["counter_reset"] = ZERO, True
        elif mark and cur.generation != base.generation:
            # The elements were created again since the last record (a reloaded table
            # restored them): their counters started from zero, whatever they show now.
            # What was sent between that record and the reload is lost with the old
            # elements.
            base, notes["counter_reset"] = ZERO, True
        elif not mark and att.generation and cur.generation and cur.generation != att.generation:
            # The same before the first record: the elements are not the ones ADD
            # created. The deltas count from zero anyway; what ADD's elements counted
            # before the reload is lost, and the record must say so.
            notes["counter_reset"] = True
        deltas = {}
        for d in ("tx", "rx"):
            # bytes and packets are one counter: either going down means it was re-created
            b, p = f"{d}_bytes", f"{d}_packets"
            if getattr(cur, b) < getattr(base, b) or getattr(cur, p) < getattr(base, p):
                deltas[b], deltas[p], notes["counter_reset"] = getattr(cur, b), getattr(cur, p), True
            else:
                deltas[b], deltas[p] = getattr(cur, b) - getattr(base, b), getattr(cur, p) - getattr(base, p)
        if not any(deltas.values()) and not notes and not (final and (mark is not None or cur)):
            return None
        start = mark["end"] if mark else _created(att.created) or fmt_time(self.now)
        end = fmt_time(max(self.now, parse_time(start)))  # a clock step back never makes end < start
        rec: dict[str, Any] = {"v": SCHEMA_VERSION, "attachment": key, "seq": (mark["seq"] + 1) if mark else 1,
                               "start": start, "end": end, "node": self.ledger.node,
                               "network": att.network, "container_id": att.container_id, "ifname": att.ifname,
                               "netns": att.netns, "host_ifname": att.host_ifname, "attachment_created": att.created}
        rec.update({k: att.labels[k] for k in LABELS if att.labels.get(k)})
        rec.update(deltas)
        rec.update({f"counter_{f}": getattr(cur, f) for f in FIELDS})
        if cur.generation:
            rec["counter_generation"] = cur.generation
        rec["final"] = final
        rec.update(notes)
        self._queue(rec)
        return rec

    def close(self, key: str) -> dict | None:
        """Final record for a key whose attachment is gone without one (its DEL ran with
        billing off, or its record vanished): zero delta, the last counters again."""
        mark = self.marks.get(key)
        if mark is None or mark.get("final"):
            return None
        rec = dict(mark, seq=mark["seq"] + 1, start=mark["end"], node=self.ledger.node, final=True,
                   counters_missing=True, **{f: 0 for f in FIELDS})
        rec.pop("counter_reset", None)
        rec["end"] = fmt_time(max(self.now, parse_time(rec["start"])))
        self._queue(rec)
        return rec

    def forget(self, key: str) -> None:
        """Drop a finished key from the checkpoint cache (the files keep its records)."""
        if self.marks.pop(key, None) is not None:
            self.dirty = True

    def _queue(self, rec: dict) -> None:
        self.pending.append(rec)
        self.marks[rec["attachment"]] = rec


@dataclass
class _Snapshot:
    name: str
    fd: int
    size: int


class Ledger:
    """The billing files in one directory. See the module docstring."""

    def __init__(self, directory: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], dt.datetime] = utcnow, node: str | None = None) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.clock = clock
        self.node = node or socket.gethostname()
        self.current = self.dir / CURRENT
        self.cache_path = self.dir / CHECKPOINT

    # --- files ---
    def rotated(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"{ROTATED_PREFIX}*.jsonl") if p.is_file())

    def files(self) -> list[Path]:
        """Every ledger file, rotated ones first (oldest name first), then the current."""
        return self.rotated() + ([self.current] if self.current.exists() else [])

    @contextlib.contextmanager
    def session(self, cache_lag: int = 0) -> Iterator[Session]:
        """Lock, load the checkpoint (repairing a torn tail, catching up or rebuilding
        the cache), yield; on a clean exit append the queued records in one write,
        fsync, then refresh the cache if it is more than `cache_lag` bytes of ledger
        behind (DEL passes 1 MiB: the next session catches up from the cached offset,
        and the periodic flush refreshes it). On an exception nothing is appended."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with locked(self.dir / LOCK):
            marks, behind = self._load()
            s = Session(self, marks, self.clock())
            yield s
            if s.pending:
                behind += self._append(s.pending)
            if s.dirty or behind > cache_lag:
                self._save_cache(s.marks)

    # --- reading ---
    @staticmethod
    def _read_lines(path: Path, offset: int = 0, size: int | None = None, fd: int | None = None) -> Iterator[dict]:
        """Complete, valid records of a file from `offset`; an unterminated last line
        (an append in progress, or torn) is not a record."""
        own = fd is None
        if own:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return
        try:
            end = os.fstat(fd).st_size if size is None else size
            pos, rest = offset, b""
            while pos < end:
                chunk = os.pread(fd, min(1 << 20, end - pos), pos)
                if not chunk:
                    break
                pos += len(chunk)
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    rec = _parse_line(line)
                    if rec is not None:
                        yield rec
                    elif line.strip():
                        log.warning("billing: skipping an unreadable line in %s", path)
        finally:
            if own:
                os.close(fd)

    def records(self) -> Iterator[dict]:
        """Every record of every file, as of one consistent moment: the files are
        opened under the lock (a rotation can't slip between listing and reading),
        then read without it."""
        snaps: list[_Snapshot] = []
        if not self.dir.is_dir():
            return
        try:
            try:
                lock = locked(self.dir / LOCK)
                lock.__enter__()
            except OSError:  # a read-only copy of a billing dir: nobody appends there
                lock = None
            try:
                for path in self.files():
                    fd = os.open(path, os.O_RDONLY)
                    snaps.append(_Snapshot(str(path), fd, os.fstat(fd).st_size))
            finally:
                if lock is not None:
                    lock.__exit__(None, None, None)
            for snap in snaps:
                yield from self._read_lines(Path(snap.name), 0, snap.size, snap.fd)
        finally:
            for snap in snaps:
                os.close(snap.fd)

    # --- checkpoint ---
    @staticmethod
    def _apply(marks: dict[str, dict], rec: dict) -> None:
        old = marks.get(rec["attachment"])
        if old is None or rec["seq"] > old["seq"]:
            marks[rec["attachment"]] = rec

    def _tail_hash(self, fd: int, offset: int) -> str:
        start = max(0, offset - _TAIL)
        return hashlib.sha256(os.pread(fd, offset - start, start)).hexdigest()

    def _load(self) -> tuple[dict[str, dict], float]:
        """(marks, how far the cache on disk is behind them: bytes of ledger, inf when
        it must be rewritten). Caller holds the lock."""
        self._repair_tail()
        try:
            cache = read_json(self.cache_path)
        except (OSError, ValueError):
            cache = False  # unreadable: rebuilt below
        caught = self._catch_up(cache) if isinstance(cache, dict) and cache.get("version") == SCHEMA_VERSION else None
        if caught is not None:
            return caught
        files = self.files()
        if cache is None and not files:
            return {}, 0  # a new ledger
        log.warning("billing: checkpoint cache in %s missing or stale; rebuilding it from the files", self.dir)
        marks: dict[str, dict] = {}
        for path in files:
            for rec in self._read_lines(path):
                self._apply(marks, rec)
        return marks, math.inf

    def _catch_up(self, cache: dict) -> tuple[dict[str, dict], float] | None:
        """The cached marks plus every record appended after the cached offset, or
        None when the cache doesn't describe these files."""
        try:
            marks = cache["marks"]
            if not all(isinstance(v, dict) and _MARK_KEYS <= v.keys() for v in marks.values()):
                return None
            ino, offset, tail = int(cache["file"]["ino"]), int(cache["file"]["offset"]), cache["file"]["tail"]
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        chain: list[Path] = []
        if self.current.exists() and self.current.stat().st_ino == ino:
            chain = [self.current]
        else:
            # Rotated after the cache was written (crash before the refresh).
            owner = next((p for p in self.rotated() if p.stat().st_ino == ino), None)
            if owner is None:
                return None
            chain = [owner] + ([self.current] if self.current.exists() else [])
        with open(chain[0], "rb") as fh:
            if os.fstat(fh.fileno()).st_size < offset or self._tail_hash(fh.fileno(), offset) != tail:
                return None
        # Caught up within the current file: that many bytes behind. Across a rotation:
        # rewrite the cache, so it names the current file again.
        behind: float = math.inf if chain[0] != self.current else self.current.stat().st_size - offset
        for i, path in enumerate(chain):
            for rec in self._read_lines(path, offset if i == 0 else 0):
                self._apply(marks, rec)
        return marks, behind

    def _save_cache(self, marks: dict[str, dict]) -> None:
        try:
            fd = os.open(self.current, os.O_RDONLY | os.O_CREAT, 0o600)
            try:
                st = os.fstat(fd)
                where = {"name": CURRENT, "ino": st.st_ino, "offset": st.st_size,
                         "tail": self._tail_hash(fd, st.st_size)}
            finally:
                os.close(fd)
            write_cache(self.cache_path, json.dumps({"version": SCHEMA_VERSION, "file": where, "marks": marks},
                                                    separators=(",", ":")).encode())
        except OSError:
            # Only a cache: the next session catches up from the older one, or rebuilds.
            log.exception("billing: cannot write the checkpoint cache %s", self.cache_path)

    # --- writing ---
    def _repair_tail(self) -> None:
        """Cut an unterminated or unreadable last line of the current file: the write
        that made it died (kill -9, ENOSPC, power loss), so it was never billed."""
        try:
            fd = os.open(self.current, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            size = os.fstat(fd).st_size
            end = size
            while end > 0:
                start = _line_start(fd, end)
                line = os.pread(fd, end - start, start)
                if line.endswith(b"\n") and _parse_line(line) is not None:
                    break
                end = start
            if end < size:
                log.warning("billing: cutting a torn tail of %d bytes from %s (not billed; billed again next)",
                            size - end, self.current)
                os.ftruncate(fd, end)
                os.fsync(fd)
        finally:
            os.close(fd)

    def _first_record(self) -> dict | None:
        try:
            with open(self.current, "rb") as fh:
                return _parse_line(fh.readline())
        except FileNotFoundError:
            return None

    def _maybe_rotate(self, incoming: int, now: dt.datetime) -> bool:
        try:
            size = self.current.stat().st_size
        except FileNotFoundError:
            return False
        if size == 0:
            return False
        first = self._first_record()
        first_end = parse_time(first["end"]) if first and isinstance(first.get("end"), str) else now
        if size + incoming <= self.max_bytes and first_end.date() == now.date():
            return False
        stem = ROTATED_PREFIX + first_end.strftime("%Y%m%dT%H%M%SZ")
        target, n = self.dir / f"{stem}.jsonl", 0
        while target.exists():  # never overwrite a rotated file
            n += 1
            target = self.dir / f"{stem}-{n}.jsonl"
        os.rename(self.current, target)
        fsync_dir(self.dir)
        log.info("billing: rotated %s to %s", self.current, target.name)
        return True

    def _append(self, recs: list[dict]) -> float:
        """Bytes appended (inf after a rotation: the cache must be re-anchored)."""
        data = b"".join(_encode(r) for r in recs)
        now = self.clock()
        rotated = self._maybe_rotate(len(data), now)
        created = not self.current.exists()
        fd = os.open(self.current, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:  # one write() in practice; a short one is torn until finished
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.dir)
        return math.inf if rotated else len(data)


def write_cache(path: Path, data: bytes) -> None:
    """The checkpoint, atomically and durably (fsutil.atomic_write: temp, fsync,
    rename, fsync the dir). A temp file left by a writer killed mid-write is removed
    by the next checkpoint write. `data` is json.dumps' (json.dump to a file takes the
    pure-Python encoder, ten times slower on a cache of a thousand attachments)."""
    atomic_write(path, data, mode=0o600)


def _line_start(fd: int, end: int) -> int:
    """Offset of the first byte of the line ending at `end` (exclusive; the byte at
    end-1 may be that line's own newline)."""
    pos = end - 1
    while pos > 0:
        lo = max(0, pos - 65536)
        chunk = os.pread(fd, pos - lo, lo)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return 0


# --- what the node runs ----------------------------------------------------------

def default_billing_dir(state_dir: str | os.PathLike) -> str:
    return os.path.join(str(state_dir), "billing")


def billing_dir_of(conf: Any) -> str:
    """A network config's billing dir: billingDir, else <stateDir>/billing; "" = off."""
    return conf.billing_dir if conf.billing_dir is not None else default_billing_dir(conf.state_dir)


def _attachments(state_dir: str | os.PathLike) -> tuple[set[str], list[Attachment]]:
    """(networks whose attachment records were all readable, every readable record)."""
    complete, out = set(), []
    root = Path(state_dir) / "networks"
    for net_dir in sorted(root.iterdir()) if root.is_dir() else []:
        ok = True
        for path in sorted((net_dir / "attachments").glob("*.json")):
            try:
                data = read_json(path)
                if data:
                    out.append(Attachment(**data))
            except (OSError, ValueError, TypeError):
                log.warning("billing: unreadable attachment record %s", path)
                ok = False
        if ok:
            complete.add(net_dir.name)
    return complete, out


def flush(state_dir: str | os.PathLike, billing_dir: str | os.PathLike | None = None, *,
          ledger: Ledger | None = None,
          read_counters: Callable[[], Mapping[str, Counters]] = kernel_counters) -> list[dict]:
    """One record per attachment under state_dir whose counters moved since its last
    record; also closes keys whose attachment vanished without a final record, and
    drops finished keys from the checkpoint cache. Returns the records written."""
    ledger = ledger or Ledger(billing_dir or default_billing_dir(state_dir))
    with ledger.session() as s:
        networks, atts = _attachments(state_dir)
        counters = read_counters()
        live = set()
        for att in atts:
            if att.created:  # no `created`, no key (never written by this version)
                live.add(attachment_key(att))
                s.bill(att, counters.get(att.host_ifname))
        for key, mark in list(s.marks.items()):
            if key in live or mark.get("network") not in networks:
                continue
            # Its record is gone, so its DEL finished: nothing can count for it again.
            if mark.get("final"):
                s.forget(key)
            else:
                log.warning("billing: %s ended without a final record; closing it", key)
                s.close(key)
    return s.pending


def attachment_counters(att: Attachment, table: TableBackend | None = None) -> Counters | None:
    """One attachment's counters, reading only its own elements (a DEL's cost must not
    grow with the node); None when its elements are gone. Without the veth's index (a
    record that never got it) the sets are listed and searched by name."""
    if not att.host_ifindex or not att.ipv4 or not att.ipv6:
        return kernel_counters(table).get(att.host_ifname)
    c = (table if table is not None else nft).endpoint_counters_of(Endpoint(att.host_ifname, att.host_ifindex, att.ipv4, att.ipv6))
    return _from_kernel(c) if c is not None else None


def final_record(conf: Any, att: Attachment, *,
                 read_counters: Callable[[], Mapping[str, Counters]] | None = None,
                 clock: Callable[[], dt.datetime] = utcnow, table: TableBackend | None = None) -> dict | None:
    """The last record of an attachment, at DEL, after its link is gone (no more
    packets) and before its elements (and their counters) are. Raises when it can't
    be written, so DEL fails and the runtime's retry bills it; only a failed ADD's
    rollback (state not ready) goes on without it."""
    directory = billing_dir_of(conf)
    if not directory:
        return None
    if not att.created:
        return None  # rebuilt without its record (see attach._orphan): nothing to key it by
    try:
        with Ledger(directory, clock=clock).session(cache_lag=DEL_CACHE_LAG) as s:
            cur = read_counters().get(att.host_ifname) if read_counters else attachment_counters(att, table)
            return s.bill(att, cur, final=True)
    except (OSError, ValueError, SockgateError) as exc:
        if att.state != READY:
            log.warning("billing: no final record for %s (rollback): %s", attachment_key(att), exc)
            return None
        if isinstance(exc, SockgateError):
            raise
        raise SockgateError(IO_FAILURE, "cannot write the final billing record",
                            f"{directory}: {exc}") from exc


class BillingFlusher:
    """Flushes every `interval` seconds (on wall-clock multiples of it, so records of
    all attachments share their boundaries) and once more when `stop` is set. The
    node agent runs it in a thread; each flush is one locked session, so a kill -9
    at any moment loses nothing (see the module docstring)."""

    def __init__(self, state_dir: str | os.PathLike, billing_dir: str | os.PathLike | None = None,
                 interval: float = DEFAULT_INTERVAL, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 clock: Callable[[], dt.datetime] = utcnow,
                 read_counters: Callable[[], Mapping[str, Counters]] = kernel_counters) -> None:
        if interval <= 0:
            raise ValueError(f"billing interval must be positive, got {interval}")
        self.state_dir = str(state_dir)
        self.ledger = Ledger(billing_dir or default_billing_dir(state_dir), max_bytes=max_bytes, clock=clock)
        self.interval = interval
        self.read_counters = read_counters
        self.errors = 0

    def flush(self) -> list[dict]:
        return flush(self.state_dir, ledger=self.ledger, read_counters=self.read_counters)

    def _flush_logged(self) -> None:
        try:
            written = self.flush()
            log.debug("billing: %d record(s) written", len(written))
        except Exception:  # retried next interval: nothing is lost meanwhile
            self.errors += 1
            log.exception("billing: flush failed; retrying next interval")

    def run(self, stop: threading.Event) -> None:
        # Checkpoint temp files that versions before fsutil's locked temp names left
        # when killed mid-write (today's name is cleared by the next checkpoint).
        remove_stale_temps(self.ledger.dir)
        while not stop.wait(self.interval - (time.time() % self.interval)):
            self._flush_logged()
        self._flush_logged()  # at shutdown


# --- reading it back -------------------------------------------------------------

GROUPINGS = ("pod", "container", "attachment")


def group_of(rec: Mapping[str, Any], by: str) -> str:
    if by == "attachment":
        return rec["attachment"]
    if by == "pod" and rec.get("pod_name"):
        return f"{rec.get('pod_namespace', '')}/{rec['pod_name']}"
    if by == "pod" and rec.get("container_name"):
        return rec["container_name"]
    return str(rec.get("container_id", ""))


@dataclass
class ReportRow:
    group: str
    tx_bytes: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    rx_packets: int = 0
    records: int = 0


def report(records: Iterable[Mapping[str, Any]], *, by: str = "pod", since: dt.datetime | None = None,
           until: dt.datetime | None = None) -> tuple[list[ReportRow], int]:
    """Sums per group of the records whose interval ends in (since, until]. Returns
    the rows (sorted by group) and how many duplicate (attachment, seq) records were
    ignored (always 0 for a ledger written by this module)."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}")
    rows: dict[str, ReportRow] = {}
    seen: set[tuple[str, int]] = set()
    dups = 0
    for rec in records:
        ident = (rec["attachment"], rec["seq"])
        if ident in seen:
            dups += 1
            continue
        seen.add(ident)
        end = parse_time(rec["end"])
        if (since is not None and end <= since) or (until is not None and end > until):
            continue
        row = rows.setdefault(group_of(rec, by), ReportRow(group_of(rec, by)))
        for f in FIELDS:
            setattr(row, f, getattr(row, f) + int(rec.get(f, 0)))
        row.records += 1
    return [rows[g] for g in sorted(rows)], dups


def format_report(rows: list[ReportRow], by: str) -> str:
    total = ReportRow("total")
    for row in rows:
        for f in (*FIELDS, "records"):
            setattr(total, f, getattr(total, f) + getattr(row, f))
    head = (by, *FIELDS, "records")
    table = [head] + [(r.group, *(str(getattr(r, f)) for f in (*FIELDS, "records"))) for r in [*rows, total]]
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in table)
