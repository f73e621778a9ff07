"""What the node runs: the periodic flush of every attachment's kernel counters into
the ledger (the agent's BillingFlusher, `sockgate billing flush`), and an
attachment's final record at DEL, written in whatever process serves the DEL (the
agent, or the plugin). The kernel counters are read under the ledger's lock, so two
writers can't interleave a read with the other's append."""
from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from netpolicy.ruleset import Endpoint
from runtime.billing.ledger import DEFAULT_MAX_BYTES, Ledger
from runtime.billing.schema import attachment_key, utcnow
from runtime.errors import IO_FAILURE, KERNEL_FAILURE, SockgateError
from runtime.fsutil import remove_stale_temps
from runtime.kernel import nft
from runtime.kernel.nft import Counters
from runtime.state.store import READY, Attachment, attachments, table_lock

if TYPE_CHECKING:
    from runtime.core.node import TableBackend

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0
DEL_CACHE_LAG = 1 << 20  # DEL leaves the cache up to this far behind (see Ledger.session)


def kernel_counters(table: TableBackend | None = None) -> dict[str, Counters]:
    """{host veth: Counters} for every attachment with elements in the counted sets,
    read in this thread's netns (the node's). No table: {}. A table whose sets can't
    be read is an error: "no counters" must never be mistaken for "nothing sent".
    `table`: the node's (runtime.core.node); default runtime.kernel.nft."""
    reader = table if table is not None else nft
    counted = reader.endpoint_counters()
    if counted is None:
        if not reader.table_exists():
            return {}
        raise SockgateError(KERNEL_FAILURE, "cannot read the accounting counters",
                            "nft list set inet sockgate tx4/tx6/rx failed")
    return counted


def default_billing_dir(state_dir: str | os.PathLike) -> str:
    return os.path.join(str(state_dir), "billing")


def billing_dir_of(conf: Any) -> str:
    """A network config's billing dir: billingDir, else <stateDir>/billing; "" = off."""
    return conf.billing_dir if conf.billing_dir is not None else default_billing_dir(conf.state_dir)


def flush(state_dir: str | os.PathLike, billing_dir: str | os.PathLike | None = None, *,
          ledger: Ledger | None = None,
          read_counters: Callable[[], Mapping[str, Counters]] = kernel_counters) -> list[dict]:
    """One record per attachment under state_dir whose counters moved since its last
    record; also closes keys whose attachment vanished without a final record, and
    drops finished keys from the checkpoint cache. Returns the records written."""
    ledger = ledger or Ledger(billing_dir or default_billing_dir(state_dir))
    with ledger.session() as s:
        listing = attachments(state_dir)
        for path in listing.unreadable:
            log.warning("billing: unreadable attachment record %s", path)
        # Only there can a missing record mean a finished attachment.
        networks = listing.complete()
        # Shared with ADD and DEL, never during a reload: a reload clears the segment
        # meter's counts of the elements it creates, then creates them (from zero), and
        # a read between the two would see a counter that went down.
        with table_lock(str(state_dir)):
            counters = read_counters()
        live = set()
        for att in listing.records:
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
    reader = table if table is not None else nft
    return reader.endpoint_counters_of(Endpoint(att.host_ifname, att.host_ifindex, att.ipv4, att.ipv6))


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
    at any moment loses nothing (see runtime.billing.ledger)."""

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

