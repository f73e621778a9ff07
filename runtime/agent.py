"""`sockgate agent`: the node agent. It serves CNI requests forwarded by the shim on a
root-only unix socket (the same handler the shim would run in-process), and runs the
node's background work: keeping exception hostnames resolved, idle reclaim, billing.

Foreground, for systemd (Type=notify) and containers: logs are JSON lines on stderr,
readiness is sd_notify READY=1 (and an optional ready file), SIGTERM finishes the
requests in flight, flushes what must be flushed, removes the socket and exits 0.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from cni_plugin import wire
from cni_plugin.shim import AGENT_SOCKET, execute

log = logging.getLogger("sockgate.agent")
MAX_REQUEST_BYTES = 4 << 20


class Component(Protocol):
    """Background work: runs until `stop` is set, then returns (after a last flush)."""

    def run(self, stop: threading.Event) -> None: ...


@dataclass
class AgentConfig:
    state_dir: str = "/var/lib/sockgate"
    run_dir: str = "/run/sockgate"
    policy_file: str = "/etc/sockgate/policy.json"
    ready_file: str = ""
    metrics_address: str = "127.0.0.1:9464"
    # The Docker door (runtime/docker_driver.py, served by docker_http.py): Docker's remote network driver
    # protocol on this socket ("" = off; production: /run/docker/plugins/sockgate.sock),
    # and dockerd's API, asked in the background who owns an endpoint.
    docker_socket: str = ""
    docker_host: str = "unix:///var/run/docker.sock"
    components: list[tuple[str, Callable[["AgentConfig"], Component]]] = field(default_factory=list)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging() -> None:
    logging.Formatter.converter = time.gmtime
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


class _Handler(socketserver.StreamRequestHandler):
    observe: Callable[[str, int, float], None] = staticmethod(lambda command, rc, seconds: None)

    def handle(self) -> None:
        started = time.monotonic()
        raw = self.rfile.read(MAX_REQUEST_BYTES)
        try:
            env, stdin = wire.decode_request(raw)
        except ValueError as exc:
            self.wfile.write(wire.encode_reply(1, json.dumps(
                {"cniVersion": "1.1.0", "code": 6, "msg": "malformed request to the agent",
                 "details": str(exc)})))
            return
        rc, out = execute(env, stdin)
        self.wfile.write(wire.encode_reply(rc, out))
        self.observe(env.get("CNI_COMMAND", "?"), rc, time.monotonic() - started)
        log.info("%s %s/%s rc=%d in %.1f ms", env.get("CNI_COMMAND"), env.get("CNI_CONTAINERID", ""),
                 env.get("CNI_IFNAME", ""), rc, (time.monotonic() - started) * 1000)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = False  # shutdown waits for requests in flight
    block_on_close = True
    # socketserver's default backlog is 5: a burst of container starts (a node taking
    # a deployment's pods) would overflow it, and a full backlog refuses a unix
    # socket's connect at once (EAGAIN) instead of queueing it.
    request_queue_size = 512


def _notify(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), path)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


def _bind(path: Path) -> _Server:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    if path.exists():
        # A socket left by a killed agent: refuse to steal a live one.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise SystemExit(f"another sockgate agent is listening on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        finally:
            probe.close()
    old = os.umask(0o177)  # root-only socket
    try:
        return _Server(str(path), _Handler)
    finally:
        os.umask(old)


def _start_metrics(cfg: AgentConfig, reclaims: Callable[[], dict] | None) -> None:
    if not cfg.metrics_address:
        return
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from runtime.metrics import SockgateCollector, serve
    registry = CollectorRegistry()
    requests = Counter("sockgate_cni_requests", "CNI requests served by the agent", ["command", "result"],
                       registry=registry)
    latency = Histogram("sockgate_cni_request_seconds", "Time to serve a CNI request", ["command"],
                        registry=registry, buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5))

    def observe(command: str, rc: int, seconds: float) -> None:
        requests.labels(command, "ok" if rc == 0 else "error").inc()
        latency.labels(command).observe(seconds)

    _Handler.observe = staticmethod(observe)
    serve(cfg.metrics_address, SockgateCollector(cfg.state_dir, reclaims), registry)


def run_agent(cfg: AgentConfig, reclaims: Callable[[], dict] | None = None) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sock_path = Path(cfg.run_dir) / AGENT_SOCKET
    server = _bind(sock_path)
    # Components stop only after the last request finished: a DEL in flight may still
    # hand work to them (a link to reap, a final billing record).
    background = threading.Event()
    workers = []
    components = list(cfg.components)
    if cfg.docker_socket:
        from runtime.docker_http import docker_component
        components.append(("docker", docker_component))
    for name, factory in components:
        component = factory(cfg)
        thread = threading.Thread(target=_guarded, args=(name, component, background), name=name)
        thread.start()
        workers.append(thread)
    _start_metrics(cfg, reclaims)
    serving = threading.Thread(target=server.serve_forever, name="rpc", kwargs={"poll_interval": 0.2})
    serving.start()
    if cfg.ready_file:
        Path(cfg.ready_file).write_text(str(os.getpid()))
    _notify("READY=1")
    log.info("ready: serving CNI requests on %s (pid %d)", sock_path, os.getpid())
    stop.wait()
    log.info("shutting down")
    _notify("STOPPING=1")
    server.shutdown()      # no new requests; serve_forever returns
    server.server_close()  # waits for the requests in flight
    serving.join()
    sock_path.unlink(missing_ok=True)
    background.set()
    for thread in workers:
        thread.join()
    if cfg.ready_file:
        Path(cfg.ready_file).unlink(missing_ok=True)
    log.info("stopped")
    return 0


def _guarded(name: str, component: Component, stop: threading.Event) -> None:
    """A component that crashes is logged and restarted: the agent keeps serving CNI."""
    while not stop.is_set():
        try:
            component.run(stop)
            return
        except Exception:
            log.exception("component %s failed; restarting in 5 s", name)
            stop.wait(5)
