"""Who owns a Docker endpoint: asked of dockerd in the background, because Docker
tells a network driver only endpoint ids. The answer (container id and name, the
network's name) goes to the driver, which writes it into the attachment's labels
(billing reads them from there). Runs in its own thread with its own timeouts: never
from a handler."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from runtime.docker.store import DockerStore, EndpointRecord

log = logging.getLogger("sockgate.docker")

IDENTITY_GIVE_UP_S = 600.0


class IdentityResolver:
    """`record(endpoint id, container id, container name, network name)` is called
    once per joined endpoint whose container dockerd names."""

    def __init__(self, store: DockerStore, docker_host: str,
                 record: Callable[[str, str, str, str], None]) -> None:
        self.store = store
        self.docker_host = docker_host
        self.record = record
        self.pending: queue.Queue[str] = queue.Queue()
        self._client: Any = None

    def enqueue(self, eid: str) -> None:
        self.pending.put(eid)

    def _docker(self) -> Any:
        if self._client is None:
            import docker  # deferred: only the Docker door needs it
            self._client = docker.APIClient(base_url=self.docker_host, version="auto", timeout=10)
        return self._client

    def lookup(self, ep: EndpointRecord) -> tuple[str, str, str] | None:
        """(container id, container name, network name), or None if not (yet) known."""
        api = self._docker()
        net_name = api.inspect_network(ep.network_id).get("Name", "")
        for c in api.containers(all=True, filters={"network": ep.network_id}):
            for settings in ((c.get("NetworkSettings") or {}).get("Networks") or {}).values():
                if settings.get("EndpointID") == ep.id:
                    names = c.get("Names") or [""]
                    return c["Id"], names[0].lstrip("/"), net_name
        return None

    def run(self, stop: threading.Event) -> None:
        waiting: dict[str, list[float]] = {}  # eid -> [next try, first seen, tries]
        while not stop.is_set():
            now = time.monotonic()
            for eid, entry in list(waiting.items()):
                due, since, tries = entry
                if due > now:
                    continue
                ep = self.store.endpoints.get(eid)
                if ep is None or ep.state != "joined" or ep.container_id:
                    del waiting[eid]
                    continue
                try:
                    found = self.lookup(ep)
                except Exception as exc:
                    log.info("asking dockerd about endpoint %s: %s", eid[:12], exc)
                    self._client = None
                    found = None
                if found:
                    try:
                        self.record(eid, *found)
                    except Exception:
                        log.exception("recording the container of endpoint %s failed", eid[:12])
                    del waiting[eid]
                elif now - since > IDENTITY_GIVE_UP_S:
                    log.warning("no container found for endpoint %s; billing goes without its name", eid[:12])
                    del waiting[eid]
                else:
                    # Docker records the endpoint in the container's settings once the
                    # container started: retry quickly for a while, then back off.
                    entry[:] = [now + (0.2 if tries < 50 else min(10.0, 0.2 * 2 ** (tries - 50))), since, tries + 1]
            wait = min((e[0] for e in waiting.values()), default=now + 1.0) - time.monotonic()
            try:
                eid = self.pending.get(timeout=max(0.02, min(1.0, wait)))
                waiting.setdefault(eid, [0.0, time.monotonic(), 0])
            except queue.Empty:
                pass
